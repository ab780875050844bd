//! The nginx round-robin harness: consecutive requests of one client go to alternating
//! upstreams. Skips with a printed reason when nginx is not installed (`.ci/run` installs it).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use bitsd_tests::nginx::Nginx;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A tiny HTTP/1.1 server answering every request with `<name> <METHOD>` and closing.
async fn named_upstream(name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let method = String::from_utf8_lossy(&head)
                    .split(' ')
                    .next()
                    .unwrap_or("")
                    .to_string();
                let body = format!("{name} {method}");
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    });
    addr
}

/// Sends one request on a kept-alive connection and returns the response body.
async fn request(conn: &mut tokio::net::TcpStream, method: &str) -> String {
    let req = format!("{method} /x HTTP/1.1\r\nHost: farm\r\nContent-Length: 0\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap();
            if body.len() >= len {
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                return body[..len].to_string();
            }
        }
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "nginx closed the connection");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_sends_consecutive_requests_of_one_client_to_alternating_upstreams() {
    let a = named_upstream("a").await;
    let b = named_upstream("b").await;
    let Some(mut nginx) = tokio::task::spawn_blocking(move || Nginx::start(&[a, b]))
        .await
        .unwrap()
    else {
        return;
    };
    // One kept-alive client connection: still a different upstream each time.
    let mut conn = tokio::net::TcpStream::connect(nginx.addr()).await.unwrap();
    let mut names = Vec::new();
    for method in [
        "BITS_POST",
        "BITS_POST",
        "GET",
        "BITS_POST",
        "GET",
        "BITS_POST",
    ] {
        let body = request(&mut conn, method).await;
        let (name, seen) = body.split_once(' ').unwrap();
        assert_eq!(seen, method, "the method reaches the upstream as sent");
        names.push(name.to_string());
    }
    // The log line of the last request may land just after its response.
    let mut log = nginx.access_log();
    for _ in 0..50 {
        if log.lines().count() >= 6 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        log = nginx.access_log();
    }
    let served: Vec<&str> = log
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect::<Vec<_>>();
    assert_eq!(served.len(), 6, "{log}");
    for pair in served.windows(2) {
        assert_ne!(
            pair[0], pair[1],
            "consecutive requests on one upstream: {served:?}"
        );
    }
    for (i, name) in names.iter().enumerate() {
        let want = if served[i] == format!("upstream={a}") {
            "a"
        } else {
            "b"
        };
        assert_eq!(name, want);
    }
    tokio::task::block_in_place(|| nginx.stop());
    assert!(tokio::net::TcpStream::connect(nginx.addr()).await.is_err());
}
