//! A node's PostgreSQL pool under writes that lose their race: a guarded write that finds
//! another write got there first reads the record that won on the connection it already
//! holds, so writes that all lose at once cannot use up the pool waiting for a second
//! connection each (found under load: 48 tasks on three nodes ending sessions two at a time
//! stalled until the call timeout and failed as "unreachable"). Against a real PostgreSQL 15;
//! skips with a printed reason when it is not installed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bitsd_storage::shared::pg::{CasOutcome, PgOptions, PgStateStore};
use bitsd_storage::SessionState;
use bitsd_tests::pg::{
    cluster_or_skip as cluster, fragment, session_record, single_connection_store,
};

/// A node whose pool holds `connections`, failing any call after 3 s.
async fn node_with(url: &str, connections: usize) -> PgStateStore {
    PgStateStore::connect(
        url,
        PgOptions {
            max_connections: connections,
            timeout: Duration::from_secs(3),
            ..PgOptions::default()
        },
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_write_on_a_one_connection_pool_answers_with_the_winner() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let store = single_connection_store(&url).await;
    let r = session_record(Some("pool"));
    assert!(store.create(&r).await.unwrap());

    // Two commits at the same offset: the second loses and is told the offset that won.
    let first = store
        .commit_fragment(&fragment(r.id, 0, 100, "k/0"))
        .await
        .unwrap();
    assert!(matches!(first, CasOutcome::Committed(ref w) if w.received == 100));
    match store
        .commit_fragment(&fragment(r.id, 0, 50, "k/0b"))
        .await
        .unwrap()
    {
        CasOutcome::Raced(w) => assert_eq!(w.received, 100),
        other => panic!("{other:?}"),
    }

    // Ending a session twice: the second is told it already ended.
    assert!(matches!(
        store.close(&r.id, SessionState::Closed).await.unwrap(),
        CasOutcome::Committed(_)
    ));
    match store.close(&r.id, SessionState::Cancelled).await.unwrap() {
        CasOutcome::Raced(w) => assert_eq!(w.state, SessionState::Closed),
        other => panic!("{other:?}"),
    }
    // A lost write on a missing session.
    let gone = session_record(None);
    assert_eq!(
        store.close(&gone.id, SessionState::Closed).await.unwrap(),
        CasOutcome::Missing
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_writes_losing_at_once_never_exhaust_the_pool() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let node = node_with(&url, 4).await;
    let mut ids = Vec::new();
    for _ in 0..8 {
        let r = session_record(Some("pool"));
        assert!(node.create(&r).await.unwrap());
        node.commit_fragment(&fragment(r.id, 0, 10, &format!("{}/0", r.id)))
            .await
            .unwrap();
        node.close(&r.id, SessionState::Closed).await.unwrap();
        ids.push(r.id);
    }
    // 64 writes at once on a pool of 4, every one of them losing (the sessions ended): each
    // reads the winner's record, none fails as unreachable.
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let node = node.clone();
            let id = ids[i % ids.len()];
            tokio::spawn(async move {
                if i % 2 == 0 {
                    node.close(&id, SessionState::Cancelled).await
                } else {
                    node.commit_fragment(&fragment(id, 10, 5, &format!("{id}/{i}")))
                        .await
                }
            })
        })
        .collect();
    for t in tasks {
        match t.await.unwrap() {
            Ok(CasOutcome::Raced(w)) => {
                assert_eq!(w.state, SessionState::Closed);
                assert_eq!(w.received, 10);
            }
            other => panic!("a lost write answered {other:?}"),
        }
    }
}
