//! The invariants checked once the faults stop and the mesh is quiet, and
//! the oracle they compare against.
//!
//! The oracle is the resolver applied to the union of every op (each
//! node's own log, cross-checked against what the hub holds), merged in two
//! different random orders; an independent reference model of the merge
//! rules (written from the design, ~40 lines, no shared code with
//! `RowState`) cross-checks the resolver itself.

use std::collections::{BTreeMap, BTreeSet};

use syncmesh_hub::core::HubCore;
use syncmesh_node::config::Mode;
use syncmesh_node::core::{NodeCore, TableInfo, row_key};
use syncmesh_node::store::LogStore;
use syncmesh_node::wire;
use syncmesh_proto::v1 as pb;
use syncmesh_resolver::{
    DeletePolicy, NodeId, Ntp64, Op, OpId, OpKind, RowState, Strategy, TableRules, Value,
    VersionVector, VisibleRow,
};

use crate::db::{Row, Rows, SimDb};
use crate::rng::Rng;
use crate::sim::Failure;
use crate::store::Shared;
use crate::workload::{COUNTERS, ExpectedOp, TOTAL, same_bits};

/// What the checks need to see of one node.
pub struct NodeView<'a> {
    /// Its name.
    pub name: &'a NodeId,
    /// Its mode.
    pub mode: Mode,
    /// Its core.
    pub core: &'a NodeCore<Shared>,
    /// Its database.
    pub db: &'a SimDb,
    /// The ops its local writes had to produce, in change order.
    pub expected: &'a [ExpectedOp],
    /// Seqs of own ops its core reported dropping under `delete_wins`
    /// after a re-snapshot (`lost_update`): each must be in the log as its
    /// write with no fields, and its increments count for nothing.
    pub dropped: &'a BTreeSet<u64>,
}

type RowId = (String, Vec<Value>);

fn fmt_row(r: Option<&Row>) -> String {
    match r {
        None => "(absent)".into(),
        Some(r) => {
            let parts: Vec<String> = r.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            format!("{{{}}}", parts.join(", "))
        }
    }
}

/// The full database row a visible row must appear as: key columns from
/// the key, absent columns NULL (`NodeCore::poll_apply` + `apply`).
fn db_row(info: &TableInfo, key: &[Value], visible: &VisibleRow) -> Row {
    let mut r: Row = info
        .schema
        .columns
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                visible.get(&c.name).cloned().unwrap_or(Value::Null),
            )
        })
        .collect();
    for (k, v) in info.schema.key.iter().zip(key) {
        r.insert(k.clone(), v.clone());
    }
    r
}

/// Merges `ops` (in the given order) into row states.
fn merge<'a>(ops: impl Iterator<Item = &'a Op>) -> BTreeMap<RowId, RowState> {
    let mut rows: BTreeMap<RowId, RowState> = BTreeMap::new();
    for op in ops {
        rows.entry((op.table.clone(), op.key.clone()))
            .or_default()
            .apply(op);
    }
    rows
}

/// The rows every applying replica must hold, per table.
fn expected_tables(
    tables: &[TableInfo],
    states: &BTreeMap<RowId, RowState>,
) -> BTreeMap<String, Rows> {
    let mut out: BTreeMap<String, Rows> = tables
        .iter()
        .map(|t| (t.schema.name.clone(), Rows::new()))
        .collect();
    for ((table, key), state) in states {
        let Some(info) = tables.iter().find(|t| &t.schema.name == table) else {
            continue;
        };
        if let Some(v) = state.visible(&info.rules) {
            out.entry(table.clone())
                .or_default()
                .insert(key.clone(), db_row(info, key, &v));
        }
    }
    out
}

/// The reference model: the visible row and the live deletes of one row,
/// computed from the whole op set at once, from the rules as documented on
/// `RowState`: a `row_pred` id `(O, s)` supersedes every op of origin `O`
/// on the row with `seq <= s` (an id of the op's own origin only up to the
/// op's seq − 1); a field `pred` id supersedes exactly that op's write of
/// that field. A write or delete is live when nothing supersedes it;
/// delete_wins hides a row with a live delete; each field shows its
/// strategy's pick among its live writes, written here from the strategy
/// docs for the values the workload writes (integers, text, NULL): the
/// highest `(HLC, op id)` (`last_write_wins`); the highest node rank, then
/// time (`source_priority`, `merge`); the greatest value (`max`); the least
/// non-NULL value (`min`); the earliest listed value, unlisted last
/// (`priority_order`); each then by time. A `sum` field shows the exact
/// sum of the deltas of every upsert no `row_pred` supersedes (a field
/// `pred` does not remove a contribution), or, with none, its
/// last-write-wins value.
pub fn reference_row(ops: &[&Op], rules: &TableRules) -> (Option<VisibleRow>, Vec<OpId>) {
    let mut row_upto: BTreeMap<&NodeId, u64> = BTreeMap::new();
    let mut field_sup: BTreeSet<(&OpId, &str)> = BTreeSet::new();
    for op in ops {
        for p in &op.row_pred {
            let upto = if p.origin == op.id.origin {
                p.seq.min(op.id.seq.saturating_sub(1))
            } else {
                p.seq
            };
            let e = row_upto.entry(&p.origin).or_insert(0);
            *e = (*e).max(upto);
        }
        for w in &op.fields {
            for p in w.pred.iter().filter(|p| **p != op.id) {
                field_sup.insert((p, w.name.as_str()));
            }
        }
    }
    let row_dead = |id: &OpId| id.seq <= row_upto.get(&id.origin).copied().unwrap_or(0);
    let live_deletes: Vec<OpId> = ops
        .iter()
        .filter(|o| o.kind == OpKind::Delete && !row_dead(&o.id))
        .map(|o| o.id.clone())
        .collect();
    let mut live: BTreeMap<&str, Vec<(&Op, &Value)>> = BTreeMap::new();
    let mut sums: BTreeMap<&str, i128> = BTreeMap::new();
    for op in ops {
        if op.kind != OpKind::Upsert || row_dead(&op.id) {
            continue;
        }
        for w in &op.fields {
            if *rules.strategy(&w.name) == Strategy::Sum
                && let Some(Value::Int(d)) = &w.delta
            {
                *sums.entry(&w.name).or_insert(0) += i128::from(*d);
            }
            if !field_sup.contains(&(&op.id, w.name.as_str())) {
                live.entry(&w.name).or_default().push((op, &w.value));
            }
        }
    }
    let by_time =
        |a: &(&Op, &Value), b: &(&Op, &Value)| (a.0.hlc, &a.0.id).cmp(&(b.0.hlc, &b.0.id));
    let rank = |list: &[String], v: &Value| match v {
        Value::Text(t) => list.iter().position(|e| e == t).unwrap_or(list.len()),
        _ => list.len(),
    };
    let mut row: VisibleRow = VisibleRow::new();
    let names: BTreeSet<&str> = live.keys().chain(sums.keys()).copied().collect();
    for name in names {
        let strategy = rules.strategy(name);
        if *strategy == Strategy::Sum
            && let Some(total) = sums.get(name)
        {
            let clamped = (*total).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
            row.insert(name.to_owned(), Value::Int(clamped));
            continue;
        }
        let Some(cands) = live.get(name) else {
            continue;
        };
        let best = cands.iter().max_by(|a, b| {
            let primary = match strategy {
                Strategy::LastWriteWins | Strategy::Sum => std::cmp::Ordering::Equal,
                Strategy::SourcePriority | Strategy::Merge => rules
                    .priority(&a.0.id.origin)
                    .cmp(&rules.priority(&b.0.id.origin)),
                Strategy::Max => a.1.cmp(b.1),
                Strategy::Min => (!a.1.is_null())
                    .cmp(&!b.1.is_null())
                    .then_with(|| b.1.cmp(a.1)),
                Strategy::PriorityOrder(list) => rank(list, b.1).cmp(&rank(list, a.1)),
            };
            primary.then_with(|| by_time(a, b))
        });
        if let Some((_, v)) = best {
            row.insert(name.to_owned(), (*v).clone());
        }
    }
    if row.is_empty() || (!live_deletes.is_empty() && rules.deletes == DeletePolicy::DeleteWins) {
        return (None, live_deletes);
    }
    (Some(row), live_deletes)
}

/// Every op the hub holds, per origin, read through a subscribe-only
/// session of an auditor (the hub's own fan-out path).
fn hub_ops(hub: &mut HubCore<Shared>, now: Ntp64) -> Result<BTreeMap<NodeId, Vec<Op>>, Failure> {
    let err = |what: &str, e: &dyn std::fmt::Display| {
        Failure::new("hub core error", format!("audit {what}: {e}"))
    };
    let sid = hub.handle_open();
    let hello = pb::NodeMessage {
        body: Some(pb::node_message::Body::Hello(pb::Hello {
            protocol_version: syncmesh_proto::PROTOCOL_VERSION,
            node: "sim-audit".into(),
            // Ops below the compacted vector are gone from the log (the
            // hub serves re-snapshots instead): audit what is left.
            version_vector: Some(wire::vv_to_proto(hub.gc_compacted())),
            mode: "subscribe".into(),
            engine: String::new(),
            seen: None,
            resnap: false,
            snapshot: None,
        })),
    };
    hub.handle_message(now, sid, hello)
        .map_err(|e| err("hello", &e))?;
    let mut out: BTreeMap<NodeId, Vec<Op>> = BTreeMap::new();
    let mut got = hub.gc_compacted().clone();
    for _ in 0..1_000_000 {
        let mut any = false;
        while let Some(m) = hub.poll_transmit(sid).map_err(|e| err("poll", &e))? {
            if let Some(pb::hub_message::Body::Ops(b)) = m.body {
                any = true;
                for raw in b.ops {
                    let op = wire::op_from_proto(raw).map_err(|e| {
                        Failure::new("hub holds valid ops", format!("hub sent: {e}"))
                    })?;
                    got.advance(&op.id.origin, op.id.seq);
                    out.entry(op.id.origin.clone()).or_default().push(op);
                }
            }
        }
        if !any {
            break;
        }
        let ack = pb::NodeMessage {
            body: Some(pb::node_message::Body::Ack(pb::Ack {
                version_vector: Some(wire::vv_to_proto(&got)),
            })),
        };
        hub.handle_message(now, sid, ack)
            .map_err(|e| err("ack", &e))?;
    }
    hub.handle_close(sid);
    Ok(out)
}

/// The invariant name of the known capture-causality bug.
pub const CAUSALITY: &str =
    "causality: a local write supersedes only ops its node held when it was made";

/// What [`check_all`] found besides hard failures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checked {
    /// One line: ops, origins, rows.
    pub summary: String,
    /// Violations of known, reported core bugs (not fatal unless strict):
    /// the first one and how many ops showed it.
    pub known: Option<(Failure, u64)>,
}

/// One conflict record as comparable text: table, key, field, candidate op
/// ids, strategy, result and time (the record's content, not its storage).
fn conflict_line(
    table: &str,
    key: &[Value],
    field: &str,
    ids: &[OpId],
    strategy: &str,
    result: Option<&Value>,
    hlc: Option<u64>,
) -> String {
    let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    format!(
        "{table}[{key:?}].{field} {{{}}} {strategy} -> {result:?} at {hlc:?}",
        ids.join(" ")
    )
}

/// Whether a replica's row state equals the oracle's, allowing for the
/// metadata garbage collection at `stable` (the replica's cut) forgot:
/// both are collected at `stable` and must then be identical (exact when
/// nothing was collected). Visible rows are compared separately, exactly.
fn same_modulo_gc(held: &RowState, oracle: &RowState, stable: &VersionVector) -> bool {
    if held == oracle {
        return true;
    }
    if stable.0.values().all(|s| *s == 0) {
        return false;
    }
    let mut a = held.clone();
    a.collect_garbage(stable);
    let mut b = oracle.clone();
    b.collect_garbage(stable);
    a == b
}

/// With `SIM_DEBUG_STATES` set, both row states (and the oracle's
/// collected at the cut) for a row-state mismatch report; empty otherwise.
fn debug_states(held: &RowState, oracle: &RowState, stable: &VersionVector) -> String {
    if std::env::var_os("SIM_DEBUG_STATES").is_none() {
        return String::new();
    }
    let mut b = oracle.clone();
    b.collect_garbage(stable);
    format!("\n held {held:?}\n oracle {oracle:?}\n oracle collected {b:?}\n cut {stable:?}")
}

/// The hub's row state of one row (empty when it holds none).
fn hub_row_state(store: &Shared, table: &str, key: &[Value]) -> Result<RowState, Failure> {
    let rk = row_key(b"r/", table, key)
        .map_err(|e| Failure::new("hub core error", format!("row key: {e}")))?;
    match store
        .get(&rk)
        .map_err(|e| Failure::new("hub core error", format!("store: {e}")))?
    {
        Some(b) => postcard::from_bytes(&b).map_err(|e| {
            Failure::new("hub core error", format!("{table}[{key:?}] row state: {e}"))
        }),
        None => Ok(RowState::default()),
    }
}

/// The hub's row state of every row the oracle knows.
fn hub_row_states(
    store: &Shared,
    states: &BTreeMap<RowId, RowState>,
) -> Result<BTreeMap<RowId, RowState>, Failure> {
    let mut out = BTreeMap::new();
    for (table, key) in states.keys() {
        let held = hub_row_state(store, table, key)?;
        out.insert((table.clone(), key.clone()), held);
    }
    Ok(out)
}

/// The first key whose row differs between `a` and `b` (bit for bit).
fn differing_key(a: &Rows, b: &Rows) -> Option<Vec<Value>> {
    let keys: BTreeSet<&Vec<Value>> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .find(|k| !match (a.get(*k), b.get(*k)) {
            (Some(g), Some(e)) => {
                g.len() == e.len()
                    && g.iter()
                        .zip(e)
                        .all(|((ka, va), (kb, vb))| ka == kb && same_bits(va, vb))
            }
            (None, None) => true,
            _ => false,
        })
        .cloned()
}

/// The hub merges every op into its own row states (for conflicts): they
/// must equal the oracle's, and its conflict records must be exactly the
/// complete conflicts of those states, once each.
fn check_hub_rows(
    tables: &[TableInfo],
    hub: &HubCore<Shared>,
    store: &Shared,
    states: &BTreeMap<RowId, RowState>,
    late: &BTreeSet<RowId>,
) -> Result<usize, Failure> {
    let mut want: BTreeSet<String> = BTreeSet::new();
    let mut dbg: BTreeMap<String, String> = BTreeMap::new();
    for ((table, key), state) in states {
        if late.contains(&(table.clone(), key.clone())) {
            continue;
        }
        let Some(info) = tables.iter().find(|t| &t.schema.name == table) else {
            continue;
        };
        let held = hub_row_state(store, table, key)?;
        if !same_modulo_gc(&held, state, &hub.gc_cut().stable) {
            return Err(Failure::new(
                "the hub's row state is a function of the op set",
                format!(
                    "hub: {table}[{key:?}] state differs from the oracle{}",
                    debug_states(&held, state, &hub.gc_cut().stable)
                ),
            ));
        }
        for c in state.conflicts(&info.rules) {
            if !c.is_complete() {
                continue;
            }
            let ids: Vec<OpId> = c.candidates.iter().map(|x| x.op.clone()).collect();
            let line = conflict_line(
                table,
                key,
                &c.field,
                &ids,
                &c.strategy,
                c.value.as_ref(),
                c.hlc.map(|h| h.time),
            );
            dbg.insert(
                line.clone(),
                debug_states(&held, state, &hub.gc_cut().stable),
            );
            want.insert(line);
        }
    }
    let req = pb::ConflictsRequest {
        table: String::new(),
        since_unix_ms: 0,
        limit: u32::MAX,
    };
    let reply = hub
        .conflicts(&req)
        .map_err(|e| Failure::new("hub core error", format!("conflicts: {e}")))?;
    let mut got: BTreeSet<String> = BTreeSet::new();
    for r in reply.conflicts {
        let bad = |e: &dyn std::fmt::Display| {
            Failure::new("conflict records are valid", format!("record {e}"))
        };
        let key = r
            .key
            .into_iter()
            .map(wire::value_from_proto)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&e))?;
        let ids = r
            .candidates
            .iter()
            .map(|x| {
                let id = x.op.clone().unwrap_or_default();
                NodeId::new(id.origin).map(|o| OpId::new(o, id.seq))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&e))?;
        let result = r
            .result
            .map(wire::value_from_proto)
            .transpose()
            .map_err(|e| bad(&e))?;
        if late.contains(&(r.table.clone(), key.clone())) {
            continue;
        }
        let line = conflict_line(
            &r.table,
            &key,
            &r.field,
            &ids,
            &r.strategy,
            result.as_ref(),
            r.hlc.map(|h| h.time),
        );
        if !got.insert(line.clone()) {
            return Err(Failure::new(
                "each conflict is recorded once",
                format!("the hub holds {line} twice"),
            ));
        }
    }
    if let Some(missing) = want.difference(&got).next() {
        return Err(Failure::new(
            "the hub records every conflict",
            format!(
                "missing {missing} ({} records held, {} expected){}",
                got.len(),
                want.len(),
                dbg.get(missing).cloned().unwrap_or_default()
            ),
        ));
    }
    if let Some(extra) = got.difference(&want).next() {
        return Err(Failure::new(
            "the hub records only current conflicts",
            format!(
                "unexpected {extra} ({} records held, {} expected)",
                got.len(),
                want.len()
            ),
        ));
    }
    Ok(got.len())
}

/// Runs every end-of-run invariant. `strict_causality` makes the known
/// capture-causality bug fatal; otherwise it is returned in
/// [`Checked::known`] and every other check still runs.
///
/// `late`: rows a node wrote while it was excluded from the stable cut
/// (before it installed a re-snapshot; the exclusion fault). Such a write
/// is concurrent with deletes whose tombstones the mesh may have collected
/// before it arrived, and the design keeps it where the uncollected
/// semantics would hide it (ARCHITECTURE.md, invariant 6: inserts are
/// kept; `update_wins` shows the fields it wrote), so for these rows only
/// the oracle of all ops does not apply: their row states, conflict
/// records, visible rows and resurrection are not compared with it. Every
/// replica must still show exactly the hub's rows (checked for every row),
/// dropped writes are still checked op by op, and counters stay exact.
// Every argument is a separate input of the checks (no natural grouping).
#[allow(clippy::too_many_arguments)]
pub fn check_all(
    tables: &[TableInfo],
    nodes: &[NodeView<'_>],
    late: &BTreeSet<RowId>,
    hub: &mut HubCore<Shared>,
    hub_store: &Shared,
    now: Ntp64,
    order: &mut Rng,
    strict_causality: bool,
) -> Result<Checked, Failure> {
    let mut known: Option<(Failure, u64)> = None;
    // 1. Every local write became exactly one op (no loss, no duplicate, no
    //    echo: applies made none), seqs gap-free, HLCs strictly increasing.
    let mut logs: BTreeMap<NodeId, Vec<Op>> = BTreeMap::new();
    for n in nodes {
        let ops = n
            .core
            .own_ops(1, usize::MAX)
            .map_err(|e| Failure::new("node core error", format!("{}: own_ops: {e}", n.name)))?;
        for (k, op) in ops.iter().enumerate() {
            if op.id.origin != *n.name || op.id.seq != k as u64 + 1 {
                return Err(Failure::new(
                    "gap-free seqs per origin",
                    format!("{}'s log entry {} is op {}", n.name, k + 1, op.id),
                ));
            }
            if op.hlc.id != n.name.hlc_id() {
                return Err(Failure::new(
                    "HLC ids belong to their origin",
                    format!("op {} has HLC {}", op.id, op.hlc),
                ));
            }
            if k > 0 && ops[k - 1].hlc >= op.hlc {
                return Err(Failure::new(
                    "HLCs never go backwards per origin",
                    format!(
                        "op {} has HLC {} after {} had {}",
                        op.id,
                        op.hlc,
                        ops[k - 1].id,
                        ops[k - 1].hlc
                    ),
                ));
            }
        }
        for (k, exp) in n.expected.iter().enumerate() {
            let seq = k as u64 + 1;
            if n.dropped.contains(&seq) {
                // The core dropped this write (a collected delete of its
                // row superseded it): the op stays, with no fields, and
                // only where `lost_update` may drop.
                let dropped_ok = ops.get(k).is_some_and(|op| {
                    op.table == exp.table
                        && op.key == exp.key
                        && op.kind == OpKind::Upsert
                        && op.fields.is_empty()
                        && exp.fields.as_ref().is_some_and(|f| !f.is_empty())
                        && tables.iter().any(|t| {
                            t.schema.name == exp.table
                                && t.rules.deletes == DeletePolicy::DeleteWins
                        })
                });
                if !dropped_ok {
                    return Err(Failure::new(
                        "a dropped write stays in the log as an upsert with no fields",
                        format!(
                            "{}: the core reported dropping op #{seq} (change #{} {}[{:?}] {:?}, delete_wins) but its log holds {:?}",
                            n.name,
                            exp.change_id,
                            exp.table,
                            exp.key,
                            exp.fields,
                            ops.get(k)
                        ),
                    ));
                }
                continue;
            }
            match ops.get(k) {
                Some(op) if exp.matches(op) => {}
                Some(op) if ops.get(k + 1).is_some_and(|next| exp.matches(next)) => {
                    return Err(Failure::new(
                        "no echo: applies create no ops",
                        format!(
                            "{}: op #{} matches no local write (the next op is change #{}): {op:?}",
                            n.name,
                            k + 1,
                            exp.change_id
                        ),
                    ));
                }
                Some(op) => {
                    return Err(Failure::new(
                        "no lost write: each local write becomes exactly one op",
                        format!(
                            "{}: op #{} should be change #{} {}[{:?}] {:?} but is {op:?}",
                            n.name,
                            k + 1,
                            exp.change_id,
                            exp.table,
                            exp.key,
                            exp.fields
                        ),
                    ));
                }
                None => {
                    return Err(Failure::new(
                        "no lost write: each local write becomes exactly one op",
                        format!(
                            "{} made {} ops for {} row-changing local writes; missing from change #{} {}[{:?}]",
                            n.name,
                            ops.len(),
                            n.expected.len(),
                            exp.change_id,
                            exp.table,
                            exp.key
                        ),
                    ));
                }
            }
        }
        if ops.len() != n.expected.len() {
            return Err(Failure::new(
                "no echo: applies create no ops",
                format!(
                    "{} made {} ops but its local writes account for {}; first extra: {:?}",
                    n.name,
                    ops.len(),
                    n.expected.len(),
                    ops.get(n.expected.len())
                ),
            ));
        }
        let pending = n.db.pending_changes_after(n.core.capture_checkpoint());
        if pending > 0 {
            return Err(Failure::new(
                "every committed write is captured",
                format!("{} still has {pending} uncaptured change rows", n.name),
            ));
        }
        if !ops.is_empty() {
            logs.insert(n.name.clone(), ops);
        }
    }

    // 2. The hub holds exactly those ops.
    let held = hub_ops(hub, now)?;
    let hub_vv = hub.version_vector().clone();
    let compacted = hub.gc_compacted().clone();
    let mut hub_dropped: Vec<(NodeId, usize)> = Vec::new();
    for (origin, ops) in &logs {
        let theirs = held.get(origin).map(Vec::as_slice).unwrap_or(&[]);
        // The hub's log starts after what it compacted (every writer had
        // seen those ops; they live on in its row states).
        let dropped = (compacted.get(origin) as usize).min(ops.len());
        let ops = &ops[dropped..];
        if hub_vv.get(origin) != (dropped + ops.len()) as u64 || theirs.len() != ops.len() {
            return Err(Failure::new(
                "the hub holds every acknowledged op",
                format!(
                    "{origin} made {} ops; the hub's version vector says {}, it sent {}",
                    ops.len(),
                    hub_vv.get(origin),
                    theirs.len()
                ),
            ));
        }
        let publish = nodes
            .iter()
            .any(|n| n.name == origin && n.mode == Mode::Publish);
        for (i, (a, b)) in ops.iter().zip(theirs).enumerate() {
            if a == b {
                continue;
            }
            // A returning publish-only node's write of a row deleted by a
            // delete it never saw: the hub drops its fields
            // (`RowState::loses_update`, `RowState::loses_to_delete`);
            // everything else stays the same.
            let mut emptied = a.clone();
            emptied.fields.clear();
            let droppable = publish
                && a.kind == OpKind::Upsert
                && !a.fields.is_empty()
                && tables.iter().any(|t| {
                    t.schema.name == a.table && t.rules.deletes == DeletePolicy::DeleteWins
                });
            if droppable && emptied == *b {
                hub_dropped.push((origin.clone(), dropped + i));
                continue;
            }
            return Err(Failure::new(
                "the hub stores ops unchanged",
                format!("node log {a:?} vs hub {b:?}"),
            ));
        }
    }
    // The oracle of all ops sees the hub's version of those ops; a
    // publish-only node's own state still holds what it wrote.
    let own_logs: BTreeMap<&NodeId, Vec<Op>> = nodes
        .iter()
        .filter(|n| n.mode == Mode::Publish)
        .filter_map(|n| Some((n.name, logs.get(n.name)?.clone())))
        .collect();
    for (origin, k) in hub_dropped {
        if let Some(op) = logs.get_mut(&origin).and_then(|ops| ops.get_mut(k)) {
            op.fields.clear();
        }
    }
    if let Some(extra) = held.keys().find(|o| !logs.contains_key(*o)) {
        return Err(Failure::new(
            "the hub holds only ops nodes made",
            format!("the hub holds ops of {extra}"),
        ));
    }

    // Causality (known bug): a local write supersedes only what its node
    // held when the user made it. A field `pred` names exact ops; a
    // `row_pred` id `(O, s)` is a prefix, so it claims too much only if some
    // op of `O` on the same row lies between what the node held and `s`.
    let mut on_row: BTreeMap<(&str, &[Value], &NodeId), Vec<u64>> = BTreeMap::new();
    for ops in logs.values() {
        for op in ops {
            on_row
                .entry((op.table.as_str(), op.key.as_slice(), &op.id.origin))
                .or_default()
                .push(op.id.seq);
        }
    }
    for n in nodes {
        let Some(ops) = logs.get(n.name) else {
            continue;
        };
        for (op, exp) in ops.iter().zip(n.expected.iter()) {
            let held = |o: &NodeId| exp.seen.get(o);
            let field_claim = op
                .fields
                .iter()
                .flat_map(|w| w.pred.iter())
                .filter(|p| p.origin != *n.name)
                .find(|p| p.seq > held(&p.origin))
                .cloned();
            let row_claim = || {
                op.row_pred
                    .iter()
                    .filter(|p| p.origin != *n.name)
                    .find_map(|p| {
                        on_row
                            .get(&(op.table.as_str(), op.key.as_slice(), &p.origin))?
                            .iter()
                            .find(|s| **s > held(&p.origin) && **s <= p.seq)
                            .map(|s| OpId::new(p.origin.clone(), *s))
                    })
            };
            let Some(unseen) = field_claim.or_else(row_claim) else {
                continue;
            };
            let f = Failure::new(
                CAUSALITY,
                format!(
                    "{}: op {} (change #{} on {}[{}]) supersedes {unseen}, but when the user wrote it the node held {} only up to #{}: {op:?}",
                    n.name,
                    op.id,
                    exp.change_id,
                    exp.table,
                    exp.key
                        .iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    unseen.origin,
                    held(&unseen.origin)
                ),
            );
            if strict_causality {
                return Err(f);
            }
            match &mut known {
                Some((_, count)) => *count += 1,
                None => known = Some((f, 1)),
            }
        }
    }

    // 3. The oracle: every op, merged in two random orders.
    let all: Vec<&Op> = logs.values().flatten().collect();
    if let Ok(want) = std::env::var("SIM_DEBUG_OPS") {
        for op in &all {
            if want.split(',').any(|w| w == op.id.to_string()) {
                eprintln!("DEBUG op {op:?}");
            }
        }
    }
    let mut a = all.clone();
    order.shuffle(&mut a);
    let mut b = all.clone();
    order.shuffle(&mut b);
    let states = merge(a.iter().copied());
    let states_b = merge(b.iter().copied());
    if states != states_b {
        let k = states
            .keys()
            .find(|k| states.get(*k) != states_b.get(*k))
            .cloned();
        return Err(Failure::new(
            "merge is order-independent",
            format!("row {k:?} differs between two merge orders"),
        ));
    }
    let mut by_row: BTreeMap<RowId, Vec<&Op>> = BTreeMap::new();
    for op in &all {
        by_row
            .entry((op.table.clone(), op.key.clone()))
            .or_default()
            .push(op);
    }
    let mut live_deletes: BTreeMap<RowId, Vec<OpId>> = BTreeMap::new();
    for (rid, ops) in &by_row {
        let Some(info) = tables.iter().find(|t| t.schema.name == rid.0) else {
            continue;
        };
        let (reference, dels) = reference_row(ops, &info.rules);
        let resolver = states.get(rid).and_then(|s| s.visible(&info.rules));
        if reference != resolver {
            return Err(Failure::new(
                "the resolver matches the reference merge model",
                format!(
                    "{}[{:?}]: resolver shows {resolver:?}, reference {reference:?}",
                    rid.0, rid.1
                ),
            ));
        }
        live_deletes.insert(rid.clone(), dels);
    }
    let want = expected_tables(tables, &states);
    // Replicas agree: every applying replica shows what the hub's own row
    // states show (whatever the oracle says).
    let hub_states = hub_row_states(hub_store, &states)?;
    let hub_want = expected_tables(tables, &hub_states);
    for n in nodes.iter().filter(|n| n.mode.applies()) {
        for info in tables {
            let t = &info.schema.name;
            let empty = Rows::new();
            let got = n.db.rows(t).unwrap_or(&empty);
            let exp = hub_want.get(t).unwrap_or(&empty);
            if let Some(key) = differing_key(got, exp) {
                return Err(Failure::new(
                    "convergence: every replica shows the hub's rows",
                    format!(
                        "{}: {t}[{key:?}] is {} but the hub's row state shows {}",
                        n.name,
                        fmt_row(got.get(&key)),
                        fmt_row(exp.get(&key))
                    ),
                ));
            }
        }
    }
    let conflicts = check_hub_rows(tables, hub, hub_store, &states, late)?;

    // 4. Every replica equals the oracle, byte for byte.
    for n in nodes {
        let (want_here, states_here) = match n.mode {
            Mode::Publish => {
                let own: Vec<&Op> = own_logs.get(n.name).into_iter().flatten().collect();
                let s = merge(own.into_iter());
                (expected_tables(tables, &s), s)
            }
            _ => (want.clone(), states.clone()),
        };
        if n.mode.applies() {
            let vv = n.core.version_vector();
            if !vv.dominates(&hub_vv) || !hub_vv.dominates(vv) {
                return Err(Failure::new(
                    "every replica holds every op",
                    format!("{} holds {:?}, the hub {:?}", n.name, vv.0, hub_vv.0),
                ));
            }
        }
        for info in tables {
            let t = &info.schema.name;
            let empty = Rows::new();
            let got = n.db.rows(t).unwrap_or(&empty);
            let exp = want_here.get(t).unwrap_or(&empty);
            if info.rules.deletes == DeletePolicy::DeleteWins && n.mode != Mode::Publish {
                for (key, row) in got {
                    let rid = (t.clone(), key.clone());
                    if late.contains(&rid) {
                        continue;
                    }
                    if let Some(d) = live_deletes.get(&rid).filter(|d| !d.is_empty()) {
                        return Err(Failure::new(
                            "no resurrection under delete_wins",
                            format!(
                                "{}: {t}[{key:?}] shows {} although delete {} is not superseded",
                                n.name,
                                fmt_row(Some(row)),
                                d[0]
                            ),
                        ));
                    }
                }
            }
            let keys: BTreeSet<&Vec<Value>> = got.keys().chain(exp.keys()).collect();
            for key in keys {
                if late.contains(&(t.clone(), key.clone())) {
                    continue;
                }
                let (g, e) = (got.get(key), exp.get(key));
                let same = match (g, e) {
                    (Some(g), Some(e)) => {
                        g.len() == e.len()
                            && g.iter()
                                .zip(e)
                                .all(|((ka, va), (kb, vb))| ka == kb && same_bits(va, vb))
                    }
                    (None, None) => true,
                    _ => false,
                };
                if !same {
                    return Err(Failure::new(
                        "convergence: replicas equal the resolver over all ops",
                        format!(
                            "{} ({}): {t}[{}] is {} but should be {}",
                            n.name,
                            n.mode.as_str(),
                            key.iter()
                                .map(|v| v.to_string())
                                .collect::<Vec<_>>()
                                .join(","),
                            fmt_row(g),
                            fmt_row(e)
                        ),
                    ));
                }
            }
        }
        if n.mode.applies() {
            for ((t, key), state) in &states_here {
                if late.contains(&(t.clone(), key.clone())) {
                    continue;
                }
                let mine = n.core.row_state(t, key).map_err(|e| {
                    Failure::new("node core error", format!("{}: row_state: {e}", n.name))
                })?;
                if !same_modulo_gc(&mine, state, &n.core.gc_cut().stable) {
                    return Err(Failure::new(
                        "row state is a function of the op set",
                        format!("{}: {t}[{key:?}] state differs from the oracle", n.name),
                    ));
                }
            }
        }
    }
    // 5. Exact counters: every replica that applies shows, for each
    //    counter, the sum of every increment any user made (counters are
    //    never deleted, so nothing may be lost or counted twice).
    let mut totals: BTreeMap<&Vec<Value>, i64> = BTreeMap::new();
    for n in nodes {
        for (k, e) in n.expected.iter().enumerate() {
            if e.table != COUNTERS || n.dropped.contains(&(k as u64 + 1)) {
                continue; // a dropped write's increment never happened
            }
            if let Some(d) = e.deltas.get(TOTAL) {
                *totals.entry(&e.key).or_insert(0) += d;
            }
        }
    }
    for n in nodes.iter().filter(|n| n.mode.applies()) {
        let empty = Rows::new();
        let rows = n.db.rows(COUNTERS).unwrap_or(&empty);
        for (key, total) in &totals {
            let got = rows.get(*key).and_then(|r| r.get(TOTAL));
            if got != Some(&Value::Int(*total)) {
                return Err(Failure::new(
                    "sum: a counter equals the total of every increment",
                    format!(
                        "{}: {COUNTERS}[{key:?}].{TOTAL} is {got:?}, the users' increments add up to {total}",
                        n.name
                    ),
                ));
            }
        }
    }
    let rows: usize = want.values().map(|r| r.len()).sum();
    Ok(Checked {
        summary: format!(
            "{} ops from {} origins, {} visible rows on {} replicas, {} conflict records",
            all.len(),
            logs.len(),
            rows,
            nodes.len(),
            conflicts
        ),
        known,
    })
}
