//! The shared backend when PostgreSQL or the object store is down: the packet gets a
//! transient 503 (BITS clients retry it), nothing acknowledged is lost, and the retry after
//! the outage goes on from the last Ack; and the real `bitsd` binary from a `[storage]
//! backend = "shared"` config file, one of two nodes SIGKILLed between fragments. Skips with a printed reason when PostgreSQL or
//! Garage is not installed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bitsd::storage::shared::objects::{ObjectStoreConfig, Objects};
use bitsd::{SharedStorage, StorageConfig};
use bitsd_tests::farm_cluster::{refused_start, write_shared_config};
use bitsd_tests::farm_servers::{shared_storage, FarmServers};
use bitsd_tests::{pattern, url_path, RawClient, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_or_object_store_down_gives_503_and_the_retry_resumes_from_the_last_ack() {
    let Some(FarmServers {
        pg,
        postgres_url: url,
        garage,
    }) = FarmServers::start_own().await
    else {
        return;
    };
    let store = ObjectStoreConfig {
        connect_timeout_ms: Some(500),
        request_timeout_secs: Some(3),
        max_retries: Some(0),
        retry_timeout_secs: Some(1),
        ..garage.object_store_config("outage")
    };
    let shared = SharedStorage {
        postgres_timeout: Duration::from_secs(2),
        postgres_open_commit: std::time::Duration::from_secs(60),
        ..shared_storage(&url, &store)
    };
    let node =
        TestServer::start_with(move |c| c.storage = StorageConfig::Shared(Box::new(shared))).await;
    let data = pattern(90_000, 7);
    let path = "/echo/outage";
    let mut client = RawClient::connect(node.addr()).await;
    let sid = client.create_session(path).await;
    let ack = client.fragment(path, &sid, &data, 0, 30_000).await;
    assert_eq!(ack.header("bits-received-content-range"), Some("30000"));

    // PostgreSQL stopped: a transient 503, the offset untouched.
    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.stop())
            .await
            .unwrap();
    }
    let mut client = RawClient::connect(node.addr()).await;
    let res = client.fragment(path, &sid, &data, 30_000, 30_000).await;
    assert_eq!(res.status, 503, "{res:?}");
    assert_eq!(res.header("bits-error-code"), Some("0x801901f7"), "{res:?}");
    // The admin API says the same: try again (not a 500 as for a broken store).
    for admin in ["/sessions", &format!("/sessions/{sid}"), "/metrics"] {
        let (status, text) = node.admin_text(admin).await;
        assert_eq!(status, 503, "{admin}: {text}");
    }
    {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.restart())
            .await
            .unwrap();
    }
    let mut client = RawClient::connect(node.addr()).await;
    let mut res = client.fragment(path, &sid, &data, 30_000, 30_000).await;
    for _ in 0..20 {
        if res.status == 200 {
            break;
        }
        // The pool may still hand out a connection of the old server once.
        tokio::time::sleep(Duration::from_millis(250)).await;
        client = RawClient::connect(node.addr()).await;
        res = client.fragment(path, &sid, &data, 30_000, 30_000).await;
    }
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.header("bits-received-content-range"), Some("60000"));

    // The object store killed: a transient 503, the offset untouched.
    let mut garage = garage;
    garage.kill();
    let mut client = RawClient::connect(node.addr()).await;
    let res = client.fragment(path, &sid, &data, 60_000, 30_000).await;
    assert_eq!(res.status, 503, "{res:?}");
    let garage = tokio::task::spawn_blocking(move || {
        garage.restart();
        garage
    })
    .await
    .unwrap();
    let mut client = RawClient::connect(node.addr()).await;
    let fin = client.fragment(path, &sid, &data, 60_000, 30_000).await;
    assert_eq!(fin.status, 200, "{fin:?}");
    let reply = url_path(fin.header("bits-reply-url").unwrap());
    let got = client.get("GET", &reply, &[]).await;
    assert_eq!(got.body, data, "nothing acknowledged was lost");
    drop(garage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_from_a_shared_config_file_continue_a_session_after_one_is_sigkilled() {
    let Some(FarmServers {
        pg: _pg,
        postgres_url: url,
        garage,
    }) = FarmServers::start().await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("farm.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\nbackend = \"shared\"\npostgres_url = \"{url}\"\n\n\
             [object_store]\nbucket = \"{}\"\nprefix = \"bin\"\nendpoint = \"{}\"\n\
             region = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            garage.bucket(),
            garage.endpoint(),
            garage.access().region,
            garage.access_key(),
            garage.secret_key()
        ),
    )
    .unwrap();
    let shown = bitsd_tests::check_config_ok(&config);
    assert!(shown.contains("storage       shared"), "{shown}");
    assert!(shown.contains(", prefix bin at http://"), "{shown}");
    assert!(
        shown.contains("at most 1073741824 bytes in memory (fragment_memory)"),
        "{shown}"
    );
    let (d1, d2) = (dir.path().join("n1"), dir.path().join("n2"));
    let cfg = config.to_str().unwrap().to_owned();
    let (n1, n2) = tokio::task::spawn_blocking(move || {
        let n1 = bitsd_tests::BitsdProcess::start(&d1, &["--config", &cfg]);
        let n2 = bitsd_tests::BitsdProcess::start(&d2, &["--config", &cfg]);
        (n1, n2)
    })
    .await
    .unwrap();
    let data = pattern(60_000, 9);
    let path = "/upload/bin/x.bin";
    let mut c1 = RawClient::connect(n1.addr).await;
    let sid = c1.create_session(path).await;
    let ack = c1.fragment(path, &sid, &data, 0, 30_000).await;
    assert_eq!(ack.header("bits-received-content-range"), Some("30000"));
    n1.kill(); // SIGKILL between two fragments
    let mut c2 = RawClient::connect(n2.addr).await;
    let fin = c2.fragment(path, &sid, &data, 30_000, 30_000).await;
    assert_eq!(fin.status, 200, "{fin:?}");
    assert_eq!(fin.header("bits-received-content-range"), Some("60000"));
    let objects =
        bitsd::storage::shared::objects::Objects::new(&garage.object_store_config("bin")).unwrap();
    let stored = objects
        .read(&objects.file_key("bin/x.bin"), None)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(stored, data);
    drop(n2);
}

/// A node asks the store once at start: a wrong secret or a bucket that does not exist stops
/// it there, with a message naming the store and what to check (before, it started, said it
/// was ready, and failed every fragment with a 500); a store that does not answer does not
/// (the node starts, logs it, and its fragments get 503 until the store is back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_to_start_on_a_store_that_refuses_its_key_or_bucket() {
    let Some(FarmServers {
        pg: _pg,
        postgres_url: url,
        garage,
    }) = FarmServers::start().await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let good = garage.object_store_config("startcheck");
    let read_only = garage.read_only_key();
    let cases = [
        (
            "wrong-secret",
            ObjectStoreConfig {
                secret_access_key: Some("0".repeat(64)),
                ..good.clone()
            },
        ),
        (
            "no-bucket",
            ObjectStoreConfig {
                bucket: "no-such-bucket".into(),
                ..good.clone()
            },
        ),
        // It may list the bucket, so only the write at start finds it out.
        (
            "read-only-key",
            ObjectStoreConfig {
                access_key_id: Some(read_only.access_key.clone()),
                secret_access_key: Some(read_only.secret_key.clone()),
                ..good.clone()
            },
        ),
    ];
    for (name, store) in cases {
        let (dir, url) = (dir.path().to_owned(), url.clone());
        let stderr = tokio::task::spawn_blocking(move || refused_start(&dir, name, &url, &store))
            .await
            .unwrap();
        let op = if name == "read-only-key" {
            "put startcheck/bitsd-access-check"
        } else {
            "list startcheck"
        };
        assert!(
            stderr.contains(&format!(
                "opening the shared storage backend: object store {op}"
            )) && stderr.contains("check the [object_store] bucket and credentials"),
            "{name}: {stderr}"
        );
    }
    // A store that does not answer (nothing listens on its port): the node starts.
    let down = ObjectStoreConfig {
        endpoint: Some(format!(
            "http://127.0.0.1:{}",
            bitsd_tests::garage::free_port()
        )),
        max_retries: Some(0),
        ..good.clone()
    };
    let log = dir.path().join("down.log");
    let config = write_shared_config(dir.path(), "down", &url, &down);
    let (data, cfg, log_path) = (dir.path().join("down"), config.clone(), log.clone());
    let node = tokio::task::spawn_blocking(move || {
        bitsd_tests::BitsdProcess::start_logging(
            &data,
            &["--config", cfg.to_str().unwrap()],
            Some(&log_path),
        )
    })
    .await
    .unwrap();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("the object store did not answer at start"),
        "{logged}"
    );
    drop(node);
    // With the right key the node starts, and its check leaves nothing in the bucket.
    let config = write_shared_config(dir.path(), "good", &url, &good);
    let data = dir.path().join("good");
    let node = tokio::task::spawn_blocking(move || {
        bitsd_tests::BitsdProcess::start(&data, &["--config", config.to_str().unwrap()])
    })
    .await
    .unwrap();
    let objects = Objects::new(&good).unwrap();
    let left = objects.list(objects.prefix()).await.unwrap();
    assert!(left.is_empty(), "left in the bucket: {left:?}");
    drop(node);
}
