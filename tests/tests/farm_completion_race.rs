//! One session completed by two farm nodes at once: a client whose final fragment is still
//! being answered by one node re-sends it, and the balancer hands the re-send to another node.
//! Both nodes see the whole upload held and both run the completion step; the session lock of
//! one node does not exclude the other. The client must get the final Ack from either, and
//! what the first Ack promised (the published file, the reply) never changes afterwards.
//! Real in-process nodes on one PostgreSQL database and one Garage bucket; skips with a
//! printed reason when PostgreSQL or Garage is not installed (`.ci/run` installs them).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bitsd::{HandlerError, Reply, Route, Upload};
use bitsd_protocol::SessionId;
use bitsd_tests::farm_servers::Farm;
use bitsd_tests::shared_backend::{listed_keys, read_object};
use bitsd_tests::{pattern, url_path, RawResponse};

/// The reply of node `node`: node 0 answers after 300 ms with 100 000 bytes, node 1 after
/// 1.5 s with a few bytes of its own. A handler need not be deterministic (one that hands out
/// a ticket number is not), so the two runs' replies differ.
fn reply_of(node: usize) -> Vec<u8> {
    match node {
        0 => pattern(100_000, 7),
        _ => format!("reply of node {node}").into_bytes(),
    }
}

async fn farm() -> Option<Farm> {
    Farm::start("race", 2, |node, c| {
        let handler = move |_upload: Upload| async move {
            let wait = if node == 0 { 300 } else { 1500 };
            tokio::time::sleep(Duration::from_millis(wait)).await;
            Ok::<_, HandlerError>(Reply::bytes(reply_of(node)))
        };
        c.routes.push(Route::upload_reply("/ticket/", handler));
    })
    .await
}

/// Sends the final fragment (`at..data.len()`) of `sid` to node 0 and, `after` later, to
/// node 1 (the client's re-send), and returns both answers.
async fn final_twice(
    farm: &Farm,
    path: &str,
    sid: &str,
    data: &[u8],
    at: usize,
    after: Duration,
) -> [RawResponse; 2] {
    let mut sends = Vec::new();
    for (i, node) in farm.nodes.iter().enumerate() {
        let mut c = node.connect().await;
        let (path, sid, data) = (path.to_owned(), sid.to_owned(), data.to_vec());
        sends.push(tokio::spawn(async move {
            if i == 1 {
                tokio::time::sleep(after).await;
            }
            c.fragment(&path, &sid, &data, at, data.len() - at).await
        }));
    }
    let first = sends.remove(0).await.unwrap();
    let second = sends.remove(0).await.unwrap();
    [first, second]
}

/// Checks that both answers of [`final_twice`] are the final Ack of an upload of `len` bytes.
fn assert_both_final_acks(answers: &[RawResponse; 2], len: usize, round: impl std::fmt::Display) {
    for (node, a) in answers.iter().enumerate() {
        assert_eq!(a.status, 200, "round {round}, node {node}: {a:?}");
        a.assert_ack();
        assert_eq!(
            a.header("BITS-Received-Content-Range"),
            Some(len.to_string().as_str()),
            "round {round}, node {node}"
        );
    }
}

/// A plain upload whose final fragment both nodes take at once: both answer the final Ack
/// (neither says 403 because the other's publish marker or published file is there), and
/// the file is the upload, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_upload_completed_on_two_nodes_at_once_gets_the_final_ack_from_both() {
    let Some(farm) = farm().await else { return };
    let frag = 64 * 1024;
    for round in 0..12 {
        let path = format!("/upload/twice-{round}.bin");
        let data = pattern(4 * frag, round);
        let mut c = farm.nodes[0].connect().await;
        let sid = c.create_session(&path).await;
        for at in (0..data.len() - frag).step_by(frag) {
            c.fragment(&path, &sid, &data, at, frag).await.assert_ack();
        }
        // Spread the re-send over the first node's completion: at once, then later and later.
        let after = Duration::from_millis(round * 2);
        let answers = final_twice(&farm, &path, &sid, &data, data.len() - frag, after).await;
        assert_both_final_acks(&answers, data.len(), round);
        let key = farm.objects.file_key(&format!("twice-{round}.bin"));
        assert!(
            read_object(&farm.objects, &key).await == data,
            "round {round}: the published file is not the upload"
        );
    }
}

/// An upload-reply session whose final fragment both nodes take: node 0's handler answers
/// first and its Ack hands out the reply; node 1's handler answers later with other bytes.
/// The reply the first Ack promised stays the reply (node 1 answers with it, and every node
/// serves it whole), and the bucket keeps one reply object for the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_made_twice_by_two_nodes_is_the_first_one_stored_everywhere() {
    let Some(farm) = farm().await else { return };
    let path = "/ticket/job.bin";
    let data = pattern(256 * 1024, 3);
    let frag = 64 * 1024;
    let mut c = farm.nodes[0].connect().await;
    let sid = c.create_session(path).await;
    for at in (0..data.len() - frag).step_by(frag) {
        c.fragment(path, &sid, &data, at, frag).await.assert_ack();
    }
    // Node 1 takes the re-send while node 0's handler still runs.
    let answers = final_twice(
        &farm,
        path,
        &sid,
        &data,
        data.len() - frag,
        Duration::from_millis(100),
    )
    .await;
    let mut urls = Vec::new();
    for (node, a) in answers.iter().enumerate() {
        a.assert_ack();
        urls.push(
            a.header("BITS-Reply-URL")
                .unwrap_or_else(|| panic!("node {node}: no reply URL: {a:?}"))
                .to_owned(),
        );
    }
    assert_eq!(urls[0], urls[1], "both Acks name one reply");
    let reply_path = url_path(&urls[0]);
    for (node, server) in farm.nodes.iter().enumerate() {
        let mut c = server.connect().await;
        let head = c.get("HEAD", &reply_path, &[]).await;
        assert_eq!(head.status, 200, "node {node}: {head:?}");
        assert_eq!(
            head.header("Content-Length"),
            Some(reply_of(0).len().to_string().as_str()),
            "node {node}: the reply's length is not the first reply's"
        );
        let got = c.get("GET", &reply_path, &[]).await;
        assert_eq!(got.status, 200, "node {node}: {:?}", got.status);
        assert!(
            got.body == reply_of(0),
            "node {node}: the reply changed after the first Ack ({} bytes: {:?}…)",
            got.body.len(),
            String::from_utf8_lossy(&got.body[..got.body.len().min(40)])
        );
    }
    // The second run's reply object is gone (the node that lost deleted it).
    let id = sid.trim_matches(|c| c == '{' || c == '}');
    let prefix = farm
        .objects
        .session_prefix(&id.parse::<SessionId>().unwrap());
    let mut replies = Vec::new();
    for _ in 0..50 {
        replies = listed_keys(&farm.objects, &prefix).await;
        replies.retain(|k| k.contains("/reply"));
        if replies.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        replies.len(),
        1,
        "reply objects of the session: {replies:?}"
    );
}

/// A plain upload assembled as a multipart upload (21 MiB, 5 MiB parts) whose final fragment
/// both nodes take at once: one node works on the assembly, the other waits for it (without
/// the wait both sent the same parts and the store refused the completion, failing both).
/// Both answer the final Ack (the waiting node finds the session committed once the first
/// lets go of the assembly), and the file is the upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_assembly_completed_on_two_nodes_at_once_gets_the_final_ack() {
    const MIB: usize = 1024 * 1024;
    let Some(farm) = Farm::start("race-parts", 2, |_, c| {
        if let bitsd::StorageConfig::Shared(s) = &mut c.storage {
            s.object_store.part_size = Some(5 * MIB as u64);
            s.object_store.coalesce_fragments = Some(false);
        }
    })
    .await
    else {
        return;
    };
    for (round, after) in [0u64, 0, 0, 0, 40].into_iter().enumerate() {
        let name = format!("parts-{round}.bin");
        let path = format!("/upload/{name}");
        let data = pattern(21 * MIB, 40 + round as u64);
        let mut c = farm.nodes[0].connect().await;
        let sid = c.create_session(&path).await;
        for at in (0..data.len() - MIB).step_by(MIB) {
            c.fragment(&path, &sid, &data, at, MIB).await.assert_ack();
        }
        let at = data.len() - MIB;
        let answers =
            final_twice(&farm, &path, &sid, &data, at, Duration::from_millis(after)).await;
        assert_both_final_acks(&answers, data.len(), round);
        let key = farm.objects.file_key(&name);
        assert!(
            read_object(&farm.objects, &key).await == data,
            "round {round}: the published file is not the upload"
        );
    }
}
