//! `/readyz` of a farm node (the real binary) follows its object store's answer to its key:
//! a key whose write permission is taken away while the node runs makes it not ready
//! (fragments fail, so a balancer that asks `/readyz` should stop sending it any), and ready
//! again once the permission is back; a store that does not answer at all leaves it ready (an
//! outage hits every node alike). Skips with a printed reason when PostgreSQL or Garage is
//! not installed.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bitsd::storage::shared::objects::ObjectStoreConfig;
use bitsd_tests::farm_cluster::write_shared_config;
use bitsd_tests::farm_servers::FarmServers;
use bitsd_tests::{pattern, BitsdProcess, RawClient};

/// `/readyz`'s status.
async fn readyz(admin: SocketAddr) -> u16 {
    RawClient::connect(admin)
        .await
        .get("GET", "/readyz", &[])
        .await
        .status
}

/// Waits (up to 20 s: the node asks the store again every 5 s) until `/readyz` answers
/// `want`; panics with `what` otherwise.
async fn until_readyz(admin: SocketAddr, want: u16, what: &str) -> Duration {
    let start = Instant::now();
    loop {
        let got = readyz(admin).await;
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: /readyz still {got} after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_stores_refusal_of_the_key_and_not_its_outage() {
    let Some(FarmServers {
        pg: _pg,
        postgres_url: url,
        mut garage,
    }) = FarmServers::start().await
    else {
        return;
    };
    let key = garage.new_key(&["--read", "--write"]);
    let store = ObjectStoreConfig {
        access_key_id: Some(key.access_key.clone()),
        secret_access_key: Some(key.secret_key.clone()),
        max_retries: Some(0),
        connect_timeout_ms: Some(500),
        ..garage.object_store_config("ready")
    };
    let dir = tempfile::tempdir().unwrap();
    let config = write_shared_config(dir.path(), "bitsd", &url, &store);
    let log = dir.path().join("node.log");
    let (data, cfg, log_path) = (dir.path().join("node"), config.clone(), log.clone());
    let node = tokio::task::spawn_blocking(move || {
        BitsdProcess::start_logging(
            &data,
            &[
                "--config",
                cfg.to_str().unwrap(),
                "--admin-listen",
                "127.0.0.1:0",
            ],
            Some(&log_path),
        )
    })
    .await
    .unwrap();
    let admin = node.admin_addr.unwrap();
    assert_eq!(readyz(admin).await, 200);
    let data = pattern(4096, 7);
    let mut c = RawClient::connect(node.addr).await;
    let path = "/upload/ready-before.bin";
    let sid = c.create_session(path).await;
    assert_eq!(c.fragment(path, &sid, &data, 0, 4096).await.status, 200);

    // The key may no longer write: fragments fail, and the node says it is not ready.
    garage.cli(&[
        "bucket",
        "deny",
        "--write",
        &key.bucket,
        "--key",
        &key.access_key,
    ]);
    let path = "/upload/ready-denied.bin";
    let sid = c.create_session(path).await;
    let refused = c.fragment(path, &sid, &data, 0, 4096).await;
    assert_eq!(refused.status, 500, "{refused:?}");
    let took = until_readyz(admin, 503, "write permission taken away").await;
    println!("not ready {took:?} after the refused fragment");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("not ready") && logged.contains("bitsd-access-check"),
        "the log does not say why: {}",
        bitsd_tests::last_lines(&logged, 20)
    );

    // The permission is back: ready again, and the fragment the client re-sends goes in.
    garage.cli(&[
        "bucket",
        "allow",
        "--write",
        &key.bucket,
        "--key",
        &key.access_key,
    ]);
    let took = until_readyz(admin, 200, "write permission given back").await;
    println!("ready again {took:?} after the permission came back");
    assert_eq!(c.fragment(path, &sid, &data, 0, 4096).await.status, 200);

    // A store that does not answer: still ready, past the time a check's answer stands.
    garage.kill();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(readyz(admin).await, 200, "a store outage took the node out");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(readyz(admin).await, 200, "a store outage took the node out");
    drop(node);
}
