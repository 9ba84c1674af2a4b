//! Rolling 10-second buckets over the last 24 hours: records, errors and
//! conflicts counted, and the highest lag seen. Pure: every call takes `now`.

use serde_json::json;

/// Width of one bucket.
pub const BUCKET_MS: u64 = 10_000;
/// Buckets kept: 24 hours.
pub const BUCKETS: usize = 8_640;
/// The chart's window: the last hour.
pub const CHART_MS: u64 = 3_600_000;

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// `unix_ms / BUCKET_MS` of the bucket this slot holds now.
    index: u64,
    records: u64,
    errors: u64,
    conflicts: u64,
    /// Highest lag sample in the bucket (negative: none).
    lag_max_seconds: f64,
}

/// Throughput in records per second.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Throughput {
    /// Over the last 10-20 seconds (the previous and the current bucket).
    pub now_records_per_second: f64,
    /// Over the time covered (since start, at most 24 hours).
    pub average_records_per_second: f64,
    /// The highest 10-second rate in the time covered.
    pub peak_records_per_second: f64,
}

/// Totals over the last 24 hours (or since start, if shorter).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Records synced.
    pub records: u64,
    /// Sync errors.
    pub errors: u64,
    /// Conflicts.
    pub conflicts: u64,
}

/// One point of the chart.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Start of the bucket, Unix ms.
    pub at_unix_ms: u64,
    /// Records per second in the bucket.
    pub records_per_second: f64,
    /// Highest lag sampled in the bucket, if any.
    pub lag_seconds: Option<f64>,
}

/// The rolling series. See the module docs.
#[derive(Clone, Debug)]
pub struct Series {
    buckets: Vec<Bucket>,
    started_ms: u64,
}

impl Series {
    /// An empty series starting at `now_ms`.
    pub fn new(now_ms: u64) -> Series {
        Series {
            buckets: vec![Bucket::default(); BUCKETS],
            started_ms: now_ms,
        }
    }

    fn slot(&mut self, now_ms: u64) -> &mut Bucket {
        let index = now_ms / BUCKET_MS;
        let b = &mut self.buckets[(index % BUCKETS as u64) as usize];
        if b.index != index {
            *b = Bucket {
                index,
                lag_max_seconds: -1.0,
                ..Bucket::default()
            };
        }
        b
    }

    fn get(&self, index: u64) -> Option<&Bucket> {
        let b = &self.buckets[(index % BUCKETS as u64) as usize];
        (b.index == index).then_some(b)
    }

    /// Counts records, errors and conflicts at `now_ms`.
    pub fn add(&mut self, now_ms: u64, records: u64, errors: u64, conflicts: u64) {
        if records == 0 && errors == 0 && conflicts == 0 {
            return;
        }
        let b = self.slot(now_ms);
        b.records += records;
        b.errors += errors;
        b.conflicts += conflicts;
    }

    /// Records a lag sample (finite, ≥ 0) at `now_ms`.
    pub fn lag(&mut self, now_ms: u64, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let b = self.slot(now_ms);
        b.lag_max_seconds = b.lag_max_seconds.max(seconds);
    }

    /// Index range (first, last] of complete and current buckets in the
    /// last 24 hours, not before the start.
    fn range(&self, now_ms: u64, span_ms: u64) -> std::ops::RangeInclusive<u64> {
        let last = now_ms / BUCKET_MS;
        let first = (now_ms.saturating_sub(span_ms) / BUCKET_MS + 1)
            .max(self.started_ms / BUCKET_MS)
            .min(last);
        first..=last
    }

    /// The part of bucket `i` covered between the start and `now_ms`
    /// (at least a second).
    fn span_ms(&self, i: u64, now_ms: u64) -> u64 {
        let from = (i * BUCKET_MS).max(self.started_ms);
        let to = ((i + 1) * BUCKET_MS).min(now_ms);
        to.saturating_sub(from).max(1_000)
    }

    /// Throughput now, on average and at its peak. Each bucket's rate is
    /// over the part of it covered since the start (at least a second).
    pub fn throughput(&self, now_ms: u64) -> Throughput {
        let last = now_ms / BUCKET_MS;
        let span = |i: u64| self.span_ms(i, now_ms);
        let records = |i: u64| self.get(i).map(|b| b.records).unwrap_or(0);
        let first = self.range(now_ms, BUCKETS as u64 * BUCKET_MS);
        let now_rate = if last > *first.start() {
            (records(last) + records(last - 1)) as f64 * 1000.0
                / (span(last) + span(last - 1)) as f64
        } else {
            records(last) as f64 * 1000.0 / span(last) as f64
        };
        let mut total = 0u64;
        let mut peak = now_rate;
        for i in first {
            total += records(i);
            if i < last {
                peak = peak.max(records(i) as f64 * 1000.0 / span(i) as f64);
            }
        }
        let covered_ms = now_ms
            .saturating_sub(self.started_ms)
            .clamp(1_000, BUCKETS as u64 * BUCKET_MS);
        let average = total as f64 * 1000.0 / covered_ms as f64;
        Throughput {
            now_records_per_second: now_rate,
            average_records_per_second: average,
            // The highest 10-second rate is never below the average.
            peak_records_per_second: peak.max(average),
        }
    }

    /// Totals of the last 24 hours.
    pub fn last_24h(&self, now_ms: u64) -> Totals {
        let mut t = Totals::default();
        for i in self.range(now_ms, BUCKETS as u64 * BUCKET_MS) {
            if let Some(b) = self.get(i) {
                t.records += b.records;
                t.errors += b.errors;
                t.conflicts += b.conflicts;
            }
        }
        t
    }

    /// The chart of the last hour: one point per bucket since the start.
    pub fn chart(&self, now_ms: u64) -> Vec<Point> {
        self.range(now_ms, CHART_MS)
            .map(|i| {
                let b = self.get(i);
                Point {
                    at_unix_ms: i * BUCKET_MS,
                    records_per_second: b.map(|b| b.records).unwrap_or(0) as f64 * 1000.0
                        / self.span_ms(i, now_ms) as f64,
                    lag_seconds: b.map(|b| b.lag_max_seconds).filter(|l| *l >= 0.0),
                }
            })
            .collect()
    }

    /// The chart as JSON: `[{"t": unix_ms, "rps": f64, "lag": f64|null}]`.
    pub fn chart_json(&self, now_ms: u64) -> serde_json::Value {
        serde_json::Value::Array(
            self.chart(now_ms)
                .into_iter()
                .map(|p| json!({"t": p.at_unix_ms, "rps": p.records_per_second, "lag": p.lag_seconds}))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_totals_and_chart() {
        let t0 = 1_000_000_000;
        let mut s = Series::new(t0);
        s.add(t0 + 1_000, 100, 1, 2);
        s.add(t0 + 15_000, 50, 0, 0);
        s.lag(t0 + 15_000, 0.5);
        s.lag(t0 + 16_000, 0.2);
        s.lag(t0 + 16_000, f64::NAN);
        let tp = s.throughput(t0 + 25_000);
        assert!(tp.peak_records_per_second >= 10.0, "{tp:?}");
        assert!(tp.average_records_per_second > 0.0);
        assert!(tp.now_records_per_second > 0.0);
        assert_eq!(
            s.last_24h(t0 + 25_000),
            Totals {
                records: 150,
                errors: 1,
                conflicts: 2
            }
        );
        let chart = s.chart(t0 + 25_000);
        assert!(chart.iter().any(|p| p.lag_seconds == Some(0.5)));
        assert_eq!(
            chart.iter().map(|p| p.records_per_second).sum::<f64>(),
            15.0
        );
        // A day later everything rolled out.
        let later = t0 + 25_000 + 86_400_000;
        assert_eq!(s.last_24h(later), Totals::default());
        assert!(s.chart(later).iter().all(|p| p.records_per_second == 0.0));
    }
}
