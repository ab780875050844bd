//! Operations: Prometheus metrics, health and readiness, JSON logs.
#![allow(clippy::unwrap_used)]

use bitsd_tests::{bitsd_binary, metric, pattern, url_path, RawClient, TestServer};

#[tokio::test]
async fn metrics_health_and_readiness() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    let data = pattern(10_000, 1);
    let (sid, fin) = c.upload("/echo/m.bin", &data, 4096).await;
    let path = url_path(fin.header("bits-reply-url").unwrap());
    assert_eq!(c.get("GET", &path, &[]).await.body, data);
    c.fragment("/echo/m.bin", &sid, &data, 0, 4096).await; // already held
    c.fragment(
        "/echo/m.bin",
        "{deadbeef-0000-4000-8000-000000000000}",
        &data,
        0,
        10,
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    let (status, text) = server.admin_text("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        metric(
            &text,
            "bitsd_packets_total{packet=\"Create-Session\",status=\"200\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "bitsd_packets_total{packet=\"Fragment\",status=\"200\"}"
        ),
        4.0
    );
    assert_eq!(
        metric(&text, "bitsd_errors_total{code=\"0x8020001f\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "bitsd_fragments_total{outcome=\"stored\"}"),
        3.0
    );
    assert_eq!(
        metric(&text, "bitsd_fragments_total{outcome=\"already_held\"}"),
        1.0
    );
    // Every BITS_POST is timed, the refused one too.
    assert_eq!(
        metric(&text, "bitsd_packet_seconds_count{packet=\"Fragment\"}"),
        5.0
    );
    assert_eq!(
        metric(
            &text,
            "bitsd_packet_seconds_count{packet=\"Create-Session\"}"
        ),
        1.0
    );
    assert!(metric(&text, "bitsd_packet_seconds_sum{packet=\"Fragment\"}") > 0.0);
    assert_eq!(metric(&text, "bitsd_upload_bytes_received_total"), 10_000.0);
    assert_eq!(metric(&text, "bitsd_reply_bytes_served_total"), 10_000.0);
    assert_eq!(metric(&text, "bitsd_reply_handler_seconds_count"), 1.0);
    assert_eq!(metric(&text, "bitsd_sessions{state=\"reply-ready\"}"), 1.0);
    assert!(metric(&text, "bitsd_meta_store_bytes") > 0.0);

    assert_eq!(server.admin_text("/healthz").await.0, 200);
    assert_eq!(server.admin_text("/readyz").await.0, 200);
}

#[test]
fn json_logs_carry_the_session_id() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(bitsd_binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let addr: std::net::SocketAddr = stdout
        .lines()
        .map(Result::unwrap)
        .find_map(|l| {
            l.split("BITS upload")
                .nth(1)?
                .split("://")
                .nth(1)?
                .split('/')
                .next()
                .map(|a| a.parse().unwrap())
        })
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sid = rt.block_on(async {
        let mut c = RawClient::connect(addr).await;
        c.create_session("/echo/j.bin").await
    });
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let created = lines
        .iter()
        .find(|v| v["fields"]["message"] == "session created")
        .unwrap_or_else(|| panic!("no 'session created' line in\n{log}"));
    assert_eq!(created["span"]["session"], sid.as_str(), "{created}");
    assert_eq!(created["span"]["packet"], "Create-Session");
}
