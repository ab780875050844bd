//! The farm's session state when PostgreSQL goes away mid-run, and a measurement of the
//! commit rate with fsync on; each test runs its own real PostgreSQL 15 (`bitsd_tests::pg`)
//! and skips with a printed reason when it is not installed.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bitsd_storage::shared::pg::{CasOutcome, PgOptions, PgStateStore};
use bitsd_tests::pg::{fragment, session_record, ClusterOptions, PgCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_mid_run_gives_transient_errors_and_loses_nothing() {
    let pg = match PgCluster::start(ClusterOptions::default()) {
        Ok(pg) => pg,
        Err(why) => return bitsd_tests::skip::missing(bitsd_tests::skip::Needs::Postgresql, why),
    };
    let url = pg.fresh_database();
    let options = PgOptions {
        max_connections: 4,
        timeout: Duration::from_secs(2),
        ..PgOptions::default()
    };
    let nodes = [
        PgStateStore::connect(&url, options.clone()).await.unwrap(),
        PgStateStore::connect(&url, options).await.unwrap(),
    ];
    // Four sessions uploaded by "clients" that retry on transient errors, on alternating nodes.
    const TARGET: u64 = 4000;
    let mut jobs = Vec::new();
    for j in 0..4 {
        let rec = session_record(Some("fleet"));
        nodes[0].create(&rec).await.unwrap();
        let nodes = nodes.clone();
        jobs.push(tokio::spawn(async move {
            let (mut acked, mut transient, mut n) = (0u64, 0u32, 0usize);
            while acked < TARGET {
                n += 1;
                let store = &nodes[n % 2];
                let step = async {
                    let read = store.load(&rec.id).await?.unwrap().received;
                    assert!(
                        read >= acked,
                        "an acknowledged offset was lost: {read} < {acked}"
                    );
                    let c = fragment(rec.id, read, 10, &format!("{j}/{read}"));
                    store.commit_fragment(&c).await
                };
                match step.await {
                    Ok(CasOutcome::Committed(r)) => acked = r.received,
                    Ok(other) => panic!("{other:?}"),
                    Err(e) => {
                        assert!(e.is_transient(), "not transient: {e}");
                        transient += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (rec.id, acked, transient)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = nodes[1].list_page(None, 100).await.unwrap();
    pg.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let down = nodes[0].load(&before[0].id).await.unwrap_err();
    assert!(down.is_transient(), "{down}");
    assert!(down.to_string().contains("unreachable"), "{down}");
    pg.restart();

    let mut transient_total = 0;
    for job in jobs {
        let (id, acked, transient) = job.await.unwrap();
        transient_total += transient;
        let rec = nodes[1].load(&id).await.unwrap().unwrap();
        assert_eq!(rec.received, acked);
        let index = nodes[0].fragments(&id).await.unwrap();
        let mut at = 0;
        for f in &index {
            assert_eq!(f.entry.offset, at, "the index has no gap");
            at += f.entry.len;
        }
        assert_eq!(at, acked);
    }
    assert!(transient_total > 0, "the outage was never seen");
    // Everything committed before the stop is still there.
    for old in before {
        let now = nodes[0].load(&old.id).await.unwrap().unwrap();
        assert!(now.received >= old.received);
    }
}

/// Measures fragment commits per second from N concurrent sessions with fsync on, with and
/// without the pending-object row (run by hand: `cargo test -p bitsd-tests --test farm_pg_outage
/// measure -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn measure_commit_rate() {
    let pg = match PgCluster::start(ClusterOptions { durable: true }) {
        Ok(pg) => pg,
        Err(why) => return bitsd_tests::skip::missing(bitsd_tests::skip::Needs::Postgresql, why),
    };
    let url = pg.fresh_database();
    let options = PgOptions {
        max_connections: 64,
        timeout: Duration::from_secs(10),
        ..PgOptions::default()
    };
    let store = PgStateStore::connect(&url, options).await.unwrap();
    for pending in [false, true] {
        for (sessions, per) in [(1usize, 400u64), (8, 150), (64, 40)] {
            let start = Instant::now();
            let tasks: Vec<_> = (0..sessions)
                .map(|_| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let rec = session_record(None);
                        store.create(&rec).await.unwrap();
                        let mut at = 0;
                        for i in 0..per {
                            let c = fragment(rec.id, at, 65536, &format!("{}/{i}", rec.id));
                            if pending {
                                store
                                    .add_pending_object(&rec.id, &c.object_key)
                                    .await
                                    .unwrap();
                            }
                            match store.commit_fragment(&c).await.unwrap() {
                                CasOutcome::Committed(r) => at = r.received,
                                other => panic!("{other:?}"),
                            }
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            let n = per * sessions as u64;
            let secs = start.elapsed().as_secs_f64();
            println!(
                "pending row {pending:5}, {sessions:>2} sessions: {n:>4} fragments in {secs:5.2}s = \
                 {:4.0} fragments/s, {:6.2} ms per fragment of one session",
                n as f64 / secs,
                secs * 1000.0 / per as f64
            );
        }
    }
}
