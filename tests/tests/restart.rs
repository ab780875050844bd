//! Restarts: a server stopped (gracefully or by SIGKILL) mid-upload resumes every session at
//! its acknowledged offset, and the client gets the exact file and reply.
#![allow(clippy::unwrap_used)]

use bitsd_tests::{pattern, url_path, BitsdProcess, RawClient, TestServer};

/// With every fragment in the upload file (`inline_below = 0`): unacknowledged file bytes
/// are cut on open.
#[tokio::test]
async fn graceful_restart_resumes_at_acked_offset_and_cuts_unacked_bytes() {
    let server = TestServer::start_with(|c| c.inline_below = 0).await;
    let data = pattern(10_000, 31);
    let mut c = server.connect().await;
    let sid = c.create_session("/echo/report.bin").await;
    assert_eq!(
        c.fragment("/echo/report.bin", &sid, &data, 0, 4096)
            .await
            .status,
        200
    );
    assert_eq!(
        c.fragment("/echo/report.bin", &sid, &data, 4096, 4096)
            .await
            .status,
        200
    );
    drop(c);
    let dir = server.stop().await;

    // Bytes that reached the file but were never acknowledged (a crash mid-fragment).
    let id: bitsd::protocol::SessionId = sid.parse().unwrap();
    let upload = dir.path().join("sessions").join(id.simple()).join("upload");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&upload)
            .unwrap();
        f.write_all(&[0xAA; 1000]).unwrap();
    }
    assert_eq!(std::fs::metadata(&upload).unwrap().len(), 9192);

    let server = TestServer::start_in(dir, |c| c.inline_below = 0).await;
    assert_eq!(
        std::fs::metadata(&upload).unwrap().len(),
        8192,
        "unacknowledged bytes cut on open"
    );
    let (_, json) = server.admin_get(&format!("/sessions/{sid}")).await;
    assert_eq!(json["upload"]["bytes_received"], 8192);
    assert_eq!(json["state"], "receiving");

    // The client lost the second Ack and re-sends from 4096: nothing is written, Ack 8192.
    let mut c = server.connect().await;
    let res = c
        .fragment("/echo/report.bin", &sid, &data, 4096, 4096)
        .await;
    assert_eq!(
        (res.status, res.header("bits-received-content-range")),
        (200, Some("8192"))
    );
    let fin = c
        .fragment("/echo/report.bin", &sid, &data, 8192, 1808)
        .await;
    assert_eq!(fin.status, 200);
    let path = url_path(fin.header("bits-reply-url").unwrap());
    assert_eq!(c.get("GET", &path, &[]).await.body, data);
}

#[tokio::test]
async fn reply_and_reply_url_survive_restart() {
    let server = TestServer::start().await;
    let data = pattern(30_000, 32);
    let mut c = server.connect().await;
    let (sid, fin) = c.upload("/echo/report.bin", &data, 8192).await;
    let url = fin.header("bits-reply-url").unwrap().to_owned();
    drop(c);
    let server = TestServer::start_in(server.stop().await, |_| {}).await;
    let mut c = server.connect().await;
    // The re-sent final fragment gets the same reply URL without running the handler again.
    let again = c
        .fragment("/echo/report.bin", &sid, &data, 24_576, 30_000 - 24_576)
        .await;
    assert_eq!(again.header("bits-reply-url"), Some(url.as_str()));
    assert_eq!(c.get("GET", &url_path(&url), &[]).await.body, data);
}

/// Drives one upload-reply job through SIGKILLs of the real binary, as a BITS client does.
#[tokio::test]
async fn sigkill_mid_upload_then_resume_with_the_real_binary() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(2_000_000, 33);
    let fragment = 100_000;
    let mut proc = BitsdProcess::start(dir.path(), &[]);
    let mut c = RawClient::connect(proc.addr).await;
    let sid = c.create_session("/echo/big.bin").await;
    let mut acked = 0usize;
    let mut kills = 0;
    let mut last_ack = 0usize;
    while acked < data.len() {
        let len = fragment.min(data.len() - acked);
        let res = c.fragment("/echo/big.bin", &sid, &data, acked, len).await;
        res.assert_ack();
        assert_eq!(res.status, 200, "{res:?}");
        let next: usize = res
            .header("bits-received-content-range")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            next >= last_ack,
            "acked offset went backwards: {next} < {last_ack}"
        );
        last_ack = next;
        acked = next;
        if acked < data.len() && acked.is_multiple_of(5 * fragment) {
            // SIGKILL right after an Ack, restart on the same data directory, reconnect.
            proc.kill();
            kills += 1;
            proc = BitsdProcess::start(dir.path(), &[]);
            c = RawClient::connect(proc.addr).await;
            // Resume as after a lost Ack: one fragment back; the server answers with what it holds.
            let back = acked - fragment;
            let res = c
                .fragment("/echo/big.bin", &sid, &data, back, fragment)
                .await;
            assert_eq!(res.status, 200, "{res:?}");
            let held: usize = res
                .header("bits-received-content-range")
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(
                held, acked,
                "server holds exactly what it acknowledged before the kill"
            );
        }
    }
    assert!(kills >= 3);
    // The reply after all that is byte-exact.
    let fin = c
        .fragment("/echo/big.bin", &sid, &data, data.len() - 1, 1)
        .await;
    let path = url_path(fin.header("bits-reply-url").unwrap());
    assert_eq!(c.get("GET", &path, &[]).await.body, data);
    assert_eq!(c.close_session("/echo/big.bin", &sid).await.status, 200);
    #[cfg(unix)]
    assert!(proc.terminate(), "bitsd exits 0 on SIGTERM");
}

/// A Create-Session Ack is durable: sessions created right before a SIGKILL are there after
/// the restart, and their uploads go on (no "session not found", no new job).
#[tokio::test]
async fn sessions_survive_sigkill_right_after_their_create_ack() {
    let dir = tempfile::tempdir().unwrap();
    let proc = BitsdProcess::start(dir.path(), &[]);
    let mut c = RawClient::connect(proc.addr).await;
    let mut sids = Vec::new();
    for i in 0..5 {
        sids.push(c.create_session(&format!("/echo/created-{i}.bin")).await);
    }
    proc.kill();
    let proc = BitsdProcess::start(dir.path(), &[]);
    let mut c = RawClient::connect(proc.addr).await;
    let data = pattern(1000, 34);
    for (i, sid) in sids.iter().enumerate() {
        let path = format!("/echo/created-{i}.bin");
        let res = c.fragment(&path, sid, &data, 0, data.len()).await;
        assert_eq!(res.status, 200, "session {i} was lost: {res:?}");
        let url = url_path(res.header("bits-reply-url").unwrap());
        assert_eq!(c.get("GET", &url, &[]).await.body, data);
    }
}

/// Small fragments live in the meta store's log, large ones in the upload file: a plain
/// upload mixing both, killed (SIGKILL) right after every Ack, resumes each time at exactly
/// the acknowledged offset and is published byte-exact; the small fragments before the first
/// large one made no session directory.
#[tokio::test]
async fn sigkill_resumes_a_mixed_small_and_large_upload_at_the_acked_offset() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [4096, 1000, 100_000, 4096, 70_000, 3000, 2];
    let data = pattern(sizes.iter().sum(), 35);
    let path = "/upload/mixed.bin";
    let mut proc = BitsdProcess::start(dir.path(), &[]);
    let mut c = RawClient::connect(proc.addr).await;
    let sid = c.create_session(path).await;
    let id: bitsd::protocol::SessionId = sid.parse().unwrap();
    let session_dir = dir.path().join("sessions").join(id.simple());
    let mut acked = 0usize;
    for (i, len) in sizes.iter().enumerate() {
        let res = c.fragment(path, &sid, &data, acked, *len).await;
        assert_eq!(res.status, 200, "fragment {i}: {res:?}");
        acked += len;
        if i == 1 {
            assert!(
                !session_dir.exists(),
                "small fragments made a session directory"
            );
        }
        if acked == data.len() {
            break;
        }
        proc.kill();
        proc = BitsdProcess::start(dir.path(), &[]);
        c = RawClient::connect(proc.addr).await;
        // As after a lost Ack: the last fragment again; the server answers what it holds.
        let res = c.fragment(path, &sid, &data, acked - len, *len).await;
        assert_eq!(
            (res.status, res.header("bits-received-content-range")),
            (200, Some(acked.to_string().as_str())),
            "after the kill following fragment {i}"
        );
    }
    let published = std::fs::read(dir.path().join("files/mixed.bin")).unwrap();
    assert!(published == data, "published upload differs");
    assert_eq!(c.close_session(path, &sid).await.status, 200);
}

/// An echo job of small fragments makes no file or directory at all; its reply, the upload
/// held in the log, survives a SIGKILL and is served by range.
#[tokio::test]
async fn sigkill_then_echo_reply_from_the_log_is_served_with_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(3000, 36);
    let path = "/echo/small.bin";
    let proc = BitsdProcess::start(dir.path(), &[]);
    let mut c = RawClient::connect(proc.addr).await;
    let (sid, fin) = c.upload(path, &data, 1000).await;
    let url = url_path(fin.header("bits-reply-url").unwrap());
    let id: bitsd::protocol::SessionId = sid.parse().unwrap();
    assert!(
        !dir.path().join("sessions").join(id.simple()).exists(),
        "a small echo job made a session directory"
    );
    proc.kill();
    let proc = BitsdProcess::start(dir.path(), &[]);
    let mut c = RawClient::connect(proc.addr).await;
    let res = c.get("GET", &url, &[("Range", "bytes=100-1199")]).await;
    assert_eq!(res.status, 206, "{res:?}");
    assert!(res.body == data[100..1200], "ranged reply differs");
    assert!(c.get("GET", &url, &[]).await.body == data);
}
