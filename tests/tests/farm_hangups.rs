//! Clients that hang up in the middle of a body on a farm node. A node streams a fragment to
//! the store while it arrives (one PUT below `part_size`, a multipart upload above it), so a
//! body cut off must leave nothing the session or the bucket would later take for bytes: no
//! acknowledged offset moves, no object appears at the fragment's key, no multipart upload
//! stays unfinished, and the client's next attempt, on another node, resumes from the last
//! Ack. A reply download cut off counts only what the client read. Real in-process nodes on
//! one PostgreSQL database and one Garage bucket (the cut-off fragments again on Azurite),
//! raw TCP clients; skips with a printed reason when PostgreSQL, Garage or Azurite is not
//! installed (`.ci/run` installs them).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bitsd::storage::shared::objects::Objects;
use bitsd_tests::farm_servers::{shared_nodes, Farm, StoreServers};
use bitsd_tests::shared_backend::{listed_keys, read_object};
use bitsd_tests::{metric, pattern, TestServer};

const MIB: usize = 1024 * 1024;

/// The session's acknowledged offset as node `node`'s admin API reads it from PostgreSQL.
async fn received(node: &TestServer, sid: &str) -> u64 {
    let (status, json) = node.admin_get(&format!("/sessions/{sid}")).await;
    assert_eq!(status, 200, "{json}");
    json["upload"]["bytes_received"].as_u64().unwrap()
}

/// Sends the head of a Fragment promising `data[first..first + promised]`, then `sent` bytes
/// of its body, and waits for the node to take them; the connection is returned to be
/// dropped (the client hanging up).
async fn cut_off(
    node: &TestServer,
    path: &str,
    sid: &str,
    data: &[u8],
    first: usize,
    promised: usize,
    sent: usize,
) -> bitsd_tests::RawClient {
    let mut bad = node.connect().await;
    let head = format!(
        "BITS_POST {path} HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Fragment\r\nBITS-Session-Id: {sid}\r\n\
         Content-Range: bytes {first}-{}/{}\r\nContent-Length: {promised}\r\n\r\n",
        first + promised - 1,
        data.len()
    );
    bad.write(head.as_bytes()).await;
    bad.write(&data[first..first + sent]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    bad
}

/// Three fragments cut off on two nodes after the first 4096 bytes were acknowledged: one
/// below `part_size` (the default 8 MiB: a single PUT opened at its first byte) after 1000 of
/// its 10,000 bytes, the same with all but its last byte sent, and one of 9 MiB (a multipart
/// upload) after 8.5 MiB, when its first part is in the store. None moves the offset on
/// either node; the session's objects are the first fragment's alone; Garage has no
/// unfinished upload left; the rest of the upload, sent to the other node from 4096, is
/// published byte-exact. Without the writer's abort on drop the multipart case leaves an
/// unfinished upload, and a node that completed a cut-off PUT would leave a second object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragment_cut_off_mid_body_acknowledges_nothing_and_leaves_nothing_in_the_bucket() {
    let Some(farm) = Farm::start("hang", 2, |_, _| {}).await else {
        return;
    };
    let data = pattern(12 * MIB, 31);
    let path = "/upload/hangup.bin";
    let mut c = farm.nodes[0].connect().await;
    let sid = c.create_session(path).await;
    let res = c.fragment(path, &sid, &data, 0, 4096).await;
    res.assert_ack();
    assert_eq!(res.status, 200, "{res:?}");

    for (i, (promised, sent)) in [
        (10_000, 1000),
        (10_000, 9_999),
        (9 * MIB, 8 * MIB + MIB / 2),
    ]
    .into_iter()
    .enumerate()
    {
        drop(cut_off(&farm.nodes[i % 2], path, &sid, &data, 4096, promised, sent).await);
    }

    // Each node notices its client is gone and drops the fragment's writer; the abort of the
    // multipart upload runs in the background.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while farm.servers.garage.unfinished_uploads() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a cut-off fragment's multipart upload was left unfinished"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for node in &farm.nodes {
        assert_eq!(
            received(node, &sid).await,
            4096,
            "a cut-off body moved the offset"
        );
    }
    let id: bitsd_protocol::SessionId = sid.parse().unwrap();
    let session_objects = listed_keys(&farm.objects, &farm.objects.session_prefix(&id)).await;
    assert_eq!(
        session_objects.len(),
        1,
        "only the acknowledged fragment's object may be in the bucket: {session_objects:?}"
    );
    assert!(
        session_objects[0].contains("/frag/00000000000000000000-"),
        "{session_objects:?}"
    );

    // The client's next attempt, on the other node, resumes from the last Ack.
    let mut other = farm.nodes[1].connect().await;
    other.upload_from(path, &sid, &data, 4096, 2 * MIB).await;
    let file = farm.objects.file_key("hangup.bin");
    assert!(read_object(&farm.objects, &file).await == data);
    assert_eq!(farm.servers.garage.unfinished_uploads(), 0);
}

/// A client that hangs up in the middle of a reply download on a farm node: the reply was
/// made on node 0, node 1 streams it from the store, and the client reads about 1,000 bytes
/// and resets the connection. Both nodes report what the client read as transferred and not
/// the megabytes node 1 had read from the store or queued on the socket (the single node's
/// check, `reply_download.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_download_cut_off_on_another_node_counts_what_the_client_acknowledged() {
    let Some(farm) = Farm::start("hangreply", 2, |_, _| {}).await else {
        return;
    };
    bitsd_tests::reply_suite::progress_of_an_aborted_download_counts_what_the_client_acknowledged_not_what_was_sent(
        &farm.nodes[0],
        &farm.nodes[1],
    )
    .await;
}

/// The value of the gauge `name{state="state"}` in a node's `/metrics` (it must be there).
async fn gauge(node: &TestServer, name: &str, state: &str) -> u64 {
    let (status, text) = node.admin_text("/metrics").await;
    assert_eq!(status, 200, "{text}");
    metric(&text, &format!("{name}{{state=\"{state}\"}}")) as u64
}

/// A fragment of 9 MiB (a multipart upload: it reserves what it can hold, its 9 MiB, of the
/// node's `fragment_memory` before its body is read) whose client sends 1 MiB and then
/// stalls: the node's `/metrics` shows the reservation
/// (`bitsd_fragment_memory_bytes{state="used"}`) while it waits, and nothing held once the
/// client hung up, so a client that gives up never keeps a share of the budget. The PostgreSQL pool's gauges are there (`max` as configured,
/// 7 here; at least one connection open); a node on the local backend shows neither metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_fragments_memory_shows_in_metrics_and_goes_when_its_client_hangs_up() {
    let Some(farm) = Farm::start("hangmem", 1, |_, c| {
        if let bitsd::StorageConfig::Shared(s) = &mut c.storage {
            s.postgres_max_connections = 7;
        }
    })
    .await
    else {
        return;
    };
    let node = &farm.nodes[0];
    let memory = "bitsd_fragment_memory_bytes";
    assert_eq!(gauge(node, memory, "limit").await, 1 << 30);
    assert_eq!(gauge(node, memory, "used").await, 0);
    let pool = "bitsd_postgres_connections";
    assert_eq!(gauge(node, pool, "max").await, 7);
    assert!(gauge(node, pool, "open").await >= 1);
    assert_eq!(gauge(node, pool, "waiting").await, 0);

    let data = pattern(10 * MIB, 41);
    let path = "/upload/stalled.bin";
    let mut c = node.connect().await;
    let sid = c.create_session(path).await;
    let stalled = cut_off(node, path, &sid, &data, 0, 9 * MIB, MIB).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let used = gauge(node, memory, "used").await;
        if used >= 9 * MIB as u64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled fragment's reservation never showed: used {used}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(stalled);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gauge(node, memory, "used").await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a hung-up fragment kept its memory"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(received(node, &sid).await, 0);

    let local = TestServer::start().await;
    let (_, text) = local.admin_text("/metrics").await;
    assert!(text.contains("bitsd_sessions"), "{text}");
    assert!(
        !text.contains(memory) && !text.contains(pool),
        "a local node shows the farm's gauges:\n{text}"
    );
}

/// The cut-off fragments on Azure Blob Storage (Azurite), where nothing is streamed: a
/// fragment is held in the node's fragment memory until its last byte and then sent, one
/// PUT below `part_size` (4 MiB there) and a block list above it. After 4096 acknowledged
/// bytes, one of 10,000 bytes cut off after 1000 on node 0 and one of 6 MiB cut off after
/// 5 MiB on node 1 (its first 4 MiB block staged): each holds fragment memory while its
/// client stalls and none once it hung up, the offset stays 4096, the session's only blob
/// is the acknowledged fragment's, and the rest, sent to node 1 from 4096, is published
/// byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_azure_a_fragment_cut_off_mid_body_acknowledges_nothing_and_frees_its_memory() {
    let Some(servers) = StoreServers::azurite().await else {
        return;
    };
    let store = servers.store.object_store_config("hangaz");
    let nodes = shared_nodes(&servers.postgres_url, &store, 2).await;
    let objects = Objects::new(&store).unwrap();
    let data = pattern(8 * MIB, 43);
    let path = "/upload/hangup-azure.bin";
    let mut c = nodes[0].connect().await;
    let sid = c.create_session(path).await;
    let res = c.fragment(path, &sid, &data, 0, 4096).await;
    res.assert_ack();
    assert_eq!(res.status, 200, "{res:?}");

    let small = cut_off(&nodes[0], path, &sid, &data, 4096, 10_000, 1000).await;
    let large = cut_off(&nodes[1], path, &sid, &data, 4096, 6 * MIB, 5 * MIB).await;
    // Both hold memory while their clients stall: the small one its 10,000 bytes, the large
    // one two 4 MiB blocks' worth.
    let memory = "bitsd_fragment_memory_bytes";
    assert!(gauge(&nodes[0], memory, "used").await >= 10_000);
    assert!(gauge(&nodes[1], memory, "used").await >= 5 * MIB as u64);
    drop((small, large));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for node in &nodes {
        while gauge(node, memory, "used").await != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a hung-up fragment kept its memory"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            received(node, &sid).await,
            4096,
            "a cut-off body moved the offset"
        );
    }
    let id: bitsd_protocol::SessionId = sid.parse().unwrap();
    let blobs = listed_keys(&objects, &objects.session_prefix(&id)).await;
    assert_eq!(
        blobs.len(),
        1,
        "only the acknowledged fragment's blob may be in the container: {blobs:?}"
    );

    let mut other = nodes[1].connect().await;
    other.upload_from(path, &sid, &data, 4096, 2 * MIB).await;
    let file = objects.file_key("hangup-azure.bin");
    assert!(read_object(&objects, &file).await == data);
}
