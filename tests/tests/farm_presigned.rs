//! Reply downloads handed off to the object store (`[object_store] presigned_reply_secs`):
//! three in-process nodes on one PostgreSQL database and one Garage bucket. A node checks the
//! session, its route and its owner, then answers `307` to a URL presigned for the request's
//! method; the store serves the bytes (ranges included), and the node counts the redirected
//! range as delivered; the ranges again on moto (a second S3 implementation). Skips with a
//! printed reason when PostgreSQL, Garage (moto) or nginx is not installed (`.ci/run`
//! installs them).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bitsd::storage::shared::objects::{ObjectStoreConfig, Objects};
use bitsd::storage::shared::pg::{PgOptions, PgStateStore};
use bitsd_protocol::SessionId;
use bitsd_tests::farm_servers::{shared_nodes, StoreServers};
use bitsd_tests::nginx::Nginx;
use bitsd_tests::{pattern, url_path, RawClient, RawResponse, TestServer};

struct Farm {
    nodes: Vec<TestServer>,
    state: PgStateStore,
    endpoint: String,
    /// PostgreSQL and the store, kept alive for the test.
    _servers: StoreServers,
}

/// Three nodes on Garage.
async fn farm() -> Option<Farm> {
    Some(farm_on(StoreServers::garage().await?).await)
}

/// Three nodes on moto (a second S3 implementation; it checks no signature, so only what
/// does not depend on the store refusing a URL runs there).
async fn farm_on_moto() -> Option<Farm> {
    Some(farm_on(StoreServers::moto().await?).await)
}

async fn farm_on(servers: StoreServers) -> Farm {
    let mut store = servers.store.object_store_config("presigned");
    store.presigned_reply_secs = Some(300);
    let endpoint = store.endpoint.clone().unwrap();
    let nodes = shared_nodes(&servers.postgres_url, &store, 3).await;
    let state = PgStateStore::connect(&servers.postgres_url, PgOptions::default())
        .await
        .unwrap();
    Farm {
        nodes,
        state,
        endpoint,
        _servers: servers,
    }
}

impl Farm {
    /// An echo job of `data` uploaded through nginx (so its packets land on every node): its
    /// session id and reply path.
    async fn echo_job(&self, data: &[u8]) -> Option<(String, String)> {
        let addrs: Vec<SocketAddr> = self.nodes.iter().map(|n| n.addr()).collect();
        let nginx = tokio::task::spawn_blocking(move || Nginx::start(&addrs))
            .await
            .unwrap()?;
        let mut client = RawClient::connect(nginx.addr()).await;
        let (sid, fin) = client.upload("/echo/presigned", data, 10_000).await;
        assert_eq!(fin.status, 200, "{fin:?}");
        Some((sid, url_path(fin.header("bits-reply-url").unwrap())))
    }

    async fn covered(&self, sid: &str) -> u64 {
        let id: SessionId = sid.trim_matches(['{', '}']).parse().unwrap();
        let record = self.state.load(&id).await.unwrap().unwrap();
        record.reply.unwrap().delivered.covered()
    }

    /// Polls until the reply's delivered bytes reach `want` (recorded in the background).
    async fn wait_covered(&self, sid: &str, want: u64) -> u64 {
        let mut covered = 0;
        for _ in 0..50 {
            covered = self.covered(sid).await;
            if covered >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        covered
    }
}

/// Sends `method` for an absolute `http://host:port/...` URL (the presigned one) with the
/// URL's own `Host`, which the signature covers.
async fn fetch(url: &str, method: &str, headers: &[(&str, &str)]) -> RawResponse {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let addr: SocketAddr = host.parse().unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    RawClient::connect(addr).await.send(req.as_bytes()).await
}

/// The `Location` of a node's answer, after checking that it is a no-store 307 to the store.
fn location(res: &RawResponse, endpoint: &str) -> String {
    assert_eq!(res.status, 307, "{res:?}");
    assert_eq!(res.header("cache-control"), Some("no-store"), "{res:?}");
    let url = res.header("location").expect("a Location").to_string();
    assert!(url.starts_with(endpoint), "{url} is not on {endpoint}");
    assert!(url.contains("X-Amz-Signature="), "not presigned: {url}");
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_redirected_by_three_nodes_come_from_the_store_and_count_each_byte_once() {
    if let Some(farm) = farm().await {
        ranges_redirected_by_three_nodes(farm).await;
    }
}

/// The same on moto: its presigned GETs serve the ranges and the whole reply alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_redirected_to_a_second_s3_implementation_come_from_it() {
    if let Some(farm) = farm_on_moto().await {
        ranges_redirected_by_three_nodes(farm).await;
    }
}

async fn ranges_redirected_by_three_nodes(farm: Farm) {
    let data = pattern(30_000, 7);
    let Some((sid, reply)) = farm.echo_job(&data).await else {
        return;
    };
    let mut body = vec![0u8; data.len()];
    let mut counted = Vec::new();
    // Overlapping ranges, each redirected by another node.
    for (i, (a, b)) in [(0usize, 11_999usize), (8_000, 21_999), (20_000, 29_999)]
        .into_iter()
        .enumerate()
    {
        let range = format!("bytes={a}-{b}");
        let mut node = RawClient::connect(farm.nodes[i].addr()).await;
        let res = node.get("GET", &reply, &[("Range", &range)]).await;
        let url = location(&res, &farm.endpoint);
        assert!(res.body.is_empty(), "a redirect carries no reply bytes");
        let got = fetch(&url, "GET", &[("Range", &range)]).await;
        assert_eq!(got.status, 206, "{got:?}");
        assert_eq!(
            got.header("content-range"),
            Some(format!("bytes {a}-{b}/{}", data.len()).as_str())
        );
        assert_eq!(got.body, data[a..=b], "range {range} from the store");
        body[a..=b].copy_from_slice(&got.body);
        counted.push(farm.wait_covered(&sid, (b + 1) as u64).await);
    }
    assert_eq!(body, data);
    // Each redirect counted its range, once: 12000, then up to 22000, then all.
    assert_eq!(counted, vec![12_000, 22_000, 30_000]);

    // A whole GET: redirected too, the store answers 200 with every byte.
    let mut node = RawClient::connect(farm.nodes[0].addr()).await;
    let url = location(&node.get("GET", &reply, &[]).await, &farm.endpoint);
    let got = fetch(&url, "GET", &[]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_is_redirected_to_a_url_signed_for_head_only_and_counts_nothing() {
    let Some(farm) = farm().await else { return };
    let data = pattern(25_000, 8);
    let Some((sid, reply)) = farm.echo_job(&data).await else {
        return;
    };
    let mut node = RawClient::connect(farm.nodes[1].addr()).await;
    let url = location(&node.get("HEAD", &reply, &[]).await, &farm.endpoint);
    let head = fetch(&url, "HEAD", &[]).await;
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(head.header("content-length"), Some("25000"));
    assert!(head.header("etag").is_some(), "{head:?}");
    // The signature covers the method: the HEAD URL does not serve a GET.
    let get = fetch(&url, "GET", &[]).await;
    assert_eq!(get.status, 403, "a HEAD URL served a GET: {get:?}");
    // Nor does an altered URL (another object of the bucket).
    let other = url.replace("/reply", "/replx");
    let forged = fetch(&other, "HEAD", &[]).await;
    assert_eq!(forged.status, 403, "{forged:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(farm.covered(&sid).await, 0, "a HEAD delivers no bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_answers_itself_what_is_not_to_be_handed_off() {
    let Some(farm) = farm().await else { return };
    let data = pattern(20_000, 9);
    let Some((sid, reply)) = farm.echo_job(&data).await else {
        return;
    };
    let mut node = RawClient::connect(farm.nodes[2].addr()).await;
    // Another route's reply path for the same session: not found, and no URL given away.
    let other_route = reply.replacen("/echo/", "/upload/", 1);
    let res = node.get("GET", &other_route, &[]).await;
    assert_eq!(res.status, 404, "{res:?}");
    assert_eq!(res.header("location"), None);
    // An unknown session: the same.
    let unknown = reply.replace(
        sid.trim_matches(['{', '}']),
        "00000000-0000-4000-8000-000000000000",
    );
    let res = node.get("GET", &unknown, &[]).await;
    assert_eq!(res.status, 404, "{res:?}");
    assert_eq!(res.header("location"), None);
    // A range past the end: 416 from the node, with the reply's size.
    let res = node.get("GET", &reply, &[("Range", "bytes=20000-")]).await;
    assert_eq!(res.status, 416, "{res:?}");
    assert_eq!(res.header("content-range"), Some("bytes */20000"));
    assert_eq!(res.header("location"), None);
    assert_eq!(farm.covered(&sid).await, 0);
    // Several ranges: the node serves the first one itself and counts it.
    let res = node
        .get("GET", &reply, &[("Range", "bytes=100-199,500-599")])
        .await;
    assert_eq!(res.status, 206, "{res:?}");
    assert_eq!(res.header("location"), None);
    assert_eq!(res.body, data[100..200]);
    assert_eq!(farm.wait_covered(&sid, 100).await, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_given_out_before_close_finds_nothing_once_the_session_is_closed() {
    let Some(farm) = farm().await else { return };
    let data = pattern(15_000, 10);
    let Some((sid, reply)) = farm.echo_job(&data).await else {
        return;
    };
    let mut node = RawClient::connect(farm.nodes[0].addr()).await;
    let url = location(&node.get("GET", &reply, &[]).await, &farm.endpoint);
    assert_eq!(fetch(&url, "GET", &[]).await.body, data);
    node.close_session("/echo/presigned", &sid)
        .await
        .assert_ack();
    let res = node.get("GET", &reply, &[]).await;
    assert_eq!(res.status, 404, "a closed session's reply: {res:?}");
    // The reply object goes right after the Close's Ack (in the background): the URL, still
    // within its validity, then finds nothing.
    let mut status = 0;
    for _ in 0..50 {
        status = fetch(&url, "GET", &[]).await.status;
        if status == 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 404, "the reply object outlived its session");
}

#[test]
fn a_validity_longer_than_a_signature_can_last_is_refused_at_start() {
    let config = ObjectStoreConfig {
        bucket: "b".into(),
        endpoint: Some("http://127.0.0.1:9".into()),
        region: Some("garage".into()),
        access_key_id: Some("k".into()),
        secret_access_key: Some("s".into()),
        presigned_reply_secs: Some(604_801),
        ..ObjectStoreConfig::default()
    };
    let err = Objects::new(&config).unwrap_err().to_string();
    assert!(err.contains("at most 604800"), "{err}");
    let ok = ObjectStoreConfig {
        presigned_reply_secs: Some(604_800),
        ..config
    };
    assert!(Objects::new(&ok).is_ok());
}
