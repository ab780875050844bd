//! Server farms (§8): two bitsd nodes behind a "load balancer" (a TCP forwarder in the test).
//! The Create-Session Ack names the node (`BITS-Host-Id`); a client following it keeps its
//! session on that node. When the node dies and the fallback timeout passes, the client goes
//! back to the farm address, the other node answers session-not-found, and the client
//! restarts there and finishes.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bitsd_client::{
    BitsUploader, JobEvent, Progress, ProgressObserver, ReplyDestination, RetryPolicy,
};
use bitsd_tests::{pattern, TestServer};

/// Forwards every connection to the current backend.
async fn load_balancer(backend: Arc<Mutex<SocketAddr>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            let target = *backend.lock().unwrap();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

/// A node on its own loopback address, naming itself in `BITS-Host-Id`.
async fn node(ip: [u8; 4], fallback_secs: u32) -> TestServer {
    // Bind first to learn the port, then start the node with its own address as host id.
    let probe = std::net::TcpListener::bind(SocketAddr::from((ip, 0))).unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    TestServer::start_with(move |cfg| {
        cfg.listen = addr;
        cfg.host_id = Some(addr.to_string());
        cfg.host_id_fallback_timeout = Some(fallback_secs);
    })
    .await
}

struct Watch {
    events: Mutex<Vec<JobEvent>>,
    halfway: tokio::sync::Notify,
    fired: Mutex<bool>,
    threshold: u64,
}

impl ProgressObserver for Watch {
    fn progress(&self, p: &Progress) {
        let mut fired = self.fired.lock().unwrap();
        if !*fired && p.upload.bytes_transferred >= self.threshold {
            *fired = true;
            self.halfway.notify_one();
        }
    }
    fn event(&self, e: &JobEvent) {
        self.events.lock().unwrap().push(e.clone());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_id_keeps_the_node_then_falls_back_to_the_farm() {
    let node_a = node([127, 0, 0, 2], 1).await;
    let node_b = node([127, 0, 0, 3], 1).await;
    let backend = Arc::new(Mutex::new(node_a.addr()));
    let farm = load_balancer(backend.clone()).await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.bin");
    let data = pattern(4 * 1024 * 1024, 77);
    std::fs::write(&file, &data).unwrap();
    let watch = Arc::new(Watch {
        events: Mutex::new(Vec::new()),
        halfway: tokio::sync::Notify::new(),
        fired: Mutex::new(false),
        threshold: data.len() as u64 / 3,
    });
    let uploader = BitsUploader::builder()
        .fragment_size(64 * 1024)
        .retry_policy(RetryPolicy {
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
            max_retries: 100,
        })
        .observer(watch.clone())
        .build();
    let url = format!("http://{farm}/echo/job.bin");
    let job = tokio::spawn({
        let (uploader, url, file) = (uploader.clone(), url.clone(), file.clone());
        async move {
            uploader
                .upload_reply(&url, &file, ReplyDestination::Memory)
                .await
        }
    });

    // A third of the way in, node A dies; the balancer now sends new connections to B.
    watch.halfway.notified().await;
    let a_addr = node_a.addr();
    let (_, a_sessions) = node_a.admin_get("/sessions").await;
    assert_eq!(
        a_sessions.as_array().unwrap().len(),
        1,
        "the session lives on node A"
    );
    *backend.lock().unwrap() = node_b.addr();
    let _a_data = node_a.stop().await;

    let outcome = tokio::time::timeout(Duration::from_secs(60), job)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let reply = outcome.reply.unwrap();
    assert_eq!(
        reply.bytes.unwrap().as_ref(),
        data.as_slice(),
        "the reply from node B is the whole file"
    );
    assert_eq!(outcome.restarts, 1, "one restart, on node B");
    assert!(
        outcome.url.contains(&node_b.addr().to_string()),
        "finished on node B: {}",
        outcome.url
    );

    let events = watch.events.lock().unwrap().clone();
    let redirects: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            JobEvent::HostIdRedirect {
                url,
                fallback_timeout,
            } => Some((url.clone(), *fallback_timeout)),
            _ => None,
        })
        .collect();
    assert_eq!(redirects.len(), 2, "{events:?}");
    assert!(redirects[0].0.contains(&a_addr.to_string()));
    assert_eq!(redirects[0].1, Some(Duration::from_secs(1)));
    assert!(redirects[1].0.contains(&node_b.addr().to_string()));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, JobEvent::HostIdFallback { url: u } if *u == url)),
        "{events:?}"
    );
    let (_, b_sessions) = node_b.admin_get("/sessions").await;
    assert_eq!(b_sessions.as_array().unwrap().len(), 1);
}
