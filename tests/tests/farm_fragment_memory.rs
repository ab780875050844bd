//! A farm node's memory for fragment bytes is bounded (`[object_store] fragment_memory`):
//! fragments that must hold their bytes share the node's budget, all or nothing, and a node
//! with no room answers 503 (retryable) before reading the body, while other fragments that
//! fit go on; a streamed fragment never waits, and streams on without a copy when the budget
//! is full; an upload's assembly and a reply past its first 64 KiB wait for room. Real
//! in-process nodes on one PostgreSQL database and one Garage bucket; skips with
//! a printed reason when PostgreSQL, Garage or nginx is not installed.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bitsd_tests::bits_post_request;
use bitsd_tests::farm_servers::{shared_nodes, Farm, FarmServers};
use bitsd_tests::nginx::Nginx;
use bitsd_tests::shared_backend::read_object;
use bitsd_tests::{pattern, RawClient};

const MIB: usize = 1024 * 1024;

/// A Fragment request for `data[first..first + len]` of an upload of `data.len()` bytes.
fn fragment_request(path: &str, sid: &str, data: &[u8], first: usize, len: usize) -> Vec<u8> {
    let range = format!("bytes {}-{}/{}", first, first + len - 1, data.len());
    bits_post_request(
        path,
        &[
            ("BITS-Packet-Type", "Fragment"),
            ("BITS-Session-Id", sid),
            ("Content-Range", &range),
        ],
        &data[first..first + len],
    )
}

/// A 4 MiB fragment of `data[0]` (session `sids[0]` at `paths[0]`) whose head and first half
/// are sent, so it holds 4 MiB of the budget while the rest waits; then a whole 4 MiB
/// fragment of `data[1]` on a connection of its own, refused with a retryable 503. Returns
/// the holder, its request and where its rest starts, the refused connection, and how long
/// the refusal took.
async fn hold_then_refuse<P: AsRef<str>>(
    node: &bitsd_tests::TestServer,
    paths: &[P],
    sids: &[String],
    data: &[Vec<u8>],
) -> (RawClient, Vec<u8>, usize, RawClient, Duration) {
    let first = fragment_request(paths[0].as_ref(), &sids[0], &data[0], 0, 4 * MIB);
    let split = first.len() - 2 * MIB;
    let mut holder = node.connect().await;
    holder.write(&first[..split]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut refused = node.connect().await;
    let started = Instant::now();
    let res = refused
        .fragment(paths[1].as_ref(), &sids[1], &data[1], 0, 4 * MIB)
        .await;
    let waited = started.elapsed();
    res.assert_error(503, "0x801901f7");
    (holder, first, split, refused, waited)
}

/// One node whose fragments are sent after their last byte (`stream_fragments = false`),
/// with a `fragment_memory` of 6 MiB.
async fn whole_fragments_in_6_mib(prefix: &str) -> Option<Farm> {
    Farm::start(prefix, 1, |_, c| {
        if let bitsd::StorageConfig::Shared(shared) = &mut c.storage {
            shared.object_store.stream_fragments = Some(false);
            shared.object_store.fragment_memory = Some(6 * MIB as u64);
        }
    })
    .await
}

/// With fragments sent after their last byte (`stream_fragments = false`) and a budget of
/// 6 MiB: a 4 MiB fragment whose body is still arriving holds 4 MiB, so a second 4 MiB
/// fragment waits for room and, finding none within the wait, answers 503 with a retryable
/// code without its session losing anything; a 1 MiB fragment fits beside the first and is
/// acknowledged at once (the budget is not a lock). Once the first is stored, the refused one
/// goes through when re-sent. Without the budget the second fragment is acknowledged at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_holding_their_bytes_share_the_budget_and_a_full_node_answers_503() {
    let Some(farm) = whole_fragments_in_6_mib("memory").await else {
        return;
    };
    let node = &farm.nodes[0];
    let data: Vec<Vec<u8>> = (0..3).map(|i| pattern(4 * MIB, 40 + i)).collect();
    let paths: Vec<String> = (0..3).map(|i| format!("/upload/memory-{i}.bin")).collect();
    let mut sids = Vec::new();
    for path in &paths {
        sids.push(node.connect().await.create_session(path).await);
    }

    // Session 0: the head and half of a 4 MiB fragment; the rest waits. Session 1: a whole
    // 4 MiB fragment does not fit beside it.
    let (mut holder, first, split, mut refused, waited) =
        hold_then_refuse(node, &paths, &sids, &data).await;
    assert!(
        waited >= Duration::from_secs(9),
        "the fragment was refused after {waited:?}, without waiting for room"
    );

    // Session 2: 1 MiB fits beside the held 4 MiB and is acknowledged at once.
    let small = node
        .connect()
        .await
        .fragment(&paths[2], &sids[2], &data[2], 0, MIB)
        .await;
    assert_eq!(small.status, 200, "{small:?}");

    // The held fragment completes; the refused one goes through when re-sent.
    holder.write(&first[split..]).await;
    let res = holder.read_response(false).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.header("bits-received-content-range"), Some("4194304"));
    let res = refused
        .fragment(&paths[1], &sids[1], &data[1], 0, 4 * MIB)
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.header("bits-received-content-range"), Some("4194304"));
    let res = node
        .connect()
        .await
        .fragment(&paths[2], &sids[2], &data[2], MIB, 3 * MIB)
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    for (i, d) in data.iter().enumerate() {
        let key = farm.objects.file_key(&format!("memory-{i}.bin"));
        assert!(
            read_object(&farm.objects, &key).await == *d,
            "upload {i} is not what was sent"
        );
    }
}

/// `fragment_memory_wait_secs` sets how long a fragment that does not fit waits for room:
/// with 1 s, a 4 MiB fragment beside a held one is refused after about a second (10 s by
/// default), and goes through once the held one is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragment_memory_wait_secs_sets_how_long_a_fragment_waits_for_room() {
    let Some(farm) = Farm::start("memory-wait", 1, |_, c| {
        if let bitsd::StorageConfig::Shared(shared) = &mut c.storage {
            shared.object_store.stream_fragments = Some(false);
            shared.object_store.fragment_memory = Some(6 * MIB as u64);
            shared.object_store.fragment_memory_wait_secs = Some(1);
        }
    })
    .await
    else {
        return;
    };
    let node = &farm.nodes[0];
    let data: Vec<Vec<u8>> = (0..2).map(|i| pattern(4 * MIB, 70 + i)).collect();
    let paths = ["/upload/wait-0.bin", "/upload/wait-1.bin"];
    let mut sids = Vec::new();
    for path in paths {
        sids.push(node.connect().await.create_session(path).await);
    }
    let (mut holder, first, split, mut refused, waited) =
        hold_then_refuse(node, &paths, &sids, &data).await;
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "refused after {waited:?}, not after the configured second"
    );
    holder.write(&first[split..]).await;
    assert_eq!(holder.read_response(false).await.status, 200);
    let res = refused
        .fragment(paths[1], &sids[1], &data[1], 0, 4 * MIB)
        .await;
    assert_eq!(res.status, 200, "{res:?}");
}

/// An upload's assembly streamed through the node counts in the same budget: with 4 MiB held
/// by a fragment still arriving and a budget of 6 MiB, the final fragment of a 4 MiB upload
/// in 1 MiB fragments is stored, but its assembly waits for room and answers 503; re-sent once
/// the held fragment is done, it publishes the file exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assembly_waits_for_room_in_the_budget_and_answers_503_without_it() {
    let Some(farm) = whole_fragments_in_6_mib("memory-assembly").await else {
        return;
    };
    let node = &farm.nodes[0];
    let held_data = pattern(4 * MIB, 50);
    let data = pattern(4 * MIB, 51);
    let (held_path, path) = ("/upload/assembly-held.bin", "/upload/assembly.bin");
    let held_sid = node.connect().await.create_session(held_path).await;
    let sid = node.connect().await.create_session(path).await;
    let mut c = node.connect().await;
    for at in (0..3 * MIB).step_by(MIB) {
        let res = c.fragment(path, &sid, &data, at, MIB).await;
        assert_eq!(res.status, 200, "{res:?}");
    }

    let first = fragment_request(held_path, &held_sid, &held_data, 0, 4 * MIB);
    let split = first.len() - MIB;
    let mut holder = node.connect().await;
    holder.write(&first[..split]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let res = c.fragment(path, &sid, &data, 3 * MIB, MIB).await;
    res.assert_error(503, "0x801901f7");
    let key = farm.objects.file_key("assembly.bin");
    assert!(
        farm.objects.head(&key).await.is_err(),
        "published without room"
    );

    holder.write(&first[split..]).await;
    let res = holder.read_response(false).await;
    assert_eq!(res.status, 200, "{res:?}");
    let res = c.fragment(path, &sid, &data, 3 * MIB, MIB).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.header("bits-received-content-range"), Some("4194304"));
    assert!(read_object(&farm.objects, &key).await == data);
}

/// Streamed fragments with a budget too small to keep any copy (1 KiB): every fragment is
/// streamed without one and stored exactly. Through a store that refuses unsigned payloads
/// (nginx answering 501), the first streamed fragment's PUT fails with no copy to send again:
/// 503, retryable; the node has noticed the refusal, and the re-sent fragment is sent whole,
/// signed, and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_fragment_goes_on_without_a_copy_when_the_budget_is_full() {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let mut store = servers.garage.object_store_config("memory-stream");
    store.fragment_memory = Some(1024);
    let nodes = shared_nodes(&servers.postgres_url, &store, 1).await;
    let data = pattern(3 * MIB, 7);
    let path = "/upload/memory-streamed.bin";
    let mut c = nodes[0].connect().await;
    let sid = c.create_session(path).await;
    for at in (0..data.len()).step_by(MIB) {
        let res = c.fragment(path, &sid, &data, at, MIB).await;
        assert_eq!(res.status, 200, "{res:?}");
    }
    let objects = bitsd::storage::shared::objects::Objects::new(&store).unwrap();
    let key = objects.file_key("memory-streamed.bin");
    assert!(read_object(&objects, &key).await == data);

    // A store that refuses unsigned payloads, behind nginx.
    let Some(proxy) = Nginx::start_refusing_unsigned_payloads(&[servers.garage.s3_addr()]) else {
        return;
    };
    let mut refusing = servers.garage.object_store_config("memory-refused");
    refusing.endpoint = Some(proxy.url());
    refusing.fragment_memory = Some(1024);
    let nodes = shared_nodes(&servers.postgres_url, &refusing, 1).await;
    let data = pattern(2 * MIB, 8);
    let path = "/upload/memory-refused.bin";
    let mut c: RawClient = nodes[0].connect().await;
    let sid = c.create_session(path).await;
    let res = c.fragment(path, &sid, &data, 0, MIB).await;
    res.assert_error(503, "0x801901f7");
    for at in (0..data.len()).step_by(MIB) {
        let res = c.fragment(path, &sid, &data, at, MIB).await;
        assert_eq!(res.status, 200, "{res:?}");
    }
    let objects = bitsd::storage::shared::objects::Objects::new(&refusing).unwrap();
    let key = objects.file_key("memory-refused.bin");
    assert!(read_object(&objects, &key).await == data);
    let log = proxy.access_log();
    assert_eq!(
        log.lines().filter(|l| l.contains("status=501")).count(),
        1,
        "one refused stream, then whole fragments:\n{log}"
    );
}

/// The whole of a reply streamed from a shared backend (`read_reply`).
async fn reply_bytes(
    backend: &bitsd::storage::shared::SharedBackend,
    id: &bitsd_protocol::SessionId,
    kind: &bitsd::storage::ReplyKind,
    len: u64,
) -> Vec<u8> {
    use bitsd::storage::SessionBackend;
    use futures_util::StreamExt;
    let mut stream = backend.read_reply(id, kind, 0, len).await.unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

/// Replies count in the same budget: while another session's 6 MiB fragment (a multipart
/// one, which reserves what it holds) takes the whole 6 MiB, a streamed reply's first 64 KiB
/// go through, its next bytes wait for room, and a reply stored from a 1 MiB file waits too;
/// once the fragment is gone both go on and are stored exactly. (Uncounted, both went through
/// at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_wait_for_room_in_the_budget_past_their_first_64_kib() {
    use bitsd::storage::shared::objects::MIN_PART_SIZE;
    use bitsd::storage::SessionBackend;
    use bytes::Bytes;
    let Some(farm) = bitsd_tests::shared_backend::farm("memory-reply", |store| {
        store.part_size = Some(MIN_PART_SIZE);
        store.fragment_memory = Some(6 * MIB as u64);
    })
    .await
    else {
        return;
    };
    let backend = &farm.backend;
    let sessions: Vec<_> = (0..2)
        .map(|_| bitsd_tests::pg::session_record(None))
        .collect();
    for s in &sessions {
        backend.create(s).await.unwrap();
    }
    let holder = bitsd_tests::shared_backend::hold_fragment_memory(backend, 6 * MIB as u64).await;

    let streamed = pattern(MIB, 60);
    let mut sink = backend.begin_reply(&sessions[0].id).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(1),
        sink.write(Bytes::copy_from_slice(&streamed[..64 * 1024])),
    )
    .await
    .expect("a reply's first 64 KiB wait for nothing")
    .unwrap();
    let rest = Bytes::copy_from_slice(&streamed[64 * 1024..]);
    let streaming = tokio::spawn(async move {
        sink.write(rest).await?;
        sink.finish().await
    });
    let from_file = pattern(MIB, 61);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("reply.bin");
    std::fs::write(&file, &from_file).unwrap();
    let stored_file = {
        let (farm_backend, id) = (backend.clone(), sessions[1].id);
        tokio::spawn(async move { farm_backend.store_reply_file(&id, &file).await })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!streaming.is_finished(), "a reply went on without room");
    assert!(
        !stored_file.is_finished(),
        "a reply file went on without room"
    );

    drop(holder);
    let kind = tokio::time::timeout(Duration::from_secs(8), streaming)
        .await
        .expect("the reply goes on once there is room")
        .unwrap()
        .unwrap();
    assert!(reply_bytes(backend, &sessions[0].id, &kind, MIB as u64).await == streamed);
    let kind = tokio::time::timeout(Duration::from_secs(8), stored_file)
        .await
        .expect("the reply file goes on once there is room")
        .unwrap()
        .unwrap();
    assert!(reply_bytes(backend, &sessions[1].id, &kind, MIB as u64).await == from_file);
}

/// Through a node: a reply handler's 1 MiB reply that finds no room in the budget within
/// `fragment_memory_wait_secs` (1 s) answers the job's final fragment with a retryable 503
/// and records nothing; re-sent once the fragment holding the budget is done, the final
/// fragment is acknowledged with the reply's URL and the reply downloads exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_without_room_answers_the_final_fragment_503_and_its_retry_gets_the_reply() {
    use bitsd::{HandlerError, Reply, Route, Upload};
    let reply = pattern(MIB, 80);
    let made = reply.clone();
    let Some(farm) = Farm::start("memory-reply-e2e", 1, move |_, c| {
        if let bitsd::StorageConfig::Shared(shared) = &mut c.storage {
            shared.object_store.stream_fragments = Some(false);
            shared.object_store.fragment_memory = Some(6 * MIB as u64);
            shared.object_store.fragment_memory_wait_secs = Some(1);
        }
        let made = made.clone();
        let handler = move |_upload: Upload| {
            let made = made.clone();
            async move { Ok::<_, HandlerError>(Reply::bytes(made)) }
        };
        c.routes.push(Route::upload_reply("/made/", handler));
    })
    .await
    else {
        return;
    };
    let node = &farm.nodes[0];
    let held = pattern(4 * MIB, 81);
    let held_path = "/upload/reply-held.bin";
    let held_sid = node.connect().await.create_session(held_path).await;
    let first = fragment_request(held_path, &held_sid, &held, 0, 4 * MIB);
    let split = first.len() - MIB;
    let mut holder = node.connect().await;
    holder.write(&first[..split]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The job's 10,000 bytes fit beside the held 4 MiB; its reply does not.
    let job = pattern(10_000, 82);
    let mut c = node.connect().await;
    let sid = c.create_session("/made/job").await;
    let res = c.fragment("/made/job", &sid, &job, 0, job.len()).await;
    res.assert_error(503, "0x801901f7");

    holder.write(&first[split..]).await;
    assert_eq!(holder.read_response(false).await.status, 200);
    let res = c.fragment("/made/job", &sid, &job, 0, job.len()).await;
    assert_eq!(res.status, 200, "{res:?}");
    let url = res.header("bits-reply-url").unwrap().to_owned();
    let got = c.get("GET", &bitsd_tests::url_path(&url), &[]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert!(got.body == reply, "the reply downloads exactly");
}
