//! The shared (farm) backend end to end: three in-process bitsd nodes on one PostgreSQL
//! database and one Garage bucket, behind nginx round robin without stickiness. Skips with a
//! printed reason when PostgreSQL, Garage or nginx is not installed (`.ci/run` installs them).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bitsd::storage::shared::objects::Objects;
use bitsd::storage::shared::pg::{PgOptions, PgStateStore};
use bitsd_protocol::SessionId;
use bitsd_tests::farm_servers::{shared_nodes, FarmServers};
use bitsd_tests::garage::Garage;
use bitsd_tests::nginx::Nginx;
use bitsd_tests::pg::PgCluster;
use bitsd_tests::{pattern, url_path, RawClient, TestServer};

/// Three nodes on one database and one bucket, and what the test needs to look inside.
struct Farm {
    nodes: Vec<Option<TestServer>>,
    state: PgStateStore,
    objects: Objects,
    _pg: Arc<PgCluster>,
    _garage: Garage,
}

async fn farm() -> Option<Farm> {
    let FarmServers {
        pg,
        postgres_url: url,
        garage,
    } = FarmServers::start().await?;
    let store = garage.object_store_config("farm");
    let nodes = shared_nodes(&url, &store, 3)
        .await
        .into_iter()
        .map(Some)
        .collect();
    let state = PgStateStore::connect(&url, PgOptions::default())
        .await
        .unwrap();
    let objects = Objects::new(&store).unwrap();
    Some(Farm {
        nodes,
        state,
        objects,
        _pg: pg,
        _garage: garage,
    })
}

impl Farm {
    fn addrs(&self) -> Vec<std::net::SocketAddr> {
        self.nodes.iter().flatten().map(|n| n.addr()).collect()
    }

    async fn balancer(&self) -> Option<Nginx> {
        let addrs = self.addrs();
        tokio::task::spawn_blocking(move || Nginx::start(&addrs))
            .await
            .unwrap()
    }
}

/// The upstream of every request in nginx's access log, in order.
fn upstreams(nginx: &Nginx) -> Vec<String> {
    nginx
        .access_log()
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("upstream="))
                .map(str::to_owned)
        })
        .collect()
}

fn assert_each_on_another_node(ups: &[String]) {
    assert!(ups.len() >= 2, "{ups:?}");
    for w in ups.windows(2) {
        assert_ne!(w[0], w[1], "two consecutive packets on one node: {ups:?}");
    }
    let distinct: std::collections::HashSet<_> = ups.iter().collect();
    assert_eq!(distinct.len(), 3, "every node took packets: {ups:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_upload_and_echo_job_with_every_packet_on_another_node() {
    let Some(farm) = farm().await else { return };
    let Some(nginx) = farm.balancer().await else {
        return;
    };
    let mut client = RawClient::connect(nginx.addr()).await;

    // A plain upload in 4 fragments: each on a different node than the one before.
    let data = pattern(70_000, 1);
    let (_sid, fin) = client.upload("/upload/farm/a.bin", &data, 20_000).await;
    assert_eq!(fin.status, 200);
    let key = farm.objects.file_key("farm/a.bin");
    let stored = farm
        .objects
        .read(&key, None)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(stored, data, "the plain upload in the bucket, byte-exact");
    let files = farm
        .objects
        .list(&farm.objects.prefix().join("files"))
        .await
        .unwrap();
    assert_eq!(
        files.iter().filter(|o| o.key == key).count(),
        1,
        "exactly once: {files:?}"
    );
    assert_eq!(files.len(), 1, "{files:?}");
    // Overwrites are off: the destination is taken for every node.
    let again = client
        .bits_post(
            "/upload/farm/a.bin",
            &[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", bitsd_tests::PROTOCOL),
            ],
            b"",
        )
        .await;
    assert_eq!(again.status, 403, "{again:?}");

    // An upload-reply echo job: the reply is served byte-exact through the balancer.
    let data = pattern(50_000, 2);
    let (sid, fin) = client.upload("/echo/job", &data, 12_000).await;
    let reply = url_path(fin.header("bits-reply-url").unwrap());
    let got = client.get("GET", &reply, &[]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body, data, "reply byte-exact");
    let close = client.close_session("/echo/job", &sid).await;
    close.assert_ack();

    assert_each_on_another_node(&upstreams(&nginx));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_downloaded_in_three_ranges_through_three_nodes_counts_each_byte_once() {
    let Some(farm) = farm().await else { return };
    let Some(nginx) = farm.balancer().await else {
        return;
    };
    let mut client = RawClient::connect(nginx.addr()).await;
    let data = pattern(30_000, 3);
    let (sid, fin) = client.upload("/echo/ranges", &data, 30_000).await;
    let reply = url_path(fin.header("bits-reply-url").unwrap());
    let mut body = vec![0u8; data.len()];
    // Overlapping ranges: 0..12000, 8000..22000, 20000..30000.
    // Each range straight from another node, on a connection of its own (the same through a
    // balancer: farm_examples.rs, reply_progress_through_a_keepalive_balancer_is_counted_when_each_body_is_done).
    let addrs = farm.addrs();
    for (i, (a, b)) in [(0usize, 11_999usize), (8_000, 21_999), (20_000, 29_999)]
        .into_iter()
        .enumerate()
    {
        let range = format!("bytes={a}-{b}");
        let mut direct = RawClient::connect(addrs[i]).await;
        let got = direct.get("GET", &reply, &[("Range", &range)]).await;
        assert_eq!(got.status, 206, "{got:?}");
        assert_eq!(got.body, data[a..=b], "range {range}");
        body[a..=b].copy_from_slice(&got.body);
    }
    assert_eq!(body, data);

    // Each byte counted once, whichever node served it.
    drop(client);
    drop(nginx);
    let id: SessionId = sid.trim_matches(['{', '}']).parse().unwrap();
    let mut covered = 0;
    for _ in 0..50 {
        let record = farm.state.load(&id).await.unwrap().unwrap();
        covered = record.reply.unwrap().delivered.covered();
        if covered == data.len() as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(covered, data.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gone_between_fragments_and_the_next_node_resumes_from_the_last_ack() {
    let Some(mut farm) = farm().await else { return };
    let data = pattern(90_000, 4);
    let addrs = farm.addrs();
    let mut a = RawClient::connect(addrs[0]).await;
    let sid = a.create_session("/echo/resume").await;
    let ack = a.fragment("/echo/resume", &sid, &data, 0, 30_000).await;
    ack.assert_ack();
    assert_eq!(ack.header("bits-received-content-range"), Some("30000"));
    // Node 0 goes away (its process state, its connections) between two fragments.
    drop(a);
    let node = farm.nodes[0].take().unwrap();
    node.stop().await;

    // The client's next packet (a repeat of the acknowledged fragment, then the rest) lands
    // on node 1: the session is there, at the last Ack.
    let mut b = RawClient::connect(addrs[1]).await;
    let again = b.fragment("/echo/resume", &sid, &data, 0, 30_000).await;
    again.assert_ack();
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.header("bits-received-content-range"), Some("30000"));
    let next = b
        .fragment("/echo/resume", &sid, &data, 30_000, 30_000)
        .await;
    assert_eq!(next.header("bits-received-content-range"), Some("60000"));
    let mut c = RawClient::connect(addrs[2]).await;
    let fin = c
        .fragment("/echo/resume", &sid, &data, 60_000, 30_000)
        .await;
    fin.assert_ack();
    assert_eq!(fin.status, 200, "{fin:?}");
    let reply = url_path(fin.header("bits-reply-url").unwrap());
    let got = b.get("GET", &reply, &[]).await;
    assert_eq!(got.body, data, "the reply, byte-exact, from another node");
}
