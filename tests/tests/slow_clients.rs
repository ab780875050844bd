//! Clients too slow to keep a server resource for long, over real TCP against a real server:
//! a Fragment body that trickles, a reply download that is never read.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bitsd_tests::{pattern, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads a response head from `rd`; its status code.
async fn status_of(rd: &mut (impl AsyncReadExt + Unpin)) -> u16 {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = rd.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_trickling_fragment_body_is_cut_off_after_the_grace_period_and_the_next_attempt_is_taken()
{
    let server = TestServer::start_with(|c| {
        c.session_limits.min_body_rate = 240;
        c.session_limits.min_body_rate_grace = Duration::from_secs(1);
    })
    .await;
    let mut c = server.connect().await;
    let sid = c.create_session("/upload/slow.bin").await;
    let data = pattern(1000, 1);

    let (mut rd, mut wr) = TcpStream::connect(server.addr())
        .await
        .unwrap()
        .into_split();
    let head = format!(
        "BITS_POST /upload/slow.bin HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Fragment\r\n\
         BITS-Session-Id: {sid}\r\nContent-Range: bytes 0-999/1000\r\nContent-Length: 1000\r\n\r\n"
    );
    wr.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    // One byte a second: never idle for long, far below 240 bytes/s.
    let body = data.clone();
    let trickle = tokio::spawn(async move {
        for b in body {
            if wr.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let status = tokio::time::timeout(Duration::from_secs(8), status_of(&mut rd))
        .await
        .expect("a body at 1 byte/s must be cut off soon after its 1 s grace period");
    assert_eq!(
        status, 500,
        "transient for the client: it sends the fragment again"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before the grace period"
    );
    trickle.abort();

    // The session lock went with the request: the next attempt is taken at once.
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        c.fragment("/upload/slow.bin", &sid, &data, 0, 1000),
    )
    .await
    .expect("the session is free for the next attempt");
    res.assert_ack();
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.header("bits-received-content-range"), Some("1000"));
}

#[tokio::test]
async fn a_fragment_at_a_fair_pace_is_not_cut_off() {
    let server = TestServer::start_with(|c| {
        c.session_limits.min_body_rate = 240;
        c.session_limits.min_body_rate_grace = Duration::from_millis(500);
    })
    .await;
    let mut c = server.connect().await;
    let sid = c.create_session("/upload/fair.bin").await;
    let data = pattern(2000, 2);
    let (mut rd, mut wr) = TcpStream::connect(server.addr())
        .await
        .unwrap()
        .into_split();
    let head = format!(
        "BITS_POST /upload/fair.bin HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Fragment\r\n\
         BITS-Session-Id: {sid}\r\nContent-Range: bytes 0-1999/2000\r\nContent-Length: 2000\r\n\r\n"
    );
    wr.write_all(head.as_bytes()).await.unwrap();
    // 500 bytes/s in 100-byte steps: slow, but above the minimum.
    for chunk in data.chunks(100) {
        wr.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = tokio::time::timeout(Duration::from_secs(5), status_of(&mut rd))
        .await
        .unwrap();
    assert_eq!(status, 200);
}

/// Open file descriptors of process `pid`.
/// Open file descriptors of `pid`, without its netlink sockets: the delivery tracking keeps
/// one sock_diag socket per thread for the life of the thread (opened at a thread's first
/// sample), which is not a resource of any one connection.
fn fds(pid: u32) -> usize {
    let netlink: std::collections::HashSet<String> =
        std::fs::read_to_string(format!("/proc/{pid}/net/netlink"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().last().map(|i| format!("socket:[{i}]")))
            .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .map(|t| !netlink.contains(&*t.to_string_lossy()))
                .unwrap_or(false)
        })
        .count()
}

/// An upload-reply of `len` bytes on `server`; the reply's path.
async fn echo_reply(addr: std::net::SocketAddr, len: usize) -> String {
    let mut c = bitsd_tests::RawClient::connect(addr).await;
    let data = pattern(len, 9);
    let (_sid, fin) = c.upload("/echo/big.bin", &data, 4 << 20).await;
    bitsd_tests::url_path(fin.header("bits-reply-url").unwrap())
}

/// A client socket that takes little at a time (a small receive buffer).
async fn slow_reader(addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

#[tokio::test]
async fn a_reply_download_that_is_never_read_is_dropped_after_the_send_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bitsd.toml");
    std::fs::write(&config, "send_idle_timeout_secs = 1\nmin_send_rate = 0\n").unwrap();
    let server = bitsd_tests::BitsdProcess::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let len = 16 << 20;
    let reply = echo_reply(server.addr, len).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = fds(server.pid());

    let mut stalled = slow_reader(server.addr).await;
    stalled
        .write_all(format!("GET {reply} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let serving = fds(server.pid());
    assert!(
        serving >= before + 2,
        "the connection and the reply file: {before} -> {serving}"
    );

    // It never reads: within a few seconds the server gives up and releases both.
    let deadline = Instant::now() + Duration::from_secs(8);
    while fds(server.pid()) > before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        fds(server.pid()),
        before,
        "connection and reply file released"
    );

    // What the client finds when it finally reads: part of the reply, then the end.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got += n,
            Err(_) => panic!("the server kept the connection open"),
        }
    }
    assert!(got < len, "the reply was cut off ({got} of {len} bytes)");
}

#[tokio::test]
async fn a_reply_download_below_the_minimum_rate_is_dropped() {
    let server = TestServer::start_with(|c| {
        c.send_limits.idle_timeout = Duration::from_secs(60);
        c.send_limits.min_rate = 1 << 20;
        c.send_limits.grace = Duration::from_millis(500);
    })
    .await;
    let len = 16 << 20;
    let reply = echo_reply(server.addr(), len).await;
    let mut slow = slow_reader(server.addr()).await;
    slow.write_all(format!("GET {reply} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // Reads 4 KiB every 100 ms: far below 1 MiB/s, never idle for long.
    let started = Instant::now();
    let mut got = 0usize;
    let mut buf = vec![0u8; 4096];
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(n)) => got += n,
            Err(_) => panic!("nothing for 10 s"),
        }
        assert!(started.elapsed() < Duration::from_secs(15), "never cut off");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(got < len, "{got}");
    assert!(ended < Duration::from_secs(15), "{ended:?}");
}

#[tokio::test]
async fn idle_connections_do_not_keep_their_slot() {
    let server = TestServer::start_with(|c| {
        c.header_read_timeout = Duration::from_secs(1);
        c.max_connections = 2;
    })
    .await;
    // Two connections that never send a request, and one that finished a request and stays.
    let mut silent = server.connect().await;
    let mut kept = server.connect().await;
    let ping = kept
        .bits_post("/upload/x", &[("BITS-Packet-Type", "Ping")], b"")
        .await;
    assert_eq!(ping.status, 200);
    assert!(
        silent.is_closed().await,
        "a connection that sends nothing is closed"
    );
    assert!(
        kept.is_closed().await,
        "an idle keep-alive connection is closed"
    );
    // The slots are free again.
    let mut c = server.connect().await;
    let ping = c
        .bits_post("/upload/x", &[("BITS-Packet-Type", "Ping")], b"")
        .await;
    assert_eq!(ping.status, 200);
}

#[tokio::test]
async fn a_pause_of_the_server_itself_is_not_held_against_the_client() {
    // The reply stalls 3 s before its first byte (a test server fault): only the time the
    // server waits for the client counts toward the minimum rate.
    let server = TestServer::start_with(|c| {
        c.send_limits.min_rate = 4 << 20;
        c.send_limits.grace = Duration::from_millis(500);
        c.fault_plan = Some(bitsd::FaultPlan::from_specs(1, &["GET:stall=3000"]).unwrap());
    })
    .await;
    let len = 8 << 20;
    let reply = echo_reply(server.addr(), len).await;
    // A client that keeps up well above the minimum, but whose socket fills now and then.
    let mut s = TcpStream::connect(server.addr()).await.unwrap();
    s.write_all(format!("GET {reply} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let body = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        if n == 0 {
            panic!("the download was cut off after {} bytes", got.len());
        }
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            if got.len() - (end + 4) >= len {
                break got.len() - (end + 4);
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert_eq!(body, len, "the whole reply after the pause");
}

#[test]
fn the_slow_client_keys_configure_the_limits_and_default_to_iis_values() {
    let defaults = bitsd::ServerConfig::default();
    assert_eq!(defaults.session_limits.min_body_rate, 240);
    assert_eq!(
        defaults.session_limits.min_body_rate_grace,
        Duration::from_secs(10)
    );
    assert_eq!(defaults.send_limits.min_rate, 240);
    assert_eq!(defaults.send_limits.grace, Duration::from_secs(10));
    assert_eq!(defaults.send_limits.idle_timeout, Duration::from_secs(60));

    let text = "min_body_rate = 1000\nmin_body_rate_grace_secs = 3\n\
                send_idle_timeout_secs = 20\nmin_send_rate = 0\nmin_send_rate_grace_secs = 5\n";
    let file = bitsd::config::ConfigFile::parse(text, "t.toml").unwrap();
    let mut config = bitsd::ServerConfig::default();
    file.apply(text, "t.toml", &mut config).unwrap();
    assert_eq!(config.session_limits.min_body_rate, 1000);
    assert_eq!(
        config.session_limits.min_body_rate_grace,
        Duration::from_secs(3)
    );
    assert_eq!(config.send_limits.idle_timeout, Duration::from_secs(20));
    assert_eq!(config.send_limits.min_rate, 0);
    assert_eq!(config.send_limits.grace, Duration::from_secs(5));
}
