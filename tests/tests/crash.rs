//! Crash safety under SIGKILL: many concurrent upload-reply clients against the real binary
//! (small fragments held in the meta store's log mixed with large ones in upload files),
//! killed at seeded random moments and restarted on the same data directory, each client
//! resuming as a BITS client does. Every upload and reply must come out byte-exact, no
//! acknowledged offset may go backwards, no acknowledged session may be lost, and restarts
//! must log no errors. A second test holds the publishing link of plain uploads (strace) and
//! kills the server inside it.
//!
//! Bounded by default; `BITSD_CRASH_SCALE=10` runs ten times the clients, bytes and kills,
//! `BITSD_CRASH_SEED=n` replays one run.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bitsd_tests::{pattern, strace, url_path, BitsdProcess, RawClient, RawResponse, PROTOCOL};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// One request on a fresh or kept connection; a dropped connection is `None`.
async fn exchange(
    conn: &mut Option<RawClient>,
    addr: SocketAddr,
    request: &[u8],
) -> Option<RawResponse> {
    if conn.is_none() {
        *conn = RawClient::try_connect(addr).await.ok();
    }
    let c = conn.as_mut()?;
    match c.try_send(request).await {
        Ok(r) => Some(r),
        Err(_) => {
            *conn = None;
            None
        }
    }
}

fn bits_request(path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!("BITS_POST {path} HTTP/1.1\r\nHost: crash.test\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// A BITS upload-reply job that survives server crashes. Returns how many times it had to
/// start a new session.
async fn client_job(addr: SocketAddr, id: u64, data: Vec<u8>, fragment: usize) -> u32 {
    let path = format!("/echo/crash-{id}.bin");
    let mut conn: Option<RawClient> = None;
    let mut restarts = 0;
    let pause = || tokio::time::sleep(Duration::from_millis(30));
    'session: loop {
        let Some(res) = exchange(
            &mut conn,
            addr,
            &bits_request(
                &path,
                &[
                    ("BITS-Packet-Type", "Create-Session"),
                    ("BITS-Supported-Protocols", PROTOCOL),
                ],
                b"",
            ),
        )
        .await
        else {
            pause().await;
            continue;
        };
        if res.status != 200 {
            pause().await;
            continue;
        }
        let sid = res.header("bits-session-id").unwrap().to_owned();
        let mut offset = 0usize;
        let mut max_acked = 0usize;
        let mut sent = 0usize;
        let reply_url = loop {
            // Every third fragment is 40 times longer: small fragments are held in the meta
            // store's log, large ones in the upload file, and a session mixes both.
            sent += 1;
            let want = if sent.is_multiple_of(3) {
                fragment * 40
            } else {
                fragment
            };
            let len = want.min(data.len() - offset);
            let range = format!("bytes {}-{}/{}", offset, offset + len - 1, data.len());
            let req = bits_request(
                &path,
                &[
                    ("BITS-Packet-Type", "Fragment"),
                    ("BITS-Session-Id", &sid),
                    ("Content-Range", &range),
                ],
                &data[offset..offset + len],
            );
            let Some(res) = exchange(&mut conn, addr, &req).await else {
                // Lost Ack: resend from the last acknowledged offset.
                pause().await;
                continue;
            };
            if res.status == 500 && res.header("bits-error-code") == Some("0x8020001f") {
                restarts += 1;
                continue 'session;
            }
            if res.status >= 500 {
                pause().await;
                continue;
            }
            assert!(
                res.status == 200 || res.status == 416,
                "client {id}: unexpected {res:?}"
            );
            let next: usize = res
                .header("bits-received-content-range")
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                next >= max_acked,
                "client {id}: acknowledged offset went back from {max_acked} to {next}"
            );
            max_acked = next;
            offset = next;
            if let Some(url) = res.header("bits-reply-url") {
                assert_eq!(next, data.len());
                break url_path(url);
            }
        };
        // Download the reply (a BITS download job retries too).
        let reply = loop {
            let req = format!("GET {reply_url} HTTP/1.1\r\nHost: crash.test\r\n\r\n");
            match exchange(&mut conn, addr, req.as_bytes()).await {
                Some(r) if r.status == 200 => break r.body,
                Some(r) => panic!("client {id}: reply download failed: {r:?}"),
                None => pause().await,
            }
        };
        assert!(
            reply == data,
            "client {id}: reply differs from the upload ({} vs {} bytes)",
            reply.len(),
            data.len()
        );
        loop {
            let req = bits_request(
                &path,
                &[
                    ("BITS-Packet-Type", "Close-Session"),
                    ("BITS-Session-Id", &sid),
                ],
                b"",
            );
            match exchange(&mut conn, addr, &req).await {
                Some(r) if r.status == 200 => return restarts,
                Some(r) => panic!("client {id}: Close-Session failed: {r:?}"),
                None => pause().await,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_survive_repeated_sigkill() {
    let scale = env_u64("BITSD_CRASH_SCALE").unwrap_or(1).max(1);
    let seed = env_u64("BITSD_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }) | 1;
    println!("crash harness: seed {seed} (BITSD_CRASH_SEED={seed} replays it), scale {scale}");
    let mut rng = Rng(seed);
    let clients = 8 * scale;
    let kills = 6 * scale;

    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let log = dir.path().join("bitsd.log");
    let first = BitsdProcess::start_logging(&data_dir, &[], Some(&log));
    let addr = first.addr;
    let listen = addr.to_string();
    let extra = ["--listen", listen.as_str(), "--admin-listen", "off"];

    let done = Arc::new(AtomicBool::new(false));
    // Kills so far: a client whose job ends before the server was killed a few times starts
    // its job again (a fast server would otherwise finish before the harness did its work).
    let killed_so_far = Arc::new(AtomicU64::new(0));
    let min_kills = kills.min(3);
    let mut jobs = Vec::new();
    for id in 0..clients {
        // A quarter of the jobs are small (their bytes and reply live in the log only).
        let size = if id % 4 == 3 {
            1 + rng.below(40_000) as usize
        } else {
            300_000 + rng.below(1_000_000 * scale) as usize
        };
        let fragment = 2048 + rng.below(32_000) as usize;
        let data = pattern(size, seed ^ id);
        let killed_so_far = killed_so_far.clone();
        jobs.push(tokio::spawn(async move {
            let mut restarts = 0;
            loop {
                restarts += client_job(addr, id, data.clone(), fragment).await;
                if killed_so_far.load(Ordering::SeqCst) >= min_kills {
                    return restarts;
                }
            }
        }));
    }

    let killer = {
        let done = done.clone();
        let data_dir = data_dir.clone();
        let log = log.clone();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let killed_so_far = killed_so_far.clone();
        let mut rng = Rng(seed.rotate_left(17) | 1);
        tokio::task::spawn_blocking(move || {
            let mut proc = first;
            let mut n = 0;
            while n < kills && !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10 + rng.below(120)));
                proc.kill();
                n += 1;
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                proc = BitsdProcess::start_logging(&data_dir, &extra, Some(&log));
                killed_so_far.store(n, Ordering::SeqCst);
            }
            (proc, n)
        })
    };

    let mut restarts = 0;
    for job in jobs {
        restarts += tokio::time::timeout(Duration::from_secs(120), job)
            .await
            .expect("a client got stuck")
            .unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let (proc, killed) = killer.await.unwrap();
    println!(
        "crash harness: {clients} clients done, {killed} SIGKILLs, {restarts} session restarts"
    );
    assert!(
        killed >= min_kills,
        "the clients finished before the server was killed often enough ({killed})"
    );
    // Every acknowledged Create-Session is durable: no job has to start over.
    assert_eq!(restarts, 0, "sessions were lost across SIGKILLs");
    drop(proc);
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    let scary: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("panicked"))
        .collect();
    assert!(
        scary.is_empty(),
        "restarts logged errors:\n{}",
        scary.join("\n")
    );
}

/// A crash between publishing a plain upload and recording its completion must not cut the
/// published file. Each round runs the real binary under strace with every `linkat` (the
/// publishing hard link) held at its exit for seconds, completes several two-fragment plain
/// uploads at once, SIGKILLs the server as soon as every file is linked (inside the hold, long
/// before sled's periodic flush), restarts it, and checks every published file byte for byte;
/// the client's re-sent final fragment then gets its 200 and the file stays as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_files_survive_sigkill_right_after_the_link() {
    let Some(strace) = strace() else {
        return;
    };
    let strace = strace.to_string_lossy().into_owned();
    let wrapper = [
        strace.as_str(),
        "-f",
        "--seccomp-bpf",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        "trace=linkat",
        "-e",
        "inject=linkat:delay_exit=5000000",
    ];
    const UPLOADS: usize = 6;
    const HALF: usize = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let log = dir.path().join("bitsd.log");
    let files = data_dir.join("files");
    for round in 0..3u64 {
        let proc = BitsdProcess::start_wrapped(&wrapper, &data_dir, &[], Some(&log));
        let mut jobs = Vec::new();
        for i in 0..UPLOADS {
            let path = format!("/upload/round{round}/file{i}.bin");
            let data = pattern(2 * HALF, round * 100 + i as u64);
            let mut c = RawClient::connect(proc.addr).await;
            let sid = c.create_session(&path).await;
            let res = c.fragment(&path, &sid, &data, 0, HALF).await;
            assert_eq!(res.status, 200, "{res:?}");
            jobs.push((path, sid, data, c));
        }
        // Every final fragment at once; their Acks never come (the server dies first).
        let mut pending = Vec::new();
        for (path, sid, data, mut c) in std::mem::take(&mut jobs) {
            let (p, s, d) = (path.clone(), sid.clone(), data.clone());
            pending.push(tokio::spawn(async move {
                let range = format!("bytes {}-{}/{}", HALF, 2 * HALF - 1, 2 * HALF);
                let req = bits_request(
                    &p,
                    &[
                        ("BITS-Packet-Type", "Fragment"),
                        ("BITS-Session-Id", &s),
                        ("Content-Range", &range),
                    ],
                    &d[HALF..],
                );
                let _ = c.try_send(&req).await;
            }));
            jobs.push((path, sid, data, RawClient::connect(proc.addr).await));
        }
        let published = |i: usize| files.join(format!("round{round}/file{i}.bin"));
        let deadline = std::time::Instant::now() + Duration::from_secs(4);
        while !(0..UPLOADS).all(|i| published(i).exists()) {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the uploads were not all linked in time"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Inside the held linkat: killed before any Ack and before sled's periodic flush.
        proc.kill();
        for p in pending {
            let _ = p.await;
        }
        let proc = BitsdProcess::start_logging(&data_dir, &[], Some(&log));
        for (i, (path, sid, data, _)) in jobs.iter().enumerate() {
            let on_disk = std::fs::read(published(i)).unwrap();
            assert!(
                on_disk == *data,
                "round {round}: published {path} has {} of {} bytes after the restart",
                on_disk.len(),
                data.len()
            );
            // The client lost its Ack and re-sends the final fragment.
            let mut c = RawClient::connect(proc.addr).await;
            let res = c.fragment(path, sid, data, HALF, HALF).await;
            assert_eq!(
                (res.status, res.header("bits-received-content-range")),
                (200, Some("131072")),
                "round {round}: {res:?}"
            );
            assert!(std::fs::read(published(i)).unwrap() == *data);
        }
        proc.kill();
    }
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}
