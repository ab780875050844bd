//! Authentication, session ownership, session and disk limits, slow clients, TLS.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bitsd::{CredentialsAuthenticator, SessionLimits, SharedAuthenticator};
use bitsd_tests::{pattern, url_path, RawClient, TestServer, PROTOCOL};

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

async fn auth_server(limits: SessionLimits) -> TestServer {
    let alice = bitsd::auth::hash_password("alice-pw").unwrap();
    let bob = bitsd::auth::hash_password("bob-pw").unwrap();
    let auth = CredentialsAuthenticator::new("bitsd-test")
        .with_user("alice", &alice)
        .with_user("bob", &bob);
    TestServer::start_with(move |cfg| {
        cfg.auth = Some(SharedAuthenticator(Arc::new(auth)));
        cfg.session_limits = limits;
    })
    .await
}

async fn create_as(c: &mut RawClient, path: &str, auth: &str) -> bitsd_tests::RawResponse {
    c.bits_post(
        path,
        &[
            ("BITS-Packet-Type", "Create-Session"),
            ("BITS-Supported-Protocols", PROTOCOL),
            ("Authorization", auth),
        ],
        b"",
    )
    .await
}

#[tokio::test]
async fn credentials_are_required_and_sessions_belong_to_their_creator() {
    let server = auth_server(SessionLimits::default()).await;
    let mut c = server.connect().await;
    let alice = basic("alice", "alice-pw");
    let bob = basic("bob", "bob-pw");

    // D23: Ping without credentials → 401 Ack with a challenge.
    let res = c
        .bits_post("/echo/x.bin", &[("BITS-Packet-Type", "Ping")], b"")
        .await;
    res.assert_ack();
    assert_eq!(res.status, 401);
    assert!(res
        .header("www-authenticate")
        .unwrap()
        .starts_with("Basic realm=\"bitsd-test\""));
    let res = c
        .bits_post(
            "/echo/x.bin",
            &[
                ("BITS-Packet-Type", "Ping"),
                ("Authorization", &basic("alice", "nope")),
            ],
            b"",
        )
        .await;
    assert_eq!(res.status, 401);
    let res = c
        .bits_post(
            "/echo/x.bin",
            &[("BITS-Packet-Type", "Ping"), ("Authorization", &alice)],
            b"",
        )
        .await;
    assert_eq!(res.status, 200);

    // Alice's session.
    let created = create_as(&mut c, "/echo/x.bin", &alice).await;
    assert_eq!(created.status, 200);
    let sid = created.header("bits-session-id").unwrap().to_owned();
    let data = pattern(5000, 1);
    let frag = |auth: &str| {
        vec![
            ("BITS-Packet-Type", "Fragment".to_owned()),
            ("BITS-Session-Id", sid.clone()),
            ("Content-Range", "bytes 0-4999/5000".to_owned()),
            ("Authorization", auth.to_owned()),
        ]
    };
    let send = |h: Vec<(&'static str, String)>| {
        let data = data.clone();
        let addr = server.addr();
        async move {
            let mut c = RawClient::connect(addr).await;
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            c.bits_post("/echo/x.bin", &h, &data).await
        }
    };
    // Bob, and nobody, cannot touch it: to them it does not exist.
    send(frag(&bob)).await.assert_error(500, "0x8020001f");
    let anon = send(frag("")[..3].to_vec()).await;
    assert_eq!(anon.status, 401);
    let fin = send(frag(&alice)).await;
    assert_eq!(fin.status, 200);
    let path = url_path(fin.header("bits-reply-url").unwrap());
    assert_eq!(c.get("GET", &path, &[]).await.status, 401);
    assert_eq!(
        c.get("GET", &path, &[("Authorization", &bob)]).await.status,
        404
    );
    let reply = c.get("GET", &path, &[("Authorization", &alice)]).await;
    assert_eq!(
        (reply.status, reply.body.as_slice()),
        (200, data.as_slice())
    );
    let close = c
        .bits_post(
            "/echo/x.bin",
            &[
                ("BITS-Packet-Type", "Close-Session"),
                ("BITS-Session-Id", &sid),
                ("Authorization", &bob),
            ],
            b"",
        )
        .await;
    close.assert_error(500, "0x8020001f");
    let close = c
        .bits_post(
            "/echo/x.bin",
            &[
                ("BITS-Packet-Type", "Close-Session"),
                ("BITS-Session-Id", &sid),
                ("Authorization", &alice),
            ],
            b"",
        )
        .await;
    assert_eq!(close.status, 200);
}

#[tokio::test]
async fn bearer_tokens_authenticate() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    let digest = bitsd_tests::sha256_hex(b"robot-token");
    std::fs::write(&tokens, format!("robot:{digest}\n")).unwrap();
    let auth = CredentialsAuthenticator::new("r")
        .with_tokens_file(&tokens)
        .unwrap();
    let server =
        TestServer::start_with(move |cfg| cfg.auth = Some(SharedAuthenticator(Arc::new(auth))))
            .await;
    let mut c = server.connect().await;
    assert_eq!(
        create_as(&mut c, "/echo/x", "Bearer robot-token")
            .await
            .status,
        200
    );
    assert_eq!(
        create_as(&mut c, "/echo/x", "Bearer wrong").await.status,
        401
    );
}

#[tokio::test]
async fn per_user_and_total_session_limits() {
    let limits = SessionLimits {
        max_sessions: Some(5),
        max_sessions_per_user: Some(3),
        ..SessionLimits::default()
    };
    let server = auth_server(limits).await;
    let mut c = server.connect().await;
    let alice = basic("alice", "alice-pw");
    let bob = basic("bob", "bob-pw");
    let mut alices = Vec::new();
    for _ in 0..3 {
        let res = create_as(&mut c, "/echo/x", &alice).await;
        assert_eq!(res.status, 200);
        alices.push(res.header("bits-session-id").unwrap().to_owned());
    }
    let refused = create_as(&mut c, "/echo/x", &alice).await;
    refused.assert_error(503, "0x80070045");
    // Bob has his own allowance, up to the total of 5.
    assert_eq!(create_as(&mut c, "/echo/x", &bob).await.status, 200);
    assert_eq!(create_as(&mut c, "/echo/x", &bob).await.status, 200);
    create_as(&mut c, "/echo/x", &bob)
        .await
        .assert_error(503, "0x80070045");
    // Ending a session frees its slot.
    let res = c
        .bits_post(
            "/echo/x",
            &[
                ("BITS-Packet-Type", "Cancel-Session"),
                ("BITS-Session-Id", &alices[0]),
                ("Authorization", &alice),
            ],
            b"",
        )
        .await;
    assert_eq!(res.status, 200);
    assert_eq!(create_as(&mut c, "/echo/x", &alice).await.status, 200);
}

#[tokio::test]
async fn disk_reserve_refuses_new_work_and_damages_nothing() {
    let server = TestServer::start().await;
    let data = pattern(10_000, 3);
    let mut c = server.connect().await;
    let sid = c.create_session("/echo/r.bin").await;
    assert_eq!(
        c.fragment("/echo/r.bin", &sid, &data, 0, 5000).await.status,
        200
    );
    drop(c);
    // Restart with a reserve no disk can meet.
    let dir = server.stop().await;
    let server =
        TestServer::start_in(dir, |cfg| cfg.session_limits.min_free_disk = u64::MAX / 4).await;
    let mut c = server.connect().await;
    let res = c
        .bits_post(
            "/echo/r.bin",
            &[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", PROTOCOL),
            ],
            b"",
        )
        .await;
    res.assert_error(500, "0x80070070");
    let res = c.fragment("/echo/r.bin", &sid, &data, 5000, 5000).await;
    res.assert_error(500, "0x80070070");
    assert_eq!(res.header("bits-received-content-range"), Some("5000"));
    drop(c);
    // With room again, the session continues where it was.
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |cfg| cfg.session_limits.min_free_disk = 0).await;
    let mut c = server.connect().await;
    let fin = c.fragment("/echo/r.bin", &sid, &data, 5000, 5000).await;
    assert_eq!(fin.status, 200);
    assert_eq!(
        c.get("GET", &url_path(fin.header("bits-reply-url").unwrap()), &[])
            .await
            .body,
        data
    );
}

#[tokio::test]
async fn a_stalled_body_releases_the_session() {
    let server = TestServer::start_with(|cfg| {
        cfg.session_limits.body_idle_timeout = Duration::from_millis(300)
    })
    .await;
    let data = pattern(10_000, 4);
    let mut c = server.connect().await;
    let sid = c.create_session("/echo/slow.bin").await;
    // Send the head and half the body, then stall without closing.
    let mut slow = server.connect().await;
    let head = format!(
        "BITS_POST /echo/slow.bin HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Fragment\r\nBITS-Session-Id: {sid}\r\n\
         Content-Range: bytes 0-9999/10000\r\nContent-Length: 10000\r\n\r\n"
    );
    slow.write(head.as_bytes()).await;
    slow.write(&data[..5000]).await;
    let stalled = slow.read_response(false).await;
    stalled.assert_error(500, "0x80004005");
    // The session lock is free again: the client retries on a new connection.
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        c.fragment("/echo/slow.bin", &sid, &data, 0, 10_000),
    )
    .await
    .unwrap();
    assert_eq!(res.status, 200);
}

#[tokio::test]
async fn slowloris_headers_are_cut_off() {
    let server =
        TestServer::start_with(|cfg| cfg.header_read_timeout = Duration::from_millis(500)).await;
    let mut slow = server.connect().await;
    slow.write(b"BITS_POST /echo/x HTTP/1.1\r\nHost: x\r\n")
        .await;
    let started = std::time::Instant::now();
    assert!(
        slow.is_closed().await,
        "a connection that never finishes its head is closed"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_their_turn() {
    let server = TestServer::start_with(|cfg| cfg.max_connections = 2).await;
    let mut first = server.connect().await;
    let second = server.connect().await;
    // Both slots are taken (the first connection is served: make sure it was accepted).
    let ping = b"BITS_POST /echo/x HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Ping\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(first.send(ping).await.status, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = server.connect().await;
    third.write(ping).await;
    let waited = tokio::time::timeout(Duration::from_millis(700), third.read_response(false)).await;
    assert!(
        waited.is_err(),
        "a third connection is not served while two are open"
    );
    drop(second);
    let res = tokio::time::timeout(Duration::from_secs(5), third.read_response(false))
        .await
        .unwrap();
    assert_eq!(res.status, 200, "served once a slot frees up");
}

#[tokio::test]
async fn oversized_request_heads_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start().await;
    for (size, status) in [(70_000usize, "400"), (1_000_000, "431")] {
        let mut s = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
        let req = format!(
            "BITS_POST /echo/x HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Ping\r\nX-Huge: {}\r\nContent-Length: 0\r\n\r\n",
            "a".repeat(size)
        );
        // The server may answer and close before it has read everything: ignore write errors.
        let _ = s.write_all(req.as_bytes()).await;
        let mut head = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut head))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&head[..n]).into_owned();
        // A header value over 4 KB is a BITS error (400 E_INVALIDARG); a head past hyper's
        // buffer bound never reaches bitsd (431).
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status}")),
            "{size} bytes: {text}"
        );
    }
    let mut ok = server.connect().await;
    assert_eq!(
        ok.bits_post("/echo/x", &[("BITS-Packet-Type", "Ping")], b"")
            .await
            .status,
        200
    );
}
