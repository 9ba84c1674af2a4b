//! Redis as a cache target (`database: { type: redis, url, key_prefix, ttl }`,
//! `mode: subscribe`).
//!
//! Every visible row of a synced table is one Redis hash at
//! `<key_prefix>:<table>:<key>` (no extra `:` after a prefix that already
//! ends with one). A composite key joins its values with `:`; a `:` or `\`
//! inside a key value is escaped with `\`. Each non-NULL field is one hash
//! field, written as text ([`redis_text`]); NULL fields are absent. A row
//! that must not exist has no key. One batch of rows is one `MULTI`/`EXEC`
//! transaction: a reader never sees half a batch, and a failed batch is
//! retried whole by the node (writes are idempotent: each row's hash is
//! replaced, not patched). With `ttl`, every written key expires that many
//! seconds after its last write.
//!
//! Redis is never captured: a node in front of it only applies. On first
//! start the node's log is empty, so the hub sends it every op it holds and
//! the cache is filled from the whole data set (the snapshot).

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use syncmesh_resolver::Value;

use crate::adapter::RowWrite;
use crate::config::redact_url;
use crate::{Error, Result};

/// How long one Redis command (or transaction) may take.
const COMMAND_TIMEOUT_MS: u64 = 10_000;
/// Most rows written in one `MULTI`/`EXEC` transaction.
pub const MAX_ROWS_PER_TRANSACTION: usize = 1_000;

/// A connection to a Redis server used as a cache of synced tables.
pub struct RedisTarget {
    conn: MultiplexedConnection,
    prefix: String,
    ttl_seconds: Option<u64>,
    url: String,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .field("ttl_seconds", &self.ttl_seconds)
            .finish_non_exhaustive()
    }
}

impl RedisTarget {
    /// Connects to `url` and checks the server answers `PING`.
    pub async fn open(
        url: &str,
        key_prefix: Option<&str>,
        ttl_seconds: Option<u64>,
    ) -> Result<Self> {
        let shown = redact_url(url);
        let err = |message: String| Error::Database {
            database: shown.clone(),
            message,
        };
        let client = redis::Client::open(url).map_err(|e| {
            err(format!(
                "invalid Redis URL ({e}); use redis://HOST:PORT[/DB]"
            ))
        })?;
        let conn = tokio::time::timeout(
            Duration::from_millis(COMMAND_TIMEOUT_MS),
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| err("no answer within 10 s; is redis-server running there?".into()))?
        .map_err(|e| {
            err(format!(
                "cannot connect ({e}); is redis-server running and the password right?"
            ))
        })?;
        let target = RedisTarget {
            conn,
            prefix: key_prefix.unwrap_or("").to_owned(),
            ttl_seconds,
            url: shown.clone(),
        };
        let pong: String = target.run(redis::cmd("PING"), "PING").await?;
        if pong != "PONG" {
            return Err(err(format!(
                "PING answered {pong:?}; is this a Redis server?"
            )));
        }
        Ok(target)
    }

    /// The Redis key of one row.
    pub fn key(&self, table: &str, key: &[Value]) -> String {
        redis_key(&self.prefix, table, key)
    }

    /// Writes `rows` in transactions of at most
    /// [`MAX_ROWS_PER_TRANSACTION`] rows: each visible row replaces its
    /// hash, each absent row deletes its key.
    pub async fn apply(&self, rows: &[RowWrite]) -> Result<()> {
        let mut conn = self.conn.clone();
        for chunk in rows.chunks(MAX_ROWS_PER_TRANSACTION) {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for w in chunk {
                let key = self.key(&w.table, &w.key);
                pipe.del(&key).ignore();
                let Some(row) = &w.row else {
                    continue;
                };
                let fields: Vec<(&str, Vec<u8>)> = row
                    .iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.as_str(), redis_text(v)))
                    .collect();
                if fields.is_empty() {
                    continue;
                }
                pipe.hset_multiple(&key, &fields).ignore();
                if let Some(ttl) = self.ttl_seconds {
                    pipe.expire(&key, i64::try_from(ttl).unwrap_or(i64::MAX))
                        .ignore();
                }
            }
            let what = format!("a transaction of {} rows", chunk.len());
            let fut = pipe.query_async::<()>(&mut conn);
            tokio::time::timeout(Duration::from_millis(COMMAND_TIMEOUT_MS), fut)
                .await
                .map_err(|_| {
                    self.err(format!(
                        "{what} got no answer within 10 s; the rows are retried"
                    ))
                })?
                .map_err(|e| self.err(format!("{what} failed ({e}); the rows are retried")))?;
        }
        Ok(())
    }

    /// Every row of `table` in the cache, as text values, ordered by key.
    pub async fn dump_table(&self, table: &str) -> Result<Vec<BTreeMap<String, Value>>> {
        let mut pattern = redis_key(&self.prefix, table, &[]);
        pattern.push_str(":*");
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, batch): (u64, Vec<String>) = self.run(cmd, "SCAN").await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        keys.sort();
        keys.dedup();
        let mut rows = Vec::with_capacity(keys.len());
        for k in keys {
            let mut cmd = redis::cmd("HGETALL");
            cmd.arg(&k);
            let h: BTreeMap<String, Vec<u8>> = self.run(cmd, "HGETALL").await?;
            rows.push(
                h.into_iter()
                    .map(|(f, v)| (f, Value::Text(String::from_utf8_lossy(&v).into_owned())))
                    .collect(),
            );
        }
        Ok(rows)
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: redis::Cmd, what: &str) -> Result<T> {
        let mut conn = self.conn.clone();
        let fut = cmd.query_async::<T>(&mut conn);
        tokio::time::timeout(Duration::from_millis(COMMAND_TIMEOUT_MS), fut)
            .await
            .map_err(|_| self.err(format!("{what} got no answer within 10 s")))?
            .map_err(|e| self.err(format!("{what} failed: {e}")))
    }

    fn err(&self, message: String) -> Error {
        Error::Database {
            database: self.url.clone(),
            message,
        }
    }
}

/// The Redis key of one row: `<prefix>:<table>:<key>` (see the module docs).
pub fn redis_key(prefix: &str, table: &str, key: &[Value]) -> String {
    let mut k = prefix.to_owned();
    if !k.is_empty() && !k.ends_with(':') {
        k.push(':');
    }
    k.push_str(table);
    for v in key {
        k.push(':');
        for ch in String::from_utf8_lossy(&redis_text(v)).chars() {
            if ch == ':' || ch == '\\' {
                k.push('\\');
            }
            k.push(ch);
        }
    }
    k
}

/// The text a value is stored as in a Redis hash field: integers and
/// decimals as written, floats in Rust's shortest exact form (`0.1`,
/// `-0.0`, `1e300`, `NaN`, `inf`), booleans as `true`/`false`, text and
/// JSON as themselves, bytes raw, timestamps as RFC 3339 in UTC with
/// microseconds (`2026-12-01T18:09:58.123456Z`). NULL is never written.
pub fn redis_text(v: &Value) -> Vec<u8> {
    match v {
        Value::Null => Vec::new(),
        Value::Bool(b) => b.to_string().into_bytes(),
        Value::Int(i) => i.to_string().into_bytes(),
        Value::Float(x) => format!("{x:?}").into_bytes(),
        Value::Decimal(s) | Value::Text(s) | Value::Json(s) => s.clone().into_bytes(),
        Value::Bytes(b) => b.clone(),
        Value::Timestamp(us) => rfc3339_micros(*us).into_bytes(),
    }
}

/// `us` microseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.ffffffZ`
/// (proleptic Gregorian calendar).
fn rfc3339_micros(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (year, month, day) = crate::adapter::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3_600,
        sod % 3_600 / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_micros(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_micros(1_764_612_598_123_456),
            "2025-12-01T18:09:58.123456Z"
        );
        assert_eq!(
            rfc3339_micros(951_782_400_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
        assert_eq!(rfc3339_micros(-1), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn keys_join_and_escape() {
        let k = [Value::Text("a:b\\c".into()), Value::Int(7)];
        assert_eq!(redis_key("sm", "orders", &k), "sm:orders:a\\:b\\\\c:7");
        assert_eq!(redis_key("sm:", "orders", &[Value::Int(1)]), "sm:orders:1");
        assert_eq!(redis_key("", "orders", &[Value::Int(1)]), "orders:1");
    }

    #[test]
    fn values_as_text() {
        assert_eq!(redis_text(&Value::Float(0.1)), b"0.1");
        assert_eq!(redis_text(&Value::Float(-0.0)), b"-0.0");
        assert_eq!(redis_text(&Value::Float(1e300)), b"1e300");
        assert_eq!(redis_text(&Value::Int(-7)), b"-7");
        assert_eq!(redis_text(&Value::Decimal("1.50".into())), b"1.50");
        assert_eq!(redis_text(&Value::Bytes(vec![0, 255])), vec![0u8, 255]);
    }
}
