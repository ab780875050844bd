//! A packet a farm node refuses before any write (a total other than the upload's) gets the
//! same answer from a node that remembers the session (farm_recent.rs: it skips the load and
//! takes the client's offset as a hint) as from a node that loads it: the offset the session
//! really holds, never the client's claim, and session-not-found once another node ended the
//! session. Two in-process nodes on one real PostgreSQL and one real Garage; skips with a
//! printed reason when PostgreSQL or Garage is missing.
#![allow(clippy::unwrap_used)]

use bitsd_tests::farm_servers::{shared_nodes, FarmServers};
use bitsd_tests::{pattern, RawClient, RawResponse};

/// What a client can tell of a refusal: status, error code, the offset reported.
fn answer(r: &RawResponse) -> (u16, Option<String>, Option<String>) {
    r.assert_ack();
    (
        r.status,
        r.header("bits-error-code").map(str::to_owned),
        r.header("bits-received-content-range").map(str::to_owned),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembering_node_refuses_a_wrong_total_as_a_loading_node_does() {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let store = servers.garage.object_store_config("recent-refusals");
    let nodes = shared_nodes(&servers.postgres_url, &store, 2).await;
    let mut a = RawClient::connect(nodes[0].addr()).await;
    let mut b = RawClient::connect(nodes[1].addr()).await;
    let path = "/upload/recent/refusals.bin";
    let data = pattern(40_000, 31);
    // Node A creates the session and takes its first fragment: it remembers it at 10000 of
    // 40000 bytes.
    let sid = a.create_session(path).await;
    let ack = a.fragment(path, &sid, &data, 0, 10_000).await;
    assert_eq!(ack.header("bits-received-content-range"), Some("10000"));

    // A packet of another total, claiming offset 20000 (no node holds it): refused by both
    // nodes alike, with the offset the session holds.
    let other = pattern(50_000, 32);
    let loaded = b.fragment(path, &sid, &other, 20_000, 10_000).await;
    assert_eq!(
        answer(&loaded),
        (400, Some("0x80070057".into()), Some("10000".into())),
        "{loaded:?}"
    );
    let remembered = a.fragment(path, &sid, &other, 20_000, 10_000).await;
    assert_eq!(
        answer(&remembered),
        answer(&loaded),
        "the remembering node reports the client's offset as held: {remembered:?}"
    );

    // Node B cancels the session; the same packet to each node: session-not-found.
    b.cancel_session(path, &sid).await.assert_ack();
    let loaded = b.fragment(path, &sid, &other, 20_000, 10_000).await;
    loaded.assert_error(500, "0x8020001f");
    let remembered = a.fragment(path, &sid, &other, 20_000, 10_000).await;
    assert_eq!(
        answer(&remembered),
        answer(&loaded),
        "a session cancelled elsewhere is not found on the remembering node either: \
         {remembered:?}"
    );
}
