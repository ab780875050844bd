//! Garbage of the shared backend on a real PostgreSQL and a real Garage: the objects of
//! fragment commits that lost a race or never happened are collected (only once older than
//! the grace period, never a published file or a publish marker), a writer whose pending row
//! was collected cannot commit an object that is gone, and a published upload's fragment
//! objects go once it is recorded committed. Skips with a printed reason when PostgreSQL or
//! Garage is not installed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bitsd::storage::shared::objects::Objects;
use bitsd::storage::shared::SharedBackend;
use bitsd::storage::{CommitOutcome, FragmentCommit, SessionBackend, SessionState};
use bitsd_protocol::SessionId;
use bitsd_tests::farm_servers::{shared_storage, FarmServers};
use bitsd_tests::pattern;
use bitsd_tests::pg::session_record;
use bytes::Bytes;

mod gc_support;

use bitsd_tests::shared_backend::{backend_on, read_object};
use gc_support::{at, fragment, objects_of, plan, read_all, two};

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
    // The pending row goes in from a task of its own while the body streams: collect as soon
    // as it is there (and a millisecond older than now), however long that takes on a busy
    // machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match n.b.collect_garbage(Duration::ZERO).await.unwrap() {
            1 => break,
            0 if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            other => panic!("collected {other} pending objects, expected the slow writer's one"),
        }
    }
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
        let (objects, key) = (b.objects().clone(), key.clone());
        async move { read_object(&objects, &key).await }
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
    let shared = shared_storage(&servers.postgres_url, &store);
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
    let dead = backend_on(&servers.postgres_url, &store, scratch.path()).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragment_of_a_session_ended_on_another_node_writes_no_object() {
    let Some(n) = two().await else { return };
    let mut record = session_record(None);
    n.a.create(&record).await.unwrap();
    let other = session_record(None);
    n.a.create(&other).await.unwrap();
    // Node a loaded the record (live); node b cancels the session before a's body arrives.
    n.b.end_session(&mut record, SessionState::Cancelled)
        .await
        .unwrap();
    for (len, frames) in [(8_000usize, 1usize), (3 * 1024 * 1024, 7)] {
        let data = pattern(len, 6);
        let mut sink =
            n.a.begin_fragment(&record.id, plan(0, len as u64))
                .await
                .unwrap();
        for chunk in data.chunks(len.div_ceil(frames)) {
            sink.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        match sink
            .commit(0, &at(&record, len as u64, len as u64))
            .await
            .unwrap()
        {
            FragmentCommit::Lost { current } => assert!(
                current
                    .as_ref()
                    .is_none_or(|r| r.state == SessionState::Cancelled),
                "{current:?}"
            ),
            other => panic!("a fragment of an ended session must not commit: {other:?}"),
        }
    }
    // Nothing reached the bucket for the ended session (not even for the collector to find).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = objects_of(&n.a, &record.id).await;
    assert!(
        left.is_empty(),
        "objects written for an ended session: {left:?}"
    );
    // Another session is untouched and takes its fragment.
    assert_eq!(
        fragment(&n.a, &other, 0, &pattern(5000, 7), 5000).await,
        FragmentCommit::Committed
    );
    assert_eq!(read_all(&n.b, &other.id).await, pattern(5000, 7));
}
