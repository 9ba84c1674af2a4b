//! The tonic shell of the hub: one actor task owns the [`HubCore`]; every
//! `Sync` stream becomes a session whose messages are fed to the core, and
//! whose outgoing queue is filled from [`HubCore::poll_transmit`]. With
//! `conflicts.mirror` set, a [`Mirror`] task copies conflict records into
//! the mirror table; the actor only wakes it (never waits for it).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::Stream;
use syncmesh_node::store::SledStore;
use syncmesh_proto::v1 as pb;
use syncmesh_proto::v1::sync_server::SyncServer;
use syncmesh_resolver::{Ntp64, TableRules};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use crate::core::{Control, HubCore, HubSettings, SessionId};
use crate::mirror::Mirror;
use crate::telemetry::{Telemetry, status_json};
use crate::{Error, Result};

/// Depth of each session's outgoing queue (messages).
const SESSION_QUEUE: usize = 16;
/// Depth of the actor's command queue.
const COMMAND_QUEUE: usize = 1024;

type Out = mpsc::Sender<Result<pb::HubMessage, Status>>;

enum Cmd {
    Open {
        out: Out,
        reply: oneshot::Sender<SessionId>,
    },
    Msg(SessionId, Box<pb::NodeMessage>),
    Closed(SessionId),
    Status(oneshot::Sender<pb::StatusReply>),
    Conflicts(
        pb::ConflictsRequest,
        oneshot::Sender<Result<pb::ConflictsReply>>,
    ),
    /// Prometheus text for `/metrics`.
    Metrics(oneshot::Sender<String>),
    /// The status and chart as JSON for the web page.
    Page(oneshot::Sender<String>),
}

/// `/metrics`, `/` and `/status.json` on the metrics address, answered by
/// the actor.
struct Endpoints {
    cmds: mpsc::Sender<Cmd>,
}

impl syncmesh_ops::http::Endpoints for Endpoints {
    fn metrics(&self) -> futures::future::BoxFuture<'static, String> {
        let cmds = self.cmds.clone();
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            if cmds.send(Cmd::Metrics(tx)).await.is_err() {
                return String::new();
            }
            rx.await.unwrap_or_default()
        })
    }

    fn status_json(&self) -> futures::future::BoxFuture<'static, Option<String>> {
        let cmds = self.cmds.clone();
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            cmds.send(Cmd::Page(tx)).await.ok()?;
            rx.await.ok()
        })
    }

    fn index_html(&self) -> Option<&'static str> {
        Some(syncmesh_ops::page::INDEX_HTML)
    }
}

fn wall_now() -> Ntp64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Ntp64::from_unix_millis(ms)
}

struct Service {
    cmds: mpsc::Sender<Cmd>,
}

#[tonic::async_trait]
impl pb::sync_server::Sync for Service {
    type SyncStream = Pin<Box<dyn Stream<Item = Result<pb::HubMessage, Status>> + Send + 'static>>;

    async fn sync(
        &self,
        request: Request<Streaming<pb::NodeMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let (out_tx, out_rx) = mpsc::channel(SESSION_QUEUE);
        let (reply_tx, reply_rx) = oneshot::channel();
        let unavailable = || Status::unavailable("hub is shutting down; retry later");
        self.cmds
            .send(Cmd::Open {
                out: out_tx,
                reply: reply_tx,
            })
            .await
            .map_err(|_| unavailable())?;
        let sid = reply_rx.await.map_err(|_| unavailable())?;
        let mut inbound = request.into_inner();
        let cmds = self.cmds.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => {
                        if cmds.send(Cmd::Msg(sid, Box::new(m))).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(session = sid, %status, "sync stream ended with an error");
                        break;
                    }
                }
            }
            let _ = cmds.send(Cmd::Closed(sid)).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn conflicts(
        &self,
        request: Request<pb::ConflictsRequest>,
    ) -> Result<Response<pb::ConflictsReply>, Status> {
        let (tx, rx) = oneshot::channel();
        let unavailable = || Status::unavailable("hub is shutting down; retry later");
        self.cmds
            .send(Cmd::Conflicts(request.into_inner(), tx))
            .await
            .map_err(|_| unavailable())?;
        match rx.await.map_err(|_| unavailable())? {
            Ok(reply) => Ok(Response::new(reply)),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let (tx, rx) = oneshot::channel();
        let unavailable = || Status::unavailable("hub is shutting down; retry later");
        self.cmds
            .send(Cmd::Status(tx))
            .await
            .map_err(|_| unavailable())?;
        Ok(Response::new(rx.await.map_err(|_| unavailable())?))
    }
}

/// A running hub.
pub struct HubHandle {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    /// Where `/metrics` and the status page are served, if configured.
    pub metrics_addr: Option<SocketAddr>,
    metrics: Option<syncmesh_ops::http::MetricsServer>,
    mirror: Option<Mirror>,
    shutdown: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<()>>,
    actor: tokio::task::JoinHandle<Result<()>>,
    /// Set once `wait` saw a task end: the handles must not be polled again.
    stopped: bool,
    /// Whether it serves TLS (`hub.tls`).
    tls: bool,
}

impl HubHandle {
    /// `http://addr` (`https://addr` with `hub.tls`), the URL nodes dial.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops accepting, closes every stream, and waits for the store to close.
    pub async fn shutdown(mut self) -> Result<()> {
        self.metrics = None;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // The mirror holds a handle of the store: stop it first.
        if let Some(m) = self.mirror.take() {
            m.stop().await;
        }
        if self.stopped {
            return Ok(());
        }
        self.server.abort();
        let _ = (&mut self.server).await;
        match (&mut self.actor).await {
            Ok(r) => r,
            Err(e) => Err(Error::Server(format!("hub actor failed: {e}"))),
        }
    }

    /// Mirror failures counted so far (`sync_errors_total{error_type="conflict_mirror"}`).
    pub fn mirror_errors(&self) -> u64 {
        self.mirror.as_ref().map_or(0, Mirror::errors)
    }

    /// Waits until the hub stops by itself (an error) or forever.
    pub async fn wait(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        let res = tokio::select! {
            r = &mut self.server => match r {
                Ok(r) => r,
                Err(e) => Err(Error::Server(format!("hub server task failed: {e}"))),
            },
            // The actor only stops on a store error or after shutdown.
            r = &mut self.actor => match r {
                Ok(Ok(())) => Err(Error::Server("the hub core stopped".into())),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(Error::Server(format!("hub actor failed: {e}"))),
            },
        };
        self.stopped = true;
        res
    }
}

/// What a hub knows beyond its [`HubSettings`].
#[derive(Clone, Debug, Default)]
pub struct HubOptions {
    /// Tables whose ops the hub merges to find conflicts.
    pub tables: BTreeMap<String, TableRules>,
    /// How long conflict records are kept (0 = the default of 90 days).
    pub conflict_retention_days: u32,
    /// Where to serve `/metrics` and the status page (`hub.metrics`).
    pub metrics: Option<SocketAddr>,
    /// `conflicts.alert`: threshold and webhook.
    pub alert: Option<syncmesh_node::config::AlertConfig>,
    /// `conflicts.mirror`: the table conflict records are copied into.
    pub mirror: Option<syncmesh_node::config::MirrorConfig>,
    /// `hub.tombstone_grace_hours` in ms (0 = the default of 7 days).
    pub tombstone_grace_ms: u64,
    /// The configured nodes (name to mode), for tombstone GC: a configured
    /// writer that never connected holds collection back.
    pub nodes: BTreeMap<syncmesh_resolver::NodeId, String>,
    /// `hub.tls`: serve gRPC over TLS (with `client_ca`, mutual TLS).
    pub tls: Option<syncmesh_node::tls::ServerTls>,
}

/// Opens the store in `data_dir`, binds `listen` and serves.
pub async fn start_hub(
    settings: HubSettings,
    options: HubOptions,
    data_dir: &Path,
    listen: SocketAddr,
) -> Result<HubHandle> {
    let opened = open_core(settings, &options, data_dir)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::Bind {
            addr: listen.to_string(),
            message: format!("{e}; is another hub running there? change hub.listen"),
        })?;
    let addr = listener.local_addr().map_err(|e| Error::Bind {
        addr: listen.to_string(),
        message: e.to_string(),
    })?;
    serve(opened, &options, accepting(listener), addr).await
}

/// The connections `listener` accepts, with `TCP_NODELAY` set on each:
/// tonic ignores its builder's `tcp_nodelay` for a caller's incoming
/// stream, and with Nagle's algorithm a small relayed batch waited for the
/// node's delayed ACK (about 40 ms on Linux) before it left the hub.
fn accepting(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Like [`start_hub`], serving the connections `incoming` yields instead of
/// binding a TCP port (a simulated network in tests; `addr` is only
/// reported).
pub async fn start_hub_with_incoming<I, IO, IE>(
    settings: HubSettings,
    options: HubOptions,
    data_dir: &Path,
    incoming: I,
    addr: SocketAddr,
) -> Result<HubHandle>
where
    I: Stream<Item = std::result::Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let opened = open_core(settings, &options, data_dir)?;
    serve(opened, &options, incoming, addr).await
}

/// A hub core with its name and configured tables, and another handle of
/// its store for the mirror.
struct Opened {
    core: HubCore<SledStore>,
    name: String,
    tables: Vec<String>,
    store: SledStore,
}

fn open_core(settings: HubSettings, options: &HubOptions, data_dir: &Path) -> Result<Opened> {
    let store = SledStore::open(data_dir)?;
    let name = settings.name.as_str().to_owned();
    let mut core = HubCore::open(settings, store.clone())?;
    core.set_conflict_mirror(options.mirror.is_some())?;
    let tables: Vec<String> = options.tables.keys().cloned().collect();
    core.set_tables(options.tables.clone());
    if options.conflict_retention_days > 0 {
        core.set_conflict_retention_days(options.conflict_retention_days);
    }
    if options.tombstone_grace_ms > 0 {
        core.set_tombstone_grace_ms(options.tombstone_grace_ms);
    }
    core.set_gc_nodes(options.nodes.clone());
    Ok(Opened {
        core,
        name,
        tables,
        store,
    })
}

async fn serve<I, IO, IE>(
    opened: Opened,
    options: &HubOptions,
    incoming: I,
    addr: SocketAddr,
) -> Result<HubHandle>
where
    I: Stream<Item = std::result::Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let Opened {
        core,
        name,
        tables,
        store,
    } = opened;
    // TLS first: a bad config starts nothing.
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    if let Some(tls) = &options.tls {
        builder = builder.tls_config(tls.tonic_config()).map_err(|e| {
            Error::Server(format!(
                "cannot set up TLS from hub.tls ({}): check hub.tls.cert, hub.tls.key and hub.tls.client_ca",
                syncmesh_node::tls::chain_text(&e)
            ))
        })?;
        tracing::info!(
            mutual = tls.is_mutual(),
            cert = %tls.cert.display(),
            "hub serves TLS{}",
            if tls.is_mutual() { " and requires client certificates signed by hub.tls.client_ca" } else { "" }
        );
    }
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let (actor_stop_tx, actor_stop_rx) = oneshot::channel::<()>();
    let metrics = match options.metrics {
        Some(at) => Some(
            syncmesh_ops::http::serve(
                at,
                std::sync::Arc::new(Endpoints {
                    cmds: cmd_tx.clone(),
                }),
            )
            .await?,
        ),
        None => None,
    };
    let telemetry = Telemetry::new(&name, wall_ms(), options.alert.as_ref());
    let mirror = options.mirror.clone().map(|m| {
        tracing::info!(
            "conflict mirror: copying conflict records into table {} at {}",
            m.table,
            m.url.redacted()
        );
        let days = if options.conflict_retention_days > 0 {
            options.conflict_retention_days
        } else {
            crate::core::DEFAULT_CONFLICT_RETENTION_DAYS
        };
        Mirror::start(store, m, days)
    });
    let actor = tokio::spawn(run_actor(
        core,
        Observed {
            telemetry,
            tables,
            mirror: mirror.as_ref().map(Mirror::waker),
        },
        cmd_rx,
        actor_stop_rx,
    ));
    let svc = SyncServer::new(Service { cmds: cmd_tx })
        .max_decoding_message_size(syncmesh_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(syncmesh_proto::MAX_MESSAGE_BYTES);
    let server = tokio::spawn(async move {
        let res = builder
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_rx.await;
            })
            .await;
        let _ = actor_stop_tx.send(());
        res.map_err(|e| Error::Server(e.to_string()))
    });
    tracing::info!(%addr, "hub listening");
    Ok(HubHandle {
        stopped: false,
        tls: options.tls.is_some(),
        addr,
        metrics_addr: metrics.as_ref().map(|m| m.addr),
        metrics,
        mirror,
        shutdown: Some(shutdown_tx),
        server,
        actor,
    })
}

/// What the actor keeps besides the core: telemetry, the configured
/// tables and the mirror's waker.
struct Observed {
    telemetry: Telemetry,
    tables: Vec<String>,
    mirror: Option<crate::mirror::Waker>,
}

impl Observed {
    /// Telemetry from the core's counters (and the mirror's failures).
    fn update(&mut self, core: &mut HubCore<SledStore>) {
        if let Some(m) = &self.mirror {
            let n = m.errors();
            if n > 0 {
                core.metrics_mut()
                    .errors
                    .insert((String::new(), crate::mirror::ERROR_TYPE.to_owned()), n);
            }
        }
        self.telemetry.update(wall_ms(), core.metrics_mut());
    }

    /// Wakes the mirror: records may have changed.
    fn wake_mirror(&self) {
        if let Some(m) = &self.mirror {
            m.wake();
        }
    }

    fn status(&mut self, core: &mut HubCore<SledStore>) -> pb::StatusReply {
        let now = wall_ms();
        self.update(core);
        let mut reply = core.status();
        self.telemetry
            .fill_status(&mut reply, core.metrics(), &self.tables, now);
        reply
    }
}

fn wall_ms() -> u64 {
    wall_now().as_unix_millis()
}

async fn run_actor(
    mut core: HubCore<SledStore>,
    mut obs: Observed,
    mut cmds: mpsc::Receiver<Cmd>,
    mut stop: oneshot::Receiver<()>,
) -> Result<()> {
    let mut outs: HashMap<SessionId, Out> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_housekeeping = std::time::Instant::now();
    core.handle_tick(wall_now())?;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                let cuts = core.gc_stats().cuts;
                core.handle_gc(wall_now(), crate::core::GC_ROWS_PER_STEP)?;
                if core.gc_stats().cuts != cuts {
                    let cut = core.gc_cut();
                    tracing::info!(
                        stable = ?cut.stable.0,
                        rows_collected = core.gc_stats().rows_collected,
                        rows_dropped = core.gc_stats().rows_dropped,
                        "tombstone GC: collecting at a new stable cut"
                    );
                }
                if last_housekeeping.elapsed() >= Duration::from_secs(60) {
                    last_housekeeping = std::time::Instant::now();
                    core.handle_tick(wall_now())?;
                }
            }
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { break };
                match cmd {
                    Cmd::Open { out, reply } => {
                        let sid = core.handle_open();
                        outs.insert(sid, out);
                        let _ = reply.send(sid);
                    }
                    Cmd::Msg(sid, msg) => {
                        let started = std::time::Instant::now();
                        let node = core.session_node(sid).map(|n| n.to_string());
                        let ctl = core.handle_message(wall_now(), sid, *msg)?;
                        while let Some(line) = core.poll_notice() {
                            tracing::warn!(session = sid, "{line}");
                        }
                        // Flushed: lag samples end now; new conflict
                        // records are durable and may be mirrored.
                        obs.update(&mut core);
                        obs.wake_mirror();
                        let ms = started.elapsed().as_millis() as u64;
                        tracing::debug!(session = sid, ms, "message handled");
                        match ctl {
                            Control::Continue => {}
                            Control::Close(reason) => {
                                let node = node.as_deref().unwrap_or("(before hello)");
                                tracing::warn!(session = sid, node, "closing the sync stream: {reason}");
                                pump(&mut core, sid, &outs)?;
                                outs.remove(&sid);
                                core.handle_close(sid);
                            }
                        }
                    }
                    Cmd::Closed(sid) => {
                        outs.remove(&sid);
                        core.handle_close(sid);
                    }
                    Cmd::Status(reply) => {
                        let _ = reply.send(obs.status(&mut core));
                    }
                    Cmd::Metrics(reply) => {
                        obs.update(&mut core);
                        let _ = reply.send(obs.telemetry.metrics().render());
                    }
                    Cmd::Page(reply) => {
                        let status = obs.status(&mut core);
                        let mut json = status_json(&status);
                        json["chart"] = obs.telemetry.chart_json(status.now_unix_ms);
                        let _ = reply.send(json.to_string());
                    }
                    Cmd::Conflicts(req, reply) => {
                        let _ = reply.send(core.conflicts(&req));
                    }
                }
            }
        }
        while let Some((sid, reason)) = core.poll_close() {
            tracing::info!(session = sid, %reason, "replacing a sync stream");
            outs.remove(&sid);
        }
        for sid in core.sessions() {
            pump(&mut core, sid, &outs)?;
        }
    }
    Ok(())
}

fn pump(
    core: &mut HubCore<SledStore>,
    sid: SessionId,
    outs: &HashMap<SessionId, Out>,
) -> Result<()> {
    let Some(out) = outs.get(&sid) else {
        return Ok(());
    };
    loop {
        let Ok(permit) = out.try_reserve() else {
            return Ok(());
        };
        match core.poll_transmit(sid)? {
            Some(m) => permit.send(Ok(m)),
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use futures::StreamExt as _;

    /// The hub's accepted sync streams do not wait for Nagle's algorithm.
    #[tokio::test]
    async fn accepted_connections_have_tcp_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = super::accepting(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "TCP_NODELAY is not set on an accepted connection"
        );
    }
}
