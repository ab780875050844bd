//! What the server tells people: the startup banner, TLS failures in the log, log lines
//! without colour codes or `Some(..)`, a command handler's stderr inside its request span, and
//! a refused packet's reason in `X-Bitsd-Error-Message`.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bitsd_tests::{bitsd_binary, pattern, RawClient, TestServer, PROTOCOL};
use tokio_rustls::rustls;

/// A bitsd process whose stdout (the banner) is returned and whose stderr goes to a file.
struct Captured {
    child: Child,
    banner: Vec<String>,
    log: PathBuf,
}

impl Captured {
    fn start(dir: &Path, args: &[&str], rust_log: &str) -> Self {
        let log = dir.join("stderr.log");
        let mut child = Command::new(bitsd_binary())
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(args)
            .env("RUST_LOG", rust_log)
            .env_remove("NO_COLOR")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut banner = Vec::new();
        loop {
            let line = lines
                .next()
                .expect("bitsd exited before its banner")
                .unwrap();
            let done = line.contains("session progress on");
            banner.push(line);
            if done {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Captured { child, banner, log }
    }

    fn addr(&self) -> std::net::SocketAddr {
        let line = self
            .banner
            .iter()
            .find(|l| l.contains("BITS upload"))
            .unwrap();
        let rest = line.split("://").nth(1).unwrap();
        rest.split('/').next().unwrap().parse().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Captured {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn self_signed(dir: &Path) -> (String, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    (
        cert_path.to_str().unwrap().to_owned(),
        key_path.to_str().unwrap().to_owned(),
    )
}

/// Waits until the log contains `needle` (the server writes it from another thread).
fn wait_for_log(server: &Captured, needle: &str) -> String {
    for _ in 0..100 {
        let log = server.log();
        if log.contains(needle) {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    server.log()
}

#[tokio::test]
async fn tls_banner_and_failed_handshakes_are_plain_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let server = Captured::start(
        dir.path(),
        &["--tls-cert", &cert, "--tls-key", &key],
        "info",
    );
    let addr = server.addr();

    // The banner: one line per route, with the scheme clients must use; nothing claims the root.
    let routes: Vec<&String> = server
        .banner
        .iter()
        .filter(|l| l.contains("BITS "))
        .collect();
    assert_eq!(routes.len(), 2, "{:?}", server.banner);
    assert!(
        routes[0].ends_with(&format!("https://{addr}/upload/")),
        "{}",
        routes[0]
    );
    assert!(
        routes[1].ends_with(&format!("https://{addr}/echo/")),
        "{}",
        routes[1]
    );
    for line in &server.banner {
        assert!(
            !line.contains("http://127.0.0.1") || line.contains("session progress"),
            "{line}"
        );
        assert!(!line.trim_end().ends_with(&format!("{addr}/")), "{line}");
    }

    // Plain HTTP to the TLS port.
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.write_all(b"BITS_POST /upload/x HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Ping\r\n\r\n")
        .unwrap();
    let mut sink = Vec::new();
    let _ = tcp.read_to_end(&mut sink);
    let log = wait_for_log(&server, "plain HTTP on the TLS port");
    assert!(log.contains("plain HTTP on the TLS port"), "{log}");

    // A client that does not trust the certificate (rate limit: one line per second).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    assert!(connector.connect(name, tcp).await.is_err());
    let log = wait_for_log(&server, "TLS handshake failed");
    assert!(log.contains("TLS handshake failed"), "{log}");
    assert!(log.contains("peer=127.0.0.1:"), "{log}");

    // A burst is rate-limited, and the next line counts what was left out.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..20 {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let _ = tcp.read_to_end(&mut sink);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let _ = tcp.read_to_end(&mut sink);
    let log = wait_for_log(&server, "suppressed=19");
    let plain_lines = log.matches("plain HTTP on the TLS port").count();
    assert_eq!(plain_lines, 3, "{log}");
    assert!(log.contains("suppressed=19"), "{log}");

    // stderr is a file, not a terminal: no colour codes; no Option debug text.
    assert!(!log.contains('\u{1b}'), "{log:?}");
    assert!(!log.contains("Some("), "{log}");
    assert!(!log.contains("None"), "{log}");
}

#[tokio::test]
async fn command_stderr_lines_carry_the_request_span_and_json_has_no_option_debug() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bitsd.toml");
    std::fs::write(
        &config,
        "[[route]]\nprefix = \"/cmd/\"\nmode = \"upload-reply\"\n\
         handler = { kind = \"command\", program = \"sh\", args = [\"-c\", \"echo handler-says-hi >&2; cat\"] }\n",
    )
    .unwrap();
    let server = Captured::start(
        dir.path(),
        &["--config", config.to_str().unwrap(), "--log-format", "json"],
        "info,bitsd=debug,bitsd_reply_handlers=debug",
    );
    let mut c = RawClient::connect(server.addr()).await;
    let data = pattern(5000, 2);
    let (sid, ack) = c.upload("/cmd/x.bin", &data, 5000).await;
    assert!(ack.header("bits-reply-url").is_some(), "{ack:?}");
    let log = wait_for_log(&server, "handler-says-hi");
    let line = log
        .lines()
        .find(|l| l.contains("handler-says-hi"))
        .unwrap_or_else(|| panic!("no stderr line in {log}"));
    let json: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(json["span"]["packet"], "Fragment", "{line}");
    assert_eq!(json["span"]["session"], sid.as_str(), "{line}");
    assert!(!log.contains("Some("), "{log}");
    assert!(!log.contains('\u{1b}'), "{log:?}");
}

#[tokio::test]
async fn a_refused_create_session_says_why_in_a_header() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    c.upload("/upload/reports/today.bin", &pattern(1000, 1), 1000)
        .await;
    let res = c
        .bits_post(
            "/upload/reports/today.bin",
            &[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", PROTOCOL),
            ],
            b"",
        )
        .await;
    res.assert_error(403, "0x80070005");
    let why = res.header("x-bitsd-error-message").expect("a reason");
    assert!(
        why.contains("today.bin exists and overwrites are off"),
        "{why}"
    );
    // A server-side failure (5xx) keeps its reasons to the log.
    let res = c
        .bits_post(
            "/upload/other.bin",
            &[
                ("BITS-Packet-Type", "Close-Session"),
                ("BITS-Session-Id", "{00000000-0000-4000-8000-000000000000}"),
            ],
            b"",
        )
        .await;
    assert_eq!(res.status, 500, "{res:?}");
    assert!(res.header("x-bitsd-error-message").is_none(), "{res:?}");
}

#[tokio::test]
async fn a_reader_that_stops_after_the_first_banner_line_does_not_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = Command::new(bitsd_binary())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Read one line, then close the pipe: the rest of the banner has nowhere to go.
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let addr: std::net::SocketAddr = first
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap()
        .parse()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = RawClient::connect(addr).await;
    let res = c
        .bits_post("/echo/x", &[("BITS-Packet-Type", "Ping")], b"")
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(child.try_wait().unwrap().is_none(), "bitsd exited");
    let _ = child.kill();
    let _ = child.wait();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
}
