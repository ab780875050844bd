//! Which of the farm's PostgreSQL writes wait for the WAL flush, on a durable cluster
//! (`fsync` and `synchronous_commit` on): the fragment commit does; the two writes that skip
//! it on purpose (a fragment's pending-object row recorded with the session's load, and reply
//! progress) do not; and their `synchronous_commit = off` lasts for their own transaction only,
//! never for the next write on the same pooled connection (which would silently make an
//! acknowledged fragment's commit undurable). Skips with a printed reason when PostgreSQL is
//! not installed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bitsd_storage::shared::pg::{CasOutcome, Expect};
use bitsd_storage::SessionState;
use bitsd_tests::pg::{
    fragment, raw_client, session_record, single_connection_store, stored_reply, ClusterOptions,
    PgCluster,
};

/// The WAL's insert position, then its flush position, in bytes.
async fn wal(raw: &tokio_postgres::Client) -> (i64, i64) {
    let row = raw
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0')::int8,
                    (pg_current_wal_flush_lsn() - '0/0')::int8",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Runs `call` and says whether the WAL it wrote was flushed by the time it returned: the
/// flush position passed the insert position from before the call (a commit that waits for
/// the flush), or it did not (one that does not; nothing else flushes in the meantime: the
/// WAL writer sleeps 10 s, the background writer and autovacuum are off).
async fn flushed<T>(
    raw: &tokio_postgres::Client,
    call: impl std::future::Future<Output = T>,
) -> (T, bool) {
    let (before, _) = wal(raw).await;
    let out = call.await;
    let (after, flushed) = wal(raw).await;
    assert!(after > before, "the call wrote no WAL");
    (out, flushed > before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_writes_meant_to_skip_the_wal_flush_skip_it_and_never_the_next_one() {
    let pg = match PgCluster::start(ClusterOptions { durable: true }) {
        Ok(pg) => pg,
        Err(why) => {
            return bitsd_tests::skip::missing(bitsd_tests::skip::Needs::Postgresql, why);
        }
    };
    let url = pg.fresh_database();
    let raw = raw_client(&url).await;
    // The WAL writer flushes asynchronous commits on its own every `wal_writer_delay`: make
    // that 10 s so an unflushed commit stays unflushed while the test looks, and let nothing
    // else write dirty pages (which flushes the WAL up to them) or WAL of its own.
    for setting in [
        "wal_writer_delay = '10s'",
        "bgwriter_lru_maxpages = 0",
        "autovacuum = off",
    ] {
        raw.batch_execute(&format!("ALTER SYSTEM SET {setting}"))
            .await
            .unwrap();
    }
    raw.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // One pooled connection: every call below runs on the same PostgreSQL backend.
    let node = single_connection_store(&url).await;
    let mut rec = session_record(None);
    let (created, sync) = flushed(&raw, node.create(&rec)).await;
    created.unwrap();
    assert!(sync, "Create-Session waits for the flush");

    // The pending-object row rides on the load without a flush of its own (up to three
    // tries: a write that waits for the flush is flushed every time, while one that does not
    // may still see another flush happen meanwhile on a machine busy with other work)...
    let mut key = String::new();
    let mut unflushed = false;
    for attempt in 0..3 {
        key = format!("sessions/{}/frag/0-{attempt}", rec.id.as_uuid());
        let (loaded, sync) = flushed(&raw, node.load_reserving(&rec.id, &key)).await;
        let (loaded, reserved) = loaded.unwrap();
        assert!(loaded.is_some() && reserved);
        if !sync {
            unflushed = true;
            break;
        }
    }
    assert!(
        unflushed,
        "the reserved row's commit was flushed, three times out of three"
    );
    // ...and the fragment commit that follows on the same connection flushes (it and the
    // row before it).
    let (c, sync) = flushed(
        &raw,
        node.commit_pending_fragment(&fragment(rec.id, 0, 1000, &key)),
    )
    .await;
    assert!(matches!(c.unwrap(), CasOutcome::Committed(_)));
    assert!(
        sync,
        "the fragment commit after a reserving load was not flushed: the load's \
         synchronous_commit = off outlived its transaction"
    );

    // A reply, then progress: recorded without a flush...
    rec.received = 1000;
    rec.state = SessionState::ReplyReady;
    rec.reply = Some(stored_reply(500, 7));
    let expect = Expect {
        received: 1000,
        state: None,
    };
    let (saved, sync) = flushed(&raw, node.save(&rec, expect)).await;
    assert!(matches!(saved.unwrap(), CasOutcome::Committed(_)));
    assert!(sync, "storing the reply waits for the flush");
    let (mut unflushed, mut covered) = (false, 0);
    for attempt in 0..3u64 {
        let (from, to) = (attempt * 100, attempt * 100 + 100);
        covered = to;
        let (after, sync) = flushed(&raw, node.record_reply_delivered(&rec.id, 7, from, to)).await;
        assert_eq!(
            after.unwrap().unwrap().reply.unwrap().delivered.covered(),
            to
        );
        if !sync {
            unflushed = true;
            break;
        }
    }
    assert!(
        unflushed,
        "reply progress waited for the WAL flush, three times out of three"
    );
    // ...and the next write on that connection (the client's Close) is durable again.
    let mut closing = node.load(&rec.id).await.unwrap().unwrap();
    closing.state = SessionState::Closed;
    let expect = Expect {
        received: 1000,
        state: Some(SessionState::ReplyReady),
    };
    let (closed, sync) = flushed(&raw, node.save(&closing, expect)).await;
    assert!(matches!(closed.unwrap(), CasOutcome::Committed(_)));
    assert!(
        sync,
        "the Close after reply progress was not flushed: progress's synchronous_commit = \
         off outlived its transaction"
    );
    // The progress is there (it went to disk with the Close).
    let reloaded = node.load(&rec.id).await.unwrap().unwrap();
    assert_eq!(reloaded.reply.unwrap().delivered.covered(), covered);
}
