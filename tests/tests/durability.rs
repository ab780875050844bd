//! Durability and resource promises of the real binary, with failures injected by strace
//! where the kernel would have to fail: a failed sync acknowledges nothing, new parent
//! directories of a published file are synced, everything on disk is private, and a body
//! trickled in one byte at a time does not pin memory per byte.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bitsd_tests::{pattern, strace, BitsdProcess, RawClient};
use tokio::io::AsyncWriteExt;

/// strace as a wrapper of the real binary, with `args` after `-f --seccomp-bpf -qq`.
fn wrapper(strace: &str, args: &[&str]) -> Vec<String> {
    let mut w: Vec<String> = [strace, "-f", "--seccomp-bpf", "-qq"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    w.extend(args.iter().map(|s| s.to_string()));
    w
}

/// Every `fdatasync` fails with EIO (the upload's `sync_data`; sled and directories use
/// `fsync`). The fragment gets a 500, and so must the client's re-send of the same range:
/// its bytes never became durable, so the server may not answer that it holds them. After a
/// restart without the fault the upload goes on from what is really held and comes out exact.
#[tokio::test]
async fn a_failed_sync_acknowledges_nothing() {
    let Some(strace) = strace() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("bitsd.log");
    let proc = BitsdProcess::start_logging(dir.path(), &[], Some(&log));
    let data = pattern(128 * 1024, 41);
    let path = "/upload/eio.bin";
    let mut c = RawClient::connect(proc.addr).await;
    let sid = c.create_session(path).await;
    // Attached after the start and the Create-Session: every fdatasync from here fails (the
    // upload file's and the meta log's).
    let mut tracer = attach_tracing(
        &strace,
        proc.pid(),
        "fdatasync",
        "inject=fdatasync:error=EIO",
    )
    .await;
    let first = c.fragment(path, &sid, &data, 0, 65536).await;
    first.assert_ack();
    assert_eq!(first.status, 500, "{first:?}");
    let again = c.fragment(path, &sid, &data, 0, 65536).await;
    assert_ne!(
        (again.status, again.header("bits-received-content-range")),
        (200, Some("65536")),
        "bytes whose sync failed were acknowledged as held: {again:?}"
    );
    assert_eq!(again.status, 500, "{again:?}");
    let _ = tracer.kill();
    let _ = tracer.wait();
    proc.kill();

    let proc = BitsdProcess::start_logging(dir.path(), &[], Some(&log));
    let mut c = RawClient::connect(proc.addr).await;
    let res = c.fragment(path, &sid, &data, 0, 65536).await;
    assert_eq!(
        (res.status, res.header("bits-received-content-range")),
        (200, Some("65536")),
        "{res:?}"
    );
    let fin = c.fragment(path, &sid, &data, 65536, 65536).await;
    assert_eq!(fin.status, 200, "{fin:?}");
    assert!(std::fs::read(dir.path().join("files/eio.bin")).unwrap() == data);
}

/// A plain upload into directories that do not exist yet: each new directory is made and its
/// entry fsynced in its parent (the files root, then each new level), so the published file's
/// whole path survives a crash, not only its last link.
#[tokio::test]
async fn new_parent_directories_of_a_published_file_are_synced() {
    let Some(strace) = strace() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let trace = dir.path().join("fsync.trace");
    let w = wrapper(
        &strace.to_string_lossy(),
        &["-y", "-o", trace.to_str().unwrap(), "-e", "trace=fsync"],
    );
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    let proc = BitsdProcess::start_wrapped(&w, &data_dir, &[], None);
    let data = pattern(5000, 42);
    let mut c = RawClient::connect(proc.addr).await;
    let (_, fin) = c.upload("/upload/new/deeper/file.bin", &data, 5000).await;
    assert_eq!(fin.status, 200);
    proc.kill();
    let files = data_dir.join("files").canonicalize().unwrap();
    assert!(std::fs::read(files.join("new/deeper/file.bin")).unwrap() == data);
    let trace = std::fs::read_to_string(&trace).unwrap();
    for synced in [files.clone(), files.join("new"), files.join("new/deeper")] {
        let needle = format!("<{}>)", synced.display());
        assert!(
            trace
                .lines()
                .any(|l| l.contains("fsync(") && l.contains(&needle)),
            "no fsync of {} (the entry of a new directory in it):\n{trace}",
            synced.display()
        );
    }
}

/// Every directory and file under a data directory the server created is private to its
/// user: sled's database, session uploads and replies, published files and their parents.
#[tokio::test]
async fn the_data_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    fn check(path: &std::path::Path, bad: &mut Vec<String>) {
        let meta = std::fs::symlink_metadata(path).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bad.push(format!("{} {mode:o}", path.display()));
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).unwrap() {
                check(&entry.unwrap().path(), bad);
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let proc = BitsdProcess::start(&data_dir, &[]);
    let data = pattern(70_000, 43);
    let mut c = RawClient::connect(proc.addr).await;
    c.upload("/upload/sub/dir/plain.bin", &data, 30_000).await;
    let (_, fin) = c.upload("/echo/reply.bin", &data, 30_000).await;
    assert!(fin.header("bits-reply-url").is_some());
    // A session in the middle of its upload.
    let sid = c.create_session("/echo/partial.bin").await;
    assert_eq!(
        c.fragment("/echo/partial.bin", &sid, &data, 0, 1000)
            .await
            .status,
        200
    );
    assert!(proc.terminate());
    let mut bad = Vec::new();
    check(&data_dir, &mut bad);
    assert!(bad.is_empty(), "open to other users:\n{}", bad.join("\n"));
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// 200 connections send a fragment body one byte at a time (each byte its own TCP segment,
/// so its own body frame). While they are half way through, the server's resident memory may
/// not have grown by anything like a read buffer per byte (200 × 60 frames of at least 4 KiB
/// each would be 48 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_byte_by_byte_does_not_pin_a_buffer_per_byte() {
    const CONNS: usize = 200;
    const SENT: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let proc = BitsdProcess::start(dir.path(), &[]);
    let addr = proc.addr;
    let mut conns = Vec::new();
    for i in 0..CONNS {
        let mut c = RawClient::connect(addr).await;
        let path = format!("/echo/trickle-{i}.bin");
        let sid = c.create_session(&path).await;
        conns.push((c, path, sid));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss(proc.server_pid());
    let data = pattern(100, 44);
    let mut tasks = Vec::new();
    for (c, path, sid) in conns {
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            drop(c);
            stream.set_nodelay(true).unwrap();
            let head = format!(
                "BITS_POST {path} HTTP/1.1\r\nHost: t\r\nBITS-Packet-Type: Fragment\r\n\
                 BITS-Session-Id: {sid}\r\nContent-Range: bytes 0-99/200\r\n\
                 Content-Length: 100\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            for b in &data[..SENT] {
                stream.write_all(&[*b]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            stream
        }));
    }
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(t.await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = rss(proc.server_pid());
    let grown = after.saturating_sub(before);
    println!("RSS {before} -> {after} bytes ({grown} grown) for {CONNS} x {SENT} one-byte frames");
    assert!(
        grown < 16 << 20,
        "resident memory grew by {grown} bytes for {} body bytes",
        CONNS * SENT
    );
    drop(streams);
}

/// A small fragment is held in the meta store's log, made durable by sled's flush
/// (`sync_file_range` on its log file). With that failing (strace attached after the session
/// was created, injecting EIO), the fragment gets a 500 and so does its re-send: nothing is
/// acknowledged. After a restart without the fault the session resumes at 0 and the upload
/// comes out exact.
#[tokio::test]
async fn a_failed_log_flush_acknowledges_no_small_fragment() {
    let Some(strace) = strace() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("bitsd.log");
    let proc = BitsdProcess::start_logging(dir.path(), &[], Some(&log));
    let data = pattern(8192, 43);
    let path = "/upload/log-eio.bin";
    let mut c = RawClient::connect(proc.addr).await;
    let sid = c.create_session(path).await;
    let mut tracer = attach(&strace, proc.pid(), "inject=sync_file_range:error=EIO").await;
    let first = c.fragment(path, &sid, &data, 0, 4096).await;
    assert_eq!(first.status, 500, "{first:?}");
    let again = c.fragment(path, &sid, &data, 0, 4096).await;
    assert_ne!(
        (again.status, again.header("bits-received-content-range")),
        (200, Some("4096")),
        "bytes whose flush failed were acknowledged as held: {again:?}"
    );
    let _ = tracer.kill();
    let _ = tracer.wait();
    proc.kill();

    let proc = BitsdProcess::start_logging(dir.path(), &[], Some(&log));
    let mut c = RawClient::connect(proc.addr).await;
    let res = c.fragment(path, &sid, &data, 0, 4096).await;
    assert_eq!(res.status, 200, "{res:?}");
    let held: usize = res
        .header("bits-received-content-range")
        .unwrap()
        .parse()
        .unwrap();
    assert!(held == 0 || held == 4096, "{res:?}");
    let fin = c.fragment(path, &sid, &data, 4096, 4096).await;
    assert_eq!(fin.status, 200, "{fin:?}");
    assert!(std::fs::read(dir.path().join("files/log-eio.bin")).unwrap() == data);
}

/// sled makes its log durable with `sync_file_range`, which neither flushes the drive's
/// write cache nor the file's size: the group commit adds an `fdatasync` of the log. A
/// small fragment (held in the log) whose `fdatasync` fails is not acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fdatasync_of_the_log_acknowledges_no_small_fragment() {
    let Some(strace) = strace() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let proc = BitsdProcess::start(dir.path(), &[]);
    let data = pattern(8192, 44);
    let path = "/upload/log-fdatasync.bin";
    let mut c = RawClient::connect(proc.addr).await;
    let sid = c.create_session(path).await;
    let mut tracer = attach_tracing(
        &strace,
        proc.pid(),
        "fdatasync",
        "inject=fdatasync:error=EIO",
    )
    .await;
    let first = c.fragment(path, &sid, &data, 0, 4096).await;
    let _ = tracer.kill();
    let _ = tracer.wait();
    assert_ne!(
        first.status, 200,
        "a small fragment was acknowledged although the log's fdatasync failed: {first:?}"
    );
    proc.kill();
}

/// fsyncgate: after a failed `fdatasync` the kernel may have dropped the dirty pages, and a
/// later `fdatasync` succeeds without writing them. So one failed flush of the meta store's
/// log must stop every later acknowledgement until a restart: here only the **first**
/// `fdatasync` fails, and neither the client's re-send of that fragment nor anything after
/// it may be acknowledged (sled's memory already holds the advanced offset; a later flush
/// succeeding proves nothing about the failed one). `/readyz` says so. After a restart the
/// upload goes on from what is really durable and comes out exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failed_log_flush_stops_every_later_ack_until_restart() {
    let Some(strace) = strace() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("bitsd.log");
    let proc = BitsdProcess::start_logging(dir.path(), &[], Some(&log));
    let data = pattern(8192, 45);
    let path = "/upload/fsyncgate.bin";
    let mut c = RawClient::connect(proc.addr).await;
    let sid = c.create_session(path).await;
    let mut tracer = attach_tracing(
        &strace,
        proc.pid(),
        "fdatasync",
        "inject=fdatasync:error=EIO:when=1",
    )
    .await;
    let first = c.fragment(path, &sid, &data, 0, 4096).await;
    assert_ne!(first.status, 200, "{first:?}");
    // The fault is spent: every fdatasync from here succeeds.
    let again = c.fragment(path, &sid, &data, 0, 4096).await;
    assert_ne!(
        again.status, 200,
        "the re-sent fragment was acknowledged after its flush failed: {again:?}"
    );
    let mut other = RawClient::connect(proc.addr).await;
    let created = other
        .bits_post(
            "/upload/other.bin",
            &[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", bitsd_tests::PROTOCOL),
            ],
            b"",
        )
        .await;
    assert_ne!(
        created.status, 200,
        "a new session was acknowledged after a failed flush: {created:?}"
    );
    let mut admin = RawClient::connect(proc.admin_addr.unwrap()).await;
    let ready = admin.get("GET", "/readyz", &[]).await;
    assert_eq!(ready.status, 503, "{ready:?}");
    let _ = tracer.kill();
    let _ = tracer.wait();
    proc.kill();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("restart"),
        "the log does not say what to do: {logged}"
    );

    let proc = BitsdProcess::start_logging(dir.path(), &[], Some(&log));
    let mut c = RawClient::connect(proc.addr).await;
    let res = c.fragment(path, &sid, &data, 0, 4096).await;
    assert_eq!(res.status, 200, "{res:?}");
    let fin = c.fragment(path, &sid, &data, 4096, 4096).await;
    assert_eq!(fin.status, 200, "{fin:?}");
    assert!(std::fs::read(dir.path().join("files/fsyncgate.bin")).unwrap() == data);
}

/// strace attached to the running server `pid`, tracing `sync_file_range` (sled's log flush)
/// with `inject`; returns once every thread of the server is traced.
async fn attach(strace: &std::path::Path, pid: u32, inject: &str) -> std::process::Child {
    attach_tracing(strace, pid, "sync_file_range", inject).await
}

/// strace attached to the running server `pid`, tracing `syscall` with `inject`.
async fn attach_tracing(
    strace: &std::path::Path,
    pid: u32,
    syscall: &str,
    inject: &str,
) -> std::process::Child {
    let tracer = std::process::Command::new(strace)
        .args(["-f", "-qq", "-o", "/dev/null", "-e"])
        .arg(format!("trace={syscall}"))
        .args(["-e", inject, "-p"])
        .arg(pid.to_string())
        .spawn()
        .unwrap();
    let attached = || {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("status")).is_ok_and(|s| {
                s.lines()
                    .any(|l| l.starts_with("TracerPid:") && !l.ends_with("\t0"))
            })
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !attached() {
        assert!(
            std::time::Instant::now() < deadline,
            "strace did not attach"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracer
}

/// A crash between the log flush and the Ack: the flush of a small fragment completes but the
/// server is killed (SIGKILL) before it answers (strace holds the flush's return for 3 s).
/// After a restart the client re-sends the fragment it got no Ack for: the server holds it
/// exactly once (its bytes and offset went durable together), and the upload comes out exact.
#[tokio::test]
async fn a_crash_between_the_log_flush_and_the_ack_keeps_bytes_and_offset_together() {
    let Some(strace) = strace() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let proc = BitsdProcess::start(dir.path(), &[]);
    let data = pattern(3 * 4096, 44);
    let path = "/upload/flush-then-kill.bin";
    let mut c = RawClient::connect(proc.addr).await;
    let sid = c.create_session(path).await;
    assert_eq!(c.fragment(path, &sid, &data, 0, 4096).await.status, 200);
    let mut tracer = attach(
        &strace,
        proc.pid(),
        "inject=sync_file_range:delay_exit=3000000",
    )
    .await;
    let addr = proc.addr;
    let (sid2, data2) = (sid.clone(), data.clone());
    let pending = tokio::spawn(async move {
        let mut c = RawClient::connect(addr).await;
        c.fragment(path, &sid2, &data2, 4096, 4096).await
    });
    // The flush runs and is held at its return; the Ack is not out yet.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !pending.is_finished(),
        "the Ack went out before the flush returned"
    );
    proc.kill();
    let _ = tracer.kill();
    let _ = tracer.wait();
    let _ = pending.await;

    let proc = BitsdProcess::start(dir.path(), &[]);
    // The flushed offset survived: the fragment is held before the client re-sends it.
    let mut admin = RawClient::connect(proc.admin_addr.unwrap()).await;
    let info = admin.get("GET", &format!("/sessions/{sid}"), &[]).await;
    let info: serde_json::Value = serde_json::from_slice(&info.body).unwrap();
    assert_eq!(info["upload"]["bytes_received"], 8192, "{info}");
    let mut c = RawClient::connect(proc.addr).await;
    let res = c.fragment(path, &sid, &data, 4096, 4096).await;
    assert_eq!(
        (res.status, res.header("bits-received-content-range")),
        (200, Some("8192")),
        "{res:?}"
    );
    let fin = c.fragment(path, &sid, &data, 8192, 4096).await;
    assert_eq!(fin.status, 200, "{fin:?}");
    assert!(std::fs::read(dir.path().join("files/flush-then-kill.bin")).unwrap() == data);
}
