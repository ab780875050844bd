//! The farm's count of live sessions is kept by PostgreSQL triggers in 64 shard rows
//! (`bitsd_live_counts`), so a Create-Session under `max_sessions` reads 64 small rows instead
//! of counting every live session. These tests hold the counter against `count(*)` through
//! every way a session enters or leaves the live states, under concurrent nodes, across the
//! migration of a database that had sessions before the counter, and show that the limit
//! check reads the counter and that sessions never wait for each other's counter row. Skips with a printed reason when PostgreSQL is not installed.
#![allow(clippy::unwrap_used)]

use bitsd_protocol::SessionId;
use bitsd_storage::shared::pg::{
    CasOutcome, CreateOutcome, Expect, Limits, PgStateStore, SCHEMA_VERSION,
};
use bitsd_storage::{ReplyKind, ReplyRecord, SessionState};
use bitsd_tests::pg::{
    cluster_or_skip as cluster, fragment, raw_client as raw, session_record, state_store as node,
};

/// The counter's sum and a plain count of live rows, read in one snapshot.
async fn counter_and_count(db: &tokio_postgres::Client) -> (i64, i64) {
    let row = db
        .query_one(
            "SELECT (SELECT coalesce(sum(n), 0)::bigint FROM bitsd_live_counts),
                    (SELECT count(*) FROM bitsd_sessions
                      WHERE state IN ('receiving', 'complete', 'reply-ready'))",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn assert_counted(db: &tokio_postgres::Client, store: &PgStateStore, live: i64, when: &str) {
    assert_eq!(
        counter_and_count(db).await,
        (live, live),
        "counter and count(*) {when}"
    );
    assert_eq!(store.live_count().await.unwrap(), live as u64, "{when}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counter_follows_every_way_in_and_out_of_the_live_states() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let a = node(&url).await;
    let b = node(&url).await;
    let db = raw(&url).await;
    let shards: i64 = db
        .query_one("SELECT count(*) FROM bitsd_live_counts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shards, 64);
    assert_counted(&db, &a, 0, "on a new database").await;

    let records: Vec<_> = (0..8).map(|_| session_record(Some("erin"))).collect();
    for (i, r) in records.iter().enumerate() {
        let on = if i % 2 == 0 { &a } else { &b };
        assert!(on.create(r).await.unwrap());
    }
    assert_counted(&db, &a, 8, "after 8 creates").await;
    // The same id again inserts nothing and counts nothing.
    assert!(!b.create(&records[0]).await.unwrap());
    assert_counted(&db, &a, 8, "after a create of a taken id").await;

    // Live to live: the last byte (Complete), then a reply (ReplyReady).
    let id = records[1].id;
    let mut last = fragment(id, 0, 10, "k1");
    last.total = Some(10);
    last.state = Some(SessionState::Complete);
    assert!(matches!(
        a.commit_fragment(&last).await.unwrap(),
        CasOutcome::Committed(r) if r.state == SessionState::Complete
    ));
    let mut ready = a.load(&id).await.unwrap().unwrap();
    ready.state = SessionState::ReplyReady;
    ready.reply = Some(ReplyRecord {
        url: format!("/upload/reply/{id}"),
        kind: ReplyKind::Stored {
            len: 3,
            crc32c: None,
            in_upload: false,
            object: None,
        },
        created_ms: 1,
        delivered: Default::default(),
    });
    let expect = Expect {
        received: 10,
        state: Some(SessionState::Complete),
    };
    assert!(matches!(
        b.save(&ready, expect).await.unwrap(),
        CasOutcome::Committed(_)
    ));
    assert_counted(&db, &a, 8, "after live-to-live changes").await;

    // Out: Close, Cancel, and a close that lost the race counts nothing.
    assert!(matches!(
        a.close(&records[2].id, SessionState::Closed).await.unwrap(),
        CasOutcome::Committed(_)
    ));
    assert!(matches!(
        b.close(&records[3].id, SessionState::Cancelled)
            .await
            .unwrap(),
        CasOutcome::Committed(_)
    ));
    assert!(matches!(
        b.close(&records[2].id, SessionState::Cancelled)
            .await
            .unwrap(),
        CasOutcome::Raced(_)
    ));
    assert!(matches!(
        a.close(&id, SessionState::Closed).await.unwrap(),
        CasOutcome::Committed(_)
    ));
    assert_counted(&db, &a, 5, "after three ends and a lost race").await;

    // Removed: a tombstone (already uncounted) and a live session (the sweeper's expiry).
    assert!(a.remove(&records[2].id).await.unwrap());
    assert_counted(&db, &a, 5, "after removing a tombstone").await;
    assert!(b.remove(&records[4].id).await.unwrap());
    assert!(!b.remove(&records[4].id).await.unwrap());
    assert_counted(&db, &a, 4, "after removing a live session").await;

    // A state written by `put` (an unguarded save) out of the live states.
    let mut gone = a.load(&records[5].id).await.unwrap().unwrap();
    gone.state = SessionState::Cancelled;
    assert!(matches!(
        a.put(&gone).await.unwrap(),
        CasOutcome::Committed(_)
    ));
    assert_counted(&db, &a, 3, "after a put to Cancelled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_creating_and_ending_at_once_leave_the_counter_exact() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let nodes = [node(&url).await, node(&url).await, node(&url).await];
    let db = raw(&url).await;
    let tasks: Vec<_> = (0..48)
        .map(|i| {
            let s = nodes[i % 3].clone();
            let other = nodes[(i + 1) % 3].clone();
            tokio::spawn(async move {
                let mut ended = 0;
                for j in 0..10 {
                    let r = session_record(Some(if j % 2 == 0 { "f" } else { "g" }));
                    assert!(s.create(&r).await.unwrap());
                    if (i + j) % 3 == 0 {
                        // Two nodes end the same session at once: one wins.
                        let (x, y) = tokio::join!(
                            s.close(&r.id, SessionState::Closed),
                            other.close(&r.id, SessionState::Cancelled)
                        );
                        let won = [x.unwrap(), y.unwrap()]
                            .iter()
                            .filter(|o| matches!(o, CasOutcome::Committed(_)))
                            .count();
                        assert_eq!(won, 1);
                        ended += 1;
                    }
                }
                ended
            })
        })
        .collect();
    let mut ended = 0;
    for t in tasks {
        ended += t.await.unwrap();
    }
    let live = 480 - ended;
    assert_counted(&db, &nodes[0], live, "after concurrent creates and ends").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_before_the_counter_is_counted_when_migrated() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let a = node(&url).await;
    let db = raw(&url).await;
    let records: Vec<_> = (0..7).map(|_| session_record(None)).collect();
    for r in &records {
        assert!(a.create(r).await.unwrap());
    }
    for r in &records[..2] {
        a.close(&r.id, SessionState::Closed).await.unwrap();
    }
    // Back to schema version 1: no counter, no triggers, the old sweeper index, no assembly
    // journals, the sessions kept.
    db.batch_execute(
        "DROP TABLE bitsd_assembly_parts, bitsd_assemblies;
         ALTER TABLE bitsd_sessions DROP COLUMN idle_minute, RESET (fillfactor);
         CREATE INDEX bitsd_sessions_updated ON bitsd_sessions (updated_ms);
         DROP TRIGGER bitsd_live_count_rows ON bitsd_sessions;
         DROP TRIGGER bitsd_live_count_state ON bitsd_sessions;
         DROP FUNCTION bitsd_count_live();
         DROP TABLE bitsd_live_counts;
         DELETE FROM bitsd_schema_version WHERE version >= 2;",
    )
    .await
    .unwrap();
    // Sessions created and ended by a node of the old version.
    let old: Vec<SessionId> = (0..3).map(|_| SessionId::random()).collect();
    for id in &old {
        db.execute(
            "INSERT INTO bitsd_sessions (id, state, received, updated_ms, record)
             SELECT $1, state, received, updated_ms, record FROM bitsd_sessions WHERE id = $2",
            &[id.as_uuid(), records[6].id.as_uuid()],
        )
        .await
        .unwrap();
    }
    db.execute(
        "UPDATE bitsd_sessions SET state = 'closed' WHERE id = $1",
        &[old[0].as_uuid()],
    )
    .await
    .unwrap();

    let upgraded = node(&url).await;
    assert_eq!(upgraded.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert_counted(&db, &upgraded, 7, "right after the migration").await;
    // The sweeper's query of version 4 finds every row, live or tombstone.
    let idle = upgraded
        .idle_sessions(bitsd_storage::now_millis() + 1, 100)
        .await
        .unwrap();
    assert_eq!(idle.len(), 10);
    upgraded.close(&old[1], SessionState::Closed).await.unwrap();
    assert_counted(&db, &upgraded, 6, "after an end following the migration").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_limit_reads_the_counter_and_stays_exact_under_racing_creates() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let a = node(&url).await;
    let b = node(&url).await;
    let db = raw(&url).await;
    let limit = Limits {
        per_user: None,
        total: Some(150),
    };
    // Far from the limit and near it (the last `max_connections` slots are taken one at a
    // time): 200 creates from two nodes at once, exactly 150 win.
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { s.create_limited(&session_record(None), limit).await })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            CreateOutcome::Created => created += 1,
            CreateOutcome::TotalLimit => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(created, 150);
    assert_counted(&db, &a, 150, "at the limit").await;

    // The check reads the counter, not the table: with the counter pushed down by hand, a
    // create passes the limit (which a count over the table would refuse) ...
    db.execute(
        "UPDATE bitsd_live_counts SET n = n - 1 WHERE shard = 0",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        b.create_limited(&session_record(None), limit)
            .await
            .unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(counter_and_count(&db).await, (150, 151));
    // ... and with it pushed up, a create far below the limit by the table is refused.
    db.execute(
        "UPDATE bitsd_live_counts SET n = n + 500 WHERE shard = 0",
        &[],
    )
    .await
    .unwrap();
    let roomy = Limits {
        per_user: None,
        total: Some(600),
    };
    assert_eq!(
        a.create_limited(&session_record(None), roomy)
            .await
            .unwrap(),
        CreateOutcome::TotalLimit
    );
}

/// The SQL block of docs/farm.md that recomputes the counter.
fn recompute_sql() -> String {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/farm.md")).unwrap();
    // The SQL block that rewrites the counter (farm.md has others: the role and database).
    doc.split("```sql illustration\n")
        .skip(1)
        .map(|block| &block[..block.find("```").unwrap()])
        .find(|block| block.contains("bitsd_live_counts"))
        .expect("the recompute block")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_recompute_repairs_a_counter_set_off_by_hand() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let a = node(&url).await;
    let db = raw(&url).await;
    let records: Vec<_> = (0..40).map(|_| session_record(None)).collect();
    for r in &records {
        assert!(a.create(r).await.unwrap());
    }
    for r in &records[..9] {
        a.close(&r.id, SessionState::Cancelled).await.unwrap();
    }
    // Rows changed with the triggers off (as a replica would apply them), and a shard's row
    // written by hand.
    db.batch_execute(
        "SET session_replication_role = replica;
         UPDATE bitsd_sessions SET state = 'closed'
          WHERE id IN (SELECT id FROM bitsd_sessions WHERE state = 'receiving' LIMIT 5);
         SET session_replication_role = DEFAULT;
         UPDATE bitsd_live_counts SET n = n + 7 WHERE shard = 3;",
    )
    .await
    .unwrap();
    assert_ne!(counter_and_count(&db).await, (26, 26));
    db.batch_execute(&recompute_sql()).await.unwrap();
    assert_counted(&db, &a, 26, "after the documented recompute").await;
    a.close(&records[39].id, SessionState::Closed)
        .await
        .unwrap();
    assert_counted(&db, &a, 25, "after an end following the recompute").await;
}

/// `n` fresh session ids whose counter shard (`hashtext(id::text) & 63`) is `shard`.
async fn ids_of_shard(db: &tokio_postgres::Client, shard: i32, n: i64) -> Vec<SessionId> {
    db.query(
        "SELECT id FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, 50000)) g
          WHERE hashtext(id::text) & 63 = $1 LIMIT $2",
        &[&shard, &n],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| SessionId::from_uuid(r.get(0)))
    .collect()
}

/// Inserts a live session row in `tx` (the counter's trigger takes a shard row in it).
async fn insert_live(tx: &tokio_postgres::Transaction<'_>, id: &SessionId) {
    tx.execute(
        "INSERT INTO bitsd_sessions (id, state, received, updated_ms, record)
         VALUES ($1, 'receiving', 0, 0, '{}'::jsonb)",
        &[id.as_uuid()],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_and_ends_never_wait_on_the_counter_for_another_session() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let a = node(&url).await;
    let db = raw(&url).await;
    let quick = std::time::Duration::from_secs(3);
    let held = SessionId::random();
    let shard: i32 = db
        .query_one(
            "SELECT hashtext($1::text) & 63",
            &[&held.as_uuid().to_string()],
        )
        .await
        .unwrap()
        .get(0);
    // Sessions of the same shard, two of them live before the holder begins.
    let same = ids_of_shard(&db, shard, 5).await;
    assert_eq!(same.len(), 5);
    let record_of = |id: SessionId| {
        let mut r = session_record(None);
        r.id = id;
        r
    };
    for id in &same[..2] {
        assert!(a.create(&record_of(*id)).await.unwrap());
    }
    // Another session's Create in the middle of its commit: its transaction holds a row.
    let mut holder = raw(&url).await;
    let tx = holder.transaction().await.unwrap();
    insert_live(&tx, &held).await;
    // Creates and ends of sessions of that shard go on meanwhile.
    for id in &same[2..] {
        let created = tokio::time::timeout(quick, a.create(&record_of(*id))).await;
        assert!(
            matches!(created, Ok(Ok(true))),
            "a Create waited for another session's counter row: {created:?}"
        );
    }
    for id in &same[..2] {
        let ended = tokio::time::timeout(quick, a.close(id, SessionState::Closed)).await;
        assert!(
            matches!(ended, Ok(Ok(_))),
            "a Close waited for another session's counter row"
        );
    }
    tx.commit().await.unwrap();
    assert_counted(&db, &a, 4, "after creates and ends beside a held row").await;

    // Every row held (64 transactions that each created a session): a Create waits, then
    // goes on once they commit, and the count is exact.
    let mut holders = Vec::new();
    for _ in 0..64 {
        holders.push(raw(&url).await);
    }
    let mut txs = Vec::new();
    for h in holders.iter_mut() {
        let tx = h.transaction().await.unwrap();
        // Each takes a row no other holder has: none of them waits.
        tokio::time::timeout(quick, insert_live(&tx, &SessionId::random()))
            .await
            .expect("a holder waited for another's counter row");
        txs.push(tx);
    }
    let free: i64 = db
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM bitsd_live_counts FOR UPDATE SKIP LOCKED) s",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(free, 0, "the 64 holders hold every row of the counter");
    let waiting = {
        let a = a.clone();
        tokio::spawn(async move { a.create(&session_record(None)).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "every row is held: the Create waits"
    );
    for tx in txs {
        tx.commit().await.unwrap();
    }
    assert!(tokio::time::timeout(quick, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap());
    assert_counted(&db, &a, 4 + 64 + 1, "after the all-held wait").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limits_hold_when_the_database_defaults_to_repeatable_read() {
    // An operator's `default_transaction_isolation = 'repeatable read'` once let racing
    // creates pass the limits: the create's snapshot was taken before it waited for its
    // advisory lock, so it did not see the creates that committed meanwhile.
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let db = raw(&url).await;
    let name: String = db
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    db.batch_execute(&format!(
        "ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'repeatable read'"
    ))
    .await
    .unwrap();
    let seen: String = raw(&url)
        .await
        .query_one("SHOW default_transaction_isolation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, "repeatable read", "new connections get the default");
    let (a, b) = (node(&url).await, node(&url).await);
    let limit = Limits {
        per_user: Some(5),
        total: Some(30),
    };
    let race = |owner: Option<&'static str>, n: usize| {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let s = if i % 2 == 0 { a.clone() } else { b.clone() };
                tokio::spawn(async move { s.create_limited(&session_record(owner), limit).await })
            })
            .collect();
        async move {
            let mut created = 0;
            for t in tasks {
                match t.await.unwrap() {
                    Ok(CreateOutcome::Created) => created += 1,
                    Ok(CreateOutcome::UserLimit | CreateOutcome::TotalLimit) => {}
                    other => panic!("a create failed instead of counting: {other:?}"),
                }
            }
            created
        }
    };
    assert_eq!(race(Some("rr"), 40).await, 5, "the per-user limit");
    assert_eq!(race(None, 60).await, 25, "the total limit");
    assert_counted(&db, &a, 30, "at the limits").await;
}
