//! The event loop: simulated processes, network and faults. See the crate
//! docs for the model; this file is its implementation.

use std::collections::{BTreeMap, VecDeque};

use syncmesh_hub::core::{Control as HubControl, HubCore, HubSettings, SessionId};
use syncmesh_node::adapter::CapturedChange;
use syncmesh_node::config::Mode;
use syncmesh_node::core::{
    Control as NodeControl, Event as NodeEvent, NodeCore, NodeSettings, PendingApply, TableInfo,
};
use syncmesh_node::shell::{CAPTURE_INTERVAL_MS, CONNECT_TIMEOUT_MS};
use syncmesh_proto::v1 as pb;
use syncmesh_resolver::{NodeId, Ntp64, Value, VersionVector};

use crate::check;
use crate::config::{MAX_CLOCK_DRIFT_MS, Params, Sabotage, SimConfig};
use crate::db::SimDb;
use crate::rng::Rng;
use crate::store::Shared;
use crate::trace::{Event, Trace};
use crate::workload::{self, ExpectedOp, WriteCounts};

/// Unix time (ms) at which every run starts.
pub const START_UNIX_MS: u64 = 1_700_000_000_000;
/// HTTP/2 keepalive ping interval of both shells (`node::shell::connect`,
/// `hub::server::start_hub`: 10 s).
pub const KEEPALIVE_INTERVAL_MS: u64 = 10_000;
/// What a node's shell reports when the hub's host resets its connection.
const HUB_RESET: &str = "stream error: connection reset by the hub";
/// How often the hub actor runs `handle_tick` (`hub::server::run_actor`).
pub const HUB_HOUSEKEEPING_MS: u64 = 60_000;
/// How often the simulated hub actor runs `handle_gc` (the real one every
/// 20 ms; coarser here to keep runs fast).
pub const HUB_GC_MS: u64 = 500;
/// Row states one GC call examines in the simulator (small, so passes
/// interleave with merges).
pub const SIM_GC_ROWS: usize = 8;
/// Jitter the node shell adds to reconnects (`0..100` ms).
pub const RECONNECT_JITTER_MS: u64 = 100;
/// The hub's error code for ops of a node that missed collected
/// tombstones (expected only under the exclusion fault).
const GC_REFUSAL: &str = "missed_collected_tombstones";
/// Batches per direction remembered for replays.
const REPLAY_HISTORY: usize = 4;
/// Events kept for failure reports.
const TRACE_WINDOW: usize = 400;

type LinkId = u64;
const N2H: usize = 0;
const H2N: usize = 1;
const NODE: usize = 0;
const HUB: usize = 1;

/// A violated invariant.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// Which invariant.
    pub invariant: String,
    /// What exactly went wrong.
    pub detail: String,
}

impl Failure {
    /// A failure of `invariant`.
    pub fn new(invariant: &str, detail: impl Into<String>) -> Self {
        Failure {
            invariant: invariant.to_owned(),
            detail: detail.into(),
        }
    }
}

/// Counters of one run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunStats {
    /// Simulated ms until the run ended (fault phase + heal).
    pub sim_ms: u64,
    /// Simulated ms from the heal until convergence was confirmed.
    pub heal_ms: u64,
    /// Events processed.
    pub events: u64,
    /// Local writes by kind.
    pub writes: WriteCounts,
    /// Ops the local writes had to produce.
    pub expected_ops: u64,
    /// Writes aimed between `poll_apply` and the apply.
    pub race_writes: u64,
    /// Messages delivered to a core.
    pub delivered: u64,
    /// Connections opened.
    pub connects: u64,
    /// Connections broken by injected loss.
    pub losses: u64,
    /// Acks dropped after a durable batch (injected).
    pub ack_losses: u64,
    /// Old batches replayed after a reconnect (injected).
    pub replays: u64,
    /// Keepalive timeouts.
    pub keepalive_timeouts: u64,
    /// Batches the hub refused for clock drift.
    pub drift_refusals: u64,
    /// Partitions started.
    pub partitions: u64,
    /// Node crashes.
    pub node_crashes: u64,
    /// Hub crashes.
    pub hub_crashes: u64,
    /// Clock jumps.
    pub clock_jumps: u64,
    /// Rows written by applies.
    pub applied_rows: u64,
    /// Stable cuts the hub adopted (tombstone GC).
    pub gc_cuts: u64,
    /// Row states the hub dropped (deleted rows fully collected).
    pub gc_hub_rows_dropped: u64,
    /// Row states the nodes dropped (counted since each one's last start).
    pub gc_node_rows_dropped: u64,
    /// Sessions the hub replaced because their node opened a newer stream
    /// (the old one was still open at the hub: reordering across
    /// connections).
    pub stream_replacements: u64,
    /// Messages that reached the hub on a session it had already closed.
    pub stale_messages: u64,
    /// Batches or hellos the hub refused because their node missed
    /// collected tombstones (`missed_collected_tombstones`: the exclusion
    /// fault).
    pub gc_refusals: u64,
    /// Re-snapshots the nodes installed.
    pub resnapshots: u64,
    /// Of those, installed while the node held own ops the hub did not:
    /// writes made while it was excluded from the cut.
    pub resnapshots_with_unsent: u64,
    /// Local writes a node core dropped under `delete_wins` because a
    /// collected delete superseded them (`lost_update`).
    pub dropped_writes: u64,
    /// Batches in which the hub dropped writes of a returning publish-only
    /// node under `delete_wins` (its notice lines).
    pub hub_dropped_batches: u64,
}

impl RunStats {
    /// Adds `o` to these totals (`heal_ms` keeps the maximum).
    pub fn absorb(&mut self, o: &RunStats) {
        self.sim_ms += o.sim_ms;
        self.heal_ms = self.heal_ms.max(o.heal_ms);
        self.events += o.events;
        for (k, v) in &o.writes {
            *self.writes.entry(k).or_default() += v;
        }
        self.expected_ops += o.expected_ops;
        self.race_writes += o.race_writes;
        self.delivered += o.delivered;
        self.connects += o.connects;
        self.losses += o.losses;
        self.ack_losses += o.ack_losses;
        self.replays += o.replays;
        self.keepalive_timeouts += o.keepalive_timeouts;
        self.drift_refusals += o.drift_refusals;
        self.partitions += o.partitions;
        self.node_crashes += o.node_crashes;
        self.hub_crashes += o.hub_crashes;
        self.clock_jumps += o.clock_jumps;
        self.applied_rows += o.applied_rows;
        self.stream_replacements += o.stream_replacements;
        self.stale_messages += o.stale_messages;
        self.gc_cuts += o.gc_cuts;
        self.gc_hub_rows_dropped += o.gc_hub_rows_dropped;
        self.gc_node_rows_dropped += o.gc_node_rows_dropped;
        self.gc_refusals += o.gc_refusals;
        self.resnapshots += o.resnapshots;
        self.resnapshots_with_unsent += o.resnapshots_with_unsent;
        self.dropped_writes += o.dropped_writes;
        self.hub_dropped_batches += o.hub_dropped_batches;
    }

    /// One line of fault and traffic counters.
    pub fn faults_line(&self) -> String {
        format!(
            "{} partitions, {} node crashes, {} hub crashes, {} clock jumps, {} connection resets, {} lost acks, {} replays, {} keepalive timeouts, {} clock-drift refusals, {} stream replacements, {} stale-session messages, {} writes racing an apply, {} connects, {} messages, {} applied rows, {} GC cuts, {} row states collected at the hub and {} at nodes, {} refusals of nodes that missed collected tombstones, {} re-snapshots installed ({} holding writes made while excluded), {} writes dropped under delete_wins, {} hub batches dropping a publish-only node's writes",
            self.partitions,
            self.node_crashes,
            self.hub_crashes,
            self.clock_jumps,
            self.losses,
            self.ack_losses,
            self.replays,
            self.keepalive_timeouts,
            self.drift_refusals,
            self.stream_replacements,
            self.stale_messages,
            self.race_writes,
            self.connects,
            self.delivered,
            self.applied_rows,
            self.gc_cuts,
            self.gc_hub_rows_dropped,
            self.gc_node_rows_dropped,
            self.gc_refusals,
            self.resnapshots,
            self.resnapshots_with_unsent,
            self.dropped_writes,
            self.hub_dropped_batches
        )
    }
}

enum Step {
    CapRead,
    CapLog(Vec<CapturedChange>),
    CapDelete(i64, usize),
    ApplyPoll,
    ApplyWrite(Vec<PendingApply>),
    ApplyAck(Vec<PendingApply>, i64),
}

enum Inbound {
    /// A message; `ack_loss`: break the connection right after handling it
    /// (its ack is lost); `replayed`: injected duplicate.
    Msg {
        m: Box<pb::HubMessage>,
        ack_loss: bool,
        replayed: bool,
    },
    /// The stream ended or failed.
    End(String),
}

struct Attempt {
    id: u64,
    link: Option<LinkId>,
    decided: bool,
}

struct SimNode {
    name: NodeId,
    mode: Mode,
    store: Shared,
    core: Option<NodeCore<Shared>>,
    inc: u64,
    db: SimDb,
    offset_ms: i64,
    step: Option<Step>,
    busy: bool,
    tick_ready: bool,
    connect: Option<Attempt>,
    connect_result: Option<Result<LinkId, String>>,
    link: Option<LinkId>,
    inbox: VecDeque<(LinkId, Inbound)>,
    expected: Vec<ExpectedOp>,
    replayable: VecDeque<pb::HubMessage>,
    /// The version vector of the running core, or of the last one before
    /// a crash (what the node held, durably, at any moment).
    held: VersionVector,
    /// Seqs of own ops the core reported dropping (`lost_update`: fields
    /// emptied under `delete_wins`), from its `Resnapshot` events.
    dropped: std::collections::BTreeSet<u64>,
    /// A re-snapshot was installed and its rows may not all be in the
    /// database yet: a local write now may still be made from a view older
    /// than the snapshot (until the core has no dirty rows left).
    resnap_unapplied: bool,
    /// A publish-only node the hub excluded from the stable cut: from then
    /// on its writes are concurrent with collected deletes (it never sees
    /// any), so every row it writes is late.
    excluded_publish: bool,
}

struct SimHub {
    settings: HubSettings,
    store: Shared,
    core: Option<HubCore<Shared>>,
    inc: u64,
    offset_ms: i64,
    sessions: BTreeMap<SessionId, LinkId>,
    replayable: BTreeMap<usize, VecDeque<pb::NodeMessage>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum End {
    Pending,
    Open,
    Closed,
}

enum Packet {
    Accept,
    Node(pb::NodeMessage),
    Hub(pb::HubMessage),
    /// End of stream, with what the receiving shell reports.
    Eos(&'static str),
    Ping,
    PingAck,
}

struct Link {
    node: usize,
    node_inc: u64,
    hub_inc: u64,
    sid: SessionId,
    node_end: End,
    hub_read: bool,
    hub_write: bool,
    broken: bool,
    q: [VecDeque<(u64, Packet)>; 2],
    scheduled: [bool; 2],
    base_ms: u64,
    ping_sent: [u64; 2],
    ping_acked: [u64; 2],
}

enum Ev {
    NodeTick(usize),
    NodeStep(usize, u64),
    Write(usize),
    RaceWrite(usize, String, Vec<Value>),
    ConnectArrive(usize, u64, u64),
    ConnectRefused(usize, u64, u64),
    ConnectTimeout(usize, u64, u64),
    Deliver(LinkId, usize),
    Keepalive(LinkId, usize),
    PartitionStart,
    PartitionEnd(u64, Vec<(usize, usize)>),
    NodeCrash,
    NodeRestart(usize, u64),
    HubCrash,
    HubRestart(u64),
    HubTick,
    HubGc,
    ClockJump,
    Heal,
    CheckQuiet,
}

/// The result of one run.
#[derive(Debug)]
pub struct Outcome {
    /// The configuration it ran with.
    pub config: SimConfig,
    /// The drawn parameters.
    pub params: Params,
    /// The first violated invariant, if any.
    pub failure: Option<Failure>,
    /// Hash over the whole trace and the final state.
    pub trace_hash: u64,
    /// Counters.
    pub stats: RunStats,
    /// The last events before the end.
    pub last_events: Vec<Event>,
    /// A known core bug this run exhibited without failing (see
    /// [`crate::check::Checked::known`]): the first instance and the count.
    pub known_issue: Option<(Failure, u64)>,
}

/// One simulated mesh: a hub, its nodes, their databases and the network.
pub struct Sim {
    cfg: SimConfig,
    p: Params,
    now: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    seq: u64,
    r_net: Rng,
    r_fault: Rng,
    r_work: Rng,
    r_shell: Rng,
    tables: Vec<TableInfo>,
    nodes: Vec<SimNode>,
    hub: SimHub,
    links: BTreeMap<LinkId, Link>,
    next_link: LinkId,
    next_attempt: u64,
    blocked: Vec<[u32; 2]>,
    part_epoch: u64,
    healed: bool,
    quiet_checks: u32,
    progress: (u64, u64),
    done: bool,
    trace: Trace,
    failure: Option<Failure>,
    known_issue: Option<(Failure, u64)>,
    stats: RunStats,
    sabotage_count: u64,
    /// Rows written by a local write its node made before it installed a
    /// re-snapshot and the hub did not hold yet: writes made while the node
    /// was excluded from the cut, concurrent with deletes the mesh may have
    /// collected. See [`check::check_all`].
    late_rows: std::collections::BTreeSet<(String, Vec<Value>)>,
}

fn fmt_key(key: &[Value]) -> String {
    let parts: Vec<String> = key.iter().map(|v| v.to_string()).collect();
    parts.join(",")
}

fn fmt_ops(ops: &[pb::Op]) -> String {
    match (ops.first(), ops.last()) {
        (Some(a), Some(b)) => {
            let id = |o: &pb::Op| {
                o.id.as_ref()
                    .map(|i| format!("{}#{}", i.origin, i.seq))
                    .unwrap_or_default()
            };
            if ops.len() == 1 {
                format!("ops[{}]", id(a))
            } else {
                format!("ops[{}..{} ({})]", id(a), id(b), ops.len())
            }
        }
        _ => "ops[]".into(),
    }
}

fn fmt_vv(vv: &Option<pb::VersionVector>) -> String {
    let mut e: Vec<(String, u64)> = vv
        .as_ref()
        .map(|v| v.entries.iter().map(|(k, s)| (k.clone(), *s)).collect())
        .unwrap_or_default();
    e.sort();
    let parts: Vec<String> = e.iter().map(|(k, s)| format!("{k}:{s}")).collect();
    format!("{{{}}}", parts.join(" "))
}

fn fmt_node_msg(m: &pb::NodeMessage) -> String {
    use pb::node_message::Body;
    match &m.body {
        Some(Body::Hello(h)) => format!("hello {}", fmt_vv(&h.version_vector)),
        Some(Body::Ops(b)) => fmt_ops(&b.ops),
        Some(Body::Ack(a)) => format!("ack {}", fmt_vv(&a.version_vector)),
        Some(Body::Seen(r)) => format!("seen {}", fmt_vv(&r.seen)),
        Some(Body::SnapshotAck(a)) => format!("snapshot-ack {} installed {}", a.id, a.installed),
        None => "empty".into(),
    }
}

fn fmt_hub_msg(m: &pb::HubMessage) -> String {
    use pb::hub_message::Body;
    match &m.body {
        Some(Body::Hello(h)) => format!("hello-reply {}", fmt_vv(&h.version_vector)),
        Some(Body::Ops(b)) => fmt_ops(&b.ops),
        Some(Body::Ack(a)) => format!("ack {}", fmt_vv(&a.version_vector)),
        Some(Body::Error(e)) => format!("error {}: {}", e.code, e.message),
        Some(Body::Cut(c)) => format!("cut {} horizon {}", fmt_vv(&c.stable), fmt_vv(&c.horizon)),
        Some(Body::Snapshot(c)) => format!(
            "snapshot {} rows {} last {} at {}",
            c.id,
            c.rows.len(),
            c.last,
            fmt_vv(&c.version_vector)
        ),
        None => "empty".into(),
    }
}

impl Sim {
    /// Builds the mesh for `cfg` (nothing runs yet).
    pub fn new(cfg: SimConfig) -> Self {
        let p = Params::draw(cfg.seed, &cfg.overrides);
        let tables = workload::tables();
        let schemas: Vec<_> = tables.iter().map(|t| t.schema.clone()).collect();
        let mut r_fault = Rng::stream(cfg.seed, 2);
        let skew = p.skew_ms as i64;
        let offset = |r: &mut Rng| r.below(2 * p.skew_ms + 1) as i64 - skew;
        let nodes = p
            .modes
            .iter()
            .enumerate()
            .map(|(i, mode)| SimNode {
                name: NodeId::new(format!("n{i}")).expect("n0..n9 are valid node names"),
                mode: *mode,
                store: Shared::default(),
                core: None,
                inc: 0,
                db: SimDb::new(&schemas, mode.captures()),
                offset_ms: offset(&mut r_fault),
                step: None,
                busy: false,
                tick_ready: false,
                connect: None,
                connect_result: None,
                link: None,
                inbox: VecDeque::new(),
                expected: Vec::new(),
                replayable: VecDeque::new(),
                held: VersionVector::default(),
                dropped: std::collections::BTreeSet::new(),
                resnap_unapplied: false,
                excluded_publish: false,
            })
            .collect::<Vec<_>>();
        let hub = SimHub {
            settings: HubSettings {
                name: NodeId::new("hub").expect("a valid node name"),
                batch_size: p.batch_size,
                max_clock_drift_ms: MAX_CLOCK_DRIFT_MS,
            },
            store: Shared::default(),
            core: None,
            inc: 0,
            offset_ms: offset(&mut r_fault),
            sessions: BTreeMap::new(),
            replayable: BTreeMap::new(),
        };
        let n = nodes.len();
        Sim {
            trace: Trace::new(TRACE_WINDOW, cfg.live_trace),
            r_net: Rng::stream(cfg.seed, 1),
            r_fault,
            r_work: Rng::stream(cfg.seed, 3),
            r_shell: Rng::stream(cfg.seed, 4),
            cfg,
            p,
            now: 0,
            queue: BTreeMap::new(),
            seq: 0,
            tables,
            nodes,
            hub,
            links: BTreeMap::new(),
            next_link: 1,
            next_attempt: 1,
            blocked: vec![[0, 0]; n],
            part_epoch: 0,
            healed: false,
            quiet_checks: 0,
            progress: (0, 0),
            done: false,
            failure: None,
            known_issue: None,
            stats: RunStats::default(),
            sabotage_count: 0,
            late_rows: std::collections::BTreeSet::new(),
        }
    }

    /// The drawn parameters.
    pub fn params(&self) -> &Params {
        &self.p
    }

    fn at(&mut self, delay_ms: u64, ev: Ev) {
        self.seq += 1;
        let t = self.now.saturating_add(delay_ms);
        self.queue.insert((t, self.seq), ev);
    }

    fn log(&mut self, text: String) {
        self.trace.push(self.now, text);
    }

    fn fail(&mut self, f: Failure) {
        if self.failure.is_none() {
            let line = format!("VIOLATION {}: {}", f.invariant, f.detail);
            self.log(line);
            self.failure = Some(f);
        }
    }

    fn node_ms(&self, i: usize) -> u64 {
        ((START_UNIX_MS + self.now) as i64 + self.nodes[i].offset_ms).max(0) as u64
    }

    fn hub_ms(&self) -> u64 {
        ((START_UNIX_MS + self.now) as i64 + self.hub.offset_ms).max(0) as u64
    }

    fn node_settings(&self, i: usize) -> NodeSettings {
        NodeSettings {
            name: self.nodes[i].name.clone(),
            mode: self.nodes[i].mode,
            batch_size: self.p.batch_size,
            max_clock_drift_ms: MAX_CLOCK_DRIFT_MS,
        }
    }

    /// Whether the hub may legitimately refuse node `i` for missing
    /// collected tombstones: only under the exclusion fault (a short
    /// tombstone grace), which never runs with a publish-only node.
    fn exclusion_expected(&self, i: usize) -> bool {
        self.p.tombstone_grace_ms > 0 && self.nodes.get(i).is_some_and(|n| n.mode != Mode::Publish)
    }

    fn delay(&mut self) -> u64 {
        self.r_net.below(self.p.max_delay_ms / 2 + 1)
    }

    /// Runs to the end and reports.
    pub fn run(mut self) -> Outcome {
        self.start();
        let deadline = self.cfg.fault_ms + self.cfg.heal_timeout_ms;
        while !self.done && self.failure.is_none() {
            let Some(((t, _), ev)) = self.queue.pop_first() else {
                self.fail(Failure::new("liveness", "the event queue ran dry"));
                break;
            };
            if t > deadline {
                self.now = deadline;
                let why = self.not_quiet_reason().unwrap_or_default();
                self.fail(Failure::new(
                    "liveness: converge after the heal",
                    format!(
                        "still not converged {} s after the network healed: {why}",
                        self.cfg.heal_timeout_ms / 1000
                    ),
                ));
                break;
            }
            self.now = t;
            self.stats.events += 1;
            self.handle(ev);
        }
        self.stats.sim_ms = self.now;
        self.finish()
    }

    fn finish(mut self) -> Outcome {
        let mut h = self.trace.hash_mut().clone();
        for n in &self.nodes {
            for s in n.db.schemas() {
                for (k, r) in n.db.rows(&s.name).into_iter().flatten() {
                    h.bytes(format!("{k:?}{r:?}").as_bytes());
                }
            }
        }
        *self.trace.hash_mut() = h;
        Outcome {
            params: self.p.clone(),
            failure: self.failure.take(),
            trace_hash: self.trace.hash(),
            last_events: self.trace.last(TRACE_WINDOW),
            known_issue: self.known_issue.take(),
            stats: self.stats.clone(),
            config: self.cfg.clone(),
        }
    }

    fn start(&mut self) {
        let summary = self.p.summary();
        self.log(format!("seed {} {summary}", self.cfg.seed));
        self.open_hub();
        self.hub_tick();
        self.at(HUB_HOUSEKEEPING_MS, Ev::HubTick);
        self.at(HUB_GC_MS, Ev::HubGc);
        for i in 0..self.nodes.len() {
            self.open_node(i);
            let phase = self.r_shell.below(CAPTURE_INTERVAL_MS);
            self.at(phase, Ev::NodeTick(i));
            if self.nodes[i].mode.captures() && self.p.writes_per_sec > 0.0 {
                let w = self.r_work.wait_ms(1000.0 / self.p.writes_per_sec);
                self.at(w, Ev::Write(i));
            }
        }
        let per_min = |rate: f64| if rate > 0.0 { 60_000.0 / rate } else { 0.0 };
        let gens = [
            (self.p.partitions_per_min, 0u8),
            (self.p.node_crashes_per_min, 1),
            (self.p.hub_crashes_per_min, 2),
            (self.p.clock_jumps_per_min, 3),
        ];
        for (rate, kind) in gens {
            if rate > 0.0 {
                let w = self.r_fault.wait_ms(per_min(rate));
                if w < self.cfg.fault_ms {
                    self.at(w, Self::fault_ev(kind));
                }
            }
        }
        self.at(self.cfg.fault_ms, Ev::Heal);
    }

    fn fault_ev(kind: u8) -> Ev {
        match kind {
            0 => Ev::PartitionStart,
            1 => Ev::NodeCrash,
            2 => Ev::HubCrash,
            _ => Ev::ClockJump,
        }
    }

    fn next_fault(&mut self, kind: u8, rate_per_min: f64) {
        if self.healed || rate_per_min <= 0.0 {
            return;
        }
        let w = self.r_fault.wait_ms(60_000.0 / rate_per_min);
        if self.now.saturating_add(w) < self.cfg.fault_ms {
            self.at(w, Self::fault_ev(kind));
        }
    }

    fn sabotage(&mut self, which: Sabotage, every: u64) -> bool {
        if self.cfg.sabotage != Some(which) {
            return false;
        }
        self.sabotage_count += 1;
        self.sabotage_count.is_multiple_of(every)
    }

    fn open_node(&mut self, i: usize) {
        let settings = self.node_settings(i);
        let mut mark = self.nodes[i].db.change_watermark();
        if self.cfg.sabotage == Some(Sabotage::ForgetRestartMark) {
            mark = 0;
        }
        match NodeCore::open(
            settings,
            self.tables.clone(),
            self.nodes[i].store.clone(),
            mark,
        ) {
            Ok(c) => self.nodes[i].core = Some(c),
            Err(e) => self.fail(Failure::new(
                "node core error",
                format!("{}: open: {e}", self.nodes[i].name),
            )),
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::NodeTick(i) => {
                self.at(CAPTURE_INTERVAL_MS, Ev::NodeTick(i));
                if self.nodes[i].core.is_some() {
                    self.nodes[i].tick_ready = true;
                    self.drive(i);
                }
            }
            Ev::NodeStep(i, inc) => {
                if self.nodes[i].inc != inc || self.nodes[i].core.is_none() {
                    return;
                }
                if let Some(step) = self.nodes[i].step.take() {
                    self.nodes[i].busy = false;
                    self.run_step(i, step);
                    self.drive(i);
                }
            }
            Ev::Write(i) => {
                if self.healed {
                    return;
                }
                let n = if self.r_work.chance(self.p.txn_rate) {
                    self.r_work.range(2, 3)
                } else {
                    1
                };
                for _ in 0..n {
                    self.local_write(i, None);
                }
                let w = self.r_work.wait_ms(1000.0 / self.p.writes_per_sec);
                self.at(w, Ev::Write(i));
            }
            Ev::RaceWrite(i, table, key) => {
                if !self.healed {
                    self.stats.race_writes += 1;
                    self.local_write(i, Some((table.as_str(), key.as_slice())));
                }
            }
            Ev::ConnectArrive(i, inc, id) => self.connect_arrive(i, inc, id),
            Ev::ConnectRefused(i, inc, id) => {
                self.decide_connect(i, inc, id, Err("connection refused".into()))
            }
            Ev::ConnectTimeout(i, inc, id) => {
                self.decide_connect(i, inc, id, Err("connect timed out".into()))
            }
            Ev::Deliver(lid, dir) => self.deliver(lid, dir),
            Ev::Keepalive(lid, side) => self.keepalive(lid, side),
            Ev::PartitionStart => self.partition_start(),
            Ev::PartitionEnd(epoch, blocks) => {
                if epoch == self.part_epoch {
                    self.log("partition ends".into());
                    for (n, d) in blocks {
                        self.unblock_one(n, d);
                    }
                }
            }
            Ev::NodeCrash => {
                let alive: Vec<usize> = (0..self.nodes.len())
                    .filter(|&i| self.nodes[i].core.is_some())
                    .collect();
                if !alive.is_empty() {
                    let i = alive[self.r_fault.index(alive.len())];
                    self.crash_node(i);
                    let down = self.r_fault.range(10, 5_000);
                    let inc = self.nodes[i].inc;
                    self.at(down, Ev::NodeRestart(i, inc));
                }
                self.next_fault(1, self.p.node_crashes_per_min);
            }
            Ev::NodeRestart(i, inc) => {
                if self.nodes[i].inc == inc && self.nodes[i].core.is_none() {
                    self.restart_node(i);
                }
            }
            Ev::HubCrash => {
                if self.hub.core.is_some() {
                    self.crash_hub();
                    let down = self.r_fault.range(10, 5_000);
                    let inc = self.hub.inc;
                    self.at(down, Ev::HubRestart(inc));
                }
                self.next_fault(2, self.p.hub_crashes_per_min);
            }
            Ev::HubTick => {
                self.at(HUB_HOUSEKEEPING_MS, Ev::HubTick);
                self.hub_tick();
            }
            Ev::HubGc => {
                self.at(HUB_GC_MS, Ev::HubGc);
                self.hub_gc();
            }
            Ev::HubRestart(inc) => {
                if self.hub.inc == inc && self.hub.core.is_none() {
                    self.restart_hub();
                }
            }
            Ev::ClockJump => {
                self.clock_jump();
                self.next_fault(3, self.p.clock_jumps_per_min);
            }
            Ev::Heal => self.heal(),
            Ev::CheckQuiet => {
                let mark = self.progress_mark();
                if mark != self.progress.0 {
                    self.progress = (mark, self.now);
                } else if self.now - self.progress.1 > self.cfg.stall_timeout_ms {
                    let why = self.not_quiet_reason().unwrap_or_default();
                    self.fail(Failure::new(
                        "liveness: progress until converged after the heal",
                        format!(
                            "nothing moved for {} s ({} s after the heal): {why}",
                            self.cfg.stall_timeout_ms / 1000,
                            (self.now - self.cfg.fault_ms) / 1000
                        ),
                    ));
                    return;
                }
                if self.not_quiet_reason().is_none() {
                    self.quiet_checks += 1;
                    if self.quiet_checks >= 2 {
                        self.stats.heal_ms = self.now - self.cfg.fault_ms;
                        self.log("quiescent: checking invariants".into());
                        self.final_checks();
                        self.done = true;
                        return;
                    }
                } else {
                    self.quiet_checks = 0;
                }
                self.at(500, Ev::CheckQuiet);
            }
        }
    }

    // ---------------------------------------------------------------
    // Local writes
    // ---------------------------------------------------------------

    fn local_write(&mut self, i: usize, target: Option<(&str, &[Value])>) {
        let node = &mut self.nodes[i];
        let Some((ch, sum)) =
            workload::random_write(&mut self.r_work, &mut node.db, &self.tables, target)
        else {
            return;
        };
        *self.stats.writes.entry(sum.what).or_default() += 1;
        if let Some(core) = node.core.as_ref() {
            node.held = core.version_vector().clone();
        }
        if node.resnap_unapplied
            && node
                .core
                .as_ref()
                .is_some_and(|c| c.stats().dirty_rows == 0)
        {
            node.resnap_unapplied = false;
        }
        if let Some(info) = self.tables.iter().find(|t| t.schema.name == ch.table) {
            let exp = workload::expected_ops(info, &ch, &node.held);
            if node.resnap_unapplied || node.excluded_publish {
                // Possibly made from a database view older than the
                // installed re-snapshot: a write concurrent with collected
                // deletes, like one made while excluded.
                for e in &exp {
                    self.late_rows.insert((e.table.clone(), e.key.clone()));
                }
            }
            self.stats.expected_ops += exp.len() as u64;
            node.expected.extend(exp);
        }
        let line = format!(
            "{} local {} {}[{}] change #{}",
            node.name,
            sum.what,
            sum.table,
            fmt_key(&sum.key),
            sum.change_id
        );
        self.log(line);
    }

    // ---------------------------------------------------------------
    // The node shell (node/src/shell.rs, step by step)
    // ---------------------------------------------------------------

    /// The shell's loop: top of the loop, then one ready `select!` branch
    /// at a time (chosen at random, like tokio), until it blocks.
    fn drive(&mut self, i: usize) {
        for _ in 0..100_000 {
            if self.failure.is_some() {
                return;
            }
            if self.nodes[i].core.is_none() || self.nodes[i].busy {
                return;
            }
            self.loop_top(i);
            if self.failure.is_some() {
                return;
            }
            let n = &mut self.nodes[i];
            let pending_link = n.connect.as_ref().and_then(|a| a.link);
            while let Some((lid, _)) = n.inbox.front() {
                if Some(*lid) == n.link || Some(*lid) == pending_link {
                    break;
                }
                n.inbox.pop_front();
            }
            let mut ready = Vec::with_capacity(3);
            if n.tick_ready {
                ready.push(0);
            }
            if n.connect_result.is_some() {
                ready.push(1);
            }
            if n.link.is_some() && n.inbox.front().map(|(l, _)| Some(*l)) == Some(n.link) {
                ready.push(2);
            }
            if ready.is_empty() {
                return;
            }
            match ready[self.r_shell.index(ready.len())] {
                0 => {
                    self.nodes[i].tick_ready = false;
                    let first = if self.nodes[i].mode.captures() {
                        Step::CapRead
                    } else {
                        Step::ApplyPoll
                    };
                    self.run_step(i, first);
                }
                1 => self.connect_branch(i),
                _ => self.message_branch(i),
            }
        }
        self.fail(Failure::new(
            "simulator",
            format!("node {i} shell loop did not block"),
        ));
    }

    fn loop_top(&mut self, i: usize) {
        let local = self.node_ms(i);
        let n = &mut self.nodes[i];
        let Some(core) = n.core.as_mut() else { return };
        let dial = n.link.is_none() && n.connect.is_none() && core.poll_connect(local);
        if dial {
            self.start_connect(i);
        }
        self.pump(i);
        let n = &mut self.nodes[i];
        let Some(core) = n.core.as_mut() else { return };
        let mut events = Vec::new();
        while let Some(ev) = core.poll_event() {
            events.push(ev);
        }
        for ev in events {
            self.node_event(i, ev, true);
        }
    }

    /// One event of node `i`'s core; `live`: the shell goes on (false when
    /// the events are drained right before a crash: nothing is sent).
    fn node_event(&mut self, i: usize, ev: NodeEvent, live: bool) {
        let name = self.nodes[i].name.clone();
        match ev {
            NodeEvent::Connected { hub_has_own } => {
                self.log(format!(
                    "{name} handshake done, hub holds {hub_has_own} own ops"
                ));
                if live {
                    self.maybe_replay_to_node(i);
                }
            }
            NodeEvent::Warning(w) => {
                if w.contains("max_clock_drift") {
                    self.log(format!("{name} warning: {w}"));
                } else {
                    self.fail(Failure::new(
                        "no unexpected warning",
                        format!("{name}: {w}"),
                    ));
                }
            }
            NodeEvent::Resnapshot(line) => {
                self.log(format!("{name} re-snapshot: {line}"));
                self.note_resnapshot(i, &line);
            }
            NodeEvent::HubError { code, message } => {
                self.log(format!("{name} hub error {code}: {message}"));
            }
        }
    }

    /// Accounts for a re-snapshot line of node `i`: an installed snapshot
    /// (and whether the node then held own ops the hub lacks: writes made
    /// while it was excluded), or a write the core dropped (`lost_update`),
    /// whose op must then be in the log with no fields (invariant 1) and
    /// whose increments count for nothing (invariant 7).
    fn note_resnapshot(&mut self, i: usize, line: &str) {
        let name = self.nodes[i].name.clone();
        if line.starts_with("re-snapshot ") && line.contains(" installed: ") {
            self.stats.resnapshots += 1;
            // Every local write so far the hub does not hold (logged or
            // not yet captured) was made before the node saw the snapshot.
            // The node's count of own ops the hub holds is from its last
            // hello reply (0 after a restart: then every write counts).
            let acked = self.nodes[i]
                .core
                .as_ref()
                .map_or(0, |c| c.stats().own_acked) as usize;
            let n = &self.nodes[i];
            let own = n.core.as_ref().map_or(0, |c| c.stats().own_ops) as usize;
            if own > acked {
                self.stats.resnapshots_with_unsent += 1;
            }
            for e in n.expected.iter().skip(acked) {
                self.late_rows.insert((e.table.clone(), e.key.clone()));
            }
            self.nodes[i].resnap_unapplied = true;
            return;
        }
        if !line.contains(" is dropped") {
            return;
        }
        // "[unsent ]write <origin>#<seq> to table ..."
        let prefix = format!("{name}#");
        let seq = line
            .split_whitespace()
            .skip_while(|w| *w != "write")
            .nth(1)
            .and_then(|id| id.strip_prefix(prefix.as_str()))
            .and_then(|s| s.parse::<u64>().ok());
        match seq {
            Some(seq) => {
                if self.nodes[i].dropped.insert(seq) {
                    self.stats.dropped_writes += 1;
                }
            }
            None => self.fail(Failure::new(
                "simulator",
                format!("{name}: cannot tell which own op this re-snapshot line drops: {line}"),
            )),
        }
    }

    /// The shell's `pump`: everything `poll_transmit` has goes into the
    /// stream, if there is one.
    fn pump(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let (Some(lid), Some(core)) = (n.link, n.core.as_mut()) else {
            return;
        };
        let mut out = Vec::new();
        loop {
            match core.poll_transmit() {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => {
                    let f =
                        Failure::new("node core error", format!("{}: poll_transmit: {e}", n.name));
                    self.fail(f);
                    return;
                }
            }
        }
        let name = self.nodes[i].name.clone();
        for m in out {
            let line = format!("{name} -> hub link {lid}: {}", fmt_node_msg(&m));
            if self.send(lid, N2H, Packet::Node(m)) {
                self.log(line);
            }
        }
    }

    fn maybe_replay_to_node(&mut self, i: usize) {
        if self.healed || !self.r_net.chance(self.p.dup) {
            return;
        }
        let n = &self.nodes[i];
        let (Some(lid), false) = (n.link, n.replayable.is_empty()) else {
            return;
        };
        let k = self.r_net.index(n.replayable.len());
        let m = n.replayable[k].clone();
        let line = format!(
            "{} replay (injected): {} again on link {lid}",
            n.name,
            fmt_hub_msg(&m)
        );
        self.stats.replays += 1;
        self.log(line);
        self.nodes[i].inbox.push_back((
            lid,
            Inbound::Msg {
                m: Box::new(m),
                ack_loss: false,
                replayed: true,
            },
        ));
    }

    fn jitter(&mut self) -> u64 {
        self.r_shell.below(RECONNECT_JITTER_MS)
    }

    fn connect_branch(&mut self, i: usize) {
        let local = self.node_ms(i);
        let jitter = self.jitter();
        let n = &mut self.nodes[i];
        let res = n.connect_result.take();
        n.connect = None;
        let Some(core) = n.core.as_mut() else { return };
        match res {
            Some(Ok(lid)) => {
                core.handle_connected(local);
                n.link = Some(lid);
                self.stats.connects += 1;
                let line = format!("{} connected (link {lid})", n.name);
                self.log(line);
            }
            Some(Err(why)) => {
                core.handle_disconnected(local, jitter);
                let line = format!("{} connect failed: {why}", n.name);
                self.log(line);
            }
            None => {}
        }
    }

    fn message_branch(&mut self, i: usize) {
        let Some((lid, item)) = self.nodes[i].inbox.pop_front() else {
            return;
        };
        let now = Ntp64::from_unix_millis(self.node_ms(i));
        let name = self.nodes[i].name.clone();
        match item {
            Inbound::Msg {
                m,
                ack_loss,
                replayed,
            } => {
                let is_ops = matches!(m.body, Some(pb::hub_message::Body::Ops(_)));
                let keep = (is_ops && !replayed).then(|| m.clone());
                self.stats.delivered += 1;
                let Some(core) = self.nodes[i].core.as_mut() else {
                    return;
                };
                let ctl = match core.handle_message(now, *m) {
                    Ok(c) => c,
                    Err(e) => {
                        self.fail(Failure::new(
                            "node core error",
                            format!("{name}: handle_message: {e}"),
                        ));
                        return;
                    }
                };
                if is_ops && self.crash_point(i, "after merging a hub batch, before its ack leaves")
                {
                    return;
                }
                match ctl {
                    NodeControl::Continue => {
                        if let Some(m) = keep {
                            let r = &mut self.nodes[i].replayable;
                            r.push_back(*m);
                            if r.len() > REPLAY_HISTORY {
                                r.pop_front();
                            }
                        }
                        if ack_loss && self.links.get(&lid).is_some_and(|l| !l.broken) {
                            self.stats.ack_losses += 1;
                            self.log(format!(
                                "{name} link {lid} breaks before its ack leaves (injected)"
                            ));
                            self.network_reset(lid);
                        }
                    }
                    NodeControl::Reconnect(reason) => {
                        if reason.contains("(clock_drift)") {
                            self.stats.drift_refusals += 1;
                        } else if reason.contains(&format!("({GC_REFUSAL})"))
                            && self.exclusion_expected(i)
                        {
                            // Counted when the hub sent it.
                        } else if replayed && reason.contains("during a re-snapshot") {
                            // The injected replay of an old batch reached a
                            // node waiting for snapshot chunks: it starts
                            // over on a new stream, as it should.
                        } else {
                            self.fail(Failure::new(
                                "protocol: no unexpected reconnect",
                                format!("{name} dropped link {lid}: {reason}"),
                            ));
                        }
                        self.node_drop_link(i, lid, &reason);
                    }
                }
            }
            Inbound::End(reason) => self.node_drop_link(i, lid, &reason),
        }
        self.run_step(i, Step::ApplyPoll);
    }

    fn node_drop_link(&mut self, i: usize, lid: LinkId, reason: &str) {
        let local = self.node_ms(i);
        let jitter = self.jitter();
        let n = &mut self.nodes[i];
        if n.link == Some(lid) {
            n.link = None;
            if let Some(core) = n.core.as_mut() {
                core.handle_disconnected(local, jitter);
            }
        }
        let line = format!("{} drops link {lid}: {reason}", n.name);
        self.log(line);
        self.close_node_end(lid);
    }

    fn run_step(&mut self, i: usize, mut step: Step) {
        loop {
            if self.failure.is_some() {
                return;
            }
            let (next, wait) = match self.exec_step(i, step) {
                Some(x) => x,
                None => return,
            };
            if wait {
                let lat = match next {
                    Step::ApplyWrite(_) => self.r_shell.range(2, 6),
                    _ => self.r_shell.range(1, 4),
                };
                let n = &mut self.nodes[i];
                n.step = Some(next);
                n.busy = true;
                let inc = n.inc;
                self.at(lat, Ev::NodeStep(i, inc));
                return;
            }
            step = next;
        }
    }

    /// One step of `capture_all` / `apply_all`; returns the next step and
    /// whether it waits for the database (other events may land meanwhile).
    fn exec_step(&mut self, i: usize, step: Step) -> Option<(Step, bool)> {
        let batch = self.p.batch_size;
        let now = Ntp64::from_unix_millis(self.node_ms(i));
        let n = &mut self.nodes[i];
        let name = n.name.clone();
        let core = n.core.as_mut()?;
        let err = |what: &str, e: &dyn std::fmt::Display| {
            Failure::new("node core error", format!("{name}: {what}: {e}"))
        };
        match step {
            Step::CapRead if core.resnap_installing() => {
                // `capture_all`: changes wait in the change table until the
                // re-snapshot is installed.
                Some((Step::ApplyPoll, false))
            }
            Step::CapRead => {
                let ch = n.db.read_changes(core.capture_checkpoint(), batch);
                if ch.is_empty() {
                    Some((Step::ApplyPoll, false))
                } else {
                    Some((Step::CapLog(ch), true))
                }
            }
            Step::CapLog(ch) => match core.handle_captured(now, &ch) {
                Ok(cp) => {
                    let seq = core.stats().own_ops;
                    let line = format!(
                        "{name} captured {} changes through #{cp}, own seq now {seq}",
                        ch.len()
                    );
                    self.log(line);
                    if self.crash_point(
                        i,
                        "after handle_captured, before the change rows are deleted",
                    ) {
                        return None;
                    }
                    Some((Step::CapDelete(cp, ch.len()), true))
                }
                Err(e) => {
                    self.fail(err("handle_captured", &e));
                    None
                }
            },
            Step::CapDelete(cp, len) => {
                let extra = i64::from(self.sabotage(Sabotage::DeleteUncapturedChange, 9));
                self.nodes[i].db.delete_changes_through(cp + extra);
                // `capture_all` sends each batch before reading the next.
                self.pump(i);
                if len >= batch {
                    Some((Step::CapRead, false))
                } else {
                    Some((Step::ApplyPoll, false))
                }
            }
            Step::ApplyPoll => match core.poll_apply(batch) {
                Ok(p) if p.is_empty() => {
                    // The shell's `db_step`: a bounded GC step after applying.
                    if let Err(e) = core.poll_gc(SIM_GC_ROWS) {
                        self.fail(err("poll_gc", &e));
                    }
                    None
                }
                Ok(p) => {
                    if !self.healed && n.mode.captures() && self.r_work.chance(self.p.race_rate) {
                        let w = &p[self.r_work.index(p.len())].write;
                        let (t, k) = (w.table.clone(), w.key.clone());
                        self.at(1, Ev::RaceWrite(i, t, k));
                    }
                    Some((Step::ApplyWrite(p), true))
                }
                Err(e) => {
                    self.fail(err("poll_apply", &e));
                    None
                }
            },
            Step::ApplyWrite(p) => {
                let mut writes: Vec<_> = p.iter().map(|x| x.write.clone()).collect();
                if self.sabotage(Sabotage::DropAppliedRow, 7) {
                    writes.pop();
                }
                let echo = self.sabotage(Sabotage::EchoApplies, 5);
                let n = &mut self.nodes[i];
                let res = n.db.apply(&writes);
                if let (true, Ok(_), Some(w)) = (echo, &res, writes.first())
                    && let Some(row) = n.db.get(&w.table, &w.key).cloned()
                {
                    let _ = n.db.replace(&w.table, &row);
                }
                match res {
                    Ok(wm) => {
                        self.stats.applied_rows += writes.len() as u64;
                        let keys: Vec<String> = writes
                            .iter()
                            .map(|w| {
                                format!(
                                    "{}[{}]{}",
                                    w.table,
                                    fmt_key(&w.key),
                                    if w.row.is_none() { " del" } else { "" }
                                )
                            })
                            .collect();
                        self.log(format!(
                            "{name} applied {} at watermark #{wm}",
                            keys.join(" ")
                        ));
                        if self.crash_point(i, "after the apply transaction, before handle_applied")
                        {
                            return None;
                        }
                        Some((Step::ApplyAck(p, wm), true))
                    }
                    Err(e) => {
                        self.fail(Failure::new(
                            "apply writes are valid",
                            format!(
                                "{name}: the core asked to write something the table refuses: {e}"
                            ),
                        ));
                        None
                    }
                }
            }
            Step::ApplyAck(p, wm) => match core.handle_applied(&p, wm) {
                Ok(()) => Some((Step::ApplyPoll, false)),
                Err(e) => {
                    self.fail(err("handle_applied", &e));
                    None
                }
            },
        }
    }

    // ---------------------------------------------------------------
    // Connections
    // ---------------------------------------------------------------

    /// Maybe crashes node `i` right here, before its shell takes another
    /// step; true if it did (the caller must stop driving the node).
    fn crash_point(&mut self, i: usize, point: &'static str) -> bool {
        if self.healed || !self.r_fault.chance(self.p.crash_point_rate) {
            return false;
        }
        self.log(format!("crash point: {point}"));
        self.crash_node(i);
        let down = self.r_fault.range(10, 500);
        let inc = self.nodes[i].inc;
        self.at(down, Ev::NodeRestart(i, inc));
        true
    }

    fn start_connect(&mut self, i: usize) {
        let id = self.next_attempt;
        self.next_attempt += 1;
        let inc = self.nodes[i].inc;
        self.nodes[i].connect = Some(Attempt {
            id,
            link: None,
            decided: false,
        });
        self.at(CONNECT_TIMEOUT_MS, Ev::ConnectTimeout(i, inc, id));
        if self.blocked[i][N2H] == 0 {
            let d = self.delay();
            self.at(d, Ev::ConnectArrive(i, inc, id));
        }
    }

    fn attempt_open(&self, i: usize, inc: u64, id: u64) -> bool {
        let n = &self.nodes[i];
        n.inc == inc
            && n.core.is_some()
            && n.connect.as_ref().is_some_and(|a| a.id == id && !a.decided)
    }

    fn connect_arrive(&mut self, i: usize, inc: u64, id: u64) {
        if !self.attempt_open(i, inc, id) {
            return;
        }
        let Some(core) = self.hub.core.as_mut() else {
            if self.blocked[i][H2N] == 0 {
                let d = self.delay();
                self.at(d, Ev::ConnectRefused(i, inc, id));
            }
            return;
        };
        let sid = core.handle_open();
        let lid = self.next_link;
        self.next_link += 1;
        let base_ms = self.r_net.below(self.p.max_delay_ms / 2 + 1);
        self.links.insert(
            lid,
            Link {
                node: i,
                node_inc: inc,
                hub_inc: self.hub.inc,
                sid,
                node_end: End::Pending,
                hub_read: true,
                hub_write: true,
                broken: false,
                q: [VecDeque::new(), VecDeque::new()],
                scheduled: [false, false],
                base_ms,
                ping_sent: [0, 0],
                ping_acked: [0, 0],
            },
        );
        self.hub.sessions.insert(sid, lid);
        if let Some(a) = self.nodes[i].connect.as_mut() {
            a.link = Some(lid);
        }
        self.log(format!(
            "hub accepts {} on link {lid} (session {sid})",
            self.nodes[i].name
        ));
        self.send(lid, H2N, Packet::Accept);
        self.at(KEEPALIVE_INTERVAL_MS, Ev::Keepalive(lid, HUB));
        self.hub_after_command();
    }

    fn decide_connect(&mut self, i: usize, inc: u64, id: u64, res: Result<LinkId, String>) {
        if !self.attempt_open(i, inc, id) {
            return;
        }
        let n = &mut self.nodes[i];
        let mut cancel = None;
        if let Some(a) = n.connect.as_mut() {
            a.decided = true;
            if res.is_err() {
                cancel = a.link;
            }
        }
        n.connect_result = Some(res);
        if let Some(lid) = cancel {
            self.close_node_end(lid);
        }
        self.drive(i);
    }

    // ---------------------------------------------------------------
    // The network
    // ---------------------------------------------------------------

    /// Queues `pkt`; false if the link is gone or broken (nothing sent).
    fn send(&mut self, lid: LinkId, dir: usize, pkt: Packet) -> bool {
        let d = self.delay();
        let now = self.now;
        let Some(link) = self.links.get_mut(&lid) else {
            return false;
        };
        if link.broken && !matches!(pkt, Packet::Eos(_)) {
            return false;
        }
        let last = link.q[dir].back().map(|x| x.0).unwrap_or(0);
        let at = (now + link.base_ms + d).max(last);
        link.q[dir].push_back((at, pkt));
        if !link.scheduled[dir] {
            link.scheduled[dir] = true;
            let first = link.q[dir].front().map(|x| x.0).unwrap_or(at);
            let wait = first.saturating_sub(now);
            self.at(wait, Ev::Deliver(lid, dir));
        }
        true
    }

    fn deliver(&mut self, lid: LinkId, dir: usize) {
        let now = self.now;
        let Some(link) = self.links.get_mut(&lid) else {
            return;
        };
        link.scheduled[dir] = false;
        if self.blocked[link.node][dir] > 0 {
            return;
        }
        let Some(&(at, _)) = link.q[dir].front() else {
            self.gc_link(lid);
            return;
        };
        if at > now {
            link.scheduled[dir] = true;
            self.at(at - now, Ev::Deliver(lid, dir));
            return;
        }
        let Some((_, pkt)) = link.q[dir].pop_front() else {
            return;
        };
        if let Some(&(next, _)) = link.q[dir].front() {
            link.scheduled[dir] = true;
            self.at(next.saturating_sub(now), Ev::Deliver(lid, dir));
        }
        if dir == N2H {
            self.hub_recv(lid, pkt);
        } else {
            self.node_recv(lid, pkt);
        }
        self.gc_link(lid);
    }

    fn gc_link(&mut self, lid: LinkId) {
        if let Some(l) = self.links.get(&lid)
            && l.node_end == End::Closed
            && !l.hub_read
            && !l.hub_write
            && l.q[0].is_empty()
            && l.q[1].is_empty()
        {
            self.links.remove(&lid);
        }
    }

    /// A connection reset (injected loss): every queued byte is gone and
    /// both ends learn it when the reset reaches them.
    fn network_reset(&mut self, lid: LinkId) {
        let Some(link) = self.links.get_mut(&lid) else {
            return;
        };
        link.broken = true;
        link.q[0].clear();
        link.q[1].clear();
        self.send(lid, N2H, Packet::Eos("connection reset"));
        self.send(lid, H2N, Packet::Eos("connection reset"));
    }

    /// The node end closes (shell dropped the stream, connect cancelled,
    /// process died, keepalive failed): what it had queued may or may not
    /// leave (a random prefix does), then the end of stream follows.
    fn close_node_end(&mut self, lid: LinkId) {
        let keep_draw = self.r_net.next_u64();
        let Some(link) = self.links.get_mut(&lid) else {
            return;
        };
        if link.node_end == End::Closed {
            return;
        }
        link.node_end = End::Closed;
        link.q[H2N].clear();
        let len = link.q[N2H].len() as u64;
        link.q[N2H].truncate((keep_draw % (len + 1)) as usize);
        self.send(lid, N2H, Packet::Eos("the node closed the stream"));
        self.gc_link(lid);
    }

    fn unblock_one(&mut self, n: usize, d: usize) {
        if self.blocked[n][d] == 0 {
            return;
        }
        self.blocked[n][d] -= 1;
        if self.blocked[n][d] == 0 {
            self.unblocked(n, d);
        }
    }

    /// Traffic held by a partition resumes (TCP retransmits), in order.
    fn unblocked(&mut self, n: usize, d: usize) {
        let lids: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.node == n && !l.q[d].is_empty())
            .map(|(id, _)| *id)
            .collect();
        for lid in lids {
            let base = self.delay();
            let now = self.now;
            let Some(link) = self.links.get_mut(&lid) else {
                continue;
            };
            let mut floor = now + link.base_ms + base;
            for (at, _) in link.q[d].iter_mut() {
                floor = floor.max(*at);
                *at = floor;
            }
            if !link.scheduled[d] {
                link.scheduled[d] = true;
                let first = link.q[d].front().map(|x| x.0).unwrap_or(now);
                self.at(first.saturating_sub(now), Ev::Deliver(lid, d));
            }
        }
    }

    fn keepalive(&mut self, lid: LinkId, side: usize) {
        let Some(link) = self.links.get(&lid) else {
            return;
        };
        let open = if side == NODE {
            link.node_end == End::Open
                && self.nodes[link.node].inc == link.node_inc
                && self.nodes[link.node].core.is_some()
        } else {
            (link.hub_read || link.hub_write)
                && link.hub_inc == self.hub.inc
                && self.hub.core.is_some()
        };
        if !open {
            return;
        }
        let i = link.node;
        if link.ping_sent[side] > link.ping_acked[side] {
            self.stats.keepalive_timeouts += 1;
            let who = if side == NODE { "node" } else { "hub" };
            self.log(format!(
                "link {lid}: {who} keepalive ping unanswered for 10 s"
            ));
            if side == NODE {
                self.close_node_end(lid);
                self.nodes[i]
                    .inbox
                    .push_back((lid, Inbound::End("keepalive timeout".into())));
                self.drive(i);
            } else {
                self.hub_connection_dead(lid);
            }
            return;
        }
        if let Some(link) = self.links.get_mut(&lid) {
            link.ping_sent[side] += 1;
        }
        let dir = if side == NODE { N2H } else { H2N };
        self.send(lid, dir, Packet::Ping);
        self.at(KEEPALIVE_INTERVAL_MS, Ev::Keepalive(lid, side));
    }

    fn node_recv(&mut self, lid: LinkId, pkt: Packet) {
        let Some(link) = self.links.get(&lid) else {
            return;
        };
        let i = link.node;
        if self.nodes[i].core.is_none() {
            return; // the host is down: nobody answers
        }
        if self.nodes[i].inc != link.node_inc || link.node_end == End::Closed {
            // A live host without a socket for this connection answers with
            // a reset (its own end of stream was sent, or lost in a power
            // loss).
            if !matches!(pkt, Packet::Eos(_)) {
                self.send(lid, N2H, Packet::Eos("connection reset"));
            }
            return;
        }
        let end = link.node_end;
        match pkt {
            Packet::Accept => {
                let wanted = self.nodes[i]
                    .connect
                    .as_ref()
                    .is_some_and(|a| a.link == Some(lid) && !a.decided);
                if end == End::Pending && wanted {
                    if let Some(l) = self.links.get_mut(&lid) {
                        l.node_end = End::Open;
                    }
                    self.at(KEEPALIVE_INTERVAL_MS, Ev::Keepalive(lid, NODE));
                    let (inc, id) = (
                        self.nodes[i].inc,
                        self.nodes[i].connect.as_ref().map(|a| a.id).unwrap_or(0),
                    );
                    self.decide_connect(i, inc, id, Ok(lid));
                }
            }
            Packet::Ping => {
                if end == End::Open {
                    self.send(lid, N2H, Packet::PingAck);
                }
            }
            Packet::PingAck => {
                if let Some(l) = self.links.get_mut(&lid) {
                    l.ping_acked[NODE] += 1;
                }
            }
            Packet::Eos(why) => match end {
                End::Open => {
                    self.nodes[i]
                        .inbox
                        .push_back((lid, Inbound::End(why.into())));
                    self.drive(i);
                }
                End::Pending => {
                    let (inc, id) = (
                        self.nodes[i].inc,
                        self.nodes[i].connect.as_ref().map(|a| a.id).unwrap_or(0),
                    );
                    if self.nodes[i]
                        .connect
                        .as_ref()
                        .is_some_and(|a| a.link == Some(lid))
                    {
                        self.decide_connect(i, inc, id, Err("stream refused".into()));
                    }
                    self.close_node_end(lid);
                }
                End::Closed => {}
            },
            Packet::Hub(m) => {
                if end != End::Open {
                    return;
                }
                if !self.healed && self.r_net.chance(self.p.loss) {
                    self.stats.losses += 1;
                    self.log(format!(
                        "link {lid}: {} to {} lost, connection reset (injected)",
                        fmt_hub_msg(&m),
                        self.nodes[i].name
                    ));
                    self.network_reset(lid);
                    return;
                }
                let is_ops = matches!(m.body, Some(pb::hub_message::Body::Ops(_)));
                let ack_loss = is_ops && !self.healed && self.r_net.chance(self.p.dup);
                let line = format!(
                    "hub -> {} link {lid}: {}",
                    self.nodes[i].name,
                    fmt_hub_msg(&m)
                );
                self.log(line);
                self.nodes[i].inbox.push_back((
                    lid,
                    Inbound::Msg {
                        m: Box::new(m),
                        ack_loss,
                        replayed: false,
                    },
                ));
                self.drive(i);
            }
            Packet::Node(_) => {}
        }
    }

    // ---------------------------------------------------------------
    // The hub (hub/src/server.rs: one actor, one command at a time)
    // ---------------------------------------------------------------

    fn hub_recv(&mut self, lid: LinkId, pkt: Packet) {
        let Some(link) = self.links.get(&lid) else {
            return;
        };
        if self.hub.core.is_none() {
            return; // the host is down: nobody answers
        }
        if link.hub_inc != self.hub.inc || (!link.hub_read && !link.hub_write) {
            // A live hub host without a socket for this connection resets it.
            if !matches!(pkt, Packet::Eos(_)) {
                self.send(lid, H2N, Packet::Eos(HUB_RESET));
            }
            return;
        }
        let (reading, writing) = (link.hub_read, link.hub_write);
        match pkt {
            Packet::Ping => {
                if reading || writing {
                    self.send(lid, H2N, Packet::PingAck);
                }
            }
            Packet::PingAck => {
                if let Some(l) = self.links.get_mut(&lid) {
                    l.ping_acked[HUB] += 1;
                }
            }
            Packet::Eos(_) => {
                if reading {
                    if let Some(l) = self.links.get_mut(&lid) {
                        l.hub_read = false;
                    }
                    self.hub_stream_closed(lid);
                }
            }
            Packet::Node(m) => {
                if !reading {
                    return;
                }
                let node = self.links.get(&lid).map(|l| l.node).unwrap_or(0);
                let name = self.nodes[node].name.clone();
                if !self.healed && self.r_net.chance(self.p.loss) {
                    self.stats.losses += 1;
                    self.log(format!(
                        "link {lid}: {} from {name} lost, connection reset (injected)",
                        fmt_node_msg(&m)
                    ));
                    self.network_reset(lid);
                    return;
                }
                let is_ops = matches!(m.body, Some(pb::node_message::Body::Ops(_)));
                let ack_loss = is_ops && !self.healed && self.r_net.chance(self.p.dup);
                self.log(format!("{name} => hub link {lid}: {}", fmt_node_msg(&m)));
                self.hub_handle(lid, m, false);
                if ack_loss && self.links.get(&lid).is_some_and(|l| !l.broken) {
                    self.stats.ack_losses += 1;
                    self.log(format!(
                        "link {lid}: breaks before the hub's ack leaves (injected)"
                    ));
                    self.network_reset(lid);
                }
            }
            Packet::Accept | Packet::Hub(_) => {}
        }
    }

    fn hub_handle(&mut self, lid: LinkId, m: pb::NodeMessage, replayed: bool) {
        let Some(link) = self.links.get(&lid) else {
            return;
        };
        let (sid, node) = (link.sid, link.node);
        let is_hello = matches!(m.body, Some(pb::node_message::Body::Hello(_)));
        let keep = (!replayed && matches!(m.body, Some(pb::node_message::Body::Ops(_))))
            .then(|| m.clone());
        let now = Ntp64::from_unix_millis(self.hub_ms());
        let Some(core) = self.hub.core.as_mut() else {
            return;
        };
        self.stats.delivered += 1;
        let ctl = match core.handle_message(now, sid, m) {
            Ok(c) => c,
            Err(e) => {
                self.fail(Failure::new(
                    "hub core error",
                    format!("handle_message (session {sid}): {e}"),
                ));
                return;
            }
        };
        match ctl {
            HubControl::Continue => {
                if let Some(m) = keep {
                    let r = self.hub.replayable.entry(node).or_default();
                    r.push_back(m);
                    if r.len() > REPLAY_HISTORY {
                        r.pop_front();
                    }
                }
                if is_hello && !replayed && !self.healed && self.r_net.chance(self.p.dup) {
                    let old = self
                        .hub
                        .replayable
                        .get(&node)
                        .filter(|r| !r.is_empty())
                        .map(|r| r[(self.r_net.next_u64() % r.len() as u64) as usize].clone());
                    if let Some(old) = old {
                        self.stats.replays += 1;
                        self.log(format!(
                            "hub replay (injected): {} from {} again on link {lid}",
                            fmt_node_msg(&old),
                            self.nodes[node].name
                        ));
                        self.hub_after_command();
                        self.hub_handle(lid, old, true);
                        return;
                    }
                }
            }
            HubControl::Close(reason) => {
                if reason == "unknown session" {
                    self.stats.stale_messages += 1;
                }
                self.log(format!("hub closes session {sid} (link {lid}): {reason}"));
                self.hub_pump(sid);
                self.hub_end_writes(lid);
                if let Some(core) = self.hub.core.as_mut() {
                    core.handle_close(sid);
                }
                self.hub.sessions.remove(&sid);
            }
        }
        self.hub_after_command();
    }

    fn hub_after_command(&mut self) {
        let mut closes = Vec::new();
        let Some(core) = self.hub.core.as_mut() else {
            return;
        };
        while let Some(c) = core.poll_close() {
            closes.push(c);
        }
        let mut notices = Vec::new();
        while let Some(line) = core.poll_notice() {
            notices.push(line);
        }
        let sessions = core.sessions();
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            if n.mode != Mode::Publish || n.excluded_publish || !core.gc_excluded(&n.name) {
                continue;
            }
            // Every write the hub does not hold yet is judged on arrival.
            let held = core.version_vector().get(&n.name) as usize;
            for e in n.expected.iter().skip(held) {
                self.late_rows.insert((e.table.clone(), e.key.clone()));
            }
            self.nodes[i].excluded_publish = true;
        }
        for line in notices {
            if line.starts_with("publish-only node ") && line.contains(" write(s) (first: ") {
                self.stats.hub_dropped_batches += 1;
            }
            self.log(format!("hub notice: {line}"));
        }
        for (sid, reason) in closes {
            self.stats.stream_replacements += 1;
            self.log(format!("hub drops session {sid}: {reason}"));
            if let Some(lid) = self.hub.sessions.remove(&sid) {
                self.hub_end_writes(lid);
            }
        }
        for sid in sessions {
            self.hub_pump(sid);
        }
    }

    fn hub_pump(&mut self, sid: SessionId) {
        let Some(&lid) = self.hub.sessions.get(&sid) else {
            return;
        };
        let node = self.links.get(&lid).map(|l| l.node).unwrap_or(0);
        loop {
            let Some(core) = self.hub.core.as_mut() else {
                return;
            };
            let m = match core.poll_transmit(sid) {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    self.fail(Failure::new(
                        "hub core error",
                        format!("poll_transmit (session {sid}): {e}"),
                    ));
                    return;
                }
            };
            if let Some(pb::hub_message::Body::Error(e)) = &m.body {
                if e.code == "clock_drift" {
                    self.stats.drift_refusals += 1;
                } else if e.code == GC_REFUSAL && self.exclusion_expected(node) {
                    self.stats.gc_refusals += 1;
                } else {
                    self.fail(Failure::new(
                        "protocol: the hub refuses nothing a correct node sends",
                        format!(
                            "hub sent {} error {}: {}",
                            self.nodes[node].name, e.code, e.message
                        ),
                    ));
                }
            }
            self.send(lid, H2N, Packet::Hub(m));
        }
    }

    /// The hub's sender for this stream is dropped: the node sees the end
    /// of the stream after everything already queued.
    fn hub_end_writes(&mut self, lid: LinkId) {
        let Some(link) = self.links.get_mut(&lid) else {
            return;
        };
        if link.hub_write {
            link.hub_write = false;
            self.send(lid, H2N, Packet::Eos("the hub closed the stream"));
        }
    }

    /// `Cmd::Closed`: the inbound stream of a session ended.
    fn hub_stream_closed(&mut self, lid: LinkId) {
        let Some(link) = self.links.get_mut(&lid) else {
            return;
        };
        let sid = link.sid;
        link.hub_write = false;
        self.hub.sessions.remove(&sid);
        if let Some(core) = self.hub.core.as_mut() {
            core.handle_close(sid);
        }
        self.hub_after_command();
        self.gc_link(lid);
    }

    /// The hub's HTTP/2 connection failed (keepalive): both halves end.
    fn hub_connection_dead(&mut self, lid: LinkId) {
        let Some(link) = self.links.get_mut(&lid) else {
            return;
        };
        link.hub_read = false;
        link.q[N2H].clear();
        let was_writing = link.hub_write;
        if was_writing {
            link.hub_write = false;
            self.send(lid, H2N, Packet::Eos("stream error: keepalive timeout"));
        }
        self.hub_stream_closed(lid);
    }

    // ---------------------------------------------------------------
    // Faults
    // ---------------------------------------------------------------

    fn partition_start(&mut self) {
        let n = self.nodes.len();
        let kind = self.r_fault.below(5);
        let mut blocks = Vec::new();
        let what = match kind {
            0 => {
                for i in 0..n {
                    blocks.push((i, N2H));
                    blocks.push((i, H2N));
                }
                "the hub is isolated".to_owned()
            }
            1 => {
                let mut names = Vec::new();
                for i in 0..n {
                    if self.r_fault.chance(0.5) {
                        blocks.push((i, N2H));
                        blocks.push((i, H2N));
                        names.push(self.nodes[i].name.to_string());
                    }
                }
                format!("split: {{{}}} cut off", names.join(","))
            }
            2 => {
                let i = self.r_fault.index(n);
                blocks.push((i, N2H));
                format!("one-way: {} -> hub cut", self.nodes[i].name)
            }
            3 => {
                let i = self.r_fault.index(n);
                blocks.push((i, H2N));
                format!("one-way: hub -> {} cut", self.nodes[i].name)
            }
            _ => {
                let i = self.r_fault.index(n);
                blocks.push((i, N2H));
                blocks.push((i, H2N));
                format!("{} cut off", self.nodes[i].name)
            }
        };
        let dur = match self.r_fault.below(10) {
            0..4 => self.r_fault.range(100, 5_000),
            4..8 => self.r_fault.range(5_000, 25_000),
            _ => self.r_fault.range(25_000, 60_000),
        };
        self.stats.partitions += 1;
        self.log(format!("partition for {dur} ms: {what}"));
        for &(i, d) in &blocks {
            self.blocked[i][d] += 1;
        }
        let epoch = self.part_epoch;
        self.at(dur, Ev::PartitionEnd(epoch, blocks));
        self.next_fault(0, self.p.partitions_per_min);
    }

    fn crash_node(&mut self, i: usize) {
        self.stats.node_crashes += 1;
        // Events the core queued since the shell last looked (a dropped
        // write is already durable in its log).
        let mut events = Vec::new();
        if let Some(core) = self.nodes[i].core.as_mut() {
            while let Some(ev) = core.poll_event() {
                events.push(ev);
            }
        }
        for ev in events {
            self.node_event(i, ev, false);
        }
        let n = &mut self.nodes[i];
        if let Some(core) = n.core.take() {
            n.held = core.version_vector().clone();
        }
        n.store.crash();
        let old = n.inc;
        n.inc += 1;
        n.step = None;
        n.busy = false;
        n.tick_ready = false;
        n.connect = None;
        n.connect_result = None;
        n.link = None;
        n.inbox.clear();
        let name = n.name.clone();
        let host = self.r_fault.chance(0.5);
        self.log(format!(
            "CRASH {name}{} (unflushed log writes lost; database and change rows stay)",
            if host {
                " host: power loss, its connections vanish silently"
            } else {
                " process: its kernel closes its connections"
            }
        ));
        let lids: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.node == i && l.node_inc == old && l.node_end != End::Closed)
            .map(|(id, _)| *id)
            .collect();
        for lid in lids {
            if host {
                if let Some(l) = self.links.get_mut(&lid) {
                    l.node_end = End::Closed;
                    l.q[N2H].clear();
                    l.q[H2N].clear();
                }
            } else {
                self.close_node_end(lid);
            }
        }
    }

    fn restart_node(&mut self, i: usize) {
        self.open_node(i);
        let mark = self.nodes[i].db.change_watermark();
        let line = format!("restart {} (restart mark #{mark})", self.nodes[i].name);
        self.log(line);
        self.drive(i);
    }

    fn crash_hub(&mut self) {
        self.stats.hub_crashes += 1;
        self.hub.core = None;
        self.hub.store.crash();
        let old = self.hub.inc;
        self.hub.inc += 1;
        self.hub.sessions.clear();
        let host = self.r_fault.chance(0.5);
        self.log(format!(
            "CRASH hub{} (unflushed writes lost)",
            if host {
                " host: power loss, its connections vanish silently"
            } else {
                " process: its kernel closes its connections"
            }
        ));
        let lids: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.hub_inc == old && (l.hub_read || l.hub_write))
            .map(|(id, _)| *id)
            .collect();
        for lid in lids {
            let keep = self.r_net.next_u64();
            if let Some(l) = self.links.get_mut(&lid) {
                l.hub_read = false;
                l.hub_write = false;
                l.q[N2H].clear();
                let len = l.q[H2N].len() as u64;
                let kept = if host { 0 } else { keep % (len + 1) };
                l.q[H2N].truncate(kept as usize);
            }
            if !host {
                self.send(lid, H2N, Packet::Eos(HUB_RESET));
            }
        }
    }

    /// Opens the hub core on its store as `hub::server::start_hub` does
    /// (with the synced tables, so it merges ops and records conflicts).
    fn open_hub(&mut self) -> bool {
        match HubCore::open(self.hub.settings.clone(), self.hub.store.clone()) {
            Ok(mut c) => {
                if self.p.tombstone_grace_ms > 0 {
                    c.set_tombstone_grace_ms(self.p.tombstone_grace_ms);
                }
                c.set_gc_nodes(
                    self.nodes
                        .iter()
                        .map(|n| (n.name.clone(), n.mode.as_str().to_owned()))
                        .collect(),
                );
                c.set_tables(
                    self.tables
                        .iter()
                        .map(|t| (t.schema.name.clone(), t.rules.clone()))
                        .collect(),
                );
                self.hub.core = Some(c);
                true
            }
            Err(e) => {
                self.fail(Failure::new("hub core error", format!("open: {e}")));
                false
            }
        }
    }

    fn restart_hub(&mut self) {
        if self.open_hub() {
            self.log("restart hub".into());
            self.hub_tick();
        }
    }

    /// The actor's tombstone GC step (every 20 ms in the real actor).
    fn hub_gc(&mut self) {
        let now = Ntp64::from_unix_millis(self.hub_ms());
        let Some(core) = self.hub.core.as_mut() else {
            return;
        };
        let cuts = core.gc_stats().cuts;
        let dropped = core.gc_stats().rows_dropped;
        if let Err(e) = core.handle_gc(now, SIM_GC_ROWS) {
            self.fail(Failure::new("hub core error", format!("handle_gc: {e}")));
            return;
        }
        self.stats.gc_hub_rows_dropped += core.gc_stats().rows_dropped - dropped;
        if core.gc_stats().cuts != cuts {
            self.stats.gc_cuts += 1;
            let line = format!("hub adopts stable cut {:?}", core.gc_cut().stable.0);
            self.log(line);
        }
        self.hub_after_command();
    }

    /// The actor's housekeeping (at start, then every minute).
    fn hub_tick(&mut self) {
        let now = Ntp64::from_unix_millis(self.hub_ms());
        if let Some(core) = self.hub.core.as_mut()
            && let Err(e) = core.handle_tick(now)
        {
            self.fail(Failure::new("hub core error", format!("handle_tick: {e}")));
        }
    }

    fn clock_jump(&mut self) {
        let n = self.nodes.len();
        let who = self.r_fault.index(n + 1);
        let skew = self.p.skew_ms;
        let mut offset = self.r_fault.below(2 * skew + 1) as i64 - skew as i64;
        if who < n && self.p.beyond_drift_ms > 0 && self.r_fault.chance(0.3) {
            offset = self.hub.offset_ms
                + (MAX_CLOCK_DRIFT_MS + self.r_fault.range(1, self.p.beyond_drift_ms)) as i64;
        }
        self.stats.clock_jumps += 1;
        if who == n {
            let old = self.hub.offset_ms;
            self.hub.offset_ms = offset;
            self.log(format!("clock of hub jumps {old:+} -> {offset:+} ms"));
        } else {
            let old = self.nodes[who].offset_ms;
            self.nodes[who].offset_ms = offset;
            let line = format!(
                "clock of {} jumps {old:+} -> {offset:+} ms",
                self.nodes[who].name
            );
            self.log(line);
        }
    }

    fn heal(&mut self) {
        self.healed = true;
        self.log("HEAL: faults and writes stop, partitions end, crashed processes restart".into());
        self.part_epoch += 1;
        for n in 0..self.nodes.len() {
            for d in 0..2 {
                if self.blocked[n][d] > 0 {
                    self.blocked[n][d] = 0;
                    self.unblocked(n, d);
                }
            }
        }
        let skew = self.p.skew_ms as i64;
        self.hub.offset_ms = self.hub.offset_ms.clamp(-skew, skew);
        for n in &mut self.nodes {
            n.offset_ms = n.offset_ms.clamp(-skew, skew);
        }
        if self.hub.core.is_none() {
            self.hub.inc += 1;
            self.restart_hub();
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].core.is_none() {
                self.nodes[i].inc += 1;
                self.restart_node(i);
            }
        }
        self.progress = (self.progress_mark(), self.now);
        self.at(500, Ev::CheckQuiet);
    }

    // ---------------------------------------------------------------
    // The end
    // ---------------------------------------------------------------

    /// A number that grows whenever the mesh makes progress: ops stored by
    /// the hub, ops held by nodes, rows applied.
    fn progress_mark(&self) -> u64 {
        let hub = self
            .hub
            .core
            .as_ref()
            .map_or(0, |h| h.version_vector().total());
        let nodes: u64 = self
            .nodes
            .iter()
            .filter_map(|n| n.core.as_ref())
            .map(|c| c.version_vector().total())
            .sum();
        hub + nodes + self.stats.applied_rows
    }

    /// Why the mesh is not (yet) quiet, or `None` when it is.
    fn not_quiet_reason(&self) -> Option<String> {
        let Some(hub) = self.hub.core.as_ref() else {
            return Some("the hub is down".into());
        };
        let hub_vv = hub.version_vector();
        for n in &self.nodes {
            let Some(core) = n.core.as_ref() else {
                return Some(format!("{} is down", n.name));
            };
            if n.busy || !n.inbox.is_empty() || n.connect.is_some() {
                return Some(format!("{} is busy", n.name));
            }
            let st = core.stats();
            if !st.connected || n.link.is_none() {
                return Some(format!("{} is not connected", n.name));
            }
            if st.dirty_rows > 0 {
                return Some(format!("{} has {} rows to apply", n.name, st.dirty_rows));
            }
            let pending = n.db.pending_changes_after(core.capture_checkpoint());
            if pending > 0 {
                return Some(format!("{} has {pending} uncaptured changes", n.name));
            }
            let own = core.version_vector().get(&n.name);
            if hub_vv.get(&n.name) != own {
                return Some(format!(
                    "hub holds {} of {}'s {own} ops",
                    hub_vv.get(&n.name),
                    n.name
                ));
            }
            if n.mode.applies() && core.version_vector() != hub_vv {
                let mine = core.version_vector().clone();
                let theirs = hub_vv.clone();
                if !mine.dominates(&theirs) || !theirs.dominates(&mine) {
                    return Some(format!(
                        "{} holds {:?}, the hub {:?}",
                        n.name, mine.0, theirs.0
                    ));
                }
            }
        }
        None
    }

    fn final_checks(&mut self) {
        self.stats.gc_node_rows_dropped = self
            .nodes
            .iter()
            .filter_map(|n| n.core.as_ref())
            .map(|c| c.gc_stats().rows_dropped)
            .sum();
        let mut views = Vec::new();
        for n in &self.nodes {
            let Some(core) = n.core.as_ref() else {
                self.failure = Some(Failure::new("simulator", "a node is down at the end"));
                return;
            };
            views.push(check::NodeView {
                name: &n.name,
                mode: n.mode,
                core,
                db: &n.db,
                expected: &n.expected,
                dropped: &n.dropped,
            });
        }
        let Some(hub) = self.hub.core.as_mut() else {
            self.failure = Some(Failure::new("simulator", "the hub is down at the end"));
            return;
        };
        let now = Ntp64::from_unix_millis(START_UNIX_MS + self.now);
        let mut order = Rng::stream(self.cfg.seed, 5);
        let res = check::check_all(
            &self.tables,
            &views,
            &self.late_rows,
            hub,
            &self.hub.store,
            now,
            &mut order,
            self.cfg.strict_causality,
        );
        drop(views);
        match res {
            Ok(c) => {
                if let Some((f, n)) = &c.known {
                    let line = format!("KNOWN ISSUE ({n} ops) {}: {}", f.invariant, f.detail);
                    self.log(line);
                }
                let line = format!("all other invariants hold: {}", c.summary);
                self.log(line);
                self.known_issue = c.known;
            }
            Err(f) => self.fail(f),
        }
    }
}
