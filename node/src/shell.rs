//! The tokio/tonic shell around [`NodeCore`]: one task owns the core and
//! feeds it from the database (capture), from the hub stream, and from a
//! control channel; it writes what the core asks for (rows to apply,
//! messages to send). All decisions live in the core.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use syncmesh_ops::prom::Metrics;
use syncmesh_proto::v1 as pb;
use syncmesh_proto::v1::sync_client::SyncClient;
use syncmesh_resolver::Ntp64;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

use crate::adapter::{Db, now_ms};
use crate::config::{Config, Mode};
use crate::core::{Control, Event, NodeCore, NodeSettings, NodeStats, TableInfo};
use crate::store::SledStore;
use crate::{Error, Result};

/// Opens the gRPC channel to the hub for a configured endpoint. The
/// default dials TCP (`Endpoint::connect`); tests that run the shell over a
/// simulated network (turmoil) pass their own.
pub type Dialer = std::sync::Arc<
    dyn Fn(
            Endpoint,
        ) -> futures::future::BoxFuture<
            'static,
            std::result::Result<Channel, tonic::transport::Error>,
        > + Send
        + Sync,
>;

/// How often the change table is polled when idle.
pub const CAPTURE_INTERVAL_MS: u64 = 50;
/// How soon it is polled again after a poll found changes (a busy
/// database is followed closely: capture lag is at most about this).
pub const CAPTURE_BUSY_INTERVAL_MS: u64 = 5;
/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT_MS: u64 = 5_000;

/// Commands to a running node.
#[derive(Debug)]
enum ShellCmd {
    SetOnline(bool),
    Shutdown,
}

/// A running node.
pub struct NodeHandle {
    name: String,
    cmds: mpsc::Sender<ShellCmd>,
    stats: watch::Receiver<NodeStats>,
    join: Option<tokio::task::JoinHandle<Result<()>>>,
    /// Where `/metrics` is served, if configured.
    pub metrics_addr: Option<std::net::SocketAddr>,
    _metrics: Option<syncmesh_ops::http::MetricsServer>,
}

/// `/metrics` of a node.
struct NodeEndpoints {
    metrics: Arc<Metrics>,
}

impl syncmesh_ops::http::Endpoints for NodeEndpoints {
    fn metrics(&self) -> futures::future::BoxFuture<'static, String> {
        let text = self.metrics.render();
        Box::pin(async move { text })
    }

    fn status_json(&self) -> futures::future::BoxFuture<'static, Option<String>> {
        Box::pin(async { None })
    }

    fn index_html(&self) -> Option<&'static str> {
        None
    }
}

impl NodeHandle {
    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The latest counters.
    pub fn stats(&self) -> NodeStats {
        self.stats.borrow().clone()
    }

    /// Cuts the node off the hub (`false`) or lets it reconnect (`true`).
    /// Capture goes on while it is offline.
    pub async fn set_online(&self, online: bool) {
        let _ = self.cmds.send(ShellCmd::SetOnline(online)).await;
    }

    /// Stops the node after the current step and waits for it.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.cmds.send(ShellCmd::Shutdown).await;
        self.wait().await
    }

    /// Waits until the node stops (only on an error or shutdown).
    pub async fn wait(&mut self) -> Result<()> {
        let Some(join) = self.join.as_mut() else {
            return Ok(());
        };
        let res = join.await;
        self.join = None;
        match res {
            Ok(r) => r,
            Err(e) => Err(Error::Store {
                path: self.name.clone(),
                message: format!("node task failed: {e}"),
            }),
        }
    }
}

/// Opens the database, checks the tables, installs capture, opens the log
/// and starts the node. Errors here are configuration or environment
/// problems and are returned before anything runs.
pub async fn start_node(config: &Config, name: &str) -> Result<NodeHandle> {
    start_node_with_dialer(config, name, None).await
}

/// Like [`start_node`], opening the hub channel with `dialer` when given.
pub async fn start_node_with_dialer(
    config: &Config,
    name: &str,
    dialer: Option<Dialer>,
) -> Result<NodeHandle> {
    let cfg = config.node(name)?;
    let (tables, sync, source) = (&config.tables, &config.sync, config.source.as_str());
    let priorities = config.priorities();
    let mut db = Db::open(&cfg.database).await?;
    let wanted: Vec<(String, Vec<String>)> = tables
        .iter()
        .map(|t| (t.name.clone(), t.key.clone()))
        .collect();
    let schemas = db.introspect(&wanted).await?;
    let mut infos = Vec::new();
    for (mut schema, t) in schemas.into_iter().zip(tables) {
        let rules = t.rules(&priorities);
        if matches!(db, Db::Redis(_) | Db::Mongo(_)) {
            // No schema to read: the configured fields are the columns
            // the rules may name (a cache stores whatever the rows hold).
            for (field, strategy) in &rules.fields {
                if !schema.columns.iter().any(|c| &c.name == field) {
                    schema.columns.push(crate::adapter::ColumnInfo {
                        name: field.clone(),
                        decl_type: if *strategy == syncmesh_resolver::Strategy::Sum {
                            "NUMERIC".into()
                        } else {
                            "TEXT".into()
                        },
                        not_null: false,
                    });
                }
            }
        }
        infos.push(TableInfo::new(schema, rules, source)?);
    }
    if cfg.mode != Mode::Subscribe {
        let schemas: Vec<_> = infos.iter().map(|i| i.schema.clone()).collect();
        db.install_capture(&schemas).await?;
    }
    let store = SledStore::open(&cfg.data_dir)?;
    let restart_mark = db.change_watermark().await?;
    let settings = NodeSettings {
        name: cfg.name.clone(),
        mode: cfg.mode,
        batch_size: sync.batch_size,
        max_clock_drift_ms: sync.max_clock_drift_ms,
    };
    let mut core = NodeCore::open(settings, infos.clone(), store, restart_mark)?;
    if let Db::Mongo(m) = &mut db {
        m.restore(core.meta(crate::mongodb::RESUME_META)?.as_deref())?;
    }
    core.set_engine(cfg.database.kind.as_str());
    let (metrics, server) = match cfg.metrics {
        Some(addr) => {
            let metrics = Arc::new(Metrics::new());
            let server = syncmesh_ops::http::serve(
                addr,
                Arc::new(NodeEndpoints {
                    metrics: metrics.clone(),
                }),
            )
            .await
            .map_err(|e| Error::Config {
                path: source.to_owned(),
                message: format!("node {}: {e}", cfg.name),
            })?;
            (Some(metrics), Some(server))
        }
        None => (None, None),
    };
    let mut snapshot = None;
    if let Db::Postgres(pg) = &mut db
        && cfg.mode.captures()
    {
        if core.capture_checkpoint() == 0 {
            // Begun here (a refused snapshot fails the start); the shell
            // publishes its chunks while it sends them to the hub.
            let schemas: Vec<_> = infos.iter().map(|i| i.schema.clone()).collect();
            snapshot = crate::postgres::InitialSnapshot::begin(pg, &mut core, &schemas)
                .await?
                .map(InitialSnapshot::Postgres);
        } else {
            // A resumed snapshot's windows still filter what capture reads.
            let progress = core
                .meta(crate::postgres::SnapshotProgress::META)?
                .and_then(|b| crate::postgres::SnapshotProgress::decode(&b));
            pg.set_resume(progress, core.capture_checkpoint());
        }
    }
    if let Db::Mysql(my) = &db
        && cfg.mode.captures()
    {
        // As PostgreSQL's: begun here, published from the shell's loop.
        let schemas: Vec<_> = infos.iter().map(|i| i.schema.clone()).collect();
        snapshot = crate::mysql::InitialSnapshot::begin(my, &mut core, &schemas, cfg.name.as_str())
            .await?
            .map(InitialSnapshot::Mysql);
    }
    let (cmd_tx, cmd_rx) = mpsc::channel(16);
    let (stats_tx, stats_rx) = watch::channel(core.stats());
    let shell = Shell {
        core,
        db,
        schemas: infos.into_iter().map(|i| i.schema).collect(),
        hub_url: cfg.hub.clone(),
        tls: cfg.tls.clone(),
        hints: crate::tls::Hints::node(&cfg.at),
        dialer,
        started: tokio::time::Instant::now(),
        batch_size: sync.batch_size,
        capture: cfg.mode != Mode::Subscribe,
        stats: stats_tx,
        db_backoff_ms: 0,
        db_retry_at_ms: 0,
        metrics,
        errors: BTreeMap::new(),
        published: None,
        download: syncmesh_ops::progress::Progress::new(cfg.name.as_str(), "catching up"),
        upload: syncmesh_ops::progress::Progress::new(cfg.name.as_str(), "sending queued changes"),
        snapshot,
        stash: None,
    };
    let join = tokio::spawn(shell.run(cmd_rx));
    Ok(NodeHandle {
        name: cfg.name.to_string(),
        cmds: cmd_tx,
        stats: stats_rx,
        join: Some(join),
        metrics_addr: server.as_ref().map(|s| s.addr),
        _metrics: server,
    })
}

struct Link {
    tx: mpsc::Sender<pb::NodeMessage>,
    inbound: Streaming<pb::HubMessage>,
}

type Connecting = tokio::task::JoinHandle<Result<Link>>;

struct Shell {
    core: NodeCore<SledStore>,
    db: Db,
    schemas: Vec<crate::adapter::TableSchema>,
    hub_url: String,
    /// How to speak TLS to an `https://` hub.
    tls: Option<crate::tls::ClientTls>,
    /// Which settings error messages name.
    hints: crate::tls::Hints,
    dialer: Option<Dialer>,
    /// Backoff and retry deadlines are ms since this (tokio's clock, so a
    /// simulated runtime controls them); HLCs read the wall clock.
    started: tokio::time::Instant,
    batch_size: usize,
    capture: bool,
    stats: watch::Sender<NodeStats>,
    db_backoff_ms: u64,
    db_retry_at_ms: u64,
    /// The node's Prometheus registry, when `metrics:` is configured.
    metrics: Option<Arc<Metrics>>,
    /// Errors by (table, error type) for `sync_errors_total`.
    errors: BTreeMap<(String, String), u64>,
    /// The stats last copied into `metrics`.
    published: Option<NodeStats>,
    /// Catch-up progress: remote ops coming in, own ops going out.
    download: syncmesh_ops::progress::Progress,
    upload: syncmesh_ops::progress::Progress,
    /// The initial snapshot while it is being published: capture, apply
    /// and GC wait, and of the hub's messages only those that do not touch
    /// rows are handled (see [`merges_during_snapshot`]).
    snapshot: Option<InitialSnapshot>,
    /// The first hub message that has to wait for the snapshot's end; no
    /// more are read until it is handled (order kept, bounded).
    stash: Option<pb::HubMessage>,
}

/// A database's initial snapshot being published (PostgreSQL and
/// MySQL/MariaDB have one; the other engines publish nothing at start).
enum InitialSnapshot {
    Postgres(crate::postgres::InitialSnapshot),
    Mysql(crate::mysql::InitialSnapshot),
}

/// Hub messages a node handles while it publishes its initial snapshot:
/// acks, errors, stable cuts (recorded only: GC waits too) and a hello
/// reply that starts no re-snapshot. Remote ops and re-snapshot chunks
/// wait. Apply waits too: a remote op applied before the snapshot reads
/// its row would be in the database view the snapshot's insert claims to
/// have seen, though the row was read as of the older snapshot point, and
/// the insert would supersede it (test
/// `remote_ops_arriving_during_an_initial_snapshot_wait_for_its_end`).
/// Merging them early would be safe with apply waiting (the core takes
/// the database's view, without them), but holding them keeps the views
/// and dirty rows of a long snapshot out of memory.
fn merges_during_snapshot(msg: &pb::HubMessage) -> bool {
    use pb::hub_message::Body;
    match &msg.body {
        Some(Body::Ack(_) | Body::Error(_) | Body::Cut(_)) => true,
        Some(Body::Hello(h)) => !h.snapshot,
        Some(Body::Ops(_) | Body::Snapshot(_)) | None => false,
    }
}

async fn connect(
    url: String,
    tls: Option<crate::tls::ClientTls>,
    hints: crate::tls::Hints,
    dialer: Option<Dialer>,
) -> Result<Link> {
    let hub_err = |message: String| Error::Hub {
        url: url.clone(),
        message,
    };
    let endpoint = crate::tls::endpoint(&url, tls.as_ref(), &hints)
        .map_err(hub_err)?
        .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let channel = match dialer {
        Some(dial) => dial(endpoint).await,
        None => endpoint.connect().await,
    };
    let channel = match channel {
        Ok(c) => c,
        Err(e) => {
            let message = match crate::tls::diagnose(&e, &url, tls.as_ref(), &hints)
                .resolve(&url, &hints)
                .await
            {
                Some(why) => {
                    format!("{why}; changes stay queued and are sent once it connects")
                }
                None => format!(
                    "cannot connect ({}); is the hub running? changes stay queued and are sent on reconnect",
                    crate::tls::chain_text(&e)
                ),
            };
            return Err(hub_err(message));
        }
    };
    let mut client = SyncClient::new(channel)
        .max_decoding_message_size(syncmesh_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(syncmesh_proto::MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(8);
    let resp = tokio::time::timeout(
        Duration::from_millis(CONNECT_TIMEOUT_MS),
        client.sync(ReceiverStream::new(rx)),
    )
    .await
    .map_err(|_| hub_err("the hub did not answer the sync stream in time".into()))?;
    let resp = match resp {
        Ok(r) => r,
        Err(s) => {
            let message = match crate::tls::diagnose(&s, &url, tls.as_ref(), &hints)
                .resolve(&url, &hints)
                .await
            {
                Some(why) => {
                    format!("{why}; changes stay queued and are sent once it connects")
                }
                None => match std::error::Error::source(&s) {
                    Some(src) => format!(
                        "sync stream refused: {} ({})",
                        s.message(),
                        crate::tls::chain_text(src)
                    ),
                    None => format!("sync stream refused: {}", s.message()),
                },
            };
            return Err(hub_err(message));
        }
    };
    Ok(Link {
        tx,
        inbound: resp.into_inner(),
    })
}

async fn next_msg(
    link: &mut Option<Link>,
) -> std::result::Result<Option<pb::HubMessage>, tonic::Status> {
    match link {
        Some(l) => l.inbound.message().await,
        None => std::future::pending().await,
    }
}

async fn connected(c: &mut Option<Connecting>) -> Result<Link> {
    match c {
        Some(h) => match h.await {
            Ok(r) => r,
            Err(e) => Err(Error::Hub {
                url: String::new(),
                message: format!("connect task failed: {e}"),
            }),
        },
        None => std::future::pending().await,
    }
}

impl Shell {
    fn mono_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn run(mut self, mut cmds: mpsc::Receiver<ShellCmd>) -> Result<()> {
        let mut link: Option<Link> = None;
        let mut connecting: Option<Connecting> = None;
        let mut online = true;
        let mut tick = tokio::time::interval(Duration::from_millis(CAPTURE_INTERVAL_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u32;
        loop {
            if link.is_none() {
                // It came on a stream that is gone: the next one starts over.
                self.stash = None;
            }
            if self.snapshot.is_none()
                && let Some(m) = self.stash.take()
            {
                self.on_hub_message(Ok(Some(m)), &mut link).await?;
            }
            if online
                && link.is_none()
                && connecting.is_none()
                && self.core.poll_connect(self.mono_ms())
            {
                connecting = Some(tokio::spawn(connect(
                    self.hub_url.clone(),
                    self.tls.clone(),
                    self.hints.clone(),
                    self.dialer.clone(),
                )));
            }
            if let Some(l) = &link
                && !self.pump(l)?
            {
                link = None;
                self.core
                    .handle_disconnected(self.mono_ms(), rand::rng().random_range(0..100));
            }
            self.log_events();
            let stats = self.core.stats();
            self.publish(&stats);
            if stats.connected {
                let now = now_ms();
                self.download
                    .observe(now, stats.remote_ops, stats.remote_ops_at_hub);
                // The snapshot's own bar covers its sending (two bars
                // would overwrite each other's line).
                if self.snapshot.is_none() {
                    self.upload.observe(now, stats.own_acked, stats.own_ops);
                }
            }
            let _ = self.stats.send(stats);
            tokio::select! {
                _ = tick.tick() => {
                    let next_ms = self.poll_db(link.as_ref()).await?;
                    tick.reset_after(Duration::from_millis(next_ms));
                    self.publish_wal();
                }
                res = connected(&mut connecting) => {
                    connecting = None;
                    match res {
                        Ok(l) => {
                            failures = 0;
                            self.core.handle_connected(self.mono_ms());
                            link = Some(l);
                        }
                        Err(e) => {
                            failures += 1;
                            if failures == 1 || failures.is_multiple_of(20) {
                                tracing::warn!(node = %self.core.name(), attempts = failures, "{e}");
                            }
                            self.core.handle_disconnected(self.mono_ms(), rand::rng().random_range(0..100));
                        }
                    }
                }
                // A PostgreSQL stream wakes capture as soon as a
                // transaction arrives (no waiting for the next poll).
                _ = self.db.changes_ready(), if self.capture
                    && self.snapshot.is_none()
                    && !self.core.resnap_installing()
                    && self.mono_ms() >= self.db_retry_at_ms => {
                    let next_ms = self.poll_db(link.as_ref()).await?;
                    tick.reset_after(Duration::from_millis(next_ms));
                }
                msg = next_msg(&mut link), if self.stash.is_none() => {
                    match msg {
                        Ok(Some(m)) if self.snapshot.is_some() && !merges_during_snapshot(&m) => {
                            self.stash = Some(m);
                        }
                        msg => self.on_hub_message(msg, &mut link).await?,
                    }
                }
                cmd = cmds.recv() => match cmd {
                    Some(ShellCmd::SetOnline(on)) => {
                        online = on;
                        if !on {
                            link = None;
                            if let Some(c) = connecting.take() { c.abort(); }
                            self.core.handle_disconnected(self.mono_ms(), 0);
                            tracing::info!(node = %self.core.name(), "taken offline");
                        }
                    }
                    Some(ShellCmd::Shutdown) | None => break,
                },
            }
        }
        self.db.close().await;
        Ok(())
    }

    /// Handles one message from the hub (or the end of its stream), then
    /// applies what it merged.
    async fn on_hub_message(
        &mut self,
        msg: std::result::Result<Option<pb::HubMessage>, tonic::Status>,
        link: &mut Option<Link>,
    ) -> Result<()> {
        let ctl = match msg {
            Ok(Some(m)) => {
                let now = Ntp64::from_unix_millis(now_ms());
                let started = std::time::Instant::now();
                let ctl = self.core.handle_message(now, m)?;
                self.publish_lag();
                let ms = started.elapsed().as_millis() as u64;
                tracing::debug!(node = %self.core.name(), ms, "hub message merged");
                ctl
            }
            Ok(None) => Control::Reconnect("the hub closed the stream".into()),
            Err(s) => Control::Reconnect(format!("stream error: {}", s.message())),
        };
        if let Control::Reconnect(reason) = ctl {
            tracing::warn!(node = %self.core.name(), hub = %self.hub_url, "disconnected: {reason}; reconnecting with backoff");
            *link = None;
            self.core
                .handle_disconnected(self.mono_ms(), rand::rng().random_range(0..100));
        }
        self.db_step(link.as_ref(), false).await?;
        Ok(())
    }

    /// One turn of the database side: the next snapshot chunk while the
    /// initial snapshot runs, else capture (if this node captures), apply
    /// and GC. Returns the ms until the next turn.
    async fn poll_db(&mut self, link: Option<&Link>) -> Result<u64> {
        if self.snapshot.is_some() {
            self.snapshot_step(link).await?;
            return Ok(0);
        }
        let capture = self.capture;
        Ok(if self.db_step(link, capture).await? > 0 {
            CAPTURE_BUSY_INTERVAL_MS
        } else {
            CAPTURE_INTERVAL_MS
        })
    }

    /// Publishes the next chunk of the initial snapshot and sends what the
    /// core has; at its end sets the checkpoint, so capture, apply and the
    /// messages that waited go on. An error stops the node, as a failed
    /// snapshot at start did: a restart resumes after the last durable
    /// chunk.
    async fn snapshot_step(&mut self, link: Option<&Link>) -> Result<()> {
        let (core, schemas, batch) = (&mut self.core, &self.schemas, self.batch_size);
        let done = match (self.snapshot.as_mut(), &mut self.db) {
            (Some(InitialSnapshot::Postgres(snap)), Db::Postgres(pg)) => {
                snap.step(pg, core, schemas, batch).await?
            }
            (Some(InitialSnapshot::Mysql(snap)), Db::Mysql(my)) => {
                snap.step(my, core, schemas, batch).await?
            }
            _ => true,
        };
        if done {
            match (self.snapshot.take(), &mut self.db) {
                (Some(InitialSnapshot::Postgres(snap)), Db::Postgres(pg)) => {
                    snap.finish(pg, &mut self.core).await?;
                }
                (Some(InitialSnapshot::Mysql(snap)), Db::Mysql(my)) => snap.finish(my),
                _ => {}
            }
        }
        if let Some(l) = link {
            self.pump(l)?;
        }
        Ok(())
    }

    /// Captures (if `capture`) and applies. A database error (busy, locked,
    /// away) is logged and retried with backoff: nothing is lost, changes
    /// wait in the change table and merged rows in the journal. Any other
    /// error stops the node. Returns the number of changes captured.
    async fn db_step(&mut self, link: Option<&Link>, capture: bool) -> Result<usize> {
        if self.mono_ms() < self.db_retry_at_ms || self.snapshot.is_some() {
            return Ok(0);
        }
        let mut res = Ok(0);
        if capture {
            res = self.capture_all(link).await;
        }
        if res.is_ok() {
            res = self.apply_all().await.and(res);
        }
        if res.is_ok() {
            res = self.core.poll_gc(crate::core::GC_ROWS_PER_POLL).and(res);
        }
        match res {
            Ok(captured) => {
                self.db_backoff_ms = 0;
                Ok(captured)
            }
            Err(e @ Error::Database { .. }) => {
                self.db_backoff_ms = (self.db_backoff_ms * 2).clamp(250, 30_000);
                self.db_retry_at_ms = self.mono_ms() + self.db_backoff_ms;
                self.count_error("", "database");
                tracing::warn!(node = %self.core.name(), retry_in_ms = self.db_backoff_ms, "{e}");
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    /// Sends what the core has while the stream has room; false if it closed.
    fn pump(&mut self, link: &Link) -> Result<bool> {
        loop {
            let permit = match link.tx.try_reserve() {
                Ok(p) => p,
                Err(mpsc::error::TrySendError::Full(())) => return Ok(true),
                Err(mpsc::error::TrySendError::Closed(())) => return Ok(false),
            };
            match self.core.poll_transmit()? {
                Some(m) => permit.send(m),
                None => return Ok(true),
            }
        }
    }

    /// Captures every pending change, batch by batch, sending each batch
    /// to the hub (when connected) before reading the next. Returns how
    /// many changes it captured.
    async fn capture_all(&mut self, link: Option<&Link>) -> Result<usize> {
        let mut captured = 0;
        loop {
            if self.core.resnap_installing() {
                // Changes wait in the change table until it is installed.
                return Ok(captured);
            }
            let changes = self
                .db
                .read_changes(self.core.capture_checkpoint(), self.batch_size)
                .await?;
            if changes.is_empty() {
                return Ok(captured);
            }
            captured += changes.len();
            let n = changes.len();
            let started = std::time::Instant::now();
            let meta = self.db.capture_meta();
            let cp = self.core.handle_captured_with_meta(
                Ntp64::from_unix_millis(now_ms()),
                &changes,
                &meta,
            )?;
            let logged_ms = started.elapsed().as_millis() as u64;
            // The ops are flushed: only now may the change rows go.
            self.db.delete_changes_through(cp).await?;
            let total_ms = started.elapsed().as_millis() as u64;
            tracing::debug!(node = %self.core.name(), changes = n, logged_ms, total_ms, "captured");
            if let Some(l) = link {
                self.pump(l)?;
            }
            if n < self.batch_size {
                return Ok(captured);
            }
        }
    }

    async fn apply_all(&mut self) -> Result<()> {
        loop {
            let pending = self.core.poll_apply(self.batch_size)?;
            if pending.is_empty() {
                return Ok(());
            }
            let started = std::time::Instant::now();
            let writes: Vec<_> = pending.iter().map(|p| p.write.clone()).collect();
            let watermark = self.db.apply(&self.schemas, &writes).await?;
            self.core.handle_applied(&pending, watermark)?;
            let ms = started.elapsed().as_millis() as u64;
            tracing::debug!(node = %self.core.name(), rows = writes.len(), ms, "applied");
        }
    }

    fn count_error(&mut self, table: &str, error_type: &str) {
        let Some(m) = &self.metrics else { return };
        let n = self
            .errors
            .entry((table.to_owned(), error_type.to_owned()))
            .or_insert(0);
        *n += 1;
        m.set_sync_errors_total(table, error_type, *n);
    }

    /// Lag of the remote ops the last call made durable: from their capture
    /// HLC to now, right after the flush.
    fn publish_lag(&mut self) {
        let durable = self.core.take_durable();
        let Some(m) = &self.metrics else { return };
        let now = now_ms();
        for (table, hlc) in durable {
            let captured = Ntp64(hlc).as_unix_millis();
            let seconds = now.saturating_sub(captured) as f64 / 1000.0;
            m.set_sync_lag_seconds(&table, self.core.name().as_str(), seconds);
        }
    }

    /// Copies the slot's retained WAL (PostgreSQL) into the registry.
    fn publish_wal(&self) {
        let (Some(m), Some((slot, bytes))) = (&self.metrics, self.db.slot_retained_wal()) else {
            return;
        };
        m.set_slot_retained_wal_bytes(self.core.name().as_str(), slot, bytes);
    }

    /// Copies changed counters into the registry.
    fn publish(&mut self, stats: &NodeStats) {
        let Some(m) = &self.metrics else { return };
        if self.published.as_ref() == Some(stats) {
            return;
        }
        for ((table, op), n) in &stats.records_synced {
            m.set_records_synced_total(table, op, *n);
        }
        self.published = Some(stats.clone());
    }

    fn log_events(&mut self) {
        while let Some(ev) = self.core.poll_event() {
            match ev {
                Event::Connected { hub_has_own } => {
                    tracing::info!(node = %self.core.name(), hub = %self.hub_url, hub_has_own, "connected to hub")
                }
                Event::Warning(w) => {
                    self.count_error("", "warning");
                    tracing::warn!(node = %self.core.name(), "{w}")
                }
                Event::Resnapshot(line) => {
                    tracing::warn!(node = %self.core.name(), "{line}")
                }
                Event::HubError { code, message } => {
                    self.count_error("", &code);
                    tracing::warn!(node = %self.core.name(), code, "hub error: {message}")
                }
            }
        }
    }
}
