//! The protocol suite on the shared backend through a load balancer: every exchange of
//! `fixtures/examples/*.json` (the runner of `examples.rs`: uploads, resumes, cancels, reply
//! downloads with GET, HEAD, ranges and 416, the error cases) replayed against three
//! in-process nodes on one PostgreSQL database and one Garage bucket behind nginx round
//! robin, with every packet of a scenario on another node than the one before (nginx's
//! access log says which node took each request). Published files are checked in the bucket.
//! The same suite runs once more on moto, a second S3 implementation, and on Azurite (Azure
//! Blob Storage's emulator). Skips with a printed
//! reason when PostgreSQL, Garage (moto) or nginx is not installed.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bitsd::storage::shared::objects::{ObjectKey, Objects};
use bitsd::storage::StorageError;
use bitsd::StorageConfig;
use bitsd_tests::examples::{replay, ScenarioConfig, Target, Targets};
use bitsd_tests::farm_servers::{shared_storage, StoreServers};
use bitsd_tests::nginx::Nginx;
use bitsd_tests::{reply_suite, TestServer};
use bytes::Bytes;

/// One database and bucket for a fixture file; each scenario gets three fresh nodes under a
/// prefix of its own (so its files and sessions' objects start empty) and its own nginx.
struct Farms {
    /// PostgreSQL and the store.
    servers: StoreServers,
    next: AtomicUsize,
    /// nginx keeps its upstream connections open between requests.
    keepalive: bool,
}

/// Three nodes behind nginx, and the bucket under the scenario's prefix.
struct Farm {
    nginx: Nginx,
    objects: Objects,
    nodes: Vec<TestServer>,
}

#[async_trait]
impl Targets for Farms {
    async fn start(&self, config: ScenarioConfig) -> Result<Box<dyn Target>, String> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let store = self
            .servers
            .store
            .object_store_config(&format!("examples-{n}"));
        let shared = shared_storage(&self.servers.postgres_url, &store);
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let s = shared.clone();
            nodes.push(
                TestServer::start_with(move |c| {
                    c.storage = StorageConfig::Shared(Box::new(s));
                    config.apply(c);
                })
                .await,
            );
        }
        let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr()).collect();
        let keepalive = self.keepalive;
        let nginx = tokio::task::spawn_blocking(move || {
            if keepalive {
                Nginx::start_keepalive(&addrs)
            } else {
                Nginx::start(&addrs)
            }
        })
        .await
        .unwrap()
        .ok_or("nginx is not installed")?;
        let objects = Objects::new(&store).map_err(|e| e.to_string())?;
        Ok(Box::new(Farm {
            nginx,
            objects,
            nodes,
        }))
    }
}

impl Farm {
    /// `<prefix>/<rel>`: where the local backend's `data_dir/<rel>` lies in the bucket
    /// (`files/…` published uploads, `sessions/…` the sessions' objects).
    fn key(&self, rel: &str) -> ObjectKey {
        self.objects.prefix().join(rel)
    }
}

#[async_trait]
impl Target for Farm {
    fn addr(&self) -> SocketAddr {
        self.nginx.addr()
    }

    /// The last node's: it lists every session of the farm from PostgreSQL.
    fn admin_addr(&self) -> SocketAddr {
        self.nodes.last().unwrap().admin_addr()
    }

    async fn put_file(&self, rel: &str, bytes: Vec<u8>) -> Result<(), String> {
        let mut w = self.objects.writer(self.key(rel));
        w.write_bytes(Bytes::from(bytes))
            .await
            .map_err(|e| e.to_string())?;
        w.finish().await.map(|_| ()).map_err(|e| e.to_string())
    }

    async fn read_file(&self, rel: &str) -> Result<Option<Vec<u8>>, String> {
        match self.objects.read(&self.key(rel), None).await {
            Ok(read) => read.bytes().await.map(Some).map_err(|e| e.to_string()),
            Err(StorageError::ObjectNotFound { .. }) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn list_dir(&self, rel: &str) -> Result<Vec<String>, String> {
        let listed = self
            .objects
            .list(&self.key(rel))
            .await
            .map_err(|e| e.to_string())?;
        Ok(listed.into_iter().map(|o| o.key.to_string()).collect())
    }

    /// Every request that reached a node went to another node than the one before.
    async fn finish(&self, requests: usize) -> Result<(), String> {
        // nginx logs a request after its answer went out: wait for every line.
        let mut log = self.nginx.access_log();
        for _ in 0..100 {
            if log.lines().count() >= requests {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            log = self.nginx.access_log();
        }
        let ups: Vec<&str> = log
            .lines()
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("upstream="))
            })
            .filter(|u| *u != "-")
            .collect();
        let distinct: std::collections::HashSet<&&str> = ups.iter().collect();
        if ups.is_empty() || distinct.len() < ups.len().min(3) {
            return Err(format!("the requests did not go round the nodes: {ups:?}"));
        }
        if let Some(w) = ups.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!(
                "two consecutive requests on node {}: {ups:?}",
                w[0]
            ));
        }
        Ok(())
    }
}

async fn farms() -> Option<Arc<Farms>> {
    farms_with(false).await
}

async fn farms_with(keepalive: bool) -> Option<Arc<Farms>> {
    farms_on(StoreServers::garage(), keepalive).await
}

/// The same farms on moto, a second S3 implementation (see `bitsd_tests::moto`).
async fn moto_farms() -> Option<Arc<Farms>> {
    farms_on(StoreServers::moto(), false).await
}

/// The same farms on Azurite (`service = "azure"`, see `bitsd_tests::azurite`).
async fn azure_farms() -> Option<Arc<Farms>> {
    farms_on(StoreServers::azurite(), false).await
}

async fn farms_on(
    servers: impl std::future::Future<Output = Option<StoreServers>>,
    keepalive: bool,
) -> Option<Arc<Farms>> {
    // nginx first: without it nothing here can run.
    bitsd_tests::nginx::nginx_binary()?;
    Some(Arc::new(Farms {
        servers: servers.await?,
        next: AtomicUsize::new(0),
        keepalive,
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_upload_reply_job_on_the_farm() {
    let Some(farms) = farms().await else { return };
    replay("a.json", "A", farms).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_resumed_upload_on_the_farm() {
    let Some(farms) = farms().await else { return };
    replay("b.json", "B", farms).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_cancel_on_the_farm() {
    let Some(farms) = farms().await else { return };
    replay("c.json", "C", farms).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_error_cases_on_the_farm() {
    let Some(farms) = farms().await else { return };
    replay("d.json", "D", farms).await;
}

/// The reply-download checks of `reply_download.rs` on one farm, each through nginx with
/// every request on another node than the one before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_download_and_progress_on_the_farm() {
    let Some(farms) = farms().await else { return };
    reply_downloads(&farms).await;
}

/// The checks of `reply_download.rs` on a new farm of `farms`.
async fn reply_downloads(farms: &Farms) {
    let farm = farms.start(ScenarioConfig::default()).await.unwrap();
    let t = farm.as_ref();
    reply_suite::head_full_ranged_resumed_and_past_end(t).await;
    reply_suite::reply_progress_counts_distinct_bytes(t).await;
    reply_suite::empty_reply_is_served_with_zero_length(t).await;
    reply_suite::reply_urls_are_not_guessable_across_routes_or_ids(t).await;
    reply_suite::multi_range_serves_the_first_satisfiable_range_and_huge_ends_are_clamped(t).await;
    farm.finish(1).await.unwrap();
}

/// Behind a balancer that keeps its upstream connections alive, a node counts a reply range
/// once the balancer's TCP stack acknowledged it, not when the upstream connection ends
/// (it does not end here): progress is current, and overlapping ranges count once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_progress_through_a_keepalive_balancer_is_counted_when_each_body_is_done() {
    let Some(farms) = farms_with(true).await else {
        return;
    };
    let farm = farms.start(ScenarioConfig::default()).await.unwrap();
    let t = farm.as_ref();
    reply_suite::reply_progress_counts_distinct_bytes(t).await;
    farm.finish(1).await.unwrap();
}

/// Every exchange of the fixtures and the reply-download checks on moto instead of Garage:
/// the farm keeps to what S3 promises, not to what one store happens to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_suite_on_a_second_s3_implementation() {
    if let Some(farms) = moto_farms().await {
        every_exchange_and_reply_download(farms).await;
    }
}

/// Every exchange of the fixtures and the reply-download checks on Azure Blob Storage
/// (Azurite): the same protocol, with a container's blobs and block lists for the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_suite_on_azure_blob_storage() {
    if let Some(farms) = azure_farms().await {
        every_exchange_and_reply_download(farms).await;
    }
}

/// Every exchange of the fixtures, then the reply-download checks, on `farms`.
async fn every_exchange_and_reply_download(farms: Arc<Farms>) {
    for (file, scenario) in [
        ("a.json", "A"),
        ("b.json", "B"),
        ("c.json", "C"),
        ("d.json", "D"),
    ] {
        replay(file, scenario, farms.clone()).await;
    }
    reply_downloads(&farms).await;
}
