//! The admin API of any node of a farm lists every session of the farm, read from
//! PostgreSQL: sessions created and advanced through node A are listed by node B with their
//! offsets, states and reply progress, page by page. Skips with a printed reason when
//! PostgreSQL or Garage is not installed.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use bitsd::{SharedStorage, StorageConfig};
use bitsd_tests::farm_servers::{self, FarmServers};
use bitsd_tests::{metric, pattern, url_path, RawClient, TestServer};
use serde_json::Value;

/// The farm's storage settings on `servers`, objects under `prefix`.
fn shared_storage(servers: &FarmServers, prefix: &str) -> SharedStorage {
    farm_servers::shared_storage(
        &servers.postgres_url,
        &servers.garage.object_store_config(prefix),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_lists_every_session_of_the_farm_with_its_offsets() {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let shared = shared_storage(&servers, "admin");
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let s = shared.clone();
        nodes.push(
            TestServer::start_with(move |c| c.storage = StorageConfig::Shared(Box::new(s))).await,
        );
    }
    let (a, b) = (&nodes[0], &nodes[1]);
    assert!(b
        .admin_get("/sessions")
        .await
        .1
        .as_array()
        .unwrap()
        .is_empty());

    // Through node A only: a plain upload half done, an echo job with its reply partly
    // downloaded, and a cancelled session.
    let mut c = RawClient::connect(a.addr()).await;
    let data = pattern(50_000, 1);
    let half = c.create_session("/upload/admin/half.bin").await;
    c.fragment("/upload/admin/half.bin", &half, &data, 0, 20_000)
        .await
        .assert_ack();
    let (job, fin) = c.upload("/echo/admin", &data[..30_000], 30_000).await;
    let reply = url_path(fin.header("bits-reply-url").unwrap());
    let got = c.get("GET", &reply, &[("Range", "bytes=0-9999")]).await;
    assert_eq!(got.status, 206, "{got:?}");
    drop(c); // the node settles what a connection took when it ends
    let mut c = RawClient::connect(a.addr()).await;
    let gone = c.create_session("/echo/admin").await;
    c.cancel_session("/echo/admin", &gone).await.assert_ack();

    // Node B has seen none of these packets and lists all three from PostgreSQL.
    let (status, all) = b.admin_get("/sessions").await;
    assert_eq!(status, 200, "{all}");
    let by_id: HashMap<String, Value> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_owned(), s.clone()))
        .collect();
    assert_eq!(by_id.len(), 3, "{all:#}");
    let s = &by_id[&half];
    assert_eq!(s["state"], "receiving");
    assert_eq!(s["upload"]["bytes_received"], 20_000);
    assert_eq!(s["upload"]["bytes_total"], 50_000);
    let s = &by_id[&job];
    assert_eq!(s["state"], "reply-ready");
    assert_eq!(s["upload"]["bytes_received"], 30_000);
    assert_eq!(s["reply"]["bytes_total"], 30_000);
    let s = &by_id[&gone];
    assert_eq!(s["state"], "cancelled");

    // Reply progress counted on node A is seen on node B (settled when A's connection ended).
    let mut transferred = Value::Null;
    for _ in 0..50 {
        let (_, one) = b.admin_get(&format!("/sessions/{job}")).await;
        transferred = one["reply"]["bytes_transferred"].clone();
        if transferred == 10_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(transferred, 10_000);

    // Pages: two, then the rest after the last id of the first, on the other node.
    let (_, first) = b.admin_get("/sessions?limit=2").await;
    let first = first.as_array().unwrap().clone();
    assert_eq!(first.len(), 2);
    let last = first[1]["id"].as_str().unwrap().trim_matches(['{', '}']);
    let (_, rest) = a
        .admin_get(&format!("/sessions?limit=2&after={last}"))
        .await;
    let rest = rest.as_array().unwrap().clone();
    assert_eq!(rest.len(), 1);
    let mut paged: Vec<String> = first
        .iter()
        .chain(&rest)
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    paged.sort();
    let mut ids: Vec<String> = by_id.keys().cloned().collect();
    ids.sort();
    assert_eq!(paged, ids, "the pages together are the farm's sessions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_farms_sessions_and_one_nodes_sweeper_expires_another_nodes_sessions() {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let shared = shared_storage(&servers, "sweep");
    // Node A never expires anything; node B expires what is idle for 2 s.
    let s = shared.clone();
    let a = TestServer::start_with(move |c| {
        c.storage = StorageConfig::Shared(Box::new(s));
        c.session_timeout = Duration::from_secs(3600);
        c.cleanup_interval = Duration::from_secs(3600);
    })
    .await;
    let s = shared.clone();
    let b = TestServer::start_with(move |c| {
        c.storage = StorageConfig::Shared(Box::new(s));
        c.session_timeout = Duration::from_secs(2);
        c.cleanup_interval = Duration::from_millis(200);
    })
    .await;

    // Through node A only: a half-done upload, a closed echo job (a tombstone), a cancelled
    // session (a tombstone), and a session kept busy.
    let mut c = RawClient::connect(a.addr()).await;
    let data = pattern(20_000, 4);
    let half = c.create_session("/upload/sweep/half.bin").await;
    c.fragment("/upload/sweep/half.bin", &half, &data, 0, 5_000)
        .await
        .assert_ack();
    let (closed, _) = c.upload("/echo/sweep", &data, 20_000).await;
    c.close_session("/echo/sweep", &closed).await.assert_ack();
    let cancelled = c.create_session("/echo/sweep").await;
    c.cancel_session("/echo/sweep", &cancelled)
        .await
        .assert_ack();
    let busy = c.create_session("/upload/sweep/busy.bin").await;

    // Node B has served none of these packets: its /metrics counts them from PostgreSQL.
    let text = b.admin_text("/metrics").await.1;
    assert_eq!(metric(&text, "bitsd_sessions{state=\"receiving\"}"), 2.0);
    assert_eq!(metric(&text, "bitsd_sessions{state=\"closed\"}"), 1.0);
    assert_eq!(metric(&text, "bitsd_sessions{state=\"cancelled\"}"), 1.0);
    assert_eq!(metric(&text, "bitsd_sessions{state=\"reply-ready\"}"), 0.0);

    // The busy session gets a fragment every 250 ms through node A while node B's sweeper
    // removes everything else (idle for more than 2 s).
    let busy_data = pattern(100_000, 5);
    let mut at = 0;
    for _ in 0..16 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        c.fragment("/upload/sweep/busy.bin", &busy, &busy_data, at, 1_000)
            .await
            .assert_ack();
        at += 1_000;
    }
    for sid in [&half, &closed, &cancelled] {
        let (status, _) = a.admin_get(&format!("/sessions/{sid}")).await;
        assert_eq!(status, 404, "{sid} expired by node B, tombstone included");
    }
    c.fragment("/upload/sweep/half.bin", &half, &data, 5_000, 1_000)
        .await
        .assert_error(500, "0x8020001f");
    let (status, json) = a.admin_get(&format!("/sessions/{busy}")).await;
    assert_eq!(status, 200, "the busy session stays: {json}");
    assert_eq!(json["upload"]["bytes_received"], 16_000);
    let text = a.admin_text("/metrics").await.1;
    assert_eq!(metric(&text, "bitsd_sessions{state=\"receiving\"}"), 1.0);
    assert_eq!(metric(&text, "bitsd_sessions{state=\"closed\"}"), 0.0);
    assert_eq!(metric(&text, "bitsd_sessions{state=\"cancelled\"}"), 0.0);
}
