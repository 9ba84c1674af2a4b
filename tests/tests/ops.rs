//! Operations end to end: a real hub and three real SQLite nodes on
//! 127.0.0.1 with `hub.metrics` (and a node's `metrics`) configured. Checks
//! `/metrics` as Prometheus text against the ops actually synced, the
//! status dashboard (library, `syncmesh status` and `--json`), a stopped
//! node reported down, conflict alerts posted to a local webhook, and the
//! live status page rendered by real headless Chromium.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use syncmesh::demo::{Mesh, NODES, TABLES_YAML};
use syncmesh::mesh::{self, hub_status};
use syncmesh_hub::core::HubSettings;
use syncmesh_hub::server::{HubOptions, start_hub};
use syncmesh_node::config::Config;
use syncmesh_node::shell::start_node;
use syncmesh_node::sqlite::SqliteAdapter;
use syncmesh_node::wire;
use syncmesh_proto::v1 as pb;
use syncmesh_proto::v1::sync_client::SyncClient;
use syncmesh_resolver::{FieldWrite, Hlc, NodeId, Ntp64, Op, OpId, TableRules, Value};
use syncmesh_tests::{ORDERS, Proc, create_db, free_port, run_syncmesh, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(60);

/// Starts hub and nodes like `Mesh::start`, with the hub's metrics (and
/// edge-a's) on free ports and `extra` appended to the config.
async fn start(dir: &Path, extra: &str) -> Result<Mesh> {
    let dir = dir.canonicalize()?;
    for n in NODES {
        let url = format!("sqlite://{}", dir.join(format!("{n}.db")).display());
        let db = SqliteAdapter::open(&url, true).await?;
        sqlx::query(sqlx::AssertSqlSafe(ORDERS.to_owned()))
            .execute(db.pool())
            .await?;
        db.close().await;
    }
    let port = free_port();
    let mut yaml = format!(
        "hub:\n  listen: 127.0.0.1:{port}\n  data_dir: ./data/hub\n  metrics: 127.0.0.1:0\nnodes:\n"
    );
    for (i, n) in NODES.iter().enumerate() {
        yaml.push_str(&format!(
            "  - name: {n}\n    hub: http://127.0.0.1:{port}\n    data_dir: ./data/{n}\n    priority: {}\n    database: {{ type: sqlite, url: \"sqlite://./{n}.db\" }}\n",
            i + 1
        ));
        if i == 0 {
            yaml.push_str("    metrics: 127.0.0.1:0\n");
        }
    }
    yaml.push_str(TABLES_YAML);
    yaml.push_str("sync:\n  batch_size: 200\n  max_clock_drift: 500ms\n");
    yaml.push_str(extra);
    let path = dir.join("syncmesh.yaml");
    std::fs::write(&path, yaml)?;
    let cfg = Config::load(&path)?;
    let hub = mesh::start_hub_from(&cfg, cfg.hub()?).await?;
    let mut nodes = Vec::new();
    let mut dbs = Vec::new();
    for n in NODES {
        nodes.push(start_node(&cfg, n).await?);
        dbs.push((
            n.to_owned(),
            SqliteAdapter::open(cfg.node(n)?.database.url.expose(), false).await?,
        ));
    }
    let wanted: Vec<_> = cfg
        .tables
        .iter()
        .map(|t| (t.name.clone(), t.key.clone()))
        .collect();
    let schemas = dbs[0].1.introspect(&wanted).await?;
    Ok(Mesh {
        hub_url: hub.url(),
        hub: Some(hub),
        cfg,
        nodes,
        dbs,
        schemas,
    })
}

fn metrics_addr(mesh: &Mesh) -> SocketAddr {
    mesh.hub.as_ref().unwrap().metrics_addr.unwrap()
}

/// A plain HTTP/1.1 GET: (status code, body).
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await??;
    let text = String::from_utf8(raw)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .context("no status code")?
        .parse()?;
    Ok((code, body.to_owned()))
}

type Samples = BTreeMap<String, Vec<(BTreeMap<String, String>, f64)>>;

/// Parses Prometheus text exposition strictly: every line is a `# HELP`,
/// `# TYPE` or a sample `name{label="value",...} number`; returns the
/// samples by name and the declared types.
fn parse_prometheus(text: &str) -> Result<(Samples, BTreeMap<String, String>)> {
    let mut samples: Samples = BTreeMap::new();
    let mut types = BTreeMap::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').context("TYPE without a type")?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                bail!("bad type in {line:?}");
            }
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').context("sample without value")?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .with_context(|| format!("bad value in {line:?}"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').context("unclosed labels")?;
                let mut labels = BTreeMap::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (k, after) = rest.split_once("=\"").context("bad label")?;
                    let mut val = String::new();
                    let mut chars = after.char_indices();
                    let end = loop {
                        match chars.next() {
                            Some((i, '"')) => break i,
                            Some((_, '\\')) => match chars.next() {
                                Some((_, 'n')) => val.push('\n'),
                                Some((_, c)) => val.push(c),
                                None => bail!("bad escape in {line:?}"),
                            },
                            Some((_, c)) => val.push(c),
                            None => bail!("unterminated label value in {line:?}"),
                        }
                    };
                    if !valid_name(k) {
                        bail!("bad label name in {line:?}");
                    }
                    labels.insert(k.to_owned(), val);
                    rest = after[end + 1..].trim_start_matches(',');
                }
                (name, labels)
            }
        };
        if !valid_name(name) {
            bail!("bad metric name in {line:?}");
        }
        samples
            .entry(name.to_owned())
            .or_default()
            .push((labels, value));
    }
    Ok((samples, types))
}

fn sum(samples: &Samples, name: &str, filter: &[(&str, &str)]) -> f64 {
    samples
        .get(name)
        .map(|v| {
            v.iter()
                .filter(|(l, _)| {
                    filter
                        .iter()
                        .all(|(k, want)| l.get(*k).map(String::as_str) == Some(*want))
                })
                .map(|(_, v)| *v)
                .sum()
        })
        .unwrap_or(0.0)
}

async fn scrape(addr: SocketAddr) -> Result<(Samples, BTreeMap<String, String>)> {
    let (code, body) = http_get(addr, "/metrics").await?;
    if code != 200 {
        bail!("/metrics answered {code}: {body}");
    }
    parse_prometheus(&body).with_context(|| format!("parsing /metrics:\n{body}"))
}

/// Inserts, updates and deletes on every node; returns (writes, deletes).
async fn load(mesh: &Mesh) -> Result<(u64, u64)> {
    let (mut writes, mut deletes) = (0, 0);
    for round in 0..3 {
        for node in 0..3 {
            for k in 1..=40 {
                let id = node as i64 * 1000 + round * 100 + k;
                mesh.exec(
                    node,
                    &format!("INSERT INTO orders VALUES ({id}, 'i{id}', {k}, 'new')"),
                )
                .await?;
                writes += 1;
            }
            let base = node as i64 * 1000 + round * 100;
            mesh.exec(
                node,
                &format!(
                    "UPDATE orders SET qty = qty + 1 WHERE id BETWEEN {} AND {}",
                    base + 1,
                    base + 10
                ),
            )
            .await?;
            writes += 10;
            mesh.exec(
                node,
                &format!(
                    "DELETE FROM orders WHERE id BETWEEN {} AND {}",
                    base + 11,
                    base + 15
                ),
            )
            .await?;
            writes += 5;
            deletes += 5;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok((writes, deletes))
}

/// Under load: `/metrics` of hub and node parse as Prometheus text and
/// count exactly the ops synced; lag is present, finite and ≥ 0 for every
/// node; the status dashboard shows the same numbers and plausible
/// throughput, through the library, `syncmesh status` and `--json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_count_what_was_synced() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = start(dir.path(), "").await?;
    let (writes, deletes) = load(&mesh).await?;
    mesh.wait_converged().await?;
    let addr = metrics_addr(&mesh);
    // Counters are published when the hub handles the ops: once converged
    // they must equal the writes exactly (no more, no less).
    let (samples, types) = scrape(addr).await?;
    assert_eq!(
        types.get("records_synced_total").map(String::as_str),
        Some("counter")
    );
    assert_eq!(
        types.get("sync_lag_seconds").map(String::as_str),
        Some("gauge")
    );
    assert_eq!(
        sum(&samples, "records_synced_total", &[("table", "orders")]),
        writes as f64
    );
    assert_eq!(
        sum(&samples, "records_synced_total", &[("operation", "delete")]),
        deletes as f64
    );
    assert_eq!(
        sum(&samples, "records_synced_total", &[("operation", "upsert")]),
        (writes - deletes) as f64
    );
    assert_eq!(hub_status(&mesh.hub_url).await?.total_ops, writes);
    for node in NODES.iter().copied().chain(["hub"]) {
        let lag = samples["sync_lag_seconds"]
            .iter()
            .find(|(l, _)| l["node"] == node && l["table"] == "orders")
            .map(|(_, v)| *v)
            .with_context(|| format!("no sync_lag_seconds for {node}: {samples:?}"))?;
        assert!(lag.is_finite() && lag >= 0.0, "lag at {node}: {lag}");
    }
    assert_eq!(sum(&samples, "sync_errors_total", &[]), 0.0);
    assert!(sum(&samples, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(samples.contains_key("process_cpu_seconds_total"));
    assert!(samples.contains_key("process_open_fds"));

    // edge-a's own endpoint: the ops of edge-b and edge-c it made durable.
    let node_addr = mesh.nodes[0].metrics_addr.unwrap();
    let (node_samples, _) = scrape(node_addr).await?;
    assert_eq!(
        sum(
            &node_samples,
            "records_synced_total",
            &[("table", "orders")]
        ),
        (writes / 3 * 2) as f64,
        "edge-a merged every op of the two other nodes"
    );
    let lag = sum(
        &node_samples,
        "sync_lag_seconds",
        &[("table", "orders"), ("node", "edge-a")],
    );
    assert!(lag.is_finite() && lag >= 0.0);
    assert!(node_samples["sync_lag_seconds"].len() == 1);

    // The dashboard data.
    let st = hub_status(&mesh.hub_url).await?;
    assert_eq!(st.health, "healthy", "{}", st.health_reason);
    let orders = st.tables.iter().find(|t| t.table == "orders").unwrap();
    assert_eq!(orders.state, "synced", "{}", orders.detail);
    assert_eq!(orders.records_total, writes);
    assert!(orders.lag_seconds.is_finite() && orders.lag_seconds >= 0.0);
    let tp = st.throughput.unwrap();
    assert!(tp.average_records_per_second > 0.0, "{tp:?}");
    assert!(
        tp.peak_records_per_second >= tp.average_records_per_second,
        "{tp:?}"
    );
    assert!(tp.peak_records_per_second.is_finite());
    assert_eq!(st.last_24h.unwrap().records, writes);
    for n in &st.nodes {
        assert!(n.connected);
        assert_eq!(n.engine, "sqlite");
        assert!(n.lag_seconds.is_finite() && n.lag_seconds >= 0.0);
    }

    // The binary: dashboard and JSON.
    let (ok, out, err) = run_syncmesh(&["status", "--hub", &mesh.hub_url])?;
    assert!(ok, "{err}");
    assert!(out.contains("HEALTHY"), "{out}");
    assert!(out.contains("throughput  now"), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("orders "))
        .context(out.clone())?;
    assert!(
        line.contains("synced") && line.contains(&writes.to_string()),
        "{line}"
    );
    for n in NODES {
        let l = out
            .lines()
            .find(|l| l.starts_with(n))
            .context(out.clone())?;
        assert!(
            l.contains(" up ") && l.contains("sqlite") && l.contains("bidirectional"),
            "{l}"
        );
    }
    let (ok, out, err) = run_syncmesh(&["status", "--hub", &mesh.hub_url, "--json"])?;
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(json["health"], "healthy");
    assert_eq!(json["tables"][0]["records_total"], writes);
    assert_eq!(json["last_24h"]["records"], writes);
    assert_eq!(json["nodes"].as_array().unwrap().len(), 3);
    mesh.stop().await
}

/// A node that stops is reported down, by name and since when; the table it
/// lacks new ops of is `behind`; an unreachable hub is one line, exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_node_is_named_down_and_unreachable_hub_fails() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut mesh = start(dir.path(), "").await?;
    mesh.exec(0, "INSERT INTO orders VALUES (1, 'a', 1, 'new')")
        .await?;
    mesh.wait_converged().await?;
    let c = mesh.nodes.remove(2);
    c.shutdown().await?;
    wait_until("edge-c reported down", LIMIT, || async {
        let st = hub_status(&mesh.hub_url).await?;
        Ok(st.nodes.iter().any(|n| n.node == "edge-c" && !n.connected))
    })
    .await?;
    mesh.exec(0, "INSERT INTO orders VALUES (2, 'b', 1, 'new')")
        .await?;
    wait_until("orders behind at edge-c", LIMIT, || async {
        let st = hub_status(&mesh.hub_url).await?;
        Ok(st.tables.iter().any(|t| t.state == "behind"))
    })
    .await?;
    let st = hub_status(&mesh.hub_url).await?;
    assert_eq!(st.health, "degraded");
    assert!(
        st.health_reason.contains("edge-c down since 20"),
        "{}",
        st.health_reason
    );
    let orders = &st.tables[0];
    assert!(orders.detail.contains("edge-c (down)"), "{}", orders.detail);
    let (ok, out, err) = run_syncmesh(&["status", "--hub", &mesh.hub_url])?;
    assert!(ok, "{err}");
    assert!(out.contains("DEGRADED - edge-c down since"), "{out}");
    let l = out
        .lines()
        .find(|l| l.starts_with("edge-c"))
        .context(out.clone())?;
    assert!(l.contains(" down ") && l.contains("down since"), "{l}");
    mesh.stop().await?;

    // Nothing listens there.
    let url = format!("http://127.0.0.1:{}", free_port());
    let (ok, out, err) = run_syncmesh(&["status", "--hub", &url])?;
    assert!(!ok, "status of an unreachable hub must fail");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach the hub at"), "{err}");
    Ok(())
}

/// A one-shot-per-connection HTTP receiver on 127.0.0.1: answers 200 and
/// hands over (request line, body) of at most `max` requests.
async fn webhook_receiver(
    max: usize,
) -> Result<(SocketAddr, tokio::sync::mpsc::Receiver<(String, String)>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::channel(max);
    tokio::spawn(async move {
        for _ in 0..max {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let request = loop {
                let Ok(n) = s.read(&mut chunk).await else {
                    break None;
                };
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        let line = head.lines().next().unwrap_or("").to_owned();
                        break Some((line, body[..len].to_owned()));
                    }
                }
            };
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
            if let Some(r) = request
                && tx.send(r).await.is_err()
            {
                return;
            }
        }
    });
    Ok((addr, rx))
}

/// Concurrent edits of two rows while partitioned make two conflicts; with
/// `conflicts.alert.per_hour: 2` the hub posts one JSON alert to the
/// webhook, and metrics and status count the conflicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_alert_is_posted_to_the_webhook() -> Result<()> {
    let (hook, mut alerts) = webhook_receiver(4).await?;
    let dir = tempfile::tempdir()?;
    let mesh = start(
        dir.path(),
        &format!(
            "conflicts:\n  alert: {{ per_hour: 2, webhook: \"http://{hook}/alerts/T0KEN\" }}\n"
        ),
    )
    .await?;
    mesh.exec(
        0,
        "INSERT INTO orders VALUES (1, 'a', 1, 'new'), (2, 'b', 1, 'new')",
    )
    .await?;
    mesh.wait_converged().await?;
    for n in &mesh.nodes {
        n.set_online(false).await;
    }
    mesh.exec(0, "UPDATE orders SET status = 'from-a' WHERE id IN (1, 2)")
        .await?;
    mesh.wait_captured(0).await?;
    mesh.exec(1, "UPDATE orders SET status = 'from-b' WHERE id IN (1, 2)")
        .await?;
    mesh.wait_captured(1).await?;
    for n in &mesh.nodes {
        n.set_online(true).await;
    }
    mesh.wait_converged().await?;
    let (line, body) = tokio::time::timeout(LIMIT, alerts.recv())
        .await
        .context("no alert reached the webhook")?
        .context("webhook receiver stopped")?;
    assert_eq!(line, "POST /alerts/T0KEN HTTP/1.1");
    let alert: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(alert["alert"], "conflict_rate", "{alert}");
    assert_eq!(alert["threshold_per_hour"], 2);
    assert_eq!(alert["conflicts_last_hour"], 2, "{alert}");
    assert_eq!(alert["tables"]["orders"], 2, "{alert}");
    assert!(alert["hub"].is_string());

    let reply = syncmesh::conflicts::fetch(&mesh.hub_url, None, 0).await?;
    assert_eq!(reply.total, 2, "the hub holds two conflict records");
    let (samples, types) = scrape(metrics_addr(&mesh)).await?;
    assert_eq!(
        types.get("conflict_count").map(String::as_str),
        Some("counter")
    );
    assert_eq!(
        sum(
            &samples,
            "conflict_count",
            &[
                ("table", "orders"),
                ("resolution_strategy", "last_write_wins")
            ]
        ),
        2.0
    );
    let st = hub_status(&mesh.hub_url).await?;
    assert_eq!(st.last_24h.unwrap().conflicts, 2);
    assert_eq!(st.tables[0].conflicts_total, 2);
    // Still one alert: the next is due an hour later at the earliest.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alerts.try_recv().is_err(), "a second alert was posted");
    mesh.stop().await
}

fn chromium() -> std::path::PathBuf {
    let path = std::env::var_os("SYNCMESH_CHROMIUM")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromium".into());
    assert!(
        path.exists(),
        "{} not found: the status page test needs Debian's chromium (bash scripts/test.sh installs it: apt-get install -y chromium)",
        path.display()
    );
    path
}

/// The hub's web page in real headless Chromium: the DOM after its scripts
/// ran shows the live numbers from the mesh (records synced, health, nodes)
/// and draws the chart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_live_numbers_in_chromium() -> Result<()> {
    let browser = chromium();
    let dir = tempfile::tempdir()?;
    let mesh = start(dir.path(), "").await?;
    let mut writes = 0;
    for (node, n) in [(0usize, 37i64), (1, 25)] {
        for k in 1..=n {
            let id = node as i64 * 1000 + k;
            mesh.exec(
                node,
                &format!("INSERT INTO orders VALUES ({id}, 'x', {k}, 'new')"),
            )
            .await?;
            writes += 1;
        }
    }
    mesh.wait_converged().await?;
    let addr = metrics_addr(&mesh);
    let (code, html) = http_get(addr, "/").await?;
    assert_eq!(code, 200);
    assert!(
        !html.contains("<script src") && !html.contains("<link") && !html.contains("https://"),
        "the page must not load external assets"
    );
    let profile = tempfile::tempdir()?;
    let out = tokio::time::timeout(
        LIMIT,
        tokio::process::Command::new(&browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                &format!("--user-data-dir={}", profile.path().display()),
                "--virtual-time-budget=5000",
                "--dump-dom",
                &format!("http://{addr}/"),
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("chromium did not finish within a minute")?
    .with_context(|| format!("cannot start {}", browser.display()))?;
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let cell = format!("<td class=\"num records\">{writes}</td>");
    assert!(
        dom.contains(&cell),
        "no {cell} in the rendered page:\n{dom}"
    );
    assert!(
        dom.contains(&format!("id=\"records-24h\">{writes}<")),
        "{dom}"
    );
    assert!(
        dom.contains("class=\"healthy\">healthy: all 3 nodes connected"),
        "{dom}"
    );
    assert!(
        dom.contains("<td>orders</td><td class=\"synced\">synced</td>"),
        "{dom}"
    );
    for n in NODES {
        assert!(
            dom.contains(&format!(
                "<td>{n}</td><td class=\"synced\">up</td><td>sqlite</td>"
            )),
            "{dom}"
        );
    }
    assert!(
        dom.contains("id=\"rps-line\""),
        "the chart was not drawn:\n{dom}"
    );
    mesh.stop().await
}

/// Real processes with `--log-format json`: a node that joins late catches
/// up on 1,500 ops and reports its progress (stderr is not a terminal, so
/// as log lines with the node's name); every log line is JSON and the
/// webhook token never appears in a log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_progress_is_logged_as_json_lines() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let port = free_port();
    let yaml = format!(
        "hub:\n  listen: 127.0.0.1:{port}\n  data_dir: ./hub\n\
         nodes:\n\
         \x20 - name: node-a\n    hub: http://127.0.0.1:{port}\n    data_dir: ./node-a\n    database: {{ type: sqlite, url: \"sqlite://./a.db\" }}\n\
         \x20 - name: node-b\n    hub: http://127.0.0.1:{port}\n    data_dir: ./node-b\n    database: {{ type: sqlite, url: \"sqlite://./b.db\" }}\n\
         tables:\n  - name: orders\n    key: [id]\n\
         sync:\n  batch_size: 500\n\
         conflicts:\n  alert: {{ per_hour: 1, webhook: \"http://127.0.0.1:1/hooks/S3CRET-T0KEN\" }}\n"
    );
    let cfg = dir.join("mesh.yaml");
    std::fs::write(&cfg, yaml)?;
    let cfg = cfg.display().to_string();
    let url_a = create_db(&dir.join("a.db"), ORDERS).await?;
    let url_b = create_db(&dir.join("b.db"), ORDERS).await?;
    let hub_url = format!("http://127.0.0.1:{port}");
    let json = ["--log-format", "json"];
    let _hub = Proc::spawn(
        dir,
        "hub",
        &[&json[..], &["hub", "--config", &cfg]].concat(),
    )?;
    let _a = Proc::spawn(
        dir,
        "node-a",
        &[&json[..], &["node", "--config", &cfg, "--name", "node-a"]].concat(),
    )?;
    // Capture is installed once the node runs: wait for it to connect.
    wait_until("node-a connected", LIMIT, || async {
        Ok(hub_status(&hub_url)
            .await
            .is_ok_and(|s| s.nodes.iter().any(|n| n.connected)))
    })
    .await?;
    let db_a = SqliteAdapter::open(&url_a, false).await?;
    let mut tx = db_a.pool().begin().await?;
    for id in 1..=1500 {
        sqlx::query("INSERT INTO orders VALUES (?, 'x', 1, 'new')")
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    wait_until("the hub holds 1500 ops", LIMIT, || async {
        Ok(hub_status(&hub_url)
            .await
            .is_ok_and(|s| s.total_ops == 1500))
    })
    .await?;
    let _b = Proc::spawn(
        dir,
        "node-b",
        &[&json[..], &["node", "--config", &cfg, "--name", "node-b"]].concat(),
    )?;
    let db_b = SqliteAdapter::open(&url_b, false).await?;
    wait_until("node-b caught up", LIMIT, || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(db_b.pool())
            .await?;
        Ok(n == 1500)
    })
    .await?;
    let log_b = dir.join("node-b.log");
    wait_until("the catch-up is reported done", LIMIT, || async {
        Ok(std::fs::read_to_string(&log_b)?.contains("catching up done"))
    })
    .await?;
    let mut lines = Vec::new();
    for name in ["hub", "node-a", "node-b"] {
        let text = std::fs::read_to_string(dir.join(format!("{name}.log")))?;
        assert!(
            !text.contains("S3CRET"),
            "the webhook token was logged:\n{text}"
        );
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{name}.log: not a JSON line: {line}"))?;
            lines.push(v);
        }
    }
    let message = |v: &serde_json::Value| v["fields"]["message"].as_str().unwrap_or("").to_owned();
    let started = lines
        .iter()
        .find(|v| message(v).starts_with("catching up: 1500 ops to go"))
        .context("no progress start line")?;
    assert_eq!(started["fields"]["node"], "node-b");
    let done = lines
        .iter()
        .find(|v| message(v).starts_with("catching up done: 1500 ops in"))
        .context("no progress end line")?;
    assert_eq!(done["fields"]["node"], "node-b");
    assert_eq!(done["fields"]["ops"], 1500);
    db_a.close().await;
    db_b.close().await;
    Ok(())
}

/// Sends `hello(node)` and then `op` on one stream; waits until the hub
/// closes it.
async fn forged(url: &str, node: &str, op: Option<pb::Op>) -> Result<()> {
    let mut client = SyncClient::connect(url.to_owned()).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    if !node.is_empty() {
        tx.send(pb::NodeMessage {
            body: Some(pb::node_message::Body::Hello(pb::Hello {
                protocol_version: syncmesh_proto::PROTOCOL_VERSION,
                node: node.into(),
                version_vector: None,
                mode: "bidirectional".into(),
                engine: "sqlite".into(),
                seen: None,
                resnap: false,
                snapshot: None,
            })),
        })
        .await?;
    }
    if let Some(op) = op {
        tx.send(pb::NodeMessage {
            body: Some(pb::node_message::Body::Ops(pb::OpBatch { ops: vec![op] })),
        })
        .await?;
    }
    let mut inbound = client
        .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Ok(Some(_)) = tokio::time::timeout(LIMIT, inbound.message()).await? {}
    Ok(())
}

fn op_of(origin: &str, table: &str) -> pb::Op {
    let o = NodeId::new(origin).unwrap();
    let hlc = Hlc {
        time: Ntp64::from_unix_millis(syncmesh_ops::unix_now_ms()).0,
        id: o.hlc_id(),
    };
    wire::op_to_proto(&Op::upsert(
        OpId::new(o, 1),
        hlc,
        table,
        vec![Value::Int(1)],
        vec![FieldWrite::new("qty", Value::Int(5))],
    ))
}

/// Refused input is counted in `sync_errors_total` by table (configured
/// tables only: made-up names do not grow the metrics) and error type, and
/// puts the table in state `error`; `status --watch` redraws in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_input_is_counted_by_table_and_watch_redraws() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let options = HubOptions {
        tables: BTreeMap::from([("orders".to_owned(), TableRules::default())]),
        metrics: Some("127.0.0.1:0".parse()?),
        ..Default::default()
    };
    let settings = HubSettings {
        name: NodeId::new("hub")?,
        batch_size: 100,
        max_clock_drift_ms: 500,
    };
    let hub = start_hub(settings, options, dir.path(), "127.0.0.1:0".parse()?).await?;
    let url = hub.url();
    // mallory sends alice's ops: refused, nothing stored.
    forged(&url, "mallory", Some(op_of("alice", "orders"))).await?;
    forged(&url, "mallory", Some(op_of("alice", "made_up_table"))).await?;
    forged(&url, "", Some(op_of("alice", "orders"))).await?;
    let (samples, _) = scrape(hub.metrics_addr.unwrap()).await?;
    let errors = |table: &str, kind: &str| {
        sum(
            &samples,
            "sync_errors_total",
            &[("table", table), ("error_type", kind)],
        )
    };
    assert_eq!(errors("orders", "origin_mismatch"), 1.0, "{samples:?}");
    assert_eq!(errors("", "origin_mismatch"), 1.0, "{samples:?}");
    assert_eq!(errors("", "no_hello"), 1.0, "{samples:?}");
    assert_eq!(sum(&samples, "sync_errors_total", &[]), 3.0);
    assert!(!samples.contains_key("records_synced_total"));
    let st = hub_status(&url).await?;
    assert_eq!(st.total_ops, 0);
    assert_eq!(st.tables.len(), 1, "{:?}", st.tables);
    let orders = &st.tables[0];
    assert_eq!(
        (orders.table.as_str(), orders.state.as_str()),
        ("orders", "error")
    );
    assert_eq!(orders.errors_total, 1);
    assert_eq!(st.last_24h.unwrap().errors, 3);
    assert_eq!(st.health, "down", "{}", st.health_reason);
    assert!(
        st.health_reason.contains("mallory down since"),
        "{}",
        st.health_reason
    );

    let mut watch = Proc::spawn(dir.path(), "watch", &["status", "--hub", &url, "--watch"])?;
    let log = dir.path().join("watch.log");
    wait_until("two frames of status --watch", LIMIT, || async {
        let text = std::fs::read_to_string(&log)?;
        Ok(text.matches("\x1b[H").count() >= 2 && text.matches("DOWN - no node").count() >= 2)
    })
    .await?;
    watch.assert_running(dir.path())?;
    watch.kill9();
    hub.shutdown().await?;
    Ok(())
}

/// A metrics address already in use: `syncmesh hub` and `syncmesh node`
/// exit non-zero with one line naming the address and what to do.
#[test]
fn metrics_address_in_use_is_one_clear_line() -> Result<()> {
    let busy = std::net::TcpListener::bind("127.0.0.1:0")?;
    let busy_port = busy.local_addr()?.port();
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let yaml = format!(
        "hub:\n  listen: 127.0.0.1:{port}\n  data_dir: ./hub\n  metrics: 127.0.0.1:{busy_port}\n\
         nodes:\n  - name: a\n    hub: http://127.0.0.1:{port}\n    data_dir: ./a\n    metrics: 127.0.0.1:{busy_port}\n    database: {{ type: sqlite, url: \"sqlite://./a.db\" }}\n\
         tables:\n  - name: orders\n"
    );
    let cfg = dir.path().join("mesh.yaml");
    std::fs::write(&cfg, yaml)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(create_db(&dir.path().join("a.db"), ORDERS))?;
    let cfg = cfg.display().to_string();
    for args in [
        vec!["hub", "--config", &cfg],
        vec!["node", "--config", &cfg, "--name", "a"],
    ] {
        let mut child = std::process::Command::new(syncmesh_tests::syncmesh_bin())
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if start.elapsed() > LIMIT {
                let _ = child.kill();
                bail!("syncmesh {args:?} kept running with its metrics address in use");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = child.wait_with_output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.trim().lines().last().unwrap_or("").to_owned();
        assert!(!status.success(), "{args:?}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(
            last.starts_with("error: ")
                && last.contains(&format!("cannot serve metrics on 127.0.0.1:{busy_port}"))
                && last.contains("change the metrics address"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    drop(busy);
    Ok(())
}

/// A conflict mirror whose database cannot be opened is counted in
/// `sync_errors_total{error_type="conflict_mirror"}` and the hub keeps
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_mirror_failures_are_counted_in_sync_errors_total() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!(
        "sqlite://{}",
        dir.path()
            .join("missing-dir")
            .join("conflicts.db")
            .display()
    );
    let options = HubOptions {
        tables: BTreeMap::from([("orders".to_owned(), TableRules::default())]),
        metrics: Some("127.0.0.1:0".parse()?),
        mirror: Some(syncmesh_node::config::MirrorConfig {
            url: syncmesh_node::config::Secret::new(url),
            table: "sync_conflicts".to_owned(),
        }),
        ..Default::default()
    };
    let settings = HubSettings {
        name: NodeId::new("hub")?,
        batch_size: 100,
        max_clock_drift_ms: 500,
    };
    let hub = start_hub(settings, options, dir.path(), "127.0.0.1:0".parse()?).await?;
    let addr = hub.metrics_addr.unwrap();
    wait_until("a counted mirror failure", LIMIT, || async {
        let (samples, _) = scrape(addr).await?;
        Ok(sum(
            &samples,
            "sync_errors_total",
            &[("table", ""), ("error_type", "conflict_mirror")],
        ) >= 1.0)
    })
    .await?;
    assert!(hub.mirror_errors() >= 1);
    hub_status(&hub.url()).await?;
    hub.shutdown().await?;
    Ok(())
}
