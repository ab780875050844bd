//! The order a fragment of the shared backend keeps now that its pending-object row is
//! inserted while the body streams (issue 14: one PostgreSQL round trip off the latency): the
//! row is committed BEFORE anything is visible at the fragment's key, so the collector always
//! knows every object that may exist. Attacked with a real PostgreSQL (a table lock holding
//! the row back; the server stopped before the fragment) and a real Garage. Skips with a
//! printed reason when PostgreSQL or Garage is not installed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bitsd::storage::shared::objects::Objects;
use bitsd::storage::shared::pg::{PgOptions, PgStateStore};
use bitsd::storage::shared::SharedBackend;
use bitsd::storage::{
    FragmentCommit, FragmentDurability, FragmentPlan, SessionBackend, SessionRecord, SessionState,
};
use bitsd_tests::farm_servers::FarmServers;
use bitsd_tests::pattern;
use bitsd_tests::pg::session_record;
use bitsd_tests::shared_backend::pending_of;
use bytes::Bytes;
use futures_util::StreamExt;

async fn backend(
    servers: &FarmServers,
    prefix: &str,
    scratch: &tempfile::TempDir,
) -> SharedBackend {
    let options = PgOptions {
        max_connections: 4,
        timeout: Duration::from_secs(5),
        ..PgOptions::default()
    };
    let state = PgStateStore::connect(&servers.postgres_url, options)
        .await
        .unwrap();
    let store = servers.garage.object_store_config(prefix);
    SharedBackend::from_parts(
        state,
        Objects::new(&store).unwrap(),
        scratch.path().to_owned(),
    )
}

/// Creates `record` through a second node on the bucket prefix `prefix` (the test's node
/// uses the same), so that the test's node has no memory of the session and loads it (a node
/// that created it would skip the load: farm_recent.rs).
async fn create_elsewhere(
    servers: &FarmServers,
    prefix: &str,
    scratch: &tempfile::TempDir,
    record: &SessionRecord,
) {
    let other = backend(servers, prefix, scratch).await;
    other.create(record).await.unwrap();
}

fn plan(write_at: u64, len: u64) -> FragmentPlan {
    FragmentPlan {
        write_at,
        len,
        durability: FragmentDurability::Durable,
    }
}

fn at(record: &SessionRecord, received: u64, total: u64) -> SessionRecord {
    let mut r = record.clone();
    r.received = received;
    r.total = Some(total);
    if received == total {
        r.state = SessionState::Complete;
    }
    r
}

async fn object_count(backend: &SharedBackend, record: &SessionRecord) -> usize {
    backend
        .objects()
        .list(&backend.objects().session_prefix(&record.id))
        .await
        .unwrap()
        .len()
}

async fn read_all(backend: &SharedBackend, record: &SessionRecord) -> Vec<u8> {
    let mut out = Vec::new();
    let mut s = backend.read_upload(&record.id).await.unwrap();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

/// The pending row is held back by a lock on its table while the body is written and the
/// commit runs: no object may appear at the key (the collector would not know it), and the
/// commit completes once the row is in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fragment_object_exists_before_its_pending_row_is_committed() {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let node = backend(&servers, "order", &scratch).await;
    let record = session_record(None);
    node.create(&record).await.unwrap();

    let (locker, connection) =
        tokio_postgres::connect(&servers.postgres_url, tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    locker
        .batch_execute("BEGIN; LOCK TABLE bitsd_pending_objects IN EXCLUSIVE MODE;")
        .await
        .unwrap();

    // A small fragment (one PUT) and, for the commit, the whole body already handed over.
    let data = pattern(200_000, 7);
    let mut sink = node
        .begin_fragment(&record.id, plan(0, data.len() as u64))
        .await
        .unwrap();
    sink.write(Bytes::from(data.clone())).await.unwrap();
    let next = at(&record, data.len() as u64, data.len() as u64);
    let commit = tokio::spawn(async move { sink.commit(0, &next).await });

    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !commit.is_finished(),
        "the commit waits for the pending row"
    );
    assert_eq!(
        object_count(&node, &record).await,
        0,
        "an object is visible before its pending row is committed"
    );
    assert_eq!(node.load(&record.id).await.unwrap().unwrap().received, 0);

    locker.batch_execute("COMMIT;").await.unwrap();
    assert_eq!(commit.await.unwrap().unwrap(), FragmentCommit::Committed);
    assert_eq!(object_count(&node, &record).await, 1);
    assert_eq!(read_all(&node, &record).await, data);
    // Committed: the pending row went with the commit, so the collector takes nothing.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(node.collect_garbage(Duration::ZERO).await.unwrap(), 0);
    assert_eq!(read_all(&node, &record).await, data);
}

/// PostgreSQL is down when the fragment starts: the body is taken, but the commit fails
/// with a transient error, nothing is visible in the bucket, the offset does not move, and
/// the client's retry after PostgreSQL returns commits the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_mid_fragment_stores_no_object_and_acknowledges_nothing() {
    let Some(servers) = FarmServers::start_own().await else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let node = backend(&servers, "outage", &scratch).await;
    let record = session_record(None);
    node.create(&record).await.unwrap();
    let first = pattern(64 * 1024, 8);
    let total = 2 * first.len() as u64;
    let mut sink = node
        .begin_fragment(&record.id, plan(0, first.len() as u64))
        .await
        .unwrap();
    sink.write(Bytes::from(first[..1000].to_vec()))
        .await
        .unwrap();

    let pg = servers.pg.clone();
    tokio::task::spawn_blocking(move || pg.stop())
        .await
        .unwrap();
    // The row's insert was racing the stop: whichever won, nothing may be acknowledged and
    // no object may be left without its row. Hand over the rest (a write may already report
    // the failed insert) and commit.
    let mut failed = None;
    if let Err(e) = sink.write(Bytes::from(first[1000..].to_vec())).await {
        failed = Some(e);
    }
    let outcome = match failed {
        Some(e) => Err(e),
        None => {
            sink.commit(0, &at(&record, first.len() as u64, total))
                .await
        }
    };
    let pg = servers.pg.clone();
    tokio::task::spawn_blocking(move || pg.restart())
        .await
        .unwrap();
    match outcome {
        Err(e) => {
            assert!(e.is_transient(), "not transient: {e}");
            assert_eq!(node.load(&record.id).await.unwrap().unwrap().received, 0);
            // An object may have been completed before the commit statement failed, but
            // only with its pending row in: the collector then finds it, none is orphaned.
            tokio::time::sleep(Duration::from_millis(20)).await;
            node.collect_garbage(Duration::ZERO).await.unwrap();
            assert_eq!(object_count(&node, &record).await, 0, "an orphan object");
        }
        // The insert and even the commit made it before the stop: then it is all there.
        Ok(c) => assert_eq!(c, FragmentCommit::Committed),
    }

    // Once back, the client's retry from the acknowledged offset goes through.
    let received = node.load(&record.id).await.unwrap().unwrap().received;
    if received == 0 {
        let mut sink = node
            .begin_fragment(&record.id, plan(0, first.len() as u64))
            .await
            .unwrap();
        sink.write(Bytes::from(first.clone())).await.unwrap();
        assert_eq!(
            sink.commit(0, &at(&record, first.len() as u64, total))
                .await
                .unwrap(),
            FragmentCommit::Committed
        );
    }
    assert_eq!(read_all(&node, &record).await, first);
    tokio::time::sleep(Duration::from_millis(20)).await;
    node.collect_garbage(Duration::ZERO).await.unwrap();
    assert_eq!(
        read_all(&node, &record).await,
        first,
        "nothing committed went"
    );
}

/// PostgreSQL is already down when the fragment begins: the fragment can no longer fail up
/// front (the row is not awaited there), so it must fail at its commit, transiently, with no
/// object in the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragment_begun_while_postgres_is_down_fails_transiently_without_an_object() {
    let Some(servers) = FarmServers::start_own().await else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let node = backend(&servers, "down", &scratch).await;
    let record = session_record(None);
    node.create(&record).await.unwrap();
    let pg = servers.pg.clone();
    tokio::task::spawn_blocking(move || pg.stop())
        .await
        .unwrap();
    let data = pattern(300_000, 9);
    let result = async {
        let mut sink = node
            .begin_fragment(&record.id, plan(0, data.len() as u64))
            .await?;
        for chunk in data.chunks(16 * 1024) {
            sink.write(Bytes::copy_from_slice(chunk)).await?;
        }
        sink.commit(0, &at(&record, data.len() as u64, data.len() as u64))
            .await
    }
    .await;
    let e = result.expect_err("no fragment commits without PostgreSQL");
    assert!(e.is_transient(), "not transient: {e}");
    assert_eq!(object_count(&node, &record).await, 0, "an orphan object");
    let pg = servers.pg.clone();
    tokio::task::spawn_blocking(move || pg.restart())
        .await
        .unwrap();
    assert_eq!(node.load(&record.id).await.unwrap().unwrap().received, 0);
}

/// Waits up to 10 s for `record`'s session to have no pending row.
async fn no_pending_left(backend: &SharedBackend, record: &SessionRecord) {
    for _ in 0..200 {
        if pending_of(backend, &record.id).await.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "pending rows left: {:?}",
        pending_of(backend, &record.id).await
    );
}

/// A Fragment's load records its object key as pending in the same round trip: the row is
/// there before any byte is written, the commit that references the object removes it, and
/// nothing is left for the collector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reserved_with_the_load_is_pending_before_the_write_and_cleared_by_the_commit() {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let node = backend(&servers, "reserve", &scratch).await;
    let record = session_record(None);
    create_elsewhere(&servers, "reserve", &scratch, &record).await;
    let (loaded, slot) = node.load_for_fragment(&record.id, 0).await.unwrap();
    assert_eq!(loaded.unwrap().received, 0);
    let slot = slot.expect("a live session's load reserves the fragment's key");
    let reserved = pending_of(&node, &record.id).await;
    assert_eq!(reserved.len(), 1, "{reserved:?}");
    let data = pattern(70_000, 8);
    let mut sink = node
        .begin_reserved_fragment(&record.id, plan(0, data.len() as u64), slot)
        .await
        .unwrap();
    sink.write(Bytes::from(data.clone())).await.unwrap();
    let next = at(&record, data.len() as u64, 2 * data.len() as u64);
    assert_eq!(
        sink.commit(0, &next).await.unwrap(),
        FragmentCommit::Committed
    );
    assert!(pending_of(&node, &record.id).await.is_empty());
    let keys = node.state().session_objects(&record.id).await.unwrap();
    assert!(keys.contains(&reserved[0]), "{keys:?} lacks {reserved:?}");
    assert_eq!(node.collect_garbage(Duration::ZERO).await.unwrap(), 0);
    assert_eq!(read_all(&node, &record).await, data);
}

/// A missing session or a tombstone reserves nothing; a reservation that is not used (the
/// packet was answered without new bytes) is forgotten; a fragment that overlaps held bytes
/// (its new bytes start elsewhere than the reserved offset) records a key of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_or_mismatched_reservations_leave_no_pending_rows() {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let node = backend(&servers, "reserve2", &scratch).await;
    let missing = session_record(None);
    let (loaded, slot) = node.load_for_fragment(&missing.id, 0).await.unwrap();
    assert!(loaded.is_none() && slot.is_none());
    assert!(pending_of(&node, &missing.id).await.is_empty());

    let mut ended = session_record(None);
    node.create(&ended).await.unwrap();
    node.end_session(&mut ended, SessionState::Cancelled)
        .await
        .unwrap();
    let (loaded, slot) = node.load_for_fragment(&ended.id, 0).await.unwrap();
    assert_eq!(loaded.unwrap().state, SessionState::Cancelled);
    assert!(slot.is_none(), "a tombstone's load reserved a key");
    assert!(pending_of(&node, &ended.id).await.is_empty());

    let record = session_record(None);
    create_elsewhere(&servers, "reserve2", &scratch, &record).await;
    let (_, slot) = node.load_for_fragment(&record.id, 0).await.unwrap();
    assert!(slot.is_some());
    drop(slot);
    no_pending_left(&node, &record).await;

    let data = pattern(3000, 9);
    let (_, slot) = node.load_for_fragment(&record.id, 0).await.unwrap();
    let mut sink = node
        .begin_reserved_fragment(&record.id, plan(0, 1000), slot.unwrap())
        .await
        .unwrap();
    sink.write(Bytes::copy_from_slice(&data[..1000]))
        .await
        .unwrap();
    let next = at(&record, 1000, 3000);
    assert_eq!(
        sink.commit(0, &next).await.unwrap(),
        FragmentCommit::Committed
    );
    // The client re-sends from 500: the load reserves for 500, the new bytes start at 1000.
    let (_, slot) = node.load_for_fragment(&record.id, 500).await.unwrap();
    let mut sink = node
        .begin_reserved_fragment(&record.id, plan(1000, 2000), slot.unwrap())
        .await
        .unwrap();
    sink.write(Bytes::copy_from_slice(&data[1000..]))
        .await
        .unwrap();
    let last = at(&next, 3000, 3000);
    assert_eq!(
        sink.commit(1000, &last).await.unwrap(),
        FragmentCommit::Committed
    );
    no_pending_left(&node, &record).await;
    assert_eq!(read_all(&node, &record).await, data);
}

/// The collector claims a reserved row (older than its grace) between the load and the
/// commit: the commit must not reference the object the collector may delete; it loses,
/// and the offset stays where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_claimed_by_the_collector_cannot_commit() {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let node = backend(&servers, "reserve3", &scratch).await;
    let record = session_record(None);
    create_elsewhere(&servers, "reserve3", &scratch, &record).await;
    let (_, slot) = node.load_for_fragment(&record.id, 0).await.unwrap();
    let data = pattern(5000, 10);
    let mut sink = node
        .begin_reserved_fragment(&record.id, plan(0, 5000), slot.unwrap())
        .await
        .unwrap();
    sink.write(Bytes::from(data)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    node.collect_garbage(Duration::ZERO).await.unwrap();
    assert!(pending_of(&node, &record.id).await.is_empty());
    let next = at(&record, 5000, 5000);
    match sink.commit(0, &next).await.unwrap() {
        FragmentCommit::Lost { current } => {
            assert_eq!(current.unwrap().received, 0)
        }
        other => panic!("a commit whose pending row was collected went through: {other:?}"),
    }
    assert_eq!(node.load(&record.id).await.unwrap().unwrap().received, 0);
}
