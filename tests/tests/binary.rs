//! The real `bitsd` binary with a generated configuration file.
#![allow(clippy::unwrap_used)]

use bitsd_tests::{bitsd_binary, pattern, url_path, BitsdProcess, RawClient};

#[tokio::test]
async fn config_file_routes_and_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("bitsd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:1\"\ndata_dir = {:?}\nmax_fragment_size = 65536\n\n\
             [[route]]\nprefix = \"/drop/\"\nmode = \"upload\"\n\n\
             [[route]]\nprefix = \"/mirror/\"\nmode = \"upload-reply\"\nhandler = {{ kind = \"echo\" }}\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    // --listen and --admin-listen (given by BitsdProcess) override the file's listen.
    let proc = BitsdProcess::start(&data, &["--config", config.to_str().unwrap()]);
    let mut c = RawClient::connect(proc.addr).await;
    let payload = pattern(200_000, 9);
    c.upload("/drop/in/x.bin", &payload, 65536).await;
    assert_eq!(std::fs::read(data.join("files/in/x.bin")).unwrap(), payload);
    let (_, fin) = c.upload("/mirror/y.bin", &payload, 65536).await;
    let reply = c
        .get("GET", &url_path(fin.header("bits-reply-url").unwrap()), &[])
        .await;
    assert_eq!(reply.body, payload);
    // The default routes are replaced by the file's.
    let res = c
        .bits_post("/upload/z.bin", &[("BITS-Packet-Type", "Ping")], b"")
        .await;
    res.assert_error(501, "0x80070005");
    // The file's fragment limit applies.
    let sid = c.create_session("/mirror/big.bin").await;
    let big = pattern(100_000, 1);
    c.fragment("/mirror/big.bin", &sid, &big, 0, 100_000)
        .await
        .assert_error(413, "0x80200020");
}

#[test]
fn check_config_reports_file_line_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "listen = \"127.0.0.1:8080\"\n\n[[route]]\nprefix = \"/app/\"\nmode = \"upload-reply\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bitsd_binary())
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:3:"), "{err}");
    assert!(err.contains("needs a handler"), "{err}");

    std::fs::write(&bad, "listen = \"127.0.0.1:8080\"\nlisten_typo = 1\n").unwrap();
    let out = std::process::Command::new(bitsd_binary())
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:2:") && err.contains("listen_typo"),
        "{err}"
    );

    // Starting with a bad file is refused the same way.
    let out = std::process::Command::new(bitsd_binary())
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml:2:"));

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[[route]]\nprefix = \"/drop/\"\nmode = \"upload\"\n").unwrap();
    let out = std::process::Command::new(bitsd_binary())
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("/drop/"));
}

#[tokio::test]
async fn hash_password_and_users_file() {
    use base64::Engine;
    use std::io::Write;
    let mut child = std::process::Command::new(bitsd_binary())
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"correct horse\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(hash.starts_with("$argon2id$"), "{hash}");

    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(&users, format!("# bitsd users\nwin-client:{hash}\n")).unwrap();
    let proc = BitsdProcess::start(
        &dir.path().join("data"),
        &["--users-file", users.to_str().unwrap()],
    );
    let mut c = RawClient::connect(proc.addr).await;
    let res = c
        .bits_post("/echo/x", &[("BITS-Packet-Type", "Ping")], b"")
        .await;
    res.assert_ack();
    assert_eq!(res.status, 401);
    assert!(res.header("www-authenticate").is_some());
    let good = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("win-client:correct horse")
    );
    let res = c
        .bits_post(
            "/echo/x",
            &[("BITS-Packet-Type", "Ping"), ("Authorization", &good)],
            b"",
        )
        .await;
    assert_eq!(res.status, 200);
}

#[tokio::test]
async fn upload_subcommand_uploads_and_fetches_the_reply() {
    let dir = tempfile::tempdir().unwrap();
    let proc = BitsdProcess::start(&dir.path().join("data"), &[]);
    let file = dir.path().join("in.bin");
    let payload = pattern(300_000, 12);
    std::fs::write(&file, &payload).unwrap();
    let reply = dir.path().join("reply.bin");
    let url = format!("http://{}/echo/in.bin", proc.addr);
    let out = std::process::Command::new(bitsd_binary())
        .args(["upload", &url])
        .arg(&file)
        .arg("--reply-file")
        .arg(&reply)
        .args(["--fragment-size", "64K", "--no-progress"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&reply).unwrap(), payload);

    // A fatal BITS error is reported by name and code, with a failing exit status.
    let url = format!("http://{}/upload/once.bin", proc.addr);
    let run = || {
        std::process::Command::new(bitsd_binary())
            .args(["upload", &url])
            .arg(&file)
            .arg("--no-progress")
            .output()
            .unwrap()
    };
    assert!(run().status.success());
    let second = run();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("E_ACCESSDENIED (0x80070005)"), "{err}");
}

#[tokio::test]
async fn the_shipped_example_config_works_as_shipped() {
    let example = bitsd_tests::fixtures_dir()
        .join("..")
        .join("bitsd.example.toml");
    let out = std::process::Command::new(bitsd_binary())
        .arg("check-config")
        .arg(&example)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for prefix in ["/upload/", "/echo/", "/receipt/", "/sum/"] {
        assert!(text.contains(prefix), "{text}");
    }
    // Every route it serves works out of the box: a plain upload lands, and each
    // upload-reply route answers with a reply.
    let dir = tempfile::tempdir().unwrap();
    let proc = BitsdProcess::start(
        &dir.path().join("data"),
        &["--config", example.to_str().unwrap()],
    );
    let mut c = RawClient::connect(proc.addr).await;
    let data = pattern(70_000, 5);
    c.upload("/upload/example.bin", &data, 32_768).await;
    assert_eq!(
        std::fs::read(dir.path().join("data/files/example.bin")).unwrap(),
        data
    );
    for (route, check) in [
        ("/echo/e.bin", "echo"),
        ("/receipt/r.bin", "sha256"),
        ("/sum/s.bin", "  -"),
    ] {
        let (_, ack) = c.upload(route, &data, 32_768).await;
        let url = ack.header("bits-reply-url").expect("a reply URL");
        let reply = c.get("GET", &url_path(url), &[]).await;
        assert_eq!(reply.status, 200, "{route}: {reply:?}");
        if check == "echo" {
            assert_eq!(reply.body, data);
        } else {
            let body = String::from_utf8_lossy(&reply.body);
            assert!(body.contains(check), "{route}: {body}");
        }
    }
}

#[cfg(unix)]
#[tokio::test]
async fn sigterm_lets_the_in_flight_fragment_finish_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let proc = BitsdProcess::start(&data_dir, &[]);
    let addr = proc.addr;
    let mut c = RawClient::connect(addr).await;
    let sid = c.create_session("/echo/t.bin").await;
    let data = pattern(100_000, 3);
    let head = format!(
        "BITS_POST /echo/t.bin HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Fragment\r\nBITS-Session-Id: {sid}\r\n\
         Content-Range: bytes 0-99999/100000\r\nContent-Length: 100000\r\n\r\n"
    );
    c.write(head.as_bytes()).await;
    c.write(&data[..50_000]).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let exit = tokio::task::spawn_blocking(move || proc.terminate());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // New connections are no longer accepted...
    assert!(
        RawClient::try_connect(addr).await.is_err(),
        "listener closed after SIGTERM"
    );
    // ...but the fragment in flight completes and is acknowledged.
    c.write(&data[50_000..]).await;
    let res = c.read_response(false).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(res.header("bits-reply-url").is_some());
    assert!(exit.await.unwrap(), "exit status 0");
    // The data directory opens cleanly and holds the completed session.
    let proc = BitsdProcess::start(&data_dir, &[]);
    let mut c = RawClient::connect(proc.addr).await;
    let again = c.fragment("/echo/t.bin", &sid, &data, 99_000, 1000).await;
    assert_eq!(again.status, 200);
    let reply = c
        .get(
            "GET",
            &url_path(again.header("bits-reply-url").unwrap()),
            &[],
        )
        .await;
    assert_eq!(reply.body, data);
}
