//! A farm node remembers the sessions it wrote last, so that a later fragment on the same
//! node skips the session's load (at the remembered offset, or past it with the client's
//! offset taken as a hint); these tests make that memory stale on purpose (another node
//! moves the session on, completes it, cancels it), or send an offset that is not the
//! session's, to a node whose memory would accept it. The compare-and-set of the fragment's
//! commit must catch every case: nothing written on a wrong hint is ever referenced, and the
//! client gets the answer a node without the memory would give. Two in-process nodes on one
//! PostgreSQL database and one Garage bucket; skips with a printed reason when PostgreSQL or
//! Garage is missing.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bitsd::storage::shared::SharedBackend;
use bitsd_protocol::SessionId;
use bitsd_tests::farm_servers::{shared_nodes, FarmServers};
use bitsd_tests::garage::Garage;
use bitsd_tests::pg::PgCluster;
use bitsd_tests::shared_backend::{backend_on, listed_keys, pending_of, read_object};
use bitsd_tests::{pattern, url_path, RawClient, TestServer};

struct Farm {
    nodes: Vec<TestServer>,
    /// A node's backend without a server, to look into PostgreSQL and the bucket.
    backend: SharedBackend,
    _scratch: tempfile::TempDir,
    _pg: Arc<PgCluster>,
    _garage: Garage,
}

async fn farm() -> Option<Farm> {
    let FarmServers {
        pg,
        postgres_url: url,
        garage,
    } = FarmServers::start().await?;
    let store = garage.object_store_config("recent");
    let nodes = shared_nodes(&url, &store, 2).await;
    let scratch = tempfile::tempdir().unwrap();
    let backend = backend_on(&url, &store, scratch.path()).await;
    Some(Farm {
        nodes,
        backend,
        _scratch: scratch,
        _pg: pg,
        _garage: garage,
    })
}

impl Farm {
    async fn clients(&self) -> (RawClient, RawClient) {
        (
            RawClient::connect(self.nodes[0].addr()).await,
            RawClient::connect(self.nodes[1].addr()).await,
        )
    }

    /// The plain upload published at `path` (under `files/`), whole.
    async fn published(&self, path: &str) -> Vec<u8> {
        let objects = self.backend.objects();
        read_object(objects, &objects.file_key(path)).await
    }

    /// The objects recorded as pending for `id` (written, or about to be, and referenced by
    /// no commit).
    async fn pending(&self, id: &SessionId) -> Vec<String> {
        pending_of(&self.backend, id).await
    }
}

fn id_of(sid: &str) -> SessionId {
    sid.trim_matches(['{', '}']).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_node_never_takes_bytes_another_node_acknowledged() {
    let Some(farm) = farm().await else { return };
    let (mut a, mut b) = farm.clients().await;
    let path = "/upload/recent/stale.bin";
    let data = pattern(40_000, 7);
    // Node A creates the session and takes the first fragment: it remembers received 10000.
    let sid = a.create_session(path).await;
    let ack = a.fragment(path, &sid, &data, 0, 10_000).await;
    assert_eq!(ack.header("bits-received-content-range"), Some("10000"));
    // Node B takes the next 15000 bytes: the session is at 25000.
    let ack = b.fragment(path, &sid, &data, 10_000, 15_000).await;
    assert_eq!(ack.header("bits-received-content-range"), Some("25000"));

    // A client that never saw B's Ack re-sends from 10000 to node A, with other bytes (a
    // buggy or hostile client): exactly what A's memory would accept. A must answer with the
    // offset that won and keep none of these bytes.
    let mut other = data.clone();
    other[10_000..20_000].fill(0xEE);
    let stale = a.fragment(path, &sid, &other, 10_000, 10_000).await;
    stale.assert_ack();
    assert_eq!(stale.status, 200, "{stale:?}");
    assert_eq!(
        stale.header("bits-received-content-range"),
        Some("25000"),
        "the stale node answers with the offset that won"
    );
    let id = id_of(&sid);
    let record = farm.backend.state().load(&id).await.unwrap().unwrap();
    assert_eq!(record.received, 25_000, "the offset never went back");

    // What A wrote for the lost commit is pending (the collector's), never in the index, and
    // the collector deletes it.
    let pending = farm.pending(&id).await;
    assert_eq!(pending.len(), 1, "{pending:?}");
    let orphan = bitsd::storage::shared::objects::ObjectKey::parse(&pending[0]).unwrap();
    assert!(
        farm.backend.objects().head(&orphan).await.is_ok(),
        "written, unreferenced"
    );
    assert_eq!(
        farm.backend
            .collect_pending_objects(Duration::ZERO)
            .await
            .unwrap(),
        1
    );
    assert!(
        farm.backend.objects().head(&orphan).await.is_err(),
        "collected"
    );

    // The rest, alternating nodes: the file is the acknowledged bytes, byte-exact.
    let ack = a.fragment(path, &sid, &data, 25_000, 5_000).await;
    assert_eq!(ack.header("bits-received-content-range"), Some("30000"));
    let fin = b.fragment(path, &sid, &data, 30_000, 10_000).await;
    fin.assert_ack();
    assert_eq!(fin.status, 200, "{fin:?}");
    b.close_session(path, &sid).await.assert_ack();
    let stored = farm.published("recent/stale.bin").await;
    assert!(
        stored == data,
        "the published file is what was acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_fragment_resent_to_a_stale_node_gets_the_completions_answer() {
    let Some(farm) = farm().await else { return };
    let (mut a, mut b) = farm.clients().await;
    let path = "/echo/recent";
    let data = pattern(30_000, 8);
    let sid = a.create_session(path).await;
    a.fragment(path, &sid, &data, 0, 10_000).await.assert_ack();
    // Node B takes the final fragment: the upload completes there and the echo reply is made.
    let fin = b.fragment(path, &sid, &data, 10_000, 20_000).await;
    fin.assert_ack();
    let reply_url = fin.header("bits-reply-url").unwrap().to_owned();
    // The client lost that Ack and re-sends the final fragment to node A, which still
    // remembers the session at 10000: the answer is the completion's, reply URL included,
    // as from any node.
    let again = a.fragment(path, &sid, &data, 10_000, 20_000).await;
    again.assert_ack();
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(
        again.header("bits-received-content-range"),
        Some("30000"),
        "{again:?}"
    );
    assert_eq!(
        again.header("bits-reply-url"),
        Some(reply_url.as_str()),
        "{again:?}"
    );
    let got = a.get("GET", &url_path(&reply_url), &[]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert!(got.body == data, "the reply, byte-exact");
    a.close_session(path, &sid).await.assert_ack();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_node_refuses_a_fragment_of_a_session_ended_elsewhere() {
    let Some(farm) = farm().await else { return };
    let (mut a, mut b) = farm.clients().await;
    for (n, end) in ["Cancel-Session", "Close-Session"].into_iter().enumerate() {
        let path = format!("/upload/recent/ended-{n}.bin");
        let data = pattern(20_000, 9 + n as u64);
        let sid = a.create_session(&path).await;
        a.fragment(&path, &sid, &data, 0, 10_000).await.assert_ack();
        let held = if end == "Cancel-Session" {
            b.cancel_session(&path, &sid).await.assert_ack();
            10_000
        } else {
            // Completed and closed on node B.
            b.fragment(&path, &sid, &data, 10_000, 10_000)
                .await
                .assert_ack();
            b.close_session(&path, &sid).await.assert_ack();
            20_000
        };
        // Node A remembers the session at 10000 and is sent exactly that.
        let late = a.fragment(&path, &sid, &data, 10_000, 10_000).await;
        late.assert_error(500, "0x8020001f");
        let id = id_of(&sid);
        assert!(
            farm.backend
                .state()
                .load(&id)
                .await
                .unwrap()
                .is_none_or(|r| r.state.is_terminal() && r.received == held),
            "{end}: the session stays ended where it was"
        );
        assert!(
            farm.pending(&id).await.is_empty(),
            "{end}: no object was written for an ended session"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembering_node_still_resumes_where_another_nodes_ack_left_the_session() {
    let Some(farm) = farm().await else { return };
    let (mut a, mut b) = farm.clients().await;
    let path = "/upload/recent/turns.bin";
    let data = pattern(60_000, 11);
    let sid = a.create_session(path).await;
    // A, A, B, A, B, B, A: every switch finds the other node's memory behind (the client's
    // offset is past it: taken as the hint, and right); every packet that stays finds it
    // current. No write is wasted.
    let plan = [
        (0usize, 0usize),
        (0, 10_000),
        (1, 20_000),
        (0, 25_000),
        (1, 40_000),
        (1, 45_000),
        (0, 50_000),
    ];
    for (i, &(node, first)) in plan.iter().enumerate() {
        let end = plan.get(i + 1).map(|p| p.1).unwrap_or(data.len());
        if end == first {
            continue;
        }
        let client = if node == 0 { &mut a } else { &mut b };
        let ack = client.fragment(path, &sid, &data, first, end - first).await;
        ack.assert_ack();
        assert_eq!(ack.status, 200, "{ack:?}");
        assert_eq!(
            ack.header("bits-received-content-range"),
            Some(end.to_string().as_str()),
            "{ack:?}"
        );
    }
    a.close_session(path, &sid).await.assert_ack();
    let stored = farm.published("recent/turns.bin").await;
    assert!(stored == data);
    assert!(farm.pending(&id_of(&sid)).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_upload_completed_elsewhere_is_never_written_again_by_a_stale_node() {
    let Some(farm) = farm().await else { return };
    let (mut a, mut b) = farm.clients().await;
    // Two sessions, each created on node A (which then remembers it receiving at offset 0,
    // total unknown) and completed on node B as a zero-byte upload (echo reply made).
    for stale_packet in ["the empty fragment again", "ten bytes"] {
        let path = "/echo/recent-empty";
        let sid = a.create_session(path).await;
        let fin = b.fragment(path, &sid, &[], 0, 0).await;
        fin.assert_ack();
        assert_eq!(fin.status, 200, "{fin:?}");
        let reply_url = fin.header("bits-reply-url").unwrap().to_owned();
        let id = id_of(&sid);
        let done = farm.backend.state().load(&id).await.unwrap().unwrap();

        if stale_packet == "ten bytes" {
            // Bytes for the finished empty upload, at node A's remembered offset: refused
            // as from any node (the upload's total is 0), nothing taken.
            let bytes = a.fragment(path, &sid, &[7u8; 10], 0, 10).await;
            bytes.assert_error(400, "0x80070057");
        } else {
            // The fragment re-sent to node A: the completion's answer, not a second
            // completion over B's.
            let again = a.fragment(path, &sid, &[], 0, 0).await;
            again.assert_ack();
            assert_eq!(again.status, 200, "{again:?}");
            assert_eq!(again.header("bits-reply-url"), Some(reply_url.as_str()));
        }
        let after = farm.backend.state().load(&id).await.unwrap().unwrap();
        assert_eq!(after.received, 0, "{stale_packet}");
        assert_eq!(after.total, Some(0), "{stale_packet}");
        assert_eq!(after.state, done.state, "{stale_packet}: {after:?}");
        assert_eq!(
            after.reply, done.reply,
            "{stale_packet}: the reply B made stays"
        );
        let got = a.get("GET", &url_path(&reply_url), &[]).await;
        assert_eq!(got.status, 200, "{got:?}");
        assert!(got.body.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offset_past_the_sessions_sent_to_a_remembering_node_gets_the_gap_answer() {
    let Some(farm) = farm().await else { return };
    let (mut a, mut b) = farm.clients().await;
    let path = "/upload/recent/gap.bin";
    let data = pattern(50_000, 12);
    let sid = a.create_session(path).await;
    a.fragment(path, &sid, &data, 0, 10_000).await.assert_ack();
    let ack = b.fragment(path, &sid, &data, 10_000, 10_000).await;
    assert_eq!(ack.header("bits-received-content-range"), Some("20000"));
    // Node A remembers 10000; the client claims 30000 (past what anyone holds). A takes the
    // client's offset as a hint, and the commit refuses it: the answer is the 416 of a gap,
    // with the offset held, as from a node that loaded the session.
    let gap = a.fragment(path, &sid, &data, 30_000, 10_000).await;
    assert_eq!(gap.status, 416, "{gap:?}");
    assert_eq!(gap.header("bits-received-content-range"), Some("20000"));
    let id = id_of(&sid);
    assert_eq!(
        farm.backend
            .state()
            .load(&id)
            .await
            .unwrap()
            .unwrap()
            .received,
        20_000
    );
    // The write the hint cost is pending, unreferenced, and collected.
    assert_eq!(farm.pending(&id).await.len(), 1);
    assert_eq!(
        farm.backend
            .collect_pending_objects(Duration::ZERO)
            .await
            .unwrap(),
        1
    );
    // The lost commit made A forget the session: the same gap again is loaded and refused
    // before any write (one wasted write at most per commit A made, not one per packet).
    // The load reserves the fragment's key (a pending row, no object) and the refusal
    // forgets the unused reservation in the background: the bucket is unchanged, and the
    // row goes without the collector.
    let objects = farm.backend.objects();
    let session_prefix = objects.session_prefix(&id);
    let before = listed_keys(objects, &session_prefix).await;
    let again = a.fragment(path, &sid, &data, 30_000, 10_000).await;
    assert_eq!(again.status, 416, "{again:?}");
    assert_eq!(
        listed_keys(objects, &session_prefix).await,
        before,
        "no second wasted write"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !farm.pending(&id).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the unused reservation is forgotten: {:?}",
            farm.pending(&id).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The client goes on from 20000 on either node; the file is byte-exact.
    let ack = a.fragment(path, &sid, &data, 20_000, 15_000).await;
    assert_eq!(ack.header("bits-received-content-range"), Some("35000"));
    let fin = b.fragment(path, &sid, &data, 35_000, 15_000).await;
    fin.assert_ack();
    assert_eq!(fin.status, 200, "{fin:?}");
    b.close_session(path, &sid).await.assert_ack();
    let stored = farm.published("recent/gap.bin").await;
    assert!(stored == data);
    assert!(farm.pending(&id).await.is_empty());
}
