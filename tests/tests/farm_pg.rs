//! The farm's session state against a real PostgreSQL 15 (started per test binary by
//! `bitsd_tests::pg`; each test skips with a printed reason when PostgreSQL is not installed).
//! Several `PgStateStore`s (each its own pool) stand in for several bitsd nodes.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitsd_protocol::SessionId;
use bitsd_storage::shared::pg::{CasOutcome, Expect, PgOptions, PgStateStore, SCHEMA_VERSION};
use bitsd_storage::SessionState;
use bitsd_tests::pg::{
    cluster_or_skip as cluster, fragment, raw_client as raw, session_record,
    single_connection_store, state_store as node, stored_reply,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_migrates_once_when_nodes_start_together_and_again() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let starts: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgStateStore::connect(&url, PgOptions::default()).await })
        })
        .collect();
    for s in starts {
        s.await.unwrap().unwrap();
    }
    let again = node(&url).await;
    again.migrate().await.unwrap();
    assert_eq!(again.schema_version().await.unwrap(), SCHEMA_VERSION);
    let versions: i64 = raw(&url)
        .await
        .query_one("SELECT count(*) FROM bitsd_schema_version", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        versions,
        i64::from(SCHEMA_VERSION),
        "each migration ran exactly once"
    );

    // A database from a newer bitsd is refused, not silently used.
    raw(&url)
        .await
        .execute(
            "INSERT INTO bitsd_schema_version (version) VALUES (999)",
            &[],
        )
        .await
        .unwrap();
    let err = PgStateStore::connect(&url, PgOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("newer"), "{err}");
    assert!(!err.is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_commits_one_winner_per_offset_and_offset_never_goes_back() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let nodes = [node(&url).await, node(&url).await, node(&url).await];
    let rec = session_record(None);
    let id = rec.id;
    assert!(nodes[0].create(&rec).await.unwrap());
    assert!(
        !nodes[1].create(&rec).await.unwrap(),
        "an id is created once"
    );

    const TASKS: usize = 12;
    const ROUNDS: usize = 40;
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = nodes[t % 3].clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut wins = Vec::new();
            let mut seen = 0u64;
            for round in 0..ROUNDS {
                // Every task reads the same offset, then all commit at once.
                barrier.wait().await;
                let read = store.load(&id).await.unwrap().unwrap().received;
                assert!(read >= seen, "received went back from {seen} to {read}");
                barrier.wait().await;
                let len = 1 + (t as u64 * 7 + round as u64) % 50;
                let key = format!("obj/{t}/{round}");
                match store
                    .commit_fragment(&fragment(id, read, len, &key))
                    .await
                    .unwrap()
                {
                    CasOutcome::Committed(r) => {
                        assert_eq!(r.received, read + len);
                        wins.push((read, len, key));
                        seen = r.received;
                    }
                    CasOutcome::Raced(r) => {
                        assert!(r.received > read, "a loser sees the offset that won");
                        seen = r.received;
                    }
                    CasOutcome::Missing => panic!("session vanished"),
                }
            }
            wins
        }));
    }
    let mut wins = Vec::new();
    for t in tasks {
        wins.extend(t.await.unwrap());
    }
    assert_eq!(wins.len(), ROUNDS, "exactly one winner per round");
    let offsets: BTreeSet<u64> = wins.iter().map(|w| w.0).collect();
    assert_eq!(offsets.len(), ROUNDS, "never two winners at one offset");

    // The fragment index is the winners' objects, contiguous from 0 to `received`.
    let index = nodes[2].fragments(&id).await.unwrap();
    assert_eq!(index.len(), ROUNDS);
    let mut at = 0;
    for f in &index {
        assert_eq!(f.entry.offset, at);
        let won = wins.iter().find(|w| w.0 == at).unwrap();
        assert_eq!((f.entry.len, &f.object_key), (won.1, &won.2));
        at += f.entry.len;
    }
    assert_eq!(nodes[1].load(&id).await.unwrap().unwrap().received, at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_ranges_from_three_nodes_count_each_byte_once() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let nodes = [node(&url).await, node(&url).await, node(&url).await];
    let mut rec = session_record(None);
    nodes[0].create(&rec).await.unwrap();
    rec.state = SessionState::ReplyReady;
    rec.reply = Some(stored_reply(1000, 1));
    let expect = Expect {
        received: 0,
        state: Some(SessionState::Receiving),
    };
    assert!(matches!(
        nodes[1].save(&rec, expect).await.unwrap(),
        CasOutcome::Committed(_)
    ));
    // Overlapping ranges, each node serving some, concurrently and repeated.
    let ranges = [
        (0, 400),
        (300, 700),
        (600, 1000),
        (0, 1000),
        (250, 260),
        (999, 1000),
    ];
    let mut tasks = Vec::new();
    for (i, (s, e)) in ranges.into_iter().enumerate() {
        let store = nodes[i % 3].clone();
        let id = rec.id;
        tasks.push(tokio::spawn(async move {
            store.record_reply_range(&id, s, e).await.unwrap().unwrap()
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap() <= 1000);
    }
    assert_eq!(
        nodes[2].record_reply_range(&rec.id, 10, 20).await.unwrap(),
        Some(1000)
    );
    let loaded = nodes[0].load(&rec.id).await.unwrap().unwrap();
    let reply = loaded.reply.unwrap();
    assert_eq!(reply.delivered.ranges(), &[(0, 1000)]);
    assert_eq!(reply.delivered.covered(), 1000);
    // Partial coverage counts only what was served.
    let mut other = session_record(None);
    other.reply = rec.reply.clone();
    nodes[0].create(&other).await.unwrap();
    nodes[1]
        .record_reply_range(&other.id, 0, 100)
        .await
        .unwrap();
    assert_eq!(
        nodes[2]
            .record_reply_range(&other.id, 50, 150)
            .await
            .unwrap(),
        Some(150)
    );
    let missing = SessionId::random();
    assert_eq!(
        nodes[0].record_reply_range(&missing, 0, 1).await.unwrap(),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_never_moves_back_nor_replaces_a_stored_reply() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let (a, b) = (node(&url).await, node(&url).await);
    let rec = session_record(None);
    a.create(&rec).await.unwrap();
    let CasOutcome::Committed(ahead) = b
        .commit_fragment(&fragment(rec.id, 0, 50, "k"))
        .await
        .unwrap()
    else {
        panic!("first commit lost")
    };
    // A stale copy (received 0) stored by another node keeps the acknowledged offset.
    let mut stale = rec.clone();
    stale.content_name = Some("name".into());
    let CasOutcome::Committed(now) = a.put(&stale).await.unwrap() else {
        panic!("put refused")
    };
    assert_eq!(
        (now.received, now.content_name.as_deref()),
        (ahead.received, Some("name"))
    );
    // A guarded save from the stale read loses.
    let expect = Expect {
        received: 0,
        state: None,
    };
    assert!(
        matches!(a.save(&stale, expect).await.unwrap(), CasOutcome::Raced(r) if r.received == 50)
    );

    // Reply made at t=1, partly delivered; made again at t=2: counted afresh.
    let mut done = now.clone();
    done.state = SessionState::ReplyReady;
    done.reply = Some(stored_reply(100, 1));
    a.put(&done).await.unwrap();
    let r = b
        .record_reply_delivered(&rec.id, 1, 0, 60)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.reply.as_ref().unwrap().delivered.covered(), 60);
    a.put(&done).await.unwrap(); // the same reply stored again keeps its progress
    assert_eq!(a.record_reply_range(&rec.id, 0, 0).await.unwrap(), Some(60));
    // Another reply (another node's run of the same completion, made at t=2) does not
    // replace the stored one: the put comes back raced with it, its progress intact.
    let mut other = done.clone();
    other.reply.as_mut().unwrap().created_ms = 2;
    assert!(matches!(
        a.put(&other).await.unwrap(),
        CasOutcome::Raced(r) if r.reply.as_ref().map(|r| r.created_ms) == Some(1)
    ));
    assert!(
        b.record_reply_delivered(&rec.id, 2, 0, 100)
            .await
            .unwrap()
            .is_none(),
        "not the stored reply"
    );
    let r = b
        .record_reply_delivered(&rec.id, 1, 70, 80)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.reply.unwrap().delivered.ranges(), &[(0, 60), (70, 80)]);
    // Nor does a record without a reply (a node's stale read from before the reply).
    assert!(matches!(a.put(&now).await.unwrap(), CasOutcome::Raced(_)));
    assert_eq!(a.record_reply_range(&rec.id, 0, 0).await.unwrap(), Some(70));

    // A tombstone is never revived by put.
    a.close(&rec.id, SessionState::Cancelled).await.unwrap();
    assert!(
        matches!(b.put(&done).await.unwrap(), CasOutcome::Raced(r) if r.state == SessionState::Cancelled)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_objects_of_lost_commits_are_found_and_removal_lists_every_object() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let a = node(&url).await;
    let b = node(&url).await;
    let rec = session_record(None);
    a.create(&rec).await.unwrap();
    let id = rec.id;
    // Both nodes record their object before writing it; one commit wins.
    a.add_pending_object(&id, "frag/a").await.unwrap();
    b.add_pending_object(&id, "frag/b").await.unwrap();
    let won = a
        .commit_fragment(&fragment(id, 0, 100, "frag/a"))
        .await
        .unwrap();
    assert!(matches!(won, CasOutcome::Committed(_)));
    let lost = b
        .commit_fragment(&fragment(id, 0, 100, "frag/b"))
        .await
        .unwrap();
    assert!(matches!(lost, CasOutcome::Raced(r) if r.received == 100));
    // A node that died between recording and committing.
    b.add_pending_object(&id, "frag/dead").await.unwrap();
    // Keys are stored verbatim, whatever characters they hold.
    let odd = "frag/it's\\a'); DROP TABLE bitsd_sessions; --";
    b.add_pending_object(&id, odd).await.unwrap();
    b.forget_pending_object(odd).await.unwrap();

    let future = bitsd_storage::now_millis() + 1;
    let stale = a.stale_pending_objects(future, 10).await.unwrap();
    let keys: BTreeSet<_> = stale.iter().map(|p| p.object_key.as_str()).collect();
    assert_eq!(
        keys,
        BTreeSet::from(["frag/b", "frag/dead"]),
        "the winner's is not pending"
    );
    assert!(stale.iter().all(|p| p.session == id));
    assert!(a.stale_pending_objects(0, 10).await.unwrap().is_empty());
    b.forget_pending_object("frag/b").await.unwrap();

    let mut owned = b.session_objects(&id).await.unwrap();
    owned.sort();
    assert_eq!(owned, vec!["frag/a".to_string(), "frag/dead".to_string()]);
    assert!(a.remove(&id).await.unwrap());
    assert!(!a.remove(&id).await.unwrap());
    assert!(a.load(&id).await.unwrap().is_none());
    assert!(a.fragments(&id).await.unwrap().is_empty());
    assert!(a
        .stale_pending_objects(future, 10)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeper_lock_is_held_by_one_node_and_freed_when_its_connection_dies() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let a = node(&url).await;
    let b = node(&url).await;
    let lock_a = a.try_sweeper_lock().await.unwrap().expect("free at first");
    assert!(lock_a.is_held());
    assert!(b.try_sweeper_lock().await.unwrap().is_none());
    assert!(
        a.try_sweeper_lock().await.unwrap().is_none(),
        "not twice, even on one node"
    );
    drop(lock_a);
    let lock_b = eventually(|| b.try_sweeper_lock()).await;
    assert!(a.try_sweeper_lock().await.unwrap().is_none());

    // The holder's connection dies (killed on the server): the lock is free for another node,
    // and the old holder can tell it lost it.
    let admin = raw(&url).await;
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks
             WHERE locktype = 'advisory' AND granted AND database =
                   (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    let _lock_a = eventually(|| a.try_sweeper_lock()).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while lock_b.is_held() {
        assert!(Instant::now() < deadline, "the old holder never noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn eventually<F, Fut>(mut take: F) -> bitsd_storage::shared::pg::SweeperLock
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<
        Output = Result<
            Option<bitsd_storage::shared::pg::SweeperLock>,
            bitsd_storage::StorageError,
        >,
    >,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(lock) = take().await.unwrap() {
            return lock;
        }
        assert!(Instant::now() < deadline, "the lock was never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pending_row_insert_leaves_the_pooled_connection_usable() {
    // The pending-row inserts once sent `BEGIN; ...; INSERT ...; COMMIT;` as one message: an
    // INSERT that failed left that pooled connection in an aborted transaction, and every
    // later call on it failed ("current transaction is aborted").
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let store = single_connection_store(&url).await;
    let rec = session_record(None);
    store.create(&rec).await.unwrap();
    raw(&url)
        .await
        .batch_execute(
            "ALTER TABLE bitsd_pending_objects
               ADD CONSTRAINT no_poison CHECK (object_key NOT LIKE '%poison%')",
        )
        .await
        .unwrap();
    assert!(store.add_pending_object(&rec.id, "poison/a").await.is_err());
    assert!(store.load(&rec.id).await.unwrap().is_some());
    assert!(store
        .add_fragment_pending_object(&rec.id, "poison/b")
        .await
        .is_err());
    assert!(store.load(&rec.id).await.unwrap().is_some());
    store.add_pending_object(&rec.id, "fine/a").await.unwrap();
    assert!(store
        .add_fragment_pending_object(&rec.id, "fine/b")
        .await
        .unwrap());
    let pending: i64 = raw(&url)
        .await
        .query_one("SELECT count(*) FROM bitsd_pending_objects", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 2);
}

/// A fragment's commit updates its session's row in place (HOT, schema version 4): no new
/// entry in the table's indexes per commit. Before version 4 the index on `updated_ms`, which
/// every commit changes, made none of them HOT. The sweeper still finds exactly the sessions
/// untouched since a time, on both sides of a minute's edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragment_commits_update_the_row_in_place_and_the_sweeper_still_finds_idle_sessions() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let a = node(&url).await;
    let db = raw(&url).await;
    let rec = session_record(None);
    assert!(a.create(&rec).await.unwrap());
    const COMMITS: i64 = 60;
    let mut at = 0;
    for i in 0..COMMITS {
        // Each commit in a millisecond of its own: each changes `updated_ms` (this test's
        // PostgreSQL commits in well under one, and an unchanged value would be HOT anyway).
        tokio::time::sleep(Duration::from_millis(2)).await;
        let key = format!("obj/{i}");
        let CasOutcome::Committed(r) = a
            .commit_fragment(&fragment(rec.id, at, 100, &key))
            .await
            .unwrap()
        else {
            panic!("commit {i} lost")
        };
        at = r.received;
    }
    // A backend reports its statistics when it exits (else up to 10 s after going idle).
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(15);
    let (updates, hot) = loop {
        let row = db
            .query_one(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
                  WHERE relname = 'bitsd_sessions'",
                &[],
            )
            .await
            .unwrap();
        let (updates, hot): (i64, i64) = (row.get(0), row.get(1));
        if updates >= COMMITS || Instant::now() > deadline {
            break (updates, hot);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(updates, COMMITS, "one update per commit");
    // Not every one: a minute's edge crossed during the loop changes `idle_minute`, and a new
    // version that finds its page full goes to another page (pruning frees only versions no
    // snapshot can still see; 58 of 60 were HOT in one CI run).
    assert!(
        hot >= COMMITS * 4 / 5,
        "{hot} of {updates} updates in place"
    );

    // The sweeper's candidates at a minute's edge: untouched before the cutoff, exactly.
    let b = node(&pg.fresh_database()).await;
    let mut ids = Vec::new();
    for updated_ms in [120_000, 179_999, 180_000] {
        let mut r = session_record(None);
        r.updated_ms = updated_ms;
        assert!(b.create(&r).await.unwrap());
        ids.push(r.id);
    }
    for (cutoff, expected) in [
        (120_000, 0),
        (120_001, 1),
        (179_999, 1),
        (180_000, 2),
        (180_001, 3),
        (10_000_000, 3),
    ] {
        let idle = b.idle_sessions(cutoff, 100).await.unwrap();
        let got: Vec<_> = idle.iter().map(|r| r.id).collect();
        assert_eq!(got, ids[..expected], "untouched before {cutoff}");
    }
    assert_eq!(b.idle_sessions(10_000_000, 2).await.unwrap().len(), 2);
}
