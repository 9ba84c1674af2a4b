//! The same seed gives the same run, whatever thread or order it runs in.

use simulations::{Overrides, SimConfig, run, sweep};

#[test]
fn same_seed_same_trace_hash_on_any_thread() {
    let cfg = |seed| SimConfig::new(seed, 0.25);
    let a = run(cfg(11));
    assert!(a.failure.is_none(), "{:?}", a.failure);
    // Three more runs of seed 11 interleaved with another seed on two
    // threads: identical traces and counters.
    let again = sweep(vec![cfg(11), cfg(12), cfg(11), cfg(11)], 2, |_| {});
    for o in again.iter().filter(|o| o.config.seed == 11) {
        assert_eq!(o.trace_hash, a.trace_hash);
        assert_eq!(o.stats, a.stats);
    }
    assert_ne!(
        again[1].trace_hash, a.trace_hash,
        "another seed, another run"
    );
}

#[test]
fn an_override_changes_the_run_and_replays_through_its_flags() {
    let mut cfg = SimConfig::new(11, 0.25);
    cfg.overrides = Overrides {
        nodes: Some(2),
        loss: Some(0.3),
        no_faults: false,
        ..Overrides::default()
    };
    let o = run(cfg.clone());
    assert!(o.failure.is_none(), "{:?}", o.failure);
    assert_eq!(o.params.modes.len(), 2);
    assert!(o.stats.losses > 0);
    let cmd = cfg.replay_command();
    assert!(
        cmd.contains("--seed 11") && cmd.contains("--nodes 2") && cmd.contains("--loss 0.3"),
        "{cmd}"
    );
}

#[test]
fn without_faults_the_mesh_converges_within_seconds() {
    for seed in 0..4 {
        let mut cfg = SimConfig::new(seed, 0.25);
        cfg.overrides.no_faults = true;
        let o = run(cfg);
        assert!(o.failure.is_none(), "{:?}", o.failure);
        assert!(o.stats.heal_ms <= 5_000, "healed in {} ms", o.stats.heal_ms);
        assert_eq!(
            o.stats.node_crashes + o.stats.partitions + o.stats.losses,
            0
        );
    }
}
