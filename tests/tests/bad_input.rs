//! Hostile and malformed input: every case gets a spec-shaped error (§2.1), nothing panics,
//! and other sessions are untouched.
#![allow(clippy::unwrap_used)]

use bitsd_tests::{pattern, url_path, RawClient, TestServer, PROTOCOL};

const SID_UNKNOWN: &str = "{deadbeef-0000-4000-8000-000000000000}";

/// A session with the first 4096 of 10000 bytes acknowledged.
async fn half_done(c: &mut RawClient, data: &[u8]) -> String {
    let sid = c.create_session("/echo/victim.bin").await;
    let res = c.fragment("/echo/victim.bin", &sid, data, 0, 4096).await;
    assert_eq!(res.header("bits-received-content-range"), Some("4096"));
    sid
}

/// The session must still be at 4096 and finish normally with the right bytes.
async fn finishes_intact(server: &TestServer, sid: &str, data: &[u8]) {
    let mut c = server.connect().await;
    let res = c.fragment("/echo/victim.bin", sid, data, 4096, 5904).await;
    res.assert_ack();
    assert_eq!(res.status, 200, "{res:?}");
    let path = url_path(res.header("bits-reply-url").unwrap());
    assert_eq!(c.get("GET", &path, &[]).await.body, data);
}

#[tokio::test]
async fn malformed_packets_get_spec_errors_and_leave_other_sessions_alone() {
    let server = TestServer::start().await;
    let data = pattern(10_000, 21);
    let mut c = server.connect().await;
    let sid = half_done(&mut c, &data).await;
    let long = "x".repeat(5000);
    let frag = |extra: &[(&'static str, String)]| {
        let mut h = vec![
            ("BITS-Packet-Type", "Fragment".to_owned()),
            ("BITS-Session-Id", sid.clone()),
        ];
        h.extend(extra.iter().cloned());
        h
    };
    // (headers, body, status, code)
    type Case = (Vec<(&'static str, String)>, Vec<u8>, u16, &'static str);
    let cases: Vec<Case> = vec![
        (vec![], vec![], 400, "0x80070057"),
        (
            vec![("BITS-Packet-Type", "FAILURE-MESSAGE".into())],
            vec![],
            400,
            "0x80070057",
        ),
        (frag(&[]), data[4096..5000].to_vec(), 400, "0x80070057"),
        (
            frag(&[
                ("Content-Range", "bytes 4096-8191/10000".into()),
                ("Content-Length", "4000".into()),
            ]),
            data[4096..8096].to_vec(),
            400,
            "0x80070057",
        ),
        (
            frag(&[("Content-Range", "bytes 0-10000/10000".into())]),
            data[..].to_vec(),
            400,
            "0x80070057",
        ),
        (
            frag(&[("Content-Range", "bytes 4096-8191/12000".into())]),
            data[4096..8192].to_vec(),
            400,
            "0x80070057",
        ),
        (
            frag(&[
                ("Content-Range", "bytes 4096-8191/10000".into()),
                ("Content-Encoding", "gzip".into()),
            ]),
            data[4096..8192].to_vec(),
            400,
            "0x80070057",
        ),
        (
            frag(&[
                ("Content-Range", "bytes 4096-8191/10000".into()),
                ("X-Padding", long.clone()),
            ]),
            data[4096..8192].to_vec(),
            400,
            "0x80070057",
        ),
        (
            frag(&[("Content-Range", "banana".into())]),
            vec![1, 2, 3],
            400,
            "0x80070057",
        ),
        (
            vec![
                ("BITS-Packet-Type", "Fragment".into()),
                ("Content-Range", "bytes 4096-8191/10000".into()),
            ],
            data[4096..8192].to_vec(),
            400,
            "0x80070057",
        ),
        (
            vec![
                ("BITS-Packet-Type", "Fragment".into()),
                ("BITS-Session-Id", SID_UNKNOWN.into()),
                ("Content-Range", "bytes 0-9/10".into()),
            ],
            vec![0; 10],
            500,
            "0x8020001f",
        ),
        (
            vec![
                ("BITS-Packet-Type", "Fragment".into()),
                ("BITS-Session-Id", "../../etc/passwd".into()),
                ("Content-Range", "bytes 0-9/10".into()),
            ],
            vec![0; 10],
            500,
            "0x8020001f",
        ),
        (
            vec![
                ("BITS-Packet-Type", "Close-Session".into()),
                ("BITS-Session-Id", sid.clone()),
            ],
            b"ABCDEFGH".to_vec(),
            400,
            "0x80070057",
        ),
        (
            vec![
                ("BITS-Packet-Type", "Cancel-Session".into()),
                ("BITS-Session-Id", sid.clone()),
            ],
            b"ABCDEFGH".to_vec(),
            400,
            "0x80070057",
        ),
        (
            vec![("BITS-Packet-Type", "Close-Session".into())],
            vec![],
            400,
            "0x80070057",
        ),
        (
            vec![
                ("BITS-Packet-Type", "Cancel-Session".into()),
                ("BITS-Session-Id", SID_UNKNOWN.into()),
            ],
            vec![],
            500,
            "0x8020001f",
        ),
        (
            vec![
                ("BITS-Packet-Type", "Create-Session".into()),
                (
                    "BITS-Supported-Protocols",
                    "{00000000-0000-0000-0000-000000000001}".into(),
                ),
            ],
            vec![],
            400,
            "0x80070057",
        ),
        (
            vec![("BITS-Packet-Type", "Create-Session".into())],
            vec![],
            400,
            "0x80070057",
        ),
        (
            vec![("BITS-Packet-Type", "Ping".into())],
            b"xx".to_vec(),
            400,
            "0x80070057",
        ),
    ];
    for (headers, body, status, code) in cases {
        // A fresh connection each time: after some errors the server may not read the body.
        let mut bad = server.connect().await;
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let res = bad.bits_post("/echo/victim.bin", &h, &body).await;
        res.assert_error(status, code);
        if let Some((_, v)) = headers.iter().find(|(k, _)| *k == "BITS-Session-Id") {
            assert_eq!(
                res.header("bits-session-id"),
                Some(v.as_str()),
                "session id echoed: {headers:?}"
            );
        }
        assert!(res.header("bits-protocol").is_none());
        assert!(res.header("bits-reply-url").is_none());
    }
    finishes_intact(&server, &sid, &data).await;
}

#[tokio::test]
async fn chunked_fragment_body_is_refused() {
    let server = TestServer::start().await;
    let data = pattern(10_000, 22);
    let mut c = server.connect().await;
    let sid = half_done(&mut c, &data).await;
    let mut bad = server.connect().await;
    let req = format!(
        "BITS_POST /echo/victim.bin HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Fragment\r\nBITS-Session-Id: {sid}\r\n\
         Content-Range: bytes 4096-4105/10000\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n"
    );
    bad.send(req.as_bytes())
        .await
        .assert_error(400, "0x80070057");
    finishes_intact(&server, &sid, &data).await;
}

#[tokio::test]
async fn short_body_acknowledges_nothing() {
    let server = TestServer::start().await;
    let data = pattern(10_000, 23);
    let mut c = server.connect().await;
    let sid = half_done(&mut c, &data).await;
    // Promise 5904 bytes, send 1000, hang up.
    let mut bad = server.connect().await;
    let head = format!(
        "BITS_POST /echo/victim.bin HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Fragment\r\nBITS-Session-Id: {sid}\r\n\
         Content-Range: bytes 4096-9999/10000\r\nContent-Length: 5904\r\n\r\n"
    );
    bad.write(head.as_bytes()).await;
    bad.write(&data[4096..5096]).await;
    drop(bad);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (_, json) = server.admin_get(&format!("/sessions/{sid}")).await;
    assert_eq!(
        json["upload"]["bytes_received"], 4096,
        "a cut-off fragment is not acknowledged"
    );
    finishes_intact(&server, &sid, &data).await;
}

#[tokio::test]
async fn path_escapes_are_refused() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    for path in [
        "/upload/../escape.bin",
        "/upload/%2e%2e/escape.bin",
        "/upload/%2E%2E/escape.bin",
        "/upload/a%2fb.bin",
        "/upload/a%5cb.bin",
        "/upload/C:/escape.bin",
        "/upload/c%3a%5cwindows%5cx.bin",
        "/upload//etc/passwd",
        "/upload/.hidden",
        "/upload/",
    ] {
        let res = c
            .bits_post(
                path,
                &[
                    ("BITS-Packet-Type", "Create-Session"),
                    ("BITS-Supported-Protocols", PROTOCOL),
                ],
                b"",
            )
            .await;
        res.assert_error(403, "0x80070005");
    }
    // Nothing was created anywhere near the data directory.
    assert!(!server.data_dir().join("escape.bin").exists());
    assert!(!server
        .data_dir()
        .parent()
        .unwrap()
        .join("escape.bin")
        .exists());
    assert_eq!(
        std::fs::read_dir(server.data_dir().join("files"))
            .unwrap()
            .count(),
        0
    );
}

#[cfg(unix)]
#[tokio::test]
async fn symlinks_in_the_files_tree_are_not_followed() {
    let server = TestServer::start().await;
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), server.data_dir().join("files/link")).unwrap();
    let mut c = server.connect().await;
    let data = pattern(100, 1);
    let sid = c.create_session("/upload/link/x.bin").await;
    let res = c.fragment("/upload/link/x.bin", &sid, &data, 0, 100).await;
    res.assert_error(403, "0x80070005");
    assert!(!outside.path().join("x.bin").exists());
}

#[tokio::test]
async fn methods_routes_and_limits() {
    let server = TestServer::start_with(|cfg| {
        cfg.limits.max_fragment_size = 32 * 1024;
        cfg.limits.max_upload_size = 1_000_000;
    })
    .await;
    let mut c = server.connect().await;
    let put = c
        .get("PUT", "/upload/x.bin", &[("Content-Length", "0")])
        .await;
    assert_eq!(put.status, 405);
    let get = c.get("GET", "/upload/x.bin", &[]).await;
    assert_eq!(get.status, 405);
    assert_eq!(c.get("GET", "/elsewhere", &[]).await.status, 404);
    let unrouted = c
        .bits_post("/nope/x.bin", &[("BITS-Packet-Type", "Ping")], b"")
        .await;
    unrouted.assert_error(501, "0x80070005");

    let sid = c.create_session("/echo/limits.bin").await;
    let big = pattern(40_000, 3);
    let res = c.fragment("/echo/limits.bin", &sid, &big, 0, 40_000).await;
    res.assert_error(413, "0x80200020");
    let mut c = server.connect().await;
    // A fragment of an upload over the maximum upload size: 400 BG_E_TOO_LARGE, never 413.
    let res = c
        .bits_post(
            "/echo/limits.bin",
            &[
                ("BITS-Packet-Type", "Fragment"),
                ("BITS-Session-Id", &sid),
                ("Content-Range", "bytes 0-4095/5000000000"),
            ],
            &big[..4096],
        )
        .await;
    res.assert_error(400, "0x80200020");
    // Smaller fragments go through.
    let mut c = server.connect().await;
    for at in (0..40_000).step_by(16_000) {
        let len = 16_000.min(40_000 - at);
        assert_eq!(
            c.fragment("/echo/limits.bin", &sid, &big, at, len)
                .await
                .status,
            200
        );
    }
}

#[tokio::test]
async fn refused_bodies_are_read_so_the_connection_survives() {
    // The client writes the whole fragment before reading; the server must take it all in,
    // or the kernel resets the connection and the client never sees the 413 / 416.
    let server = TestServer::start_with(|cfg| cfg.limits.max_fragment_size = 1024 * 1024).await;
    let mut c = server.connect().await;
    let sid = c.create_session("/echo/keep.bin").await;
    let big = pattern(3 * 1024 * 1024, 5);
    let res = c.fragment("/echo/keep.bin", &sid, &big, 0, big.len()).await;
    res.assert_error(413, "0x80200020");
    let gap = c
        .fragment("/echo/keep.bin", &sid, &big, 512 * 1024, 512 * 1024)
        .await;
    assert_eq!(gap.status, 416);
    assert_eq!(gap.header("bits-received-content-range"), Some("0"));
    // Same connection, still usable.
    let ok = c
        .fragment("/echo/keep.bin", &sid, &big, 0, 512 * 1024)
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("bits-received-content-range"), Some("524288"));
}
