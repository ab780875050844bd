//! Password checks against the real binary: argon2 runs off the async workers (measured as
//! CPU time per thread in /proc), unknown users cost the same check as known ones, repeated
//! failures back off per client address and per user.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use bitsd_tests::BitsdProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "robot-token-0123456789";

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// An argon2id hash with small parameters (4 MiB, one pass), so that the debug build checks
/// it in tens of milliseconds instead of most of a second.
fn cheap_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(4096, 1, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(b"bitsd-test-salt!").unwrap();
    argon
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

/// A bitsd process with user `alice` (password `alice-pw`) and the bearer token [`TOKEN`].
fn start(dir: &Path) -> BitsdProcess {
    let users = dir.join("users");
    let tokens = dir.join("tokens");
    let hash = cheap_hash("alice-pw");
    std::fs::write(&users, format!("alice:{hash}\n")).unwrap();
    let digest = bitsd_tests::sha256_hex(TOKEN.as_bytes());
    std::fs::write(&tokens, format!("robot:{digest}\n")).unwrap();
    let data = dir.join("data");
    BitsdProcess::start(
        &data,
        &[
            "--users-file",
            users.to_str().unwrap(),
            "--tokens-file",
            tokens.to_str().unwrap(),
        ],
    )
}

/// The pid of the bitsd process whose command line names `data_dir`.
fn pid_of(data_dir: &Path) -> u32 {
    let needle = data_dir.to_str().unwrap().as_bytes().to_vec();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == needle.as_slice())
            && cmdline.starts_with(b"/")
        {
            return pid;
        }
    }
    panic!("no bitsd process for {}", data_dir.display());
}

/// utime + stime in clock ticks from a `stat` file.
fn ticks(stat: &str) -> u64 {
    // The fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// CPU ticks of the async runtime's threads (named `tokio-rt-worker`, or `tokio-runtime-w…`
/// in older tokio), and of the whole process (threads that ended included).
fn cpu(pid: u32) -> (u64, u64) {
    let total = ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap());
    let mut runtime = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("tokio-r") {
            if let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) {
                runtime += ticks(&stat);
            }
        }
    }
    (runtime, total)
}

/// A Ping with `authorization` from the local address `from`; the status and `Retry-After`.
async fn ping(from: Ipv4Addr, server: SocketAddr, authorization: &str) -> (u16, Option<String>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
    let mut stream = socket.connect(server).await.unwrap();
    let request = format!(
        "BITS_POST /echo/x.bin HTTP/1.1\r\nHost: bits.example.test\r\nBITS-Packet-Type: Ping\r\n\
         Authorization: {authorization}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    let retry_after = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("retry-after: ")
                .or(l.strip_prefix("Retry-After: "))
        })
        .map(str::to_owned);
    (status, retry_after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_passwords_are_checked_off_the_async_workers_and_a_token_ping_stays_fast() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let pid = pid_of(&dir.path().join("data"));
    let token = format!("Bearer {TOKEN}");
    assert_eq!(ping(Ipv4Addr::LOCALHOST, server.addr, &token).await.0, 200);

    let (runtime0, total0) = cpu(pid);
    let started = Instant::now();
    // Three clients, each from its own address, two wrong passwords each.
    let attackers: Vec<_> = (0..3u8)
        .map(|i| {
            let addr = server.addr;
            tokio::spawn(async move {
                for _ in 0..2 {
                    let (status, _) = ping(
                        Ipv4Addr::new(127, 0, 0, 10 + i),
                        addr,
                        &basic("alice", "wrong"),
                    )
                    .await;
                    assert_eq!(status, 401);
                }
            })
        })
        .collect();
    let mut token_pings = Vec::new();
    while !attackers.iter().all(|a| a.is_finished()) {
        let t = Instant::now();
        assert_eq!(ping(Ipv4Addr::LOCALHOST, server.addr, &token).await.0, 200);
        token_pings.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    for a in attackers {
        a.await.unwrap();
    }
    let (runtime1, total1) = cpu(pid);
    let (runtime, total) = (runtime1 - runtime0, total1 - total0);
    let verification = started.elapsed().min(Duration::from_millis(total * 10 / 6));
    token_pings.sort();
    let median = token_pings[token_pings.len() / 2];
    eprintln!(
        "6 wrong passwords: {total} ticks of CPU, {runtime} on the async workers; \
         {} token pings, median {median:?}",
        token_pings.len()
    );
    assert!(total >= 6, "the checks cost almost nothing? {total} ticks");
    assert!(
        // Old builds ran argon2 on the workers: all of the CPU time was theirs.
        runtime * 2 < total,
        "argon2 ran on the async workers: {runtime} of {total} ticks"
    );
    assert!(
        median < verification,
        "a token ping ({median:?}) waited about as long as a password check ({verification:?})"
    );
}

#[tokio::test]
async fn unknown_users_cost_the_same_check_as_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let pid = pid_of(&dir.path().join("data"));
    let mut spent = Vec::new();
    for (from, user) in [(20u8, "alice"), (21, "nobody")] {
        let (_, before) = cpu(pid);
        for _ in 0..3 {
            let (status, _) = ping(
                Ipv4Addr::new(127, 0, 0, from),
                server.addr,
                &basic(user, "wrong"),
            )
            .await;
            assert_eq!(status, 401);
        }
        let (_, after) = cpu(pid);
        spent.push(after - before);
    }
    eprintln!(
        "known user: {} ticks, unknown user: {} ticks",
        spent[0], spent[1]
    );
    assert!(spent[0] >= 2, "{spent:?}");
    assert!(
        spent[1] * 2 >= spent[0] && spent[0] * 2 >= spent[1],
        "known and unknown users cost different work: {spent:?}"
    );
}

#[tokio::test]
async fn repeated_failures_back_off_per_address_and_per_user_without_a_check() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let pid = pid_of(&dir.path().join("data"));
    let attacker = Ipv4Addr::new(127, 0, 0, 30);
    for _ in 0..5 {
        let (status, retry) = ping(attacker, server.addr, &basic("carol", "guess")).await;
        assert_eq!((status, retry), (401, None));
    }
    // The sixth attempt from that address is refused at once, without an argon2 check, even
    // with the right password of another user.
    let (_, before) = cpu(pid);
    let (status, retry) = ping(attacker, server.addr, &basic("alice", "alice-pw")).await;
    assert_eq!(status, 401);
    assert!(retry.unwrap().parse::<u64>().unwrap() >= 1);
    // The same user name from another address is refused too.
    let (status, retry) = ping(
        Ipv4Addr::new(127, 0, 0, 31),
        server.addr,
        &basic("carol", "x"),
    )
    .await;
    assert_eq!(status, 401);
    assert!(retry.is_some());
    let (_, after) = cpu(pid);
    assert!(
        after - before <= 10,
        "a refused attempt ran a check: {} ticks",
        after - before
    );
    // Another user from another address is unaffected.
    let (status, _) = ping(
        Ipv4Addr::new(127, 0, 0, 32),
        server.addr,
        &basic("alice", "alice-pw"),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn wrong_bearer_tokens_back_off_per_address_like_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let guesser = Ipv4Addr::new(127, 0, 0, 40);
    for i in 0..5 {
        let (status, retry) = ping(guesser, server.addr, &format!("Bearer guess-{i}")).await;
        assert_eq!((status, retry), (401, None), "guess {i}");
    }
    // From then on that address is refused at once, with the time to wait, even with the
    // right token: guessing tokens costs the guesser time, as guessing passwords does.
    let (status, retry) = ping(guesser, server.addr, &format!("Bearer {TOKEN}")).await;
    assert_eq!(status, 401);
    assert!(retry.unwrap().parse::<u64>().unwrap() >= 1);
    // Another address with the right token is unaffected (there is no user name to lock).
    let (status, _) = ping(
        Ipv4Addr::new(127, 0, 0, 41),
        server.addr,
        &format!("Bearer {TOKEN}"),
    )
    .await;
    assert_eq!(status, 200);
}

// ---------------------------------------------------------------------------------------------
// The admin listener.
// ---------------------------------------------------------------------------------------------

/// A GET on the admin listener at `addr` (an unspecified address means this host).
async fn admin_get(addr: SocketAddr, path: &str, token: Option<&str>) -> bitsd_tests::RawResponse {
    let addr = if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
    } else {
        addr
    };
    let mut c = bitsd_tests::RawClient::connect(addr).await;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    c.send(format!("GET {path} HTTP/1.1\r\nHost: admin\r\n{auth}\r\n").as_bytes())
        .await
}

#[test]
fn a_non_loopback_admin_listener_is_refused_without_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = bitsd_tests::bitsd_refuses(
        &dir.path().join("data"),
        &["--listen", "127.0.0.1:0", "--admin-listen", "0.0.0.0:0"],
        Duration::from_secs(10),
        "served an admin listener on 0.0.0.0 without being allowed to",
    );
    assert!(
        stderr.contains("not a loopback address") && stderr.contains("--admin-allow-non-loopback"),
        "{stderr}"
    );
    // check-config says so too.
    let file = dir.path().join("bitsd.toml");
    std::fs::write(&file, "admin_listen = \"0.0.0.0:8081\"\n").unwrap();
    let out = std::process::Command::new(bitsd_tests::bitsd_binary())
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
}

#[tokio::test]
async fn the_admin_token_guards_everything_but_the_probes() {
    let dir = tempfile::tempdir().unwrap();
    let token = "admin-token-0123456789abcdef";
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let server = BitsdProcess::start(
        &dir.path().join("data"),
        &[
            "--admin-listen",
            "0.0.0.0:0",
            "--admin-allow-non-loopback",
            "--admin-token-file",
            token_file.to_str().unwrap(),
        ],
    );
    let admin = server.admin_addr.unwrap();
    for path in [
        "/sessions",
        "/metrics",
        "/sessions/{deadbeef-0000-0000-0000-000000000000}",
    ] {
        let res = admin_get(admin, path, None).await;
        assert_eq!(res.status, 401, "{path}: {res:?}");
        assert!(res
            .header("www-authenticate")
            .unwrap()
            .starts_with("Bearer"));
        assert_eq!(
            admin_get(admin, path, Some("wrong-token-0123456789"))
                .await
                .status,
            401
        );
    }
    assert_eq!(admin_get(admin, "/sessions", Some(token)).await.status, 200);
    assert_eq!(admin_get(admin, "/metrics", Some(token)).await.status, 200);
    // Liveness and readiness probes stay open.
    assert_eq!(admin_get(admin, "/healthz", None).await.status, 200);
    assert_eq!(admin_get(admin, "/readyz", None).await.status, 200);
}

#[tokio::test]
async fn admin_sessions_are_paged() {
    let server = bitsd_tests::TestServer::start().await;
    let mut c = server.connect().await;
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(c.create_session(&format!("/upload/p{i}.bin")).await);
    }
    let mut seen = Vec::new();
    let mut path = "/sessions?limit=2".to_owned();
    let mut pages = 0;
    loop {
        let res = admin_get(server.admin_addr(), &path, None).await;
        assert_eq!(res.status, 200, "{res:?}");
        let page: serde_json::Value = serde_json::from_slice(&res.body).unwrap();
        let page = page.as_array().unwrap();
        assert!(page.len() <= 2, "{page:?}");
        seen.extend(page.iter().map(|s| s["id"].as_str().unwrap().to_owned()));
        pages += 1;
        match res.header("link") {
            Some(link) => {
                path = link
                    .strip_prefix('<')
                    .and_then(|l| l.split_once('>'))
                    .unwrap()
                    .0
                    .to_owned();
            }
            None => break,
        }
        assert!(pages < 10);
    }
    assert_eq!(pages, 3);
    seen.sort();
    created.sort();
    assert_eq!(seen, created);
    assert_eq!(
        admin_get(server.admin_addr(), "/sessions?limit=0", None)
            .await
            .status,
        400
    );
    assert_eq!(
        admin_get(server.admin_addr(), "/sessions?after=nope", None)
            .await
            .status,
        400
    );
}
