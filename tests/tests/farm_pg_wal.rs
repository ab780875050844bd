//! Which of the farm's PostgreSQL writes wait for the WAL flush, on a durable cluster
//! (`fsync` and `synchronous_commit` on): the fragment commit does; the two writes that skip
//! it on purpose (a fragment's pending-object row recorded with the session's load, and reply
//! progress) do not; and their `synchronous_commit = off` lasts for their own transaction only,
//! never for the next write on the same pooled connection (which would silently make an
//! acknowledged fragment's commit undurable). Skips with a printed reason when PostgreSQL is
//! not installed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bitsd_storage::shared::pg::{CasOutcome, Expect, PgOptions, PgStateStore};
use bitsd_storage::{ReplyKind, ReplyRecord, SessionState};
use bitsd_tests::pg::{fragment, raw_client, session_record, ClusterOptions, PgCluster};

/// WAL bytes written but not yet flushed: 0 right after a commit that waited for the flush
/// (nothing else writes to this cluster), more after one that did not.
async fn unflushed(raw: &tokio_postgres::Client) -> i64 {
    raw.query_one(
        "SELECT (pg_current_wal_insert_lsn() - pg_current_wal_flush_lsn())::int8",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_writes_meant_to_skip_the_wal_flush_skip_it_and_never_the_next_one() {
    let pg = match PgCluster::start(ClusterOptions { durable: true }) {
        Ok(pg) => pg,
        Err(why) => {
            eprintln!("skipping: {why}");
            return;
        }
    };
    let url = pg.fresh_database();
    let raw = raw_client(&url).await;
    // The WAL writer flushes asynchronous commits on its own every `wal_writer_delay`: make
    // that 10 s so an unflushed commit stays visible while the test looks.
    raw.batch_execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
        .await
        .unwrap();
    raw.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // One pooled connection: every call below runs on the same PostgreSQL backend.
    let node = PgStateStore::connect(
        &url,
        PgOptions {
            max_connections: 1,
            ..PgOptions::default()
        },
    )
    .await
    .unwrap();
    let mut rec = session_record(None);
    node.create(&rec).await.unwrap();
    assert_eq!(
        unflushed(&raw).await,
        0,
        "Create-Session waits for the flush"
    );

    // The pending-object row rides on the load without a flush of its own...
    let key = format!("sessions/{}/frag/0-a", rec.id.as_uuid());
    let (loaded, reserved) = node.load_reserving(&rec.id, &key).await.unwrap();
    assert!(loaded.is_some() && reserved);
    assert!(
        unflushed(&raw).await > 0,
        "the reserved row's commit was flushed"
    );
    // ...and the fragment commit that follows on the same connection flushes (it and the
    // row before it).
    let c = node
        .commit_pending_fragment(&fragment(rec.id, 0, 1000, &key))
        .await
        .unwrap();
    assert!(matches!(c, CasOutcome::Committed(_)), "{c:?}");
    assert_eq!(
        unflushed(&raw).await,
        0,
        "the fragment commit after a reserving load was not flushed: the load's \
         synchronous_commit = off outlived its transaction"
    );

    // A reply, then progress: recorded without a flush...
    rec.received = 1000;
    rec.state = SessionState::ReplyReady;
    rec.reply = Some(ReplyRecord {
        url: "http://farm/reply/x".into(),
        kind: ReplyKind::Stored {
            len: 500,
            crc32c: None,
            in_upload: false,
        },
        created_ms: 7,
        delivered: Default::default(),
    });
    let saved = node
        .save(
            &rec,
            Expect {
                received: 1000,
                state: None,
            },
        )
        .await
        .unwrap();
    assert!(matches!(saved, CasOutcome::Committed(_)), "{saved:?}");
    assert_eq!(
        unflushed(&raw).await,
        0,
        "storing the reply waits for the flush"
    );
    let after = node
        .record_reply_delivered(&rec.id, 7, 0, 200)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.reply.unwrap().delivered.covered(), 200);
    assert!(
        unflushed(&raw).await > 0,
        "reply progress waited for the WAL flush"
    );
    // ...and the next write on that connection (the client's Close) is durable again.
    let mut closing = node.load(&rec.id).await.unwrap().unwrap();
    closing.state = SessionState::Closed;
    let closed = node
        .save(
            &closing,
            Expect {
                received: 1000,
                state: Some(SessionState::ReplyReady),
            },
        )
        .await
        .unwrap();
    assert!(matches!(closed, CasOutcome::Committed(_)), "{closed:?}");
    assert_eq!(
        unflushed(&raw).await,
        0,
        "the Close after reply progress was not flushed: progress's synchronous_commit = \
         off outlived its transaction"
    );
    // The progress is there (it went to disk with the Close).
    let reloaded = node.load(&rec.id).await.unwrap().unwrap();
    assert_eq!(reloaded.reply.unwrap().delivered.covered(), 200);
}
