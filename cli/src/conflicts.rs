//! `syncmesh conflicts`: the conflict records a hub holds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use serde_json::json;
use syncmesh_node::wire;
use syncmesh_proto::v1 as pb;
use syncmesh_proto::v1::sync_client::SyncClient;
use syncmesh_resolver::{Ntp64, Value};

/// Parses `--since`: a duration back from now (`90m`, `24h`, `7d`), an
/// RFC 3339 time (`2026-11-24T10:00:00Z`), or Unix milliseconds.
pub fn parse_since(text: &str, now: SystemTime) -> Result<u64> {
    let t = text.trim();
    if let Ok(ms) = t.parse::<u64>() {
        return Ok(ms);
    }
    if let Ok(d) = humantime::parse_duration(t) {
        let at = now.checked_sub(d).unwrap_or(UNIX_EPOCH);
        return Ok(at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0));
    }
    if let Ok(at) = humantime::parse_rfc3339_weak(t) {
        return Ok(at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0));
    }
    bail!(
        "--since {t:?} is not a time: use a duration back from now (90m, 24h, 7d), an RFC 3339 time (2026-11-24T10:00:00Z) or Unix milliseconds"
    )
}

/// Asks the hub at `url` for conflict records.
pub async fn fetch(
    url: &str,
    table: Option<&str>,
    since_unix_ms: u64,
) -> Result<pb::ConflictsReply> {
    fetch_at(&crate::mesh::HubTarget::plain(url), table, since_unix_ms).await
}

/// Asks the hub `target` names for conflict records.
pub async fn fetch_at(
    target: &crate::mesh::HubTarget,
    table: Option<&str>,
    since_unix_ms: u64,
) -> Result<pb::ConflictsReply> {
    let channel = target.channel(Duration::from_secs(10)).await?;
    let reply = SyncClient::new(channel)
        .max_decoding_message_size(syncmesh_proto::MAX_MESSAGE_BYTES)
        .conflicts(pb::ConflictsRequest {
            table: table.unwrap_or_default().to_owned(),
            since_unix_ms,
            limit: 0,
        })
        .await;
    match reply {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => Err(target.call_error("conflicts", s).await),
    }
}

fn value(v: &Option<pb::Value>) -> Value {
    v.clone()
        .and_then(|v| wire::value_from_proto(v).ok())
        .unwrap_or(Value::Null)
}

fn when(h: &Option<pb::Hlc>) -> String {
    let ms = h
        .as_ref()
        .map(|h| Ntp64(h.time).as_unix_millis())
        .unwrap_or(0);
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn op_name(c: &pb::ConflictCandidate) -> String {
    c.op.as_ref()
        .map(|o| format!("{}#{}", o.origin, o.seq))
        .unwrap_or_default()
}

/// The records as JSON (each as [`syncmesh_hub::mirror::record_json`],
/// the same content the `sync_conflicts` mirror table holds).
pub fn to_json(reply: &pb::ConflictsReply) -> serde_json::Value {
    json!({
        "total": reply.total,
        "conflicts": reply
            .conflicts
            .iter()
            .map(syncmesh_hub::mirror::record_json)
            .collect::<Vec<_>>(),
    })
}

/// Prints the records as a table.
pub fn print(reply: &pb::ConflictsReply) {
    if reply.conflicts.is_empty() {
        println!("no conflicts ({} held in all)", reply.total);
        return;
    }
    println!(
        "{} conflicts shown ({} held in all), newest first",
        reply.conflicts.len(),
        reply.total
    );
    for c in &reply.conflicts {
        let key: Vec<String> = c
            .key
            .iter()
            .map(|k| value(&Some(k.clone())).to_string())
            .collect();
        let cands: Vec<String> = c
            .candidates
            .iter()
            .map(|x| format!("{} from {}", value(&x.value), op_name(x)))
            .collect();
        println!(
            "{}  {}[{}].{}  {}: {} -> {}",
            when(&c.hlc),
            c.table,
            key.join(", "),
            c.field,
            c.strategy,
            cands.join(" vs "),
            value(&c.result)
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_durations_times_and_millis() {
        let now = UNIX_EPOCH + Duration::from_secs(100_000);
        assert_eq!(parse_since("1000", now).unwrap(), 1000);
        assert_eq!(parse_since("1h", now).unwrap(), (100_000 - 3600) * 1000);
        assert_eq!(parse_since("1970-01-01T00:00:10Z", now).unwrap(), 10_000);
        let err = parse_since("yesterday-ish", now).unwrap_err().to_string();
        assert!(err.contains("RFC 3339"), "{err}");
    }
}
