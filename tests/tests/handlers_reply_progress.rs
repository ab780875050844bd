//! Reply progress through the admin JSON after every download pattern, for a by-value HTTP
//! backend reply.
#![allow(clippy::unwrap_used)]

mod handler_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bitsd::config::NotificationMode;
use bitsd_tests::{pattern, url_path};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use handler_support::*;

// ---------------------------------------------------------------------------------------------
// Reply progress through the admin JSON, for a by-value backend reply.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn reply_progress_after_each_download_pattern() {
    const REPLY_LEN: usize = 12 * 1024 * 1024;
    let reply = Arc::new(pattern(REPLY_LEN, 80));
    let backend = {
        let reply = Arc::clone(&reply);
        Backend::start(move |_| Answer::ok(reply.as_ref().clone())).await
    };
    let server = start(vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByValue,
        10,
    )])
    .await;
    let mut c = server.connect().await;
    let data = pattern(20_000, 81);
    let job = Job::start(&mut c, HOST, "/app/q.bin", data, 8192).await;

    // Before the reply exists: unknown.
    let p = progress(&server, &job.sid).await;
    assert_eq!(p["state"], "receiving");
    assert_eq!(p["upload"]["bytes_received"], 16_384);
    assert_eq!(p["upload"]["bytes_total"], 20_000);
    assert_eq!(p["reply"]["bytes_total"], serde_json::Value::Null);
    assert_eq!(p["reply"]["bytes_transferred"], serde_json::Value::Null);

    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    let path = url_path(&url);
    let transferred = |p: &serde_json::Value| p["reply"]["bytes_transferred"].as_u64().unwrap();
    let p = progress(&server, &job.sid).await;
    assert_eq!(p["state"], "reply-ready");
    assert_eq!(p["reply"]["bytes_total"], REPLY_LEN);
    assert_eq!(transferred(&p), 0);

    // HEAD transfers nothing.
    let head = c.get("HEAD", &path, &[]).await;
    assert_eq!(
        head.header("content-length"),
        Some(REPLY_LEN.to_string().as_str())
    );
    assert_eq!(transferred(&progress(&server, &job.sid).await), 0);

    // A ranged GET, then an overlapping one: distinct bytes only.
    let part = c.get("GET", &path, &[("Range", "bytes=0-999")]).await;
    assert_eq!(part.status, 206);
    assert!(part.body == reply[..1000]);
    assert_eq!(transferred(&progress(&server, &job.sid).await), 1000);
    let part = c.get("GET", &path, &[("Range", "bytes=500-1499")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 500-1499/{REPLY_LEN}").as_str())
    );
    assert!(part.body == reply[500..1500]);
    assert_eq!(transferred(&progress(&server, &job.sid).await), 1500);

    // An interrupted download: the client reads part of the body and drops the connection.
    // A small receive buffer keeps the kernel from taking the whole reply on its behalf.
    let read = {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        let mut stream = socket.connect(server.addr()).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        while got.len() < 300_000 {
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(got.starts_with(b"HTTP/1.1 200"));
        let body = &got[head_end..];
        assert!(body == &reply[..body.len()]);
        body.len()
    };
    // The server learns of the drop when its writes fail; wait until the attempt is counted.
    let deadline = Instant::now() + Duration::from_secs(5);
    let after_drop = loop {
        let t = transferred(&progress(&server, &job.sid).await);
        if t > 1500 || Instant::now() > deadline {
            break t;
        }
    };
    assert!(
        after_drop > 1500,
        "an interrupted download counts what the connection took ({after_drop})"
    );
    assert!(
        after_drop < REPLY_LEN as u64,
        "an interrupted download of {read} bytes counted {after_drop} of {REPLY_LEN}"
    );

    // Two full downloads: everything, counted once.
    for _ in 0..2 {
        let full = c.get("GET", &path, &[]).await;
        assert_eq!(full.status, 200);
        assert!(full.body == *reply);
        let p = progress(&server, &job.sid).await;
        assert_eq!(transferred(&p), REPLY_LEN as u64);
        assert_eq!(p["reply"]["bytes_total"], REPLY_LEN);
    }
    assert_eq!(backend.count(), 1);
}
