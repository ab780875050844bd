//! The shared backend's early fragment write (`SessionBackend::early_fragment`): a node opens
//! a fragment's PUT and streams the body to it while the session's load is still on its way,
//! and keeps that write only if the load makes the fragment exactly those new bytes at that
//! offset. Attacked with a real PostgreSQL (a table lock holding the load back) and a real
//! Garage: no object is visible before the fragment's pending row is committed; a fragment
//! for no session, for an ended session, a re-send, an overlap and a client gone mid-body
//! store nothing they should not, and the upload stays byte-exact. Skips with a printed
//! reason when PostgreSQL or Garage is not installed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bitsd::storage::shared::objects::Objects;
use bitsd::storage::shared::pg::{PgOptions, PgStateStore};
use bitsd::storage::shared::SharedBackend;
use bitsd::storage::{FragmentCommit, SessionBackend, SessionRecord, SessionState};
use bitsd::{SharedStorage, StorageConfig};
use bitsd_protocol::SessionId;
use bitsd_tests::farm_servers::FarmServers;
use bitsd_tests::pg::session_record;
use bitsd_tests::shared_backend::read_all;
use bitsd_tests::{bits_post_request, pattern, RawClient, TestServer};
use bytes::Bytes;
use tokio::io::AsyncWriteExt;

/// A shared backend on its own prefix, for the tests that drive the seam directly.
async fn backend(
    servers: &FarmServers,
    prefix: &str,
    scratch: &tempfile::TempDir,
) -> SharedBackend {
    let options = PgOptions {
        max_connections: 4,
        timeout: Duration::from_secs(10),
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

/// Objects under the session's prefix (fragments; nothing else is written before completion).
async fn objects_of(objects: &Objects, id: &SessionId) -> Vec<String> {
    objects
        .list(&objects.session_prefix(id))
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key.as_str().to_owned())
        .collect()
}

/// A PostgreSQL connection that holds `bitsd_pending_objects` locked until `COMMIT`: every
/// fragment's load (which records the fragment's key as pending) waits behind it.
async fn lock_pending_rows(url: &str) -> tokio_postgres::Client {
    let (locker, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    locker
        .batch_execute("BEGIN; LOCK TABLE bitsd_pending_objects IN EXCLUSIVE MODE;")
        .await
        .unwrap();
    locker
}

/// The whole body goes to the early write while the load is held back: nothing is visible
/// at the key, the commit waits; once the load returns the commit completes the object and
/// the bytes read back exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_write_completes_nothing_before_its_load_has_recorded_the_key() {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let node = backend(&servers, "early-order", &scratch).await;
    let record = session_record(None);
    node.create(&record).await.unwrap();
    let data = pattern(300_000, 11);
    let locker = lock_pending_rows(&servers.postgres_url).await;

    let early = node
        .early_fragment(&record.id, 0, data.len() as u64)
        .expect("a fragment under the part size is written early");
    let (mut sink, load) = (early.sink, early.load);
    let load = tokio::spawn(load);
    for chunk in data.chunks(70_000) {
        sink.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let mut next = record.clone();
    next.received = data.len() as u64;
    next.total = Some(data.len() as u64);
    next.state = SessionState::Complete;
    let commit = tokio::spawn(async move { sink.commit(0, &next).await });

    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!load.is_finished(), "the load waits behind the table lock");
    assert!(
        !commit.is_finished(),
        "the commit waits for the pending row"
    );
    assert!(
        objects_of(node.objects(), &record.id).await.is_empty(),
        "an object is visible before its pending row is committed"
    );

    locker.batch_execute("COMMIT;").await.unwrap();
    let (loaded, slot) = load.await.unwrap().unwrap();
    assert_eq!(
        loaded.unwrap().received,
        0,
        "the load saw the session as it was"
    );
    assert!(
        slot.is_none(),
        "the early write holds the reservation itself"
    );
    assert_eq!(commit.await.unwrap().unwrap(), FragmentCommit::Committed);
    assert_eq!(objects_of(node.objects(), &record.id).await.len(), 1);
    assert_eq!(read_all(&node, &record.id).await, data);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        node.collect_garbage(Duration::ZERO).await.unwrap(),
        0,
        "the committed object's pending row went with the commit"
    );
    assert_eq!(read_all(&node, &record.id).await, data);
}

/// The session ended (here: cancelled by another node) before the early write's load: no
/// row goes in, so the commit completes no object and loses to the stored record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_write_for_an_ended_session_stores_nothing() {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let node = backend(&servers, "early-ended", &scratch).await;
    let record: SessionRecord = session_record(None);
    node.create(&record).await.unwrap();
    let mut ended = record.clone();
    node.end_session(&mut ended, SessionState::Cancelled)
        .await
        .unwrap();

    let data = pattern(100_000, 12);
    let early = node
        .early_fragment(&record.id, 0, data.len() as u64)
        .unwrap();
    let mut sink = early.sink;
    sink.write(Bytes::from(data.clone())).await.unwrap();
    let (loaded, _) = early.load.await.unwrap();
    assert!(loaded.unwrap().state.is_terminal());
    let mut next = record.clone();
    next.received = data.len() as u64;
    next.total = Some(2 * data.len() as u64);
    match sink.commit(0, &next).await.unwrap() {
        FragmentCommit::Lost { current } => {
            assert!(
                current.as_ref().is_none_or(|r| r.state.is_terminal()),
                "{current:?}"
            )
        }
        other => panic!("an ended session took a fragment: {other:?}"),
    }
    assert!(objects_of(node.objects(), &record.id).await.is_empty());
}

/// One node on the shared backend, and what the test needs to look inside.
struct Node {
    server: TestServer,
    state: PgStateStore,
    objects: Objects,
    servers: FarmServers,
}

async fn node(prefix: &str) -> Option<Node> {
    let servers = FarmServers::start().await?;
    let store = servers.garage.object_store_config(prefix);
    let shared = SharedStorage {
        postgres_url: servers.postgres_url.clone(),
        postgres_max_connections: 4,
        postgres_timeout: Duration::from_secs(10),
        object_store: store.clone(),
    };
    let server =
        TestServer::start_with(move |c| c.storage = StorageConfig::Shared(Box::new(shared))).await;
    let state = PgStateStore::connect(&servers.postgres_url, PgOptions::default())
        .await
        .unwrap();
    Some(Node {
        server,
        state,
        objects: Objects::new(&store).unwrap(),
        servers,
    })
}

fn id_of(sid: &str) -> SessionId {
    sid.trim_matches(['{', '}']).parse().unwrap()
}

/// Through the service: a fragment for a session that never existed is answered
/// session-not-found and leaves nothing in the bucket; a re-sent fragment and one that
/// overlaps the held bytes (both written early, then found to be something else) are read
/// again the usual way, so the upload is stored byte-exact, one object per new range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_overlaps_and_unknown_sessions_through_a_node() {
    let Some(node) = node("early-service").await else {
        return;
    };
    let mut client = RawClient::connect(node.server.addr()).await;
    let path = "/upload/early/overlap.bin";
    let data = pattern(300_000, 13);

    let ghost = format!("{{{}}}", SessionId::random());
    let res = client.fragment(path, &ghost, &data, 0, 100_000).await;
    res.assert_error(500, "0x8020001f");
    assert!(objects_of(&node.objects, &id_of(&ghost)).await.is_empty());

    let sid = client.create_session(path).await;
    let id = id_of(&sid);
    let res = client.fragment(path, &sid, &data, 0, 100_000).await;
    res.assert_ack();
    // Re-sent whole: already held.
    let res = client.fragment(path, &sid, &data, 0, 100_000).await;
    res.assert_ack();
    assert_eq!(res.header("bits-received-content-range"), Some("100000"));
    // Overlapping the held bytes: only [100000, 250000) is new.
    let res = client.fragment(path, &sid, &data, 60_000, 190_000).await;
    res.assert_ack();
    assert_eq!(res.header("bits-received-content-range"), Some("250000"));
    let index: Vec<(u64, u64)> = node
        .state
        .fragments(&id)
        .await
        .unwrap()
        .iter()
        .map(|f| (f.entry.offset, f.entry.len))
        .collect();
    assert_eq!(index, vec![(0, 100_000), (100_000, 150_000)]);
    let res = client.fragment(path, &sid, &data, 250_000, 50_000).await;
    res.assert_ack();
    assert_eq!(res.status, 200, "{res:?}");
    let stored = node
        .objects
        .read(&node.objects.file_key("early/overlap.bin"), None)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(stored, data, "the published upload, byte-exact");
}

/// The client sends part of a fragment and hangs up while the node's load is held back (the
/// early write has the bytes): nothing is stored, the offset stays, and the fragment sent
/// again is taken whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_during_the_load_leaves_no_object_and_no_offset() {
    let Some(node) = node("early-hangup").await else {
        return;
    };
    let path = "/upload/early/hangup.bin";
    let data = pattern(400_000, 14);
    let mut client = RawClient::connect(node.server.addr()).await;
    let sid = client.create_session(path).await;
    let id = id_of(&sid);

    let url = node.servers.postgres_url.clone();
    let locker = lock_pending_rows(&url).await;
    let request = bits_post_request(
        path,
        &[
            ("BITS-Packet-Type", "Fragment"),
            ("BITS-Session-Id", &sid),
            ("Content-Range", &format!("bytes 0-199999/{}", data.len())),
        ],
        &data[..200_000],
    );
    let mut tcp = tokio::net::TcpStream::connect(node.server.addr())
        .await
        .unwrap();
    // Headers and 150,000 of the 200,000 body bytes, then the client is gone.
    let cut = request.len() - 50_000;
    tcp.write_all(&request[..cut]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(tcp);
    tokio::time::sleep(Duration::from_millis(300)).await;
    locker.batch_execute("COMMIT;").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert!(objects_of(&node.objects, &id).await.is_empty());
    assert_eq!(node.state.load(&id).await.unwrap().unwrap().received, 0);
    let res = client.fragment(path, &sid, &data, 0, 200_000).await;
    res.assert_ack();
    assert_eq!(res.header("bits-received-content-range"), Some("200000"));
    let res = client.fragment(path, &sid, &data, 200_000, 200_000).await;
    assert_eq!(res.status, 200, "{res:?}");
    let stored = node
        .objects
        .read(&node.objects.file_key("early/hangup.bin"), None)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(stored, data);
}

/// Fragments of 4 MiB (under the part size: written early) answered without their bytes
/// being needed: one for a session that does not exist, one past the held bytes (a gap).
/// The node reads the rest of each body before it answers, so the client, which writes the
/// whole body first, gets its Ack instead of a reset, and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_body_is_needed_still_reaches_a_client_writing_megabytes() {
    let Some(node) = node("early-discard").await else {
        return;
    };
    let mut client = RawClient::connect(node.server.addr()).await;
    let path = "/upload/early/gap.bin";
    let data = pattern(9 * 1024 * 1024, 15);
    let big = 4 * 1024 * 1024;

    let ghost = format!("{{{}}}", SessionId::random());
    let res = client.fragment(path, &ghost, &data, 0, big).await;
    res.assert_error(500, "0x8020001f");
    assert!(objects_of(&node.objects, &id_of(&ghost)).await.is_empty());

    let sid = client.create_session(path).await;
    let res = client.fragment(path, &sid, &data, 1024 * 1024, big).await;
    assert_eq!(res.status, 416, "{res:?}");
    assert_eq!(res.header("bits-received-content-range"), Some("0"));
    assert!(objects_of(&node.objects, &id_of(&sid)).await.is_empty());
    // The same connection carries the upload on.
    let res = client.fragment(path, &sid, &data, 0, big).await;
    res.assert_ack();
    assert_eq!(
        res.header("bits-received-content-range"),
        Some(big.to_string().as_str())
    );
}
