//! Hostile URLs and what the server derives from them: relative notification URLs never
//! follow the client's `Host` (SSRF), double-encoded and `%u` request targets, names the file
//! system cannot hold, route prefixes that shadow reply paths, the command handler's
//! environment.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bitsd::config::{build_handler, HandlerSpec, NotificationMode};
use bitsd::Route;
use bitsd_tests::{RawClient, RawResponse, TestServer, PROTOCOL};
use tokio::net::TcpListener;

/// A `BITS_POST` to `target` (origin or absolute form) with an explicit `Host`.
async fn post(
    c: &mut RawClient,
    target: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let mut req = format!(
        "BITS_POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    c.send(&bytes).await
}

/// Create-Session and one fragment carrying the whole `data`, both to `target` with `host`;
/// returns the final fragment's Ack.
async fn whole_job(c: &mut RawClient, target: &str, host: &str, data: &[u8]) -> RawResponse {
    let res = post(
        c,
        target,
        host,
        &[
            ("BITS-Packet-Type", "Create-Session"),
            ("BITS-Supported-Protocols", PROTOCOL),
        ],
        b"",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    let sid = res.header("bits-session-id").unwrap().to_owned();
    let range = format!("bytes 0-{}/{}", data.len() - 1, data.len());
    post(
        c,
        target,
        host,
        &[
            ("BITS-Packet-Type", "Fragment"),
            ("BITS-Session-Id", &sid),
            ("Content-Range", &range),
        ],
        data,
    )
    .await
}

/// A TCP service that only counts the connections it gets.
struct Internal {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Internal {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Internal {
            addr,
            connections,
            task,
        }
    }
}

impl Drop for Internal {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn http_route(prefix: &str, url: &str) -> Route {
    Route::upload_reply_shared(
        prefix,
        build_handler(&HandlerSpec::Http {
            url: url.to_owned(),
            notification: Some(NotificationMode::ByValue),
            timeout_secs: Some(5),
            data_entity_headers: false,
        })
        .unwrap(),
    )
}

#[tokio::test]
async fn a_hostile_host_never_picks_where_a_relative_notification_goes() {
    let internal = Internal::start().await;
    let server =
        TestServer::start_with(|cfg| cfg.routes = vec![http_route("/app/", "notify")]).await;
    let hostile = internal.addr.to_string();
    let mut c = server.connect().await;

    // The client names the internal service in Host...
    let fin = whole_job(&mut c, "/app/sub/x.bin", &hostile, b"secret upload").await;
    fin.assert_ack();
    // ...and in an absolute-form request target.
    let absolute = format!("http://{hostile}/app/sub/y.bin");
    let fin2 = whole_job(&mut c, &absolute, &hostile, b"secret upload").await;
    fin2.assert_ack();

    // The notification went to the server's own listener (which refuses a plain POST), not
    // to the service the client named.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        internal.connections.load(Ordering::SeqCst),
        0,
        "the internal service was contacted: {fin:?} {fin2:?}"
    );
    assert_eq!(fin.header("bits-error-context"), Some("0x7"), "{fin:?}");
}

fn command_route(prefix: &str, script: &str, pass_env: &[&str]) -> Route {
    Route::upload_reply_shared(
        prefix,
        build_handler(&HandlerSpec::Command {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            timeout_secs: Some(10),
            failure_status: None,
            env: [("CONFIGURED".to_owned(), "yes".to_owned())].into(),
            pass_env: pass_env.iter().map(|s| (*s).to_owned()).collect(),
        })
        .unwrap(),
    )
}

/// Uploads `data` to `path` and downloads the reply.
async fn reply_of(c: &mut RawClient, path: &str, data: &[u8]) -> String {
    let (_, fin) = c.upload(path, data, data.len()).await;
    let url = fin.header("bits-reply-url").unwrap().to_owned();
    let res = c.get("GET", &bitsd_tests::url_path(&url), &[]).await;
    assert_eq!(res.status, 200, "{res:?}");
    String::from_utf8(res.body).unwrap()
}

#[tokio::test]
async fn the_command_handler_sees_no_server_variable_unless_listed() {
    // A variable of this process (the server's environment), other than PATH.
    let (name, value) = std::env::vars()
        .find(|(k, v)| {
            k != "PATH"
                && !v.is_empty()
                && !v.contains('\n')
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
        .expect("the test process has some environment variable");
    let server = TestServer::start_with(|cfg| {
        cfg.routes = vec![
            command_route("/clean/", "env", &[]),
            command_route("/pass/", "env", &[&name]),
        ]
    })
    .await;
    let mut c = server.connect().await;
    let clean = reply_of(&mut c, "/clean/a.bin", b"x").await;
    let vars: Vec<&str> = clean
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    assert!(!vars.contains(&name.as_str()), "{name} leaked: {clean}");
    assert!(vars.contains(&"BITS_SESSION_ID"), "{clean}");
    assert!(vars.contains(&"CONFIGURED"), "{clean}");
    assert!(vars.contains(&"PATH"), "{clean}");
    let passed = reply_of(&mut c, "/pass/a.bin", b"x").await;
    assert!(
        passed.lines().any(|l| l == format!("{name}={value}")),
        "{name} not passed through: {passed}"
    );
}

#[test]
fn a_route_inside_another_routes_reply_paths_is_refused_at_config_load() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bitsd.toml");
    std::fs::write(
        &file,
        "[[route]]\nprefix = \"/app/\"\nmode = \"upload-reply\"\nhandler = { kind = \"echo\" }\n\n\
         [[route]]\nprefix = \"/app/BITS-Sessions/\"\nmode = \"upload\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bitsd_tests::bitsd_binary())
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted: {stderr}");
    assert!(
        stderr.contains(":6:")
            && stderr.contains("route /app/BITS-Sessions/ is inside /app/BITS-Sessions/")
            && stderr.contains("reply downloads"),
        "{stderr}"
    );
    // Serving with it is refused the same way.
    let out = std::process::Command::new(bitsd_tests::bitsd_binary())
        .arg("--config")
        .arg(&file)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "off"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reply downloads"));
}

#[tokio::test]
async fn double_encoded_and_u_escaped_targets_are_400() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    for target in [
        "/upload/%252e%252e%252fescape.bin",
        "/upload/a%2525b.bin",
        "/upload/%u002e%u002e/x.bin",
        "/upload/x%U002Fy.bin",
        "/echo/%252e%252e%252fx",
    ] {
        let res = c.try_create_session(target).await;
        res.assert_ack();
        res.assert_error(400, "0x80070057");
        assert_eq!(res.header("bits-error-context"), Some("0x5"), "{res:?}");
        let res = c.get("GET", target, &[]).await;
        assert_eq!(res.status, 400, "{target}: {res:?}");
    }
    // Single escapes stay fine.
    let res = c.try_create_session("/upload/report%20v2.bin").await;
    assert_eq!(res.status, 200, "{res:?}");
    // Nothing was stored under the literal names.
    let files: Vec<_> = std::fs::read_dir(server.data_dir().join("files"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(files.is_empty(), "{files:?}");
}

#[tokio::test]
async fn names_the_file_system_cannot_hold_are_refused_at_create_session() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    // A 300-byte segment (NAME_MAX is 255 on the usual file systems).
    let long_name = format!("/upload/{}.bin", "n".repeat(296));
    let res = c.try_create_session(&long_name).await;
    res.assert_ack();
    res.assert_error(400, "0x800700ce");
    // An 8 KiB path of acceptable segments (PATH_MAX is 4096).
    let deep = format!("/upload/{}/x.bin", vec!["d".repeat(200); 40].join("/"));
    assert!(deep.len() > 8000);
    let res = c.try_create_session(&deep).await;
    res.assert_ack();
    res.assert_error(400, "0x800700ce");
    // The same on an upload-reply route, whose upload may be committed too.
    let res = c
        .try_create_session(&format!("/echo/{}", "n".repeat(300)))
        .await;
    res.assert_error(400, "0x800700ce");
    // A 255-byte name is fine.
    let ok = format!("/upload/{}", "n".repeat(255));
    let res = c.try_create_session(&ok).await;
    assert_eq!(res.status, 200, "{res:?}");
}
