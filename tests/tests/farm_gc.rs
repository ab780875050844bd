//! Garbage of the shared backend on a real PostgreSQL and a real Garage: the objects of
//! fragment commits that lost a race or never happened are collected (only once older than
//! the grace period, never a published file or a publish marker), a writer whose pending row
//! was collected cannot commit an object that is gone, and a published upload's fragment
//! objects go once it is recorded committed. Skips with a printed reason when PostgreSQL or
//! Garage is not installed.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bitsd::storage::shared::objects::{ObjectInfo, Objects};
use bitsd::storage::shared::pg::{PgOptions, PgStateStore};
use bitsd::storage::shared::SharedBackend;
use bitsd::storage::{
    CommitOutcome, FragmentCommit, FragmentDurability, FragmentPlan, SessionBackend, SessionRecord,
    SessionState,
};
use bitsd_protocol::SessionId;
use bitsd_tests::farm_servers::FarmServers;
use bitsd_tests::garage::Garage;
use bitsd_tests::pattern;
use bitsd_tests::pg::{session_record, PgCluster};
use bytes::Bytes;
use futures_util::StreamExt;

/// Two "nodes": two backends on one database and bucket.
struct Two {
    a: SharedBackend,
    b: SharedBackend,
    _garage: Garage,
    _pg: Arc<PgCluster>,
    _scratch: tempfile::TempDir,
}

async fn two() -> Option<Two> {
    let FarmServers {
        pg,
        postgres_url: url,
        garage,
    } = FarmServers::start().await?;
    let store = garage.object_store_config("gc");
    let scratch = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let state = PgStateStore::connect(&url, PgOptions::default())
            .await
            .unwrap();
        nodes.push(SharedBackend::from_parts(
            state,
            Objects::new(&store).unwrap(),
            scratch.path().to_owned(),
        ));
    }
    let b = nodes.pop().unwrap();
    let a = nodes.pop().unwrap();
    Some(Two {
        a,
        b,
        _garage: garage,
        _pg: pg,
        _scratch: scratch,
    })
}

fn plan(write_at: u64, len: u64) -> FragmentPlan {
    FragmentPlan {
        write_at,
        len,
        durability: FragmentDurability::Durable,
    }
}

async fn read_all(backend: &SharedBackend, id: &SessionId) -> Vec<u8> {
    let mut out = Vec::new();
    let mut s = backend.read_upload(id).await.unwrap();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

async fn objects_of(backend: &SharedBackend, id: &SessionId) -> Vec<ObjectInfo> {
    backend
        .objects()
        .list(&backend.objects().session_prefix(id))
        .await
        .unwrap()
}

/// `record` advanced to `received` (complete when it reaches `total`).
fn at(record: &SessionRecord, received: u64, total: u64) -> SessionRecord {
    let mut r = record.clone();
    r.received = received;
    r.total = Some(total);
    if received == total {
        r.state = SessionState::Complete;
    }
    r
}

/// Writes `bytes` at `offset` through `backend` and commits it.
async fn fragment(
    backend: &SharedBackend,
    record: &SessionRecord,
    offset: u64,
    bytes: &[u8],
    total: u64,
) -> FragmentCommit {
    let mut sink = backend
        .begin_fragment(&record.id, plan(offset, bytes.len() as u64))
        .await
        .unwrap();
    sink.write(Bytes::copy_from_slice(bytes)).await.unwrap();
    sink.commit(offset, &at(record, offset + bytes.len() as u64, total))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_losing_writers_object_is_collected_and_the_winners_bytes_stay() {
    let Some(n) = two().await else { return };
    let record = session_record(None);
    n.a.create(&record).await.unwrap();
    let winner = pattern(20_000, 1);
    let loser: Vec<u8> = winner.iter().map(|b| !b).collect();
    // Both nodes write offset 0; a commits first, b loses.
    let mut wa =
        n.a.begin_fragment(&record.id, plan(0, 20_000))
            .await
            .unwrap();
    let mut wb =
        n.b.begin_fragment(&record.id, plan(0, 20_000))
            .await
            .unwrap();
    wa.write(Bytes::from(winner.clone())).await.unwrap();
    wb.write(Bytes::from(loser)).await.unwrap();
    let next = at(&record, 20_000, 40_000);
    assert_eq!(
        wa.commit(0, &next).await.unwrap(),
        FragmentCommit::Committed
    );
    assert!(matches!(
        wb.commit(0, &next).await.unwrap(),
        FragmentCommit::Lost { .. }
    ));
    assert_eq!(
        objects_of(&n.a, &record.id).await.len(),
        2,
        "winner and loser"
    );

    // Within the grace period nothing goes.
    assert_eq!(
        n.b.collect_garbage(Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(objects_of(&n.a, &record.id).await.len(), 2);
    // Past it, the loser's object goes (on any node), and only it.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(n.b.collect_garbage(Duration::ZERO).await.unwrap(), 1);
    let left = objects_of(&n.a, &record.id).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(
        read_all(&n.b, &record.id).await,
        winner,
        "the winner's bytes"
    );
    // The session goes on: the rest of the upload, on the other node.
    let tail = pattern(20_000, 2);
    assert_eq!(
        fragment(&n.b, &at(&record, 20_000, 40_000), 20_000, &tail, 40_000).await,
        FragmentCommit::Committed
    );
    let mut whole = winner.clone();
    whole.extend_from_slice(&tail);
    assert_eq!(read_all(&n.a, &record.id).await, whole);
    assert_eq!(n.a.collect_garbage(Duration::ZERO).await.unwrap(), 0);
    assert_eq!(
        read_all(&n.a, &record.id).await,
        whole,
        "nothing committed went"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_whose_pending_object_was_collected_cannot_commit_it() {
    let Some(n) = two().await else { return };
    let record = session_record(None);
    n.a.create(&record).await.unwrap();
    let data = pattern(8_000, 3);
    // A slow writer: its object is complete in the bucket but not committed yet when the
    // collector (grace zero) runs on the other node.
    let mut slow =
        n.a.begin_fragment(&record.id, plan(0, 8_000))
            .await
            .unwrap();
    slow.write(Bytes::from(data.clone())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(n.b.collect_garbage(Duration::ZERO).await.unwrap(), 1);
    // Its commit must not reference an object the collector deletes: it loses, the offset
    // stays at 0 and the client re-sends the fragment.
    match slow.commit(0, &at(&record, 8_000, 8_000)).await.unwrap() {
        FragmentCommit::Lost { current: Some(r) } => assert_eq!(r.received, 0),
        other => panic!("a collected write must not commit: {other:?}"),
    }
    assert_eq!(n.a.load(&record.id).await.unwrap().unwrap().received, 0);
    // The re-sent fragment commits, and the upload reads whole.
    assert_eq!(
        fragment(&n.b, &record, 0, &data, 8_000).await,
        FragmentCommit::Committed
    );
    assert_eq!(read_all(&n.a, &record.id).await, data);
    // Whatever the slow writer left is garbage for the next sweep, and only that goes.
    tokio::time::sleep(Duration::from_millis(20)).await;
    n.a.collect_garbage(Duration::ZERO).await.unwrap();
    assert_eq!(read_all(&n.b, &record.id).await, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_upload_loses_its_fragment_objects_and_survives_the_collector() {
    let Some(n) = two().await else { return };
    let mut record = session_record(None);
    record.destination = Some("gc/out.bin".into());
    n.a.create(&record).await.unwrap();
    let one = pattern(15_000, 4);
    let two_ = pattern(15_000, 5);
    assert_eq!(
        fragment(&n.a, &record, 0, &one, 30_000).await,
        FragmentCommit::Committed
    );
    assert_eq!(
        fragment(&n.b, &at(&record, 15_000, 30_000), 15_000, &two_, 30_000).await,
        FragmentCommit::Committed
    );
    assert_eq!(objects_of(&n.a, &record.id).await.len(), 2);
    assert_eq!(
        n.b.publish_upload(&record.id, "gc/out.bin", false)
            .await
            .unwrap(),
        CommitOutcome::Committed
    );
    // Recorded committed: its fragment objects are gone before Close, the file is whole.
    let left = objects_of(&n.a, &record.id).await;
    assert!(left.is_empty(), "fragments kept after publish: {left:?}");
    let mut whole = one.clone();
    whole.extend_from_slice(&two_);
    let key = n.a.objects().file_key("gc/out.bin");
    let read = |b: &SharedBackend| {
        let objects = b.objects().clone();
        let key = key.clone();
        async move {
            objects
                .read(&key, None)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        }
    };
    assert_eq!(read(&n.a).await, whole);
    // A repeated publish (a retried final packet) still answers from the record.
    assert_eq!(
        n.a.publish_upload(&record.id, "gc/out.bin", false)
            .await
            .unwrap(),
        CommitOutcome::Committed
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    n.a.collect_garbage(Duration::ZERO).await.unwrap();
    assert_eq!(
        read(&n.b).await,
        whole,
        "the collector leaves published files"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_assembly_and_the_committed_record_never_loses_the_file() {
    let Some(n) = two().await else { return };
    let mut record = session_record(None);
    record.destination = Some("gc/crashed.bin".into());
    n.a.create(&record).await.unwrap();
    let data = pattern(12_000, 6);
    assert_eq!(
        fragment(&n.a, &record, 0, &data, 12_000).await,
        FragmentCommit::Committed
    );
    // What a node that died after the assembly and before the `committed` record leaves:
    // the publish marker (a pending row for the destination key) and the file itself.
    let dest = n.a.objects().file_key("gc/crashed.bin");
    n.a.state()
        .add_pending_object(&record.id, dest.as_str())
        .await
        .unwrap();
    let mut w = n.a.objects().writer(dest.clone());
    w.write_bytes(Bytes::from(data.clone())).await.unwrap();
    w.finish().await.unwrap();
    assert!(!n.a.load(&record.id).await.unwrap().unwrap().committed);
    // The collector, with no grace at all, on either node: the file and its marker stay,
    // and so do the fragments that are not yet published.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(n.b.collect_garbage(Duration::ZERO).await.unwrap(), 0);
    assert_eq!(n.a.collect_garbage(Duration::ZERO).await.unwrap(), 0);
    assert!(n.b.destination_exists("gc/crashed.bin").await);
    assert_eq!(objects_of(&n.a, &record.id).await.len(), 1);
    // The retried publish on the other node recognises its own marker and finishes.
    assert_eq!(
        n.b.publish_upload(&record.id, "gc/crashed.bin", false)
            .await
            .unwrap(),
        CommitOutcome::Committed
    );
    let got =
        n.a.objects()
            .read(&dest, None)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    assert_eq!(got, data);
    assert!(n.a.load(&record.id).await.unwrap().unwrap().committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_of_a_node_collects_a_dead_writers_object_on_its_schedule() {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let store = servers.garage.object_store_config("gc-node");
    let shared = bitsd::SharedStorage {
        postgres_url: servers.postgres_url.clone(),
        postgres_max_connections: 4,
        postgres_timeout: Duration::from_secs(5),
        object_store: store.clone(),
    };
    // An orphan (objects of a session with no row) older than the grace when the node starts:
    // the node's first sweep deletes it.
    let orphan_store = Objects::new(&store).unwrap();
    let orphan = orphan_store.session_prefix(&SessionId::random());
    orphan_store
        .put_stream(
            orphan.join("frag/00000000000000000000-orphan"),
            futures_util::stream::iter([Ok::<_, bitsd::storage::StorageError>(Bytes::from(
                pattern(1_000, 8),
            ))]),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let node = bitsd_tests::TestServer::start_with(move |c| {
        c.storage = bitsd::StorageConfig::Shared(Box::new(shared));
        c.cleanup_interval = Duration::from_millis(200);
        c.pending_object_grace = Duration::from_millis(500);
    })
    .await;
    // A session through the node, one fragment acknowledged.
    let mut c = bitsd_tests::RawClient::connect(node.addr()).await;
    let data = pattern(40_000, 7);
    let sid = c.create_session("/upload/gc/dead.bin").await;
    c.fragment("/upload/gc/dead.bin", &sid, &data, 0, 20_000)
        .await
        .assert_ack();
    // Another "node" writes the next fragment's object and dies before its commit.
    let scratch = tempfile::tempdir().unwrap();
    let dead = SharedBackend::from_parts(
        PgStateStore::connect(&servers.postgres_url, PgOptions::default())
            .await
            .unwrap(),
        Objects::new(&store).unwrap(),
        scratch.path().to_owned(),
    );
    let id: SessionId = sid.trim_matches(['{', '}']).parse().unwrap();
    let mut sink = dead
        .begin_fragment(&id, plan(20_000, 20_000))
        .await
        .unwrap();
    sink.write(Bytes::copy_from_slice(&data[20_000..]))
        .await
        .unwrap();
    // What the commit would do first: complete the object. Then the writer is gone.
    let mut w = dead.objects().writer(
        dead.objects()
            .session_prefix(&id)
            .join("frag/00000000000000020000-deadwriter"),
    );
    w.write_bytes(Bytes::copy_from_slice(&data[20_000..]))
        .await
        .unwrap();
    w.finish().await.unwrap();
    dead.state()
        .add_pending_object(
            &id,
            dead.objects()
                .session_prefix(&id)
                .join("frag/00000000000000020000-deadwriter")
                .as_str(),
        )
        .await
        .unwrap();
    drop(sink);
    assert_eq!(objects_of(&dead, &id).await.len(), 2, "acknowledged + dead");
    // The node's sweeper deletes the dead writer's object after the grace, not the
    // acknowledged one.
    let mut left = Vec::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = objects_of(&dead, &id).await;
        if left.len() == 1 {
            break;
        }
    }
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(!left[0].key.as_str().contains("deadwriter"), "{left:?}");
    assert!(
        orphan_store.list(&orphan).await.unwrap().is_empty(),
        "the orphan's objects"
    );
    // The client goes on from its last Ack; the file is whole.
    let fin = c
        .fragment("/upload/gc/dead.bin", &sid, &data, 20_000, 20_000)
        .await;
    fin.assert_ack();
    let file = dead
        .objects()
        .read(&dead.objects().file_key("gc/dead.bin"), None)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(file, data);
}

/// Every object key under the bucket's prefix (sessions and files).
async fn all_keys(backend: &SharedBackend) -> Vec<String> {
    let mut keys: Vec<String> = backend
        .objects()
        .list(backend.objects().prefix())
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key.as_str().to_owned())
        .collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_without_a_row_lose_their_objects_after_the_grace_and_nothing_else_does() {
    let Some(n) = two().await else { return };
    // An orphan: its row deleted by hand (fragments and a reply in the bucket stay).
    let orphan = session_record(None);
    n.a.create(&orphan).await.unwrap();
    for (i, offset) in [0u64, 10_000].into_iter().enumerate() {
        let bytes = pattern(10_000, 20 + i as u64);
        let r = at(&orphan, offset, 20_000);
        assert_eq!(
            fragment(&n.a, &r, offset, &bytes, 20_000).await,
            FragmentCommit::Committed
        );
    }
    let reply = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(reply.path(), pattern(3_000, 29)).unwrap();
    n.a.store_reply_file(&orphan.id, reply.path())
        .await
        .unwrap();
    assert_eq!(objects_of(&n.a, &orphan.id).await.len(), 3);
    assert!(n.a.state().remove(&orphan.id).await.unwrap());

    // A straggler: a writer recorded its pending row, another node purged the session (its
    // objects, then its row and pending rows), then the writer's object landed. Its commit
    // loses, and nothing but the bucket knows of the object.
    let purged = session_record(None);
    n.a.create(&purged).await.unwrap();
    let mut late =
        n.a.begin_fragment(&purged.id, plan(0, 5_000))
            .await
            .unwrap();
    n.b.purge(&purged.id).await.unwrap();
    late.write(Bytes::from(pattern(5_000, 30))).await.unwrap();
    assert!(matches!(
        late.commit(0, &at(&purged, 5_000, 5_000)).await.unwrap(),
        FragmentCommit::Lost { .. }
    ));
    assert_eq!(objects_of(&n.a, &purged.id).await.len(), 1);

    // Kept: a live session, a tombstone with an object left behind, and a published file
    // whose session row is gone too.
    let live = session_record(None);
    n.a.create(&live).await.unwrap();
    let live_bytes = pattern(7_000, 31);
    assert_eq!(
        fragment(&n.a, &live, 0, &live_bytes, 70_000).await,
        FragmentCommit::Committed
    );
    let mut ended = session_record(None);
    n.a.create(&ended).await.unwrap();
    n.a.end_session(&mut ended, SessionState::Cancelled)
        .await
        .unwrap();
    let leftover = n.a.objects().fragment_key(&ended.id, 0);
    n.a.objects()
        .put_stream(
            leftover.clone(),
            futures_util::stream::iter([Ok::<_, bitsd::storage::StorageError>(Bytes::from(
                pattern(100, 32),
            ))]),
        )
        .await
        .unwrap();
    let mut published = session_record(None);
    published.destination = Some("orphans/out.bin".into());
    n.a.create(&published).await.unwrap();
    let file = pattern(9_000, 33);
    assert_eq!(
        fragment(&n.a, &published, 0, &file, 9_000).await,
        FragmentCommit::Committed
    );
    assert_eq!(
        n.a.publish_upload(&published.id, "orphans/out.bin", false)
            .await
            .unwrap(),
        CommitOutcome::Committed
    );
    assert!(n.a.state().remove(&published.id).await.unwrap());

    let mut found = n.b.orphan_sessions().await.unwrap();
    found.sort();
    let mut want = vec![orphan.id, purged.id];
    want.sort();
    assert_eq!(found, want, "the sessions with objects and no row");

    // Within the grace nothing goes.
    let before = all_keys(&n.a).await;
    assert_eq!(
        n.b.collect_orphan_sessions(Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(all_keys(&n.a).await, before);

    // Past it, exactly the orphans' objects go, while new sessions are being created and
    // written on the other node (a session's row precedes its objects: never touched).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let writer = async {
        let mut made = Vec::new();
        for i in 0..6u64 {
            let r = session_record(None);
            n.a.create(&r).await.unwrap();
            let bytes = pattern(4_000, 40 + i);
            assert_eq!(
                fragment(&n.a, &r, 0, &bytes, 4_000).await,
                FragmentCommit::Committed
            );
            made.push((r, bytes));
        }
        made
    };
    let (deleted, made) = tokio::join!(n.b.collect_orphan_sessions(Duration::ZERO), writer);
    assert_eq!(
        deleted.unwrap(),
        4,
        "3 objects of the orphan, 1 of the straggler"
    );
    assert!(objects_of(&n.a, &orphan.id).await.is_empty());
    assert!(objects_of(&n.a, &purged.id).await.is_empty());
    for (r, bytes) in &made {
        assert_eq!(&read_all(&n.b, &r.id).await, bytes, "a new session's bytes");
    }
    let after = all_keys(&n.a).await;
    let gone: Vec<_> = before.iter().filter(|k| !after.contains(k)).collect();
    assert_eq!(gone.len(), 4, "{gone:?}");
    let prefixes = [
        n.a.objects().session_prefix(&orphan.id).as_str().to_owned(),
        n.a.objects().session_prefix(&purged.id).as_str().to_owned(),
    ];
    assert!(
        gone.iter()
            .all(|k| prefixes.iter().any(|p| k.starts_with(&format!("{p}/")))),
        "{gone:?}"
    );
    assert_eq!(read_all(&n.a, &live.id).await, live_bytes);
    assert!(
        after.contains(&leftover.as_str().to_owned()),
        "a tombstone's object"
    );
    let file_key = n.a.objects().file_key("orphans/out.bin");
    assert_eq!(
        n.b.objects()
            .read(&file_key, None)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        file,
        "a published file"
    );
    // Nothing left to find; the sweeper's own call finds nothing more either.
    assert!(n.b.orphan_sessions().await.unwrap().is_empty());
    let collected = n.a.collect_garbage(Duration::ZERO).await.unwrap();
    assert_eq!(collected, 0, "{:?}", all_keys(&n.a).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_farm_on_another_database_sharing_the_prefix_deletes_nothing() {
    let Some(n) = two().await else { return };
    let record = session_record(None);
    n.a.create(&record).await.unwrap();
    let data = pattern(6_000, 50);
    assert_eq!(
        fragment(&n.a, &record, 0, &data, 6_000).await,
        FragmentCommit::Committed
    );
    // This farm's first scan claims the prefix for its database.
    assert!(n.a.orphan_sessions().await.unwrap().is_empty());
    // A second farm: its own database, the same bucket and prefix (a misconfiguration). To
    // it every session of the first farm has no row; it must delete none of them.
    let pg = Arc::clone(&n._pg);
    let other_url = tokio::task::spawn_blocking(move || pg.fresh_database())
        .await
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let other = SharedBackend::from_parts(
        PgStateStore::connect(&other_url, PgOptions::default())
            .await
            .unwrap(),
        n.a.objects().clone(),
        scratch.path().to_owned(),
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let refused = other.collect_orphan_sessions(Duration::ZERO).await;
    assert!(
        matches!(refused, Err(bitsd::storage::StorageError::Corrupt { .. })),
        "{refused:?}"
    );
    assert!(other.collect_garbage(Duration::ZERO).await.is_err());
    assert_eq!(
        read_all(&n.b, &record.id).await,
        data,
        "the first farm's bytes"
    );
    // The owner's own scans go on.
    assert_eq!(
        n.b.collect_orphan_sessions(Duration::ZERO).await.unwrap(),
        0
    );
    assert_eq!(objects_of(&n.a, &record.id).await.len(), 1);
}
