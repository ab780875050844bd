//! The shared backend when PostgreSQL or the object store is down: the packet gets a
//! transient 503 (BITS clients retry it), nothing acknowledged is lost, and the retry after
//! the outage goes on from the last Ack. Skips with a printed reason when PostgreSQL or
//! Garage is not installed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bitsd::storage::shared::objects::ObjectStoreConfig;
use bitsd::{SharedStorage, StorageConfig};
use bitsd_tests::garage::Garage;
use bitsd_tests::pg::{ClusterOptions, PgCluster};
use bitsd_tests::{pattern, url_path, RawClient, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_or_object_store_down_gives_503_and_the_retry_resumes_from_the_last_ack() {
    let pg = match tokio::task::spawn_blocking(|| PgCluster::start(ClusterOptions::default()))
        .await
        .unwrap()
    {
        Ok(c) => std::sync::Arc::new(c),
        Err(why) => {
            eprintln!("skipping: {why}");
            return;
        }
    };
    let Some(garage) = tokio::task::spawn_blocking(Garage::start).await.unwrap() else {
        return;
    };
    let url = {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.fresh_database())
            .await
            .unwrap()
    };
    let shared = SharedStorage {
        postgres_url: url,
        postgres_max_connections: 4,
        postgres_timeout: Duration::from_secs(2),
        object_store: ObjectStoreConfig {
            bucket: garage.bucket().to_owned(),
            prefix: "outage".into(),
            endpoint: Some(garage.endpoint()),
            region: Some(garage.access().region.clone()),
            access_key_id: Some(garage.access_key().to_owned()),
            secret_access_key: Some(garage.secret_key().to_owned()),
            connect_timeout_ms: Some(500),
            request_timeout_secs: Some(3),
            max_retries: Some(0),
            retry_timeout_secs: Some(1),
            ..ObjectStoreConfig::default()
        },
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
