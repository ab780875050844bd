//! Session timeout and cleanup (§7): idle sessions are removed with their data, reply and
//! tombstone, and the disk space comes back.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use bitsd_tests::{pattern, url_path, TestServer};

/// Bytes the files below `dir` take on disk.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        total += meta.blocks() * 512;
        if meta.is_dir() {
            total += disk_usage(&entry.path());
        }
    }
    total
}

#[tokio::test]
async fn idle_sessions_expire_and_free_their_space() {
    let server = TestServer::start_with(|cfg| {
        cfg.session_timeout = Duration::from_millis(1500);
        cfg.cleanup_interval = Duration::from_millis(200);
    })
    .await;
    let mut c = server.connect().await;
    let big = pattern(4 * 1024 * 1024, 1);
    // A finished upload-reply session holding a 4 MiB upload (the echo reply is the upload
    // file itself).
    let (done, fin) = c.upload("/echo/a.bin", &big, 1024 * 1024).await;
    let reply_path = url_path(fin.header("bits-reply-url").unwrap());
    // A half-done session, and a closed one (tombstone).
    let half = c.create_session("/echo/b.bin").await;
    c.fragment("/echo/b.bin", &half, &big, 0, 2 * 1024 * 1024)
        .await;
    let (closed, _) = c.upload("/echo/c.bin", &pattern(1000, 2), 1000).await;
    assert_eq!(c.close_session("/echo/c.bin", &closed).await.status, 200);
    // A session that stays busy.
    let busy = c.create_session("/echo/d.bin").await;
    let busy_data = pattern(100_000, 3);

    let sessions_dir = server.data_dir().join("sessions");
    let before = disk_usage(&sessions_dir);
    assert!(before >= 6 * 1024 * 1024, "{before}");

    let mut at = 0;
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let res = c.fragment("/echo/d.bin", &busy, &busy_data, at, 1000).await;
        assert_eq!(res.status, 200, "the busy session stays alive: {res:?}");
        at += 1000;
    }

    let after = disk_usage(&sessions_dir);
    assert!(
        after < 1024 * 1024,
        "space returned: before {before}, after {after}"
    );
    for sid in [&done, &half, &closed] {
        let (status, _) = server.admin_get(&format!("/sessions/{sid}")).await;
        assert_eq!(status, 404, "{sid} removed, tombstone included");
    }
    let res = c
        .fragment("/echo/b.bin", &half, &big, 2 * 1024 * 1024, 1024)
        .await;
    res.assert_error(500, "0x8020001f");
    let res = c.close_session("/echo/c.bin", &closed).await;
    res.assert_error(500, "0x8020001f");
    assert_eq!(c.get("GET", &reply_path, &[]).await.status, 404);
    let (status, json) = server.admin_get(&format!("/sessions/{busy}")).await;
    assert_eq!(status, 200);
    assert_eq!(json["upload"]["bytes_received"], 12_000);
}
