//! Progress of long work, such as a node catching up after being offline:
//! [`Tracker`] (pure) decides when work is long enough to report and what
//! to report; [`Progress`] shows it as an `indicatif` bar with rows, rate and
//! ETA when stderr is a terminal, and as a log line every few seconds when
//! it is not.

use std::io::IsTerminal;

/// Work smaller than this many ops is not reported.
pub const MIN_OPS: u64 = 1_000;
/// Interval between log lines (when stderr is not a terminal).
pub const LOG_EVERY_MS: u64 = 2_000;

/// What to report.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    /// Long work began.
    Started {
        /// Ops to do.
        total: u64,
    },
    /// Periodic update.
    Update {
        /// Ops done since the start.
        done: u64,
        /// Ops to do in all (may grow while running).
        total: u64,
        /// Ops per second since the start.
        rate_ops_per_second: f64,
        /// Seconds left at that rate (None while the rate is 0).
        eta_seconds: Option<f64>,
    },
    /// Everything is done.
    Finished {
        /// Ops done.
        done: u64,
        /// Seconds it took.
        seconds: f64,
    },
}

/// Follows `done` toward `target` (both absolute counters).
#[derive(Clone, Debug, Default)]
pub struct Tracker {
    active: Option<(u64, u64)>, // (start_ms, done at start)
    last_report_ms: u64,
}

impl Tracker {
    /// Position now; returns what to report, if anything.
    pub fn observe(&mut self, now_ms: u64, done: u64, target: u64) -> Option<Report> {
        let remaining = target.saturating_sub(done);
        match self.active {
            None if remaining >= MIN_OPS => {
                self.active = Some((now_ms, done));
                self.last_report_ms = now_ms;
                Some(Report::Started { total: remaining })
            }
            None => None,
            Some((start_ms, start_done)) => {
                let seconds = now_ms.saturating_sub(start_ms) as f64 / 1000.0;
                let did = done.saturating_sub(start_done);
                if remaining == 0 {
                    self.active = None;
                    return Some(Report::Finished { done: did, seconds });
                }
                if now_ms.saturating_sub(self.last_report_ms) < LOG_EVERY_MS {
                    return None;
                }
                self.last_report_ms = now_ms;
                let rate = if seconds > 0.0 {
                    did as f64 / seconds
                } else {
                    0.0
                };
                Some(Report::Update {
                    done: did,
                    total: target.saturating_sub(start_done),
                    rate_ops_per_second: rate,
                    eta_seconds: (rate > 0.0).then(|| remaining as f64 / rate),
                })
            }
        }
    }

    /// (ops done, ops in all) since the start, while active.
    pub fn position(&self, done: u64, target: u64) -> Option<(u64, u64)> {
        self.active
            .map(|(_, start)| (done.saturating_sub(start), target.saturating_sub(start)))
    }
}

/// A [`Tracker`] shown to a person.
#[derive(Debug)]
pub struct Progress {
    who: String,
    what: &'static str,
    tracker: Tracker,
    bar: Option<indicatif::ProgressBar>,
    terminal: bool,
}

impl Progress {
    /// Progress of `what` (e.g. "catching up") on `who` (e.g. a node name).
    pub fn new(who: &str, what: &'static str) -> Progress {
        Progress {
            who: who.to_owned(),
            what,
            tracker: Tracker::default(),
            bar: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// Position now (absolute counters).
    pub fn observe(&mut self, now_ms: u64, done: u64, target: u64) {
        let report = self.tracker.observe(now_ms, done, target);
        if let (Some(bar), Some((pos, len))) = (&self.bar, self.tracker.position(done, target)) {
            bar.set_length(len);
            bar.set_position(pos);
        }
        let Some(report) = report else { return };
        let who = self.who.as_str();
        match report {
            Report::Started { total } => {
                if self.terminal {
                    let bar = indicatif::ProgressBar::new(total);
                    if let Ok(style) = indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:40}] {human_pos}/{human_len} ops  {per_sec}  ETA {eta}",
                    ) {
                        bar.set_style(style.progress_chars("=> "));
                    }
                    bar.set_message(format!("{who}: {}", self.what));
                    self.bar = Some(bar);
                }
                tracing::info!(node = who, ops = total, "{}: {total} ops to go", self.what);
            }
            Report::Update {
                done,
                total,
                rate_ops_per_second,
                eta_seconds,
            } => {
                if self.bar.is_none() {
                    let eta = eta_seconds
                        .map(|s| format!("{s:.0} s"))
                        .unwrap_or_else(|| "unknown".to_owned());
                    tracing::info!(
                        node = who,
                        done,
                        total,
                        rate_ops_per_second = rate_ops_per_second.round(),
                        "{}: {done}/{total} ops, {rate_ops_per_second:.0} ops/s, ETA {eta}",
                        self.what
                    );
                }
            }
            Report::Finished { done, seconds } => {
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
                tracing::info!(
                    node = who,
                    ops = done,
                    seconds,
                    "{} done: {done} ops in {seconds:.1} s",
                    self.what
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_long_work_only_with_rate_and_eta() {
        let mut t = Tracker::default();
        assert_eq!(t.observe(0, 10, 500), None, "short work is not reported");
        assert_eq!(
            t.observe(0, 0, 5_000),
            Some(Report::Started { total: 5_000 })
        );
        assert_eq!(
            t.observe(1_000, 1_000, 5_000),
            None,
            "not yet time for a line"
        );
        match t.observe(2_000, 2_000, 6_000) {
            Some(Report::Update {
                done,
                total,
                rate_ops_per_second,
                eta_seconds,
            }) => {
                assert_eq!((done, total), (2_000, 6_000));
                assert_eq!(rate_ops_per_second, 1_000.0);
                assert_eq!(eta_seconds, Some(4.0));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.position(3_000, 6_000), Some((3_000, 6_000)));
        assert_eq!(
            t.observe(5_000, 6_000, 6_000),
            Some(Report::Finished {
                done: 6_000,
                seconds: 5.0
            })
        );
        assert_eq!(t.observe(6_000, 6_000, 6_000), None);
    }
}
