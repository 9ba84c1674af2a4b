//! The invariants have teeth: bugs planted in the simulator's own shell and
//! database (never in the cores) are caught within a few seeds.

use simulations::config::Sabotage;
use simulations::{Overrides, SimConfig, run};

fn first_failure(sabotage: Sabotage, overrides: Overrides, seeds: u64) -> Option<(u64, String)> {
    (0..seeds).find_map(|seed| {
        let mut cfg = SimConfig::new(seed, 0.25);
        cfg.sabotage = Some(sabotage);
        cfg.overrides = overrides.clone();
        run(cfg).failure.map(|f| (seed, f.invariant))
    })
}

#[test]
fn an_echoing_apply_is_caught() {
    let (_, inv) = first_failure(Sabotage::EchoApplies, Overrides::default(), 20)
        .expect("an echoing apply must fail some seed");
    assert!(inv.contains("no echo"), "{inv}");
}

#[test]
fn a_lost_applied_row_is_caught() {
    let (_, inv) = first_failure(Sabotage::DropAppliedRow, Overrides::default(), 20)
        .expect("a dropped apply must fail some seed");
    assert!(
        inv.contains("convergence") || inv.contains("resurrection"),
        "{inv}"
    );
}

#[test]
fn a_lost_change_row_is_caught() {
    let (_, inv) = first_failure(Sabotage::DeleteUncapturedChange, Overrides::default(), 20)
        .expect("a lost change must fail some seed");
    assert!(inv.contains("no lost write"), "{inv}");
}

#[test]
fn forgetting_the_restart_mark_is_caught() {
    // The window is narrow (a crash between an apply that overwrote an
    // uncaptured local write and that write's capture), so crash often at
    // the interesting points.
    let o = Overrides {
        crash_points: Some(0.3),
        node_crashes_per_min: Some(1.0),
        ..Overrides::default()
    };
    let (_, inv) = first_failure(Sabotage::ForgetRestartMark, o, 60)
        .expect("restarting without the restart mark must fail some seed");
    assert!(
        inv.contains("convergence") || inv.contains("resurrection"),
        "{inv}"
    );
}
