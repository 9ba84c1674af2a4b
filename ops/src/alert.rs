//! Conflict alerts: a conflicts-per-hour threshold ([`ConflictAlert`],
//! pure) and a webhook sender ([`Webhook`]) with a bounded queue and bounded
//! retries, so an unreachable webhook never slows sync down.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use crate::{Error, Result};

/// Width of one counting slot.
const MINUTE_MS: u64 = 60_000;
/// The window the threshold applies to.
const HOUR_MS: u64 = 3_600_000;
/// Alerts waiting to be posted; more are dropped (and logged).
pub const WEBHOOK_QUEUE: usize = 16;
/// Attempts per alert.
pub const WEBHOOK_ATTEMPTS: u32 = 3;
/// Time allowed for one attempt (connect, send, answer).
pub const WEBHOOK_TIMEOUT_MS: u64 = 5_000;
/// Pause before the second attempt; doubled for each further one.
pub const WEBHOOK_BACKOFF_MS: u64 = 500;

/// A fired alert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    /// Conflicts in the last hour.
    pub conflicts_last_hour: u64,
    /// The configured threshold.
    pub per_hour: u32,
    /// Conflicts in the last hour per table.
    pub tables: BTreeMap<String, u64>,
    /// When it fired, Unix ms.
    pub at_unix_ms: u64,
}

impl Alert {
    /// The JSON body posted to the webhook.
    pub fn to_json(&self, hub: &str) -> serde_json::Value {
        serde_json::json!({
            "alert": "conflict_rate",
            "hub": hub,
            "conflicts_last_hour": self.conflicts_last_hour,
            "threshold_per_hour": self.per_hour,
            "tables": self.tables,
            "at_unix_ms": self.at_unix_ms,
            "message": format!(
                "{} conflicts in the last hour reached the threshold of {} per hour: see `syncmesh conflicts --since 1h`",
                self.conflicts_last_hour, self.per_hour
            ),
        })
    }
}

/// Counts conflicts per minute over the last hour and fires once the count
/// reaches `per_hour`; then stays quiet for an hour.
#[derive(Clone, Debug)]
pub struct ConflictAlert {
    per_hour: u32,
    /// (minute index, table, conflicts), oldest first.
    minutes: VecDeque<(u64, String, u64)>,
    last_fired_ms: Option<u64>,
}

impl ConflictAlert {
    /// A threshold of `per_hour` conflicts (at least 1).
    pub fn new(per_hour: u32) -> ConflictAlert {
        ConflictAlert {
            per_hour: per_hour.max(1),
            minutes: VecDeque::new(),
            last_fired_ms: None,
        }
    }

    /// Counts `n` new conflicts of `table` at `now_ms`; returns an alert if
    /// the threshold is reached now.
    pub fn observe(&mut self, now_ms: u64, table: &str, n: u64) -> Option<Alert> {
        let minute = now_ms / MINUTE_MS;
        let oldest = now_ms.saturating_sub(HOUR_MS) / MINUTE_MS;
        while self.minutes.front().is_some_and(|(m, _, _)| *m <= oldest) {
            self.minutes.pop_front();
        }
        if n > 0 {
            match self
                .minutes
                .iter_mut()
                .rev()
                .take_while(|(m, _, _)| *m == minute)
                .find(|(_, t, _)| t == table)
            {
                Some(slot) => slot.2 += n,
                None => self.minutes.push_back((minute, table.to_owned(), n)),
            }
        }
        let total: u64 = self.minutes.iter().map(|(_, _, c)| c).sum();
        let quiet = self
            .last_fired_ms
            .is_some_and(|at| now_ms.saturating_sub(at) < HOUR_MS);
        if n == 0 || total < u64::from(self.per_hour) || quiet {
            return None;
        }
        self.last_fired_ms = Some(now_ms);
        let mut tables = BTreeMap::new();
        for (_, t, c) in &self.minutes {
            *tables.entry(t.clone()).or_insert(0) += c;
        }
        Some(Alert {
            conflicts_last_hour: total,
            per_hour: self.per_hour,
            tables,
            at_unix_ms: now_ms,
        })
    }
}

/// `scheme://host[:port]/***`: a webhook URL safe to log.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            let host = host.rsplit('@').next().unwrap_or(host);
            format!("{scheme}://{host}/***")
        }
        None => "<webhook>".to_owned(),
    }
}

/// Posts alerts to a webhook from a background task.
#[derive(Clone, Debug)]
pub struct Webhook {
    tx: mpsc::Sender<String>,
}

struct Target {
    authority: String,
    path: String,
    shown: String,
}

fn parse_target(url: &str) -> Result<Target> {
    let shown = redact_url(url);
    let err = |message: &str| Error::Webhook {
        url: shown.clone(),
        message: message.to_owned(),
    };
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| err("not a URL: use http://HOST:PORT/PATH"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(err(
                "https webhooks are not supported yet (no TLS in this build): use an http:// endpoint, e.g. a local relay",
            ));
        }
        _ => return Err(err("the URL must start with http://")),
    }
    let Some(auth) = uri.authority() else {
        return Err(err("the URL has no host"));
    };
    let authority = if auth.port().is_some() {
        auth.as_str().to_owned()
    } else {
        format!("{}:80", auth.host())
    };
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    Ok(Target {
        authority,
        path,
        shown,
    })
}

impl Webhook {
    /// Checks `url` and starts the sender task (needs a tokio runtime).
    pub fn spawn(url: &str) -> Result<Webhook> {
        let target = parse_target(url)?;
        let (tx, mut rx) = mpsc::channel::<String>(WEBHOOK_QUEUE);
        tokio::spawn(async move {
            while let Some(body) = rx.recv().await {
                deliver(&target, body).await;
            }
        });
        Ok(Webhook { tx })
    }

    /// Queues one JSON body; never waits. False if the queue was full (the
    /// alert is dropped and logged).
    pub fn send(&self, body: String) -> bool {
        match self.tx.try_send(body) {
            Ok(()) => true,
            Err(_) => {
                tracing::warn!(
                    "conflict alert dropped: {WEBHOOK_QUEUE} alerts are already waiting for the webhook"
                );
                false
            }
        }
    }
}

async fn deliver(target: &Target, body: String) {
    let mut pause_ms = WEBHOOK_BACKOFF_MS;
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        let res = tokio::time::timeout(
            Duration::from_millis(WEBHOOK_TIMEOUT_MS),
            post(target, body.clone()),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {WEBHOOK_TIMEOUT_MS} ms")));
        match res {
            Ok(()) => {
                tracing::info!(webhook = %target.shown, "conflict alert delivered");
                return;
            }
            Err(e) if attempt == WEBHOOK_ATTEMPTS => {
                tracing::warn!(
                    webhook = %target.shown,
                    attempts = attempt,
                    "conflict alert not delivered: {e}; check conflicts.alert.webhook and that the receiver is up"
                );
            }
            Err(e) => {
                tracing::debug!(webhook = %target.shown, attempt, "webhook attempt failed: {e}");
                tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                pause_ms *= 2;
            }
        }
    }
}

async fn post(target: &Target, body: String) -> std::result::Result<(), String> {
    let stream = tokio::net::TcpStream::connect(&target.authority)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    let conn = tokio::spawn(conn);
    let req = Request::post(target.path.as_str())
        .header(hyper::header::HOST, target.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "syncmesh")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    conn.abort();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the webhook answered HTTP {status}"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_the_threshold_then_stays_quiet_for_an_hour() {
        let mut a = ConflictAlert::new(3);
        let t = 10 * HOUR_MS;
        assert_eq!(a.observe(t, "orders", 2), None);
        let fired = a.observe(t + 1_000, "items", 1).unwrap();
        assert_eq!(fired.conflicts_last_hour, 3);
        assert_eq!(fired.tables["orders"], 2);
        assert_eq!(a.observe(t + 2_000, "orders", 5), None, "quiet for an hour");
        // Old conflicts roll out of the window.
        let later = t + 2 * HOUR_MS;
        assert_eq!(a.observe(later, "orders", 1), None);
        assert!(a.observe(later + 1, "orders", 2).is_some());
    }

    #[test]
    fn webhook_urls_are_checked_and_redacted() {
        assert_eq!(
            redact_url("http://user:pw@127.0.0.1:9000/hooks/T0KEN"),
            "http://127.0.0.1:9000/***"
        );
        assert!(parse_target("https://x/y").is_err());
        let t = parse_target("http://127.0.0.1:9000/alerts?k=1").unwrap();
        assert_eq!(t.authority, "127.0.0.1:9000");
        assert_eq!(t.path, "/alerts?k=1");
        assert_eq!(
            parse_target("http://localhost/a").unwrap().authority,
            "localhost:80"
        );
    }
}
