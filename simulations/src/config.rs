//! What one simulated run looks like: the knobs a user can fix on the
//! command line ([`Overrides`]) and the per-seed fault mix drawn from the
//! seed for every knob left open ([`Params`]).

use std::fmt::Write as _;

use syncmesh_node::config::Mode;

use crate::rng::Rng;

/// The hub's and every node's `sync.max_clock_drift` (the config default).
pub const MAX_CLOCK_DRIFT_MS: u64 = 500;

/// Knobs fixed from the command line; `None` means drawn from the seed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    /// Number of nodes (2-5 when drawn).
    pub nodes: Option<usize>,
    /// Probability that a delivered message breaks its connection (0-0.3).
    pub loss: Option<f64>,
    /// Probability of an ack lost after a durable batch, and of a replayed
    /// batch after a reconnect (0-0.5).
    pub dup: Option<f64>,
    /// Largest one-way delay of a message in ms (0-500).
    pub max_delay_ms: Option<u64>,
    /// Partitions started per simulated minute.
    pub partitions_per_min: Option<f64>,
    /// Node crashes per simulated minute (over all nodes).
    pub node_crashes_per_min: Option<f64>,
    /// Hub crashes per simulated minute.
    pub hub_crashes_per_min: Option<f64>,
    /// Clock jumps per simulated minute (over all processes).
    pub clock_jumps_per_min: Option<f64>,
    /// Local writes per second per writing node.
    pub writes_per_sec: Option<f64>,
    /// Largest clock offset in ms of a process (kept within half the drift
    /// unless `beyond_drift_ms` says otherwise).
    pub skew_ms: Option<u64>,
    /// How far beyond `max_clock_drift` a clock may jump during faults
    /// (0 = never).
    pub beyond_drift_ms: Option<u64>,
    /// Ops per batch (`sync.batch_size`).
    pub batch_size: Option<usize>,
    /// Probability of a node crash at each interesting shell step (see
    /// [`Params::crash_point_rate`]).
    pub crash_points: Option<f64>,
    /// The exclusion fault: the hub's tombstone grace in ms (2,000-10,000
    /// when drawn, on some seeds; `0` = off: the default grace of hours).
    /// See [`Params::tombstone_grace_ms`].
    pub tombstone_grace_ms: Option<u64>,
    /// Turns every fault off (a baseline run).
    pub no_faults: bool,
    /// Makes the first node publish-only (at least 3 nodes).
    pub publish_first: bool,
}

impl Overrides {
    /// The command-line flags that reproduce these overrides.
    pub fn to_flags(&self) -> String {
        let mut s = String::new();
        let mut flag = |name: &str, v: Option<String>| {
            if let Some(v) = v {
                let _ = write!(s, " --{name} {v}");
            }
        };
        flag("nodes", self.nodes.map(|v| v.to_string()));
        flag("loss", self.loss.map(|v| v.to_string()));
        flag("dup", self.dup.map(|v| v.to_string()));
        flag("max-delay-ms", self.max_delay_ms.map(|v| v.to_string()));
        flag(
            "partitions-per-min",
            self.partitions_per_min.map(|v| v.to_string()),
        );
        flag(
            "node-crashes-per-min",
            self.node_crashes_per_min.map(|v| v.to_string()),
        );
        flag(
            "hub-crashes-per-min",
            self.hub_crashes_per_min.map(|v| v.to_string()),
        );
        flag(
            "clock-jumps-per-min",
            self.clock_jumps_per_min.map(|v| v.to_string()),
        );
        flag("writes-per-sec", self.writes_per_sec.map(|v| v.to_string()));
        flag("skew-ms", self.skew_ms.map(|v| v.to_string()));
        flag(
            "beyond-drift-ms",
            self.beyond_drift_ms.map(|v| v.to_string()),
        );
        flag("batch-size", self.batch_size.map(|v| v.to_string()));
        flag("crash-points", self.crash_points.map(|v| v.to_string()));
        flag(
            "tombstone-grace-ms",
            self.tombstone_grace_ms.map(|v| v.to_string()),
        );
        if self.no_faults {
            s.push_str(" --no-faults");
        }
        if self.publish_first {
            s.push_str(" --publish-first");
        }
        s
    }
}

/// A deliberate bug planted in the simulator's own shell or database, to
/// prove that the invariants catch that class of bug (used by tests; the
/// cores are never modified).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sabotage {
    /// Every 5th apply transaction also records its first row in the
    /// change log, as a capture trigger without the echo flag would.
    EchoApplies,
    /// Every 7th apply transaction silently skips its last row.
    DropAppliedRow,
    /// Nodes restart with restart mark 0 (forgetting that an apply before
    /// the crash may have overwritten uncaptured local writes).
    ForgetRestartMark,
    /// Every 9th capture deletes one change row more than was logged.
    DeleteUncapturedChange,
}

/// Everything that defines one run besides the seed's randomness.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// The seed.
    pub seed: u64,
    /// Simulated duration of the fault phase (writes and faults), ms.
    pub fault_ms: u64,
    /// After the heal the mesh must make progress (ops stored, merged or
    /// applied) at least this often until it converges, ms.
    pub stall_timeout_ms: u64,
    /// And it must converge within this long after the heal in any case, ms.
    pub heal_timeout_ms: u64,
    /// Knobs fixed by the user.
    pub overrides: Overrides,
    /// Print every trace event to stderr as it happens.
    pub live_trace: bool,
    /// A causality violation fails the seed (the default). `false` only
    /// counts it (`--lenient-causality`), to look past it at the rest.
    pub strict_causality: bool,
    /// A planted bug (tests of the invariants only).
    pub sabotage: Option<Sabotage>,
}

impl SimConfig {
    /// A run of `seed` with `minutes` of simulated faults.
    pub fn new(seed: u64, minutes: f64) -> Self {
        SimConfig {
            seed,
            fault_ms: (minutes.max(0.0) * 60_000.0) as u64,
            stall_timeout_ms: 60_000,
            heal_timeout_ms: 1_800_000,
            overrides: Overrides::default(),
            live_trace: false,
            strict_causality: true,
            sabotage: None,
        }
    }

    /// The one command that replays this run.
    pub fn replay_command(&self) -> String {
        format!(
            "cargo run -p simulations --release -- --seed {} --minutes {}{}{} --trace",
            self.seed,
            self.fault_ms as f64 / 60_000.0,
            self.overrides.to_flags(),
            if self.strict_causality {
                ""
            } else {
                " --lenient-causality"
            }
        )
    }
}

/// The resolved parameters of one seed.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// Mode of each node.
    pub modes: Vec<Mode>,
    /// See [`Overrides::loss`].
    pub loss: f64,
    /// See [`Overrides::dup`].
    pub dup: f64,
    /// See [`Overrides::max_delay_ms`].
    pub max_delay_ms: u64,
    /// See [`Overrides::partitions_per_min`].
    pub partitions_per_min: f64,
    /// See [`Overrides::node_crashes_per_min`].
    pub node_crashes_per_min: f64,
    /// See [`Overrides::hub_crashes_per_min`].
    pub hub_crashes_per_min: f64,
    /// See [`Overrides::clock_jumps_per_min`].
    pub clock_jumps_per_min: f64,
    /// See [`Overrides::writes_per_sec`].
    pub writes_per_sec: f64,
    /// See [`Overrides::skew_ms`].
    pub skew_ms: u64,
    /// See [`Overrides::beyond_drift_ms`].
    pub beyond_drift_ms: u64,
    /// See [`Overrides::batch_size`].
    pub batch_size: usize,
    /// Probability that a local write is aimed at a row the node is about
    /// to apply, between `poll_apply` and the apply transaction.
    pub race_rate: f64,
    /// Probability that a local transaction writes 2-3 rows.
    pub txn_rate: f64,
    /// Probability that a node crashes right at an interesting step of its
    /// shell: after `handle_captured` before the change rows are deleted,
    /// after the apply transaction before `handle_applied`, after a hub
    /// message was merged before its ack leaves. Only when node crashes
    /// are on.
    pub crash_point_rate: f64,
    /// The exclusion fault: when non-zero, the hub's tombstone grace
    /// (`HubCore::set_tombstone_grace_ms`) in ms instead of the default of
    /// hours, so a node whose session is gone longer than that (a long
    /// partition, a crash) is excluded from the stable cut, deletes are
    /// collected without it, and when it returns having written meanwhile
    /// the hub refuses its ops until it is re-snapshotted (a publish-only
    /// node's ops are judged by the hub on arrival instead).
    pub tombstone_grace_ms: u64,
}

impl Params {
    /// Draws the fault mix of `seed`, keeping every overridden knob.
    pub fn draw(seed: u64, o: &Overrides) -> Self {
        let mut r = Rng::stream(seed, 0xC0F1);
        let maybe = |p: f64, lo: f64, hi: f64, r: &mut Rng| {
            if r.chance(p) {
                lo + r.unit() * (hi - lo)
            } else {
                0.0
            }
        };
        let mut nodes = o.nodes.unwrap_or(2 + r.below(4) as usize).max(1);
        if o.publish_first {
            nodes = nodes.max(3);
        }
        let mut modes = vec![Mode::Bidirectional; nodes];
        if nodes >= 3 {
            if r.chance(0.2) || o.publish_first {
                modes[0] = Mode::Publish;
            }
            if r.chance(0.2) {
                modes[nodes - 1] = Mode::Subscribe;
            }
        }
        let loss = maybe(0.6, 0.0, 0.30, &mut r);
        let dup = maybe(0.6, 0.0, 0.50, &mut r);
        let max_delay_ms = [0, 2, 20, 100, 250, 500][r.index(6)];
        let partitions_per_min = maybe(0.7, 1.0, 12.0, &mut r);
        let node_crashes_per_min = maybe(0.6, 1.0, 10.0, &mut r);
        let hub_crashes_per_min = maybe(0.5, 0.5, 5.0, &mut r);
        let clock_jumps_per_min = maybe(0.6, 1.0, 20.0, &mut r);
        let writes_per_sec = 1.0 + r.unit() * 5.0;
        let skew_ms = r.below(MAX_CLOCK_DRIFT_MS / 2 + 1);
        let beyond_drift_ms = if r.chance(0.15) {
            r.range(50, MAX_CLOCK_DRIFT_MS)
        } else {
            0
        };
        let batch_size = [1, 2, 3, 10, 100][r.index(5)];
        let race_rate = maybe(0.8, 0.05, 0.5, &mut r);
        let txn_rate = maybe(0.5, 0.05, 0.3, &mut r);
        let crash_point_rate = maybe(0.7, 0.002, 0.05, &mut r);
        // Drawn last, so the knobs above stay what they were for every seed.
        let tombstone_grace_ms = if r.chance(0.3) {
            r.range(2_000, 10_000)
        } else {
            0
        };
        let mut p = Params {
            modes,
            loss: o.loss.unwrap_or(loss),
            dup: o.dup.unwrap_or(dup),
            max_delay_ms: o.max_delay_ms.unwrap_or(max_delay_ms),
            partitions_per_min: o.partitions_per_min.unwrap_or(partitions_per_min),
            node_crashes_per_min: o.node_crashes_per_min.unwrap_or(node_crashes_per_min),
            hub_crashes_per_min: o.hub_crashes_per_min.unwrap_or(hub_crashes_per_min),
            clock_jumps_per_min: o.clock_jumps_per_min.unwrap_or(clock_jumps_per_min),
            writes_per_sec: o.writes_per_sec.unwrap_or(writes_per_sec),
            skew_ms: o.skew_ms.unwrap_or(skew_ms),
            beyond_drift_ms: o.beyond_drift_ms.unwrap_or(beyond_drift_ms),
            batch_size: o.batch_size.unwrap_or(batch_size).max(1),
            race_rate,
            txn_rate,
            crash_point_rate: o.crash_points.unwrap_or(crash_point_rate),
            tombstone_grace_ms: o.tombstone_grace_ms.unwrap_or(tombstone_grace_ms),
        };
        if p.node_crashes_per_min <= 0.0 && o.crash_points.is_none() {
            p.crash_point_rate = 0.0;
        }
        if o.no_faults {
            p.loss = 0.0;
            p.dup = 0.0;
            p.partitions_per_min = 0.0;
            p.node_crashes_per_min = 0.0;
            p.hub_crashes_per_min = 0.0;
            p.clock_jumps_per_min = 0.0;
            p.skew_ms = 0;
            p.beyond_drift_ms = 0;
            p.crash_point_rate = 0.0;
            p.tombstone_grace_ms = 0;
        }
        p
    }

    /// One line for reports.
    pub fn summary(&self) -> String {
        let modes: Vec<&str> = self.modes.iter().map(|m| m.as_str()).collect();
        format!(
            "nodes={} [{}] loss={:.3} dup={:.3} delay<={}ms partitions/min={:.1} node-crashes/min={:.1} crash-points={:.3} hub-crashes/min={:.1} clock-jumps/min={:.1} skew<={}ms beyond-drift={}ms writes/s/node={:.1} batch={} race={:.2} txn={:.2} tombstone-grace={}",
            self.modes.len(),
            modes.join(","),
            self.loss,
            self.dup,
            self.max_delay_ms,
            self.partitions_per_min,
            self.node_crashes_per_min,
            self.crash_point_rate,
            self.hub_crashes_per_min,
            self.clock_jumps_per_min,
            self.skew_ms,
            self.beyond_drift_ms,
            self.writes_per_sec,
            self.batch_size,
            self.race_rate,
            self.txn_rate,
            if self.tombstone_grace_ms > 0 {
                format!("{}ms", self.tombstone_grace_ms)
            } else {
                "default".to_owned()
            },
        )
    }
}
