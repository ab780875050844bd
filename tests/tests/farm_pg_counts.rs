//! Live-session counts, limits, tombstones, the farm-wide listing and the sweeper's idle
//! candidates against a real PostgreSQL 15, with two `PgStateStore`s (each its own pool)
//! standing in for two bitsd nodes (each test skips with a printed reason when PostgreSQL is
//! not installed).
#![allow(clippy::unwrap_used)]

use bitsd_protocol::SessionId;
use bitsd_storage::shared::pg::{CasOutcome, CreateOutcome, Expect, Limits};
use bitsd_storage::SessionState;
use bitsd_tests::pg::{cluster_or_skip as cluster, fragment, session_record, state_store as node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_counts_limits_and_tombstones() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let a = node(&url).await;
    let b = node(&url).await;
    let mut alice = Vec::new();
    for _ in 0..3 {
        let r = session_record(Some("alice"));
        assert!(a.create(&r).await.unwrap());
        alice.push(r);
    }
    for owner in [Some("bob"), Some("bob"), None] {
        assert!(b.create(&session_record(owner)).await.unwrap());
    }
    assert_eq!(a.live_count().await.unwrap(), 6);
    assert_eq!(b.live_count_of("alice").await.unwrap(), 3);
    let (total, per_user) = b.live_counts().await.unwrap();
    assert_eq!(
        (total, per_user.get("alice"), per_user.get("bob")),
        (6, Some(&3), Some(&2))
    );

    // Close on one node, seen on the other; a tombstone no longer counts and takes no bytes.
    let id = alice[0].id;
    assert!(matches!(
        b.close(&id, SessionState::Closed).await.unwrap(),
        CasOutcome::Committed(r) if r.state == SessionState::Closed
    ));
    assert!(matches!(
        a.close(&id, SessionState::Cancelled).await.unwrap(),
        CasOutcome::Raced(r) if r.state == SessionState::Closed
    ));
    assert!(matches!(
        a.commit_fragment(&fragment(id, 0, 10, "late")).await.unwrap(),
        CasOutcome::Raced(r) if r.state == SessionState::Closed && r.received == 0
    ));
    let mut revived = alice[0].clone();
    revived.state = SessionState::Complete;
    let expect = Expect {
        received: 0,
        state: None,
    };
    assert!(matches!(
        a.save(&revived, expect).await.unwrap(),
        CasOutcome::Raced(r) if r.state == SessionState::Closed
    ));
    assert_eq!(a.live_count().await.unwrap(), 5);
    assert_eq!(a.live_count_of("alice").await.unwrap(), 2);
    assert!(matches!(
        a.close(&SessionId::random(), SessionState::Closed)
            .await
            .unwrap(),
        CasOutcome::Missing
    ));

    // Limits.
    let per_user = Limits {
        per_user: Some(2),
        total: None,
    };
    assert_eq!(
        a.create_limited(&session_record(Some("alice")), per_user)
            .await
            .unwrap(),
        CreateOutcome::UserLimit
    );
    let total = Limits {
        per_user: None,
        total: Some(5),
    };
    assert_eq!(
        a.create_limited(&session_record(Some("carol")), total)
            .await
            .unwrap(),
        CreateOutcome::TotalLimit
    );
    // Many nodes creating for one user at once never pass the per-user limit.
    let limit = Limits {
        per_user: Some(3),
        total: None,
    };
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(
                async move { s.create_limited(&session_record(Some("dave")), limit).await },
            )
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            CreateOutcome::Created => created += 1,
            CreateOutcome::UserLimit => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(created, 3);
    assert_eq!(b.live_count_of("dave").await.unwrap(), 3);

    // Paged listing sees every session of the farm, each once, in id order.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = b.list_page(after.as_ref(), 4).await.unwrap();
        if page.is_empty() {
            break;
        }
        after = Some(page.last().unwrap().id);
        seen.extend(page.into_iter().map(|r| *r.id.as_uuid()));
    }
    assert_eq!(seen.len(), 9);
    assert_eq!(a.list().await.unwrap().len(), 9);

    // The sweeper's candidates: untouched since a time, oldest first.
    let idle = b
        .idle_sessions(bitsd_storage::now_millis() + 1, 100)
        .await
        .unwrap();
    assert_eq!(idle.len(), 9);
    assert!(idle.windows(2).all(|w| w[0].updated_ms <= w[1].updated_ms));
    assert!(b.idle_sessions(0, 100).await.unwrap().is_empty());
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
}
