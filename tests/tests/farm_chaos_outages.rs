//! The farm's single failures under concurrent load, with real `bitsd` binaries behind nginx
//! round robin and clients that retry like BITS (`bitsd_tests::bits_job`): PostgreSQL stopped
//! for a few seconds, one Garage node of a three-node replication-3 cluster SIGKILLed, and a
//! node SIGKILLed while a large fragment's body is streaming into it. Every job must finish
//! byte-exact, no session may restart from zero and no acknowledged offset may go back.
//! Skips with a printed reason when PostgreSQL, Garage or nginx is not installed.
#![allow(clippy::unwrap_used)]

mod chaos_support;

use std::time::{Duration, Instant};

use bitsd::storage::shared::objects::{ObjectStoreConfig, Objects};
use bitsd_tests::bits_job::RetryPolicy;
use bitsd_tests::farm_cluster::{shared_config, FarmCluster};
use bitsd_tests::farm_servers::{shared_storage, FarmServers};
use bitsd_tests::garage::GarageCluster;
use bitsd_tests::pg::PgCluster;
use bitsd_tests::{pattern, RawClient};

use chaos_support::{check_plain_uploads, plans, run_jobs, tally, MIB};

/// Three nodes of one config behind nginx, in a blocking task.
async fn cluster(configs: Vec<String>) -> Option<FarmCluster> {
    tokio::task::spawn_blocking(move || FarmCluster::start(&configs))
        .await
        .unwrap()
}

/// Object-store settings that give up quickly on a dead endpoint (the packet gets its 503
/// and the client retries on another node).
fn impatient(store: ObjectStoreConfig) -> ObjectStoreConfig {
    ObjectStoreConfig {
        connect_timeout_ms: Some(500),
        max_retries: Some(1),
        retry_timeout_secs: Some(2),
        ..store
    }
}

/// Waits (up to 30 s) until nginx has passed on `n` requests: the jobs are under way, most
/// of them past Create-Session.
async fn wait_for_requests(cluster: &FarmCluster, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.nginx().access_log().lines().count() < n {
        assert!(Instant::now() < deadline, "the jobs did not get going");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_seconds_under_concurrent_jobs_through_bitsd_loses_nothing() {
    // Its own cluster (`start_own`): stopping the binary's shared one would hit the other tests.
    let Some(FarmServers {
        pg,
        postgres_url: url,
        garage,
    }) = FarmServers::start_own().await
    else {
        return;
    };
    let store = garage.object_store_config("pgdown");
    let config = shared_config("", &url, 8, 2, &store);
    let Some(cluster) = cluster(vec![config.clone(), config.clone(), config]).await else {
        return;
    };
    // 24 jobs of 1-4 MiB in 32-256 KiB fragments: several hundred packets, still going on
    // when PostgreSQL stops.
    let jobs = plans(
        "pgdown",
        24,
        14,
        (MIB as u64, 4 * MIB as u64),
        (32_768, 262_144),
    );
    let addr = cluster.addr();
    let run = tokio::spawn({
        let jobs = jobs.clone();
        async move { run_jobs(addr, &jobs, &RetryPolicy::default()).await }
    });
    wait_for_requests(&cluster, 3 * jobs.len()).await;
    let stopped = Instant::now();
    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.stop())
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !run.is_finished(),
        "the jobs ended before PostgreSQL came back"
    );
    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.restart())
            .await
            .unwrap();
    }
    println!("PostgreSQL down for {:?}", stopped.elapsed());
    let results = run.await.unwrap();
    let (mut failures, transient) = tally(&jobs, &results);
    println!("transient answers: {transient:?}");
    let objects = Objects::new(&store).unwrap();
    failures.extend(check_plain_uploads(&objects, &jobs).await);
    assert!(
        failures.is_empty(),
        "{failures:#?}\n{}",
        cluster.log_tails(20)
    );
    assert!(
        transient.keys().any(|k| k.ends_with(": 503 0x801901f7")),
        "the outage never reached a client as the transient 503: {transient:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garage_node_killed_under_concurrent_jobs_through_bitsd_and_uploads_go_on() {
    let Some(mut garage) = tokio::task::spawn_blocking(GarageCluster::start)
        .await
        .unwrap()
    else {
        return;
    };
    let pg = match tokio::task::spawn_blocking(PgCluster::shared)
        .await
        .unwrap()
    {
        Ok(c) => c,
        Err(why) => return bitsd_tests::skip::missing(bitsd_tests::skip::Needs::Postgresql, why),
    };
    let url = {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.fresh_database())
            .await
            .unwrap()
    };
    // bitsd node i talks to Garage node i: killing Garage node 2 leaves bitsd node 2 without
    // its store (its packets get 503 and are retried on the others), and the writes of the
    // other two need the quorum of the two Garage nodes left.
    let configs: Vec<String> = (0..3)
        .map(|i| {
            shared_config(
                "",
                &url,
                8,
                5,
                &impatient(garage.object_store_config(i, "g3")),
            )
        })
        .collect();
    let Some(cluster) = cluster(configs).await else {
        return;
    };
    let jobs = plans(
        "g3",
        16,
        33,
        (MIB as u64, 6 * MIB as u64),
        (65_536, 2 * MIB as u64),
    );
    let addr = cluster.addr();
    let run = tokio::spawn({
        let jobs = jobs.clone();
        async move { run_jobs(addr, &jobs, &RetryPolicy::default()).await }
    });
    wait_for_requests(&cluster, 3 * jobs.len()).await;
    tokio::task::block_in_place(|| garage.kill(2));
    assert!(
        !run.is_finished(),
        "the jobs ended before the Garage node was killed"
    );
    let results = run.await.unwrap();
    let (mut failures, transient) = tally(&jobs, &results);
    println!("transient answers: {transient:?}");
    let objects = Objects::new(&garage.object_store_config(0, "g3")).unwrap();
    failures.extend(check_plain_uploads(&objects, &jobs).await);
    assert!(
        failures.is_empty(),
        "{failures:#?}\n{}",
        cluster.log_tails(20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sigkilled_mid_fragment_and_the_retry_on_another_node_resumes_from_the_last_ack() {
    let Some(FarmServers {
        pg: _pg,
        postgres_url: url,
        garage,
    }) = FarmServers::start().await
    else {
        return;
    };
    // Part size 5 MiB: the 8 MiB fragment goes to the store as a multipart upload, cut off
    // after its first part.
    let store = ObjectStoreConfig {
        part_size: Some(5 * MIB as u64),
        ..garage.object_store_config("midfrag")
    };
    let config = shared_config("", &url, 8, 5, &store);
    let Some(mut cluster) = cluster(vec![config.clone(), config.clone(), config]).await else {
        return;
    };
    let data = pattern(12 * MIB, 21);
    let path = "/upload/midfrag/big.bin";
    let mut client = RawClient::connect(cluster.addr()).await;
    let sid = client.create_session(path).await;
    let ack = client.fragment(path, &sid, &data, 0, MIB).await;
    ack.assert_ack();
    assert_eq!(ack.header("bits-received-content-range"), Some("1048576"));

    // An 8 MiB fragment straight to node 0, its body paused after 6 MiB (past the first
    // 5 MiB part), then node 0 SIGKILLed.
    let (first, len) = (MIB, 8 * MIB);
    let request = bitsd_tests::bits_post_request(
        path,
        &[
            ("BITS-Packet-Type", "Fragment"),
            ("BITS-Session-Id", &sid),
            (
                "Content-Range",
                &format!("bytes {}-{}/{}", first, first + len - 1, data.len()),
            ),
        ],
        &data[first..first + len],
    );
    let head = request.len() - len;
    let mut direct = RawClient::connect(cluster.node_addr(0)).await;
    direct.write(&request[..head + 6 * MIB]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tokio::task::block_in_place(|| cluster.kill(0));
    let cut = direct.try_send(&request[head + 6 * MIB..]).await;
    assert!(cut.is_err(), "the killed node answered: {cut:?}");

    // The client's retry goes through the balancer: node 0 refuses, so it lands on another
    // node, which knows the session at the last Ack and takes the fragment again.
    let mut client = RawClient::connect(cluster.addr()).await;
    let retry = client.fragment(path, &sid, &data, first, len).await;
    retry.assert_ack();
    assert_eq!(retry.status, 200, "{retry:?}");
    assert_eq!(retry.header("bits-received-content-range"), Some("9437184"));
    let node0 = cluster.node_addr(0).to_string();
    // nginx writes a request's line when it has finished it, just after the answer.
    let mut log = cluster.nginx().access_log();
    for _ in 0..100 {
        if log.lines().count() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        log = cluster.nginx().access_log();
    }
    assert_eq!(log.lines().count(), 3, "{log}");
    let last = log.lines().last().unwrap();
    let upstream = last.split_whitespace().next().unwrap();
    assert!(
        upstream.starts_with("upstream=") && !upstream.ends_with(&format!("={node0}")),
        "the retry was answered by node 0: {last}"
    );
    tokio::task::block_in_place(|| cluster.restart(0));
    let fin = client.fragment(path, &sid, &data, 9 * MIB, 3 * MIB).await;
    fin.assert_ack();
    assert_eq!(fin.status, 200, "{fin:?}");
    let objects = Objects::new(&store).unwrap();
    let key = objects.file_key("midfrag/big.bin");
    let stored = objects
        .read(&key, None)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(stored == data, "the upload in the bucket differs");
    let listed = objects.list(&objects.prefix().join("files")).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    client.close_session(path, &sid).await.assert_ack();
    println!(
        "unfinished multipart uploads left by the kill: {}",
        tokio::task::block_in_place(|| garage.unfinished_uploads())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_download_while_the_object_store_or_postgres_is_down_is_a_transient_503() {
    use bitsd::{SharedStorage, StorageConfig};
    let Some(FarmServers {
        pg,
        postgres_url: url,
        mut garage,
    }) = FarmServers::start_own().await
    else {
        return;
    };
    let shared = SharedStorage {
        postgres_timeout: Duration::from_secs(2),
        postgres_open_commit: std::time::Duration::from_secs(60),
        ..shared_storage(&url, &impatient(garage.object_store_config("replyout")))
    };
    let node = bitsd_tests::TestServer::start_with(move |c| {
        c.storage = StorageConfig::Shared(Box::new(shared));
    })
    .await;
    let data = pattern(40_000, 5);
    let mut client = node.connect().await;
    let (_sid, fin) = client.upload("/echo/replyout", &data, 40_000).await;
    let reply = bitsd_tests::url_path(fin.header("bits-reply-url").unwrap());
    let addr = node.addr();
    let get = |reply: String| async move {
        let mut c = RawClient::connect(addr).await;
        c.get("GET", &reply, &[]).await
    };

    // The store down: the reply cannot be read now, but nothing is lost: a transient 503
    // (a BITS client retries it), not 500.
    tokio::task::block_in_place(|| garage.kill());
    let res = get(reply.clone()).await;
    assert_eq!(res.status, 503, "store down: {res:?}");
    tokio::task::block_in_place(|| garage.restart());
    let res = get(reply.clone()).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(res.body == data);

    // PostgreSQL down: the reply's record cannot be looked up: the same transient 503.
    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.stop())
            .await
            .unwrap();
    }
    let res = get(reply.clone()).await;
    assert_eq!(res.status, 503, "PostgreSQL down: {res:?}");
    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.restart())
            .await
            .unwrap();
    }
    let mut res = get(reply.clone()).await;
    for _ in 0..20 {
        if res.status == 200 {
            break;
        }
        // The pool may still hand out a connection of the old server once.
        tokio::time::sleep(Duration::from_millis(250)).await;
        res = get(reply.clone()).await;
    }
    assert_eq!(res.status, 200, "{res:?}");
    assert!(res.body == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sigkilled_while_completing_a_plain_upload_and_the_retry_publishes_it_once() {
    let Some(FarmServers {
        pg: _pg,
        postgres_url: url,
        garage,
    }) = FarmServers::start().await
    else {
        return;
    };
    let store = ObjectStoreConfig {
        part_size: Some(5 * MIB as u64),
        ..garage.object_store_config("completion")
    };
    let config = shared_config("", &url, 8, 5, &store);
    let Some(mut cluster) = cluster(vec![config.clone(), config.clone(), config]).await else {
        return;
    };
    // 24 MiB in 1 MiB fragments: completing it assembles 24 fragment objects into 5 parts.
    let data = pattern(24 * MIB, 22);
    let path = "/upload/completion/done.bin";
    let mut client = RawClient::connect(cluster.addr()).await;
    let sid = client.create_session(path).await;
    for i in 0..23 {
        let ack = client.fragment(path, &sid, &data, i * MIB, MIB).await;
        assert_eq!(ack.status, 200, "{ack:?}");
    }
    // The final fragment straight to node 0, which is SIGKILLed as soon as it has committed
    // the last byte, while it assembles the file (before the file is published).
    let state = bitsd::storage::shared::pg::PgStateStore::connect(&url, Default::default())
        .await
        .unwrap();
    let id: bitsd_protocol::SessionId = sid.trim_matches(['{', '}']).parse().unwrap();
    let mut direct = RawClient::connect(cluster.node_addr(0)).await;
    let request = bitsd_tests::bits_post_request(
        path,
        &[
            ("BITS-Packet-Type", "Fragment"),
            ("BITS-Session-Id", &sid),
            (
                "Content-Range",
                &format!("bytes {}-{}/{}", 23 * MIB, 24 * MIB - 1, data.len()),
            ),
        ],
        &data[23 * MIB..],
    );
    direct.write(&request).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while state.load(&id).await.unwrap().unwrap().received < data.len() as u64 {
        assert!(
            Instant::now() < deadline,
            "node 0 never committed the last byte"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::task::block_in_place(|| cluster.kill(0));
    let answered = direct.try_send(b"").await;
    assert!(
        answered.is_err(),
        "node 0 answered before the kill: {answered:?}"
    );
    let objects = Objects::new(&store).unwrap();
    let listed = objects.list(&objects.prefix().join("files")).await.unwrap();
    assert!(
        listed.is_empty(),
        "node 0 published the file before the kill: the window was missed"
    );

    // The retry of the final fragment on another node completes the upload: published once,
    // byte-exact.
    let mut client = RawClient::connect(cluster.addr()).await;
    let fin = client.fragment(path, &sid, &data, 23 * MIB, MIB).await;
    fin.assert_ack();
    assert_eq!(fin.status, 200, "{fin:?}");
    assert_eq!(fin.header("bits-received-content-range"), Some("25165824"));
    let listed = objects.list(&objects.prefix().join("files")).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let stored = objects
        .read(&objects.file_key("completion/done.bin"), None)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(stored == data, "the published file differs from the upload");
    client.close_session(path, &sid).await.assert_ack();
}
