//! Plain uploads and upload-reply sessions end to end: commit, overwrite rules, concurrency.
#![allow(clippy::unwrap_used)]

use bitsd_tests::{pattern, url_path, TestServer};

#[tokio::test]
async fn plain_upload_is_committed_under_files() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    let data = pattern(300_000, 11);
    let (sid, fin) = c.upload("/upload/dir/sub/report.bin", &data, 65536).await;
    assert!(
        fin.header("bits-reply-url").is_none(),
        "plain upload Acks carry no reply URL"
    );
    let committed = server.data_dir().join("files/dir/sub/report.bin");
    assert_eq!(std::fs::read(&committed).unwrap(), data);
    // The re-sent final fragment is idempotent.
    let again = c
        .fragment(
            "/upload/dir/sub/report.bin",
            &sid,
            &data,
            262_144,
            300_000 - 262_144,
        )
        .await;
    again.assert_ack();
    assert_eq!(again.status, 200);
    assert_eq!(again.header("bits-received-content-range"), Some("300000"));
    // Close keeps the committed file and removes the session's own files.
    assert_eq!(
        c.close_session("/upload/dir/sub/report.bin", &sid)
            .await
            .status,
        200
    );
    assert_eq!(std::fs::read(&committed).unwrap(), data);
    let sessions = std::fs::read_dir(server.data_dir().join("sessions"))
        .unwrap()
        .count();
    assert_eq!(sessions, 0, "session files are gone after Close");
}

#[tokio::test]
async fn overwrite_refused_at_create_and_at_commit() {
    let server = TestServer::start().await;
    let data_a = pattern(10_000, 1);
    let data_b = pattern(10_000, 2);
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    // Two sessions on one URL are both accepted (D16); the first to commit wins.
    let sid_a = a.create_session("/upload/same.bin").await;
    let sid_b = b.create_session("/upload/same.bin").await;
    assert_ne!(sid_a, sid_b);
    let fin = a
        .fragment("/upload/same.bin", &sid_a, &data_a, 0, 10_000)
        .await;
    assert_eq!(fin.status, 200);
    let late = b
        .fragment("/upload/same.bin", &sid_b, &data_b, 0, 10_000)
        .await;
    late.assert_error(403, "0x80070005");
    assert_eq!(late.header("bits-session-id"), Some(sid_b.as_str()));
    assert_eq!(
        std::fs::read(server.data_dir().join("files/same.bin")).unwrap(),
        data_a
    );
    // Now that the file exists, Create-Session itself is refused (D15).
    let res = b
        .bits_post(
            "/upload/same.bin",
            &[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", bitsd_tests::PROTOCOL),
            ],
            b"",
        )
        .await;
    res.assert_error(403, "0x80070005");
    assert!(res.header("bits-protocol").is_none());
}

#[tokio::test]
async fn overwrite_allowed_when_configured() {
    let server = TestServer::start_with(|cfg| {
        cfg.routes = vec![bitsd::Route::upload("/upload/").allow_overwrites(true)];
    })
    .await;
    let mut c = server.connect().await;
    c.upload("/upload/x.bin", &pattern(5000, 1), 5000).await;
    let newer = pattern(7000, 2);
    c.upload("/upload/x.bin", &newer, 3000).await;
    assert_eq!(
        std::fs::read(server.data_dir().join("files/x.bin")).unwrap(),
        newer
    );
}

#[tokio::test]
async fn thirty_two_concurrent_upload_reply_sessions() {
    let server = TestServer::start().await;
    let addr = server.addr();
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        tasks.push(tokio::spawn(async move {
            let data = pattern(20_000 + (i as usize) * 3_001, 100 + i);
            let fragment = 1000 + (i as usize) * 997;
            let mut c = bitsd_tests::RawClient::connect(addr).await;
            // Every client targets the same URL, as upload-reply jobs do.
            let (sid, fin) = c.upload("/echo/job.bin", &data, fragment).await;
            let path = url_path(fin.header("bits-reply-url").unwrap());
            let reply = c.get("GET", &path, &[]).await;
            assert_eq!(reply.status, 200);
            assert_eq!(reply.body, data, "session {i} got someone else's bytes");
            let close = c.close_session("/echo/job.bin", &sid).await;
            assert_eq!(close.status, 200);
            sid
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        assert!(ids.insert(t.await.unwrap()));
    }
    assert_eq!(ids.len(), 32);
}

#[tokio::test]
async fn racing_duplicate_fragments_are_serialized() {
    // A reconnecting client re-sends a fragment while the first copy is still in flight.
    let server = TestServer::start().await;
    let data = pattern(200_000, 4);
    let mut c = server.connect().await;
    let sid = c.create_session("/echo/race.bin").await;
    let addr = server.addr();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (sid, data) = (sid.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = bitsd_tests::RawClient::connect(addr).await;
            c.fragment("/echo/race.bin", &sid, &data, 0, 100_000).await
        }));
    }
    for t in tasks {
        let res = t.await.unwrap();
        res.assert_ack();
        assert_eq!(res.status, 200);
        assert_eq!(res.header("bits-received-content-range"), Some("100000"));
    }
    let fin = c
        .fragment("/echo/race.bin", &sid, &data, 100_000, 100_000)
        .await;
    let path = url_path(fin.header("bits-reply-url").unwrap());
    assert_eq!(c.get("GET", &path, &[]).await.body, data);
}

#[tokio::test]
async fn cancel_after_completion_keeps_committed_file_and_drops_reply() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    let data = pattern(4096, 8);
    let (sid, _) = c.upload("/upload/kept.bin", &data, 4096).await;
    assert_eq!(c.cancel_session("/upload/kept.bin", &sid).await.status, 200);
    assert_eq!(
        std::fs::read(server.data_dir().join("files/kept.bin")).unwrap(),
        data
    );
    assert_eq!(
        c.cancel_session("/upload/kept.bin", &sid).await.status,
        200,
        "repeated Cancel"
    );
    let (status, json) = server.admin_get(&format!("/sessions/{sid}")).await;
    assert_eq!(status, 200);
    assert_eq!(json["state"], "cancelled");
}

#[tokio::test]
async fn fsync_policies_still_deliver_every_byte() {
    for policy in [bitsd::FsyncPolicy::OnClose, bitsd::FsyncPolicy::Never] {
        let server = TestServer::start_with(|cfg| cfg.fsync = policy).await;
        let data = pattern(300_000, 40);
        let mut c = server.connect().await;
        let (sid, fin) = c.upload("/echo/f.bin", &data, 65536).await;
        let reply = c
            .get("GET", &url_path(fin.header("bits-reply-url").unwrap()), &[])
            .await;
        assert_eq!(reply.body, data, "{policy:?}");
        drop(c);
        // A graceful restart keeps the completed session and its reply.
        let server = TestServer::start_in(server.stop().await, |cfg| cfg.fsync = policy).await;
        let mut c = server.connect().await;
        let again = c
            .fragment("/echo/f.bin", &sid, &data, 262_144, 300_000 - 262_144)
            .await;
        assert_eq!(again.status, 200, "{policy:?}");
        assert_eq!(
            c.get(
                "GET",
                &url_path(again.header("bits-reply-url").unwrap()),
                &[]
            )
            .await
            .body,
            data
        );
    }
}
