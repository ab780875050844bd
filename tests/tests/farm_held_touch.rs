//! A fragment a farm node finds already held (a re-sent or overlapping packet) only touches
//! the session; that touch must never write back the record the node read over what another
//! node stored meanwhile. Here node B completes and publishes a plain upload while node A is
//! still reading the body of an already-held fragment of it: after A's answer the session
//! must still be complete and published, and the client's re-sent final fragment must get
//! the completion's answer (not a second publish refused with 403 because the published
//! file exists). Two in-process nodes on one real PostgreSQL and one real Garage, real TCP;
//! skips with a printed reason when PostgreSQL or Garage is missing.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bitsd::storage::shared::SharedBackend;
use bitsd::storage::{SessionRecord, SessionState};
use bitsd_protocol::SessionId;
use bitsd_tests::farm_servers::{shared_nodes, FarmServers};
use bitsd_tests::shared_backend::{backend_on, read_object};
use bitsd_tests::{bits_post_request, pattern, RawClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_fragment_read_while_another_node_completes_does_not_undo_the_completion() {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let store = servers.garage.object_store_config("held-touch");
    let nodes = shared_nodes(&servers.postgres_url, &store, 2).await;
    let scratch = tempfile::tempdir().unwrap();
    let backend = backend_on(&servers.postgres_url, &store, scratch.path()).await;
    let mut a = RawClient::connect(nodes[0].addr()).await;
    let mut slow = RawClient::connect(nodes[0].addr()).await;
    let mut b = RawClient::connect(nodes[1].addr()).await;
    let path = "/upload/held/touch.bin";
    let data = pattern(20_000, 41);
    let sid = a.create_session(path).await;
    let id: SessionId = sid.trim_matches(['{', '}']).parse().unwrap();
    let ack = a.fragment(path, &sid, &data, 0, 10_000).await;
    assert_eq!(ack.header("bits-received-content-range"), Some("10000"));

    // The first fragment again, to node A, whose body stops short: A has loaded the session
    // (receiving, 10000 held), found the packet held, and reads the body.
    let request = bits_post_request(
        path,
        &[
            ("BITS-Packet-Type", "Fragment"),
            ("BITS-Session-Id", &sid),
            ("Content-Range", "bytes 0-9999/20000"),
        ],
        &data[..10_000],
    );
    let (head, rest) = request.split_at(request.len() - 4_000);
    slow.write(head).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Meanwhile node B takes the final fragment: complete, published.
    let fin = b.fragment(path, &sid, &data, 10_000, 10_000).await;
    fin.assert_ack();
    assert_eq!(fin.status, 200, "{fin:?}");
    let done = stored(&backend, &id).await;
    assert!(
        done.committed && done.state == SessionState::Complete,
        "{done:?}"
    );

    // A's body ends; A answers the held packet.
    slow.write(rest).await;
    let held = slow.read_response(false).await;
    held.assert_ack();
    assert_eq!(held.status, 200, "{held:?}");

    let after = stored(&backend, &id).await;
    assert_eq!(
        (after.state, after.committed, after.received, after.total),
        (SessionState::Complete, true, 20_000, Some(20_000)),
        "the held packet's touch wrote node A's stale record over B's completion: {after:?}"
    );
    // The client lost B's Ack and re-sends the final fragment (to either node): the
    // completion's answer.
    for client in [&mut a, &mut b] {
        let again = client.fragment(path, &sid, &data, 10_000, 10_000).await;
        again.assert_ack();
        assert_eq!(again.status, 200, "{again:?}");
        assert_eq!(again.header("bits-received-content-range"), Some("20000"));
    }
    a.close_session(path, &sid).await.assert_ack();
    let objects = backend.objects();
    assert!(read_object(objects, &objects.file_key("held/touch.bin")).await == data);
}

/// The session's record as PostgreSQL holds it.
async fn stored(backend: &SharedBackend, id: &SessionId) -> SessionRecord {
    backend.state().load(id).await.unwrap().unwrap()
}
