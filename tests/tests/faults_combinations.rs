//! The test server mode under seeded combinations of faults: every run recovers, and the same
//! seed injects the same faults at the same packets.
#![allow(clippy::unwrap_used)]

mod fault_support;

use std::time::Duration;

use bitsd::FaultPlan;

use fault_support::*;

/// What a run looked like on the wire, without the random session ids.
fn signature(run: &Run) -> Vec<String> {
    run.entries
        .iter()
        .map(|e| {
            format!(
                "{} {} -> {:?} {:?} {}",
                e.packet,
                e.range.as_deref().unwrap_or("-"),
                e.status,
                e.fault,
                e.answered
            )
        })
        .collect()
}

const COMBINATION: &[&str] = &[
    "Fragment:lose-ack,p=0.3,times=3",
    "Fragment:drop-after=3000,p=0.2,times=2",
    "Fragment:status=500,code=0x80004005,p=0.15,times=2",
    "Fragment:resync=0,p=0.1",
    "Fragment:forget-session,p=0.1",
    "Fragment:fail-handler=504,p=0.5",
    "HEAD:status=503,p=0.3",
    "GET:truncate=7000,p=0.5,times=2",
    "Close-Session:lose-ack,p=0.5",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeded_combinations_recover_and_replay_exactly() {
    let mut fired_total = 0;
    for seed in [1u64, 2, 3, 42] {
        let runs = futures_util::future::join_all((0..2).map(|attempt| async move {
            let plan = FaultPlan::from_specs(seed, COMBINATION).unwrap();
            let name = format!("seed {seed} run {attempt}");
            run_job(
                &name,
                plan,
                Mode::Echo,
                uploader(Duration::from_secs(20), false, 16_384),
                150_000,
                seed,
            )
            .await
        }))
        .await;
        for run in &runs {
            if let Err(e) = &run.result {
                panic!("{}: {e}", run.name);
            }
            assert_recovery(run);
        }
        assert_eq!(
            signature(&runs[0]),
            signature(&runs[1]),
            "seed {seed}: the same seed must inject the same faults at the same packets"
        );
        let fired = runs[0].entries.iter().filter(|e| e.fault.is_some()).count();
        eprintln!("seed {seed}: {fired} faults");
        fired_total += fired;
    }
    assert!(
        fired_total >= 8,
        "the combinations injected only {fired_total} faults"
    );
}
