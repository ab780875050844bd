//! The test server mode through the `bitsd` binary and its config: fault flags, the
//! transcript on disk and on the admin listener, config keys, the documented recipes, and
//! bounded state whatever ids clients send.
#![allow(clippy::unwrap_used)]

mod fault_support;

use std::time::Duration;

use bitsd::{FaultPlan, FaultRule, TranscriptEntry, TranscriptOptions};
use bitsd_client::ReplyDestination;
use bitsd_tests::{pattern, BitsdProcess, RawClient, TestServer};

use fault_support::*;

/// `GET /transcript` on the admin listener: status, content type and body.
async fn admin_transcript(admin: std::net::SocketAddr) -> (u16, Option<String>, String) {
    let mut c = RawClient::connect(admin).await;
    let res = c
        .send(b"GET /transcript HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await;
    (
        res.status,
        res.header("content-type").map(str::to_owned),
        String::from_utf8(res.body).unwrap(),
    )
}

#[tokio::test]
async fn the_binary_takes_fault_flags_and_writes_the_transcript() {
    let dir = tempfile::tempdir().unwrap();
    let transcript = dir.path().join("transcript.jsonl");
    let proc = BitsdProcess::start(
        &dir.path().join("data"),
        &[
            "--fault",
            "Fragment#2:lose-ack",
            "--fault",
            "GET#1:truncate=1000",
            "--fault-seed",
            "9",
            "--transcript",
            transcript.to_str().unwrap(),
        ],
    );
    let data = pattern(100_000, 5);
    let input = dir.path().join("in.bin");
    std::fs::write(&input, &data).unwrap();
    let out = tokio::time::timeout(
        RUN_LIMIT,
        uploader(Duration::from_secs(20), false, 32_768).upload_reply(
            &format!("http://{}/echo/flags.bin", proc.addr),
            &input,
            ReplyDestination::Memory,
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.reply.unwrap().bytes.as_deref() == Some(&data[..]));
    // Close-Session's line is written before its Ack goes out.
    let file = std::fs::read_to_string(&transcript).unwrap();
    let entries: Vec<TranscriptEntry> = file
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let faults: Vec<_> = entries.iter().filter_map(|e| e.fault.as_deref()).collect();
    assert_eq!(faults, ["lose-ack", "truncate"]);
    let lost = entries
        .iter()
        .position(|e| e.fault.as_deref() == Some("lose-ack"))
        .unwrap();
    assert_eq!(entries[lost + 1].range, entries[lost].range);
    assert_eq!(
        entries[lost]
            .request_headers
            .get("bits-packet-type")
            .map(String::as_str),
        Some("Fragment")
    );
    let gets: Vec<_> = entries.iter().filter(|e| e.packet == "GET").collect();
    assert_eq!(gets[1].range.as_deref(), Some("bytes=1000-99999"));
    assert_eq!(entries.last().unwrap().packet, "Close-Session");
    // The admin listener serves the same lines.
    let (status, ctype, body) = admin_transcript(proc.admin_addr.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(ctype.as_deref(), Some("application/x-ndjson"));
    assert_eq!(body, file);
}

#[tokio::test]
async fn transcript_without_faults_and_none_when_off() {
    let server =
        TestServer::start_with(|c| c.transcript = Some(TranscriptOptions::default())).await;
    let mut c = server.connect().await;
    let (sid, _) = c.upload("/upload/plain.bin", &pattern(1000, 1), 600).await;
    let entries = settled_entries(&server).await;
    let summary: Vec<_> = entries
        .iter()
        .map(|e| (e.packet.as_str(), e.range.as_deref(), e.status, e.received))
        .collect();
    assert_eq!(
        summary,
        [
            ("Create-Session", None, Some(200), None),
            ("Fragment", Some("bytes 0-599/1000"), Some(200), Some(600)),
            (
                "Fragment",
                Some("bytes 600-999/1000"),
                Some(200),
                Some(1000)
            ),
        ]
    );
    assert!(entries.iter().all(|e| e.fault.is_none() && e.answered));
    assert_eq!(entries[0].session.as_deref(), Some(sid.as_str()));
    assert_eq!(entries[1].session.as_deref(), Some(sid.as_str()));
    assert!(entries[0].time.ends_with('Z'));
    let (status, _, body) = admin_transcript(server.admin_addr()).await;
    assert_eq!(status, 200);
    assert_eq!(body.lines().count(), 3);

    let plain = TestServer::start().await;
    assert!(plain.server().transcript().is_none());
    let (status, _, _) = admin_transcript(plain.admin_addr()).await;
    assert_eq!(status, 404);
}

#[test]
fn config_keys_and_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("faults.toml");
    std::fs::write(
        &plan,
        "seed = 42\n\n[[rule]]\npacket = \"Fragment\"\nnth = 3\naction = \"drop-after\"\nbytes = 1000\n",
    )
    .unwrap();
    let config = dir.path().join("bitsd.toml");
    std::fs::write(
        &config,
        format!(
            "fault_plan = {:?}\ntranscript = {:?}\n",
            plan.to_str().unwrap(),
            dir.path().join("t.jsonl").to_str().unwrap()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bitsd_tests::bitsd_binary())
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 rule(s), seed 42"), "{text}");
    assert!(text.contains("Fragment#3:drop-after=1000"), "{text}");
    assert!(text.contains("t.jsonl"), "{text}");
    // A bad plan is refused with its file and line.
    std::fs::write(
        &plan,
        "seed = 1\n[[rule]]\npacket = \"Ping\"\naction = \"truncate\"\nbytes = 1\n",
    )
    .unwrap();
    let out = std::process::Command::new(bitsd_tests::bitsd_binary())
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("faults.toml:2:") && err.contains("only to GET"),
        "{err}"
    );
}

/// The plan and every `--fault` example of docs/testing-your-bits-client.md parse.
#[test]
fn the_readme_recipes_parse() {
    let section = std::fs::read_to_string(
        bitsd_tests::fixtures_dir().join("../docs/testing-your-bits-client.md"),
    )
    .unwrap();
    let section = section.as_str();
    let mut blocks = 0;
    for block in section.split("```toml\n").skip(1) {
        let toml = &block[..block.find("```").unwrap()];
        let plan = FaultPlan::parse(toml, "testing-your-bits-client.md")
            .unwrap_or_else(|e| panic!("{e}\n{toml}"));
        assert!(!plan.rules.is_empty());
        blocks += 1;
    }
    assert!(blocks >= 1);
    let mut flags = 0;
    for piece in section.split("--fault \"").skip(1) {
        let spec = &piece[..piece.find('"').unwrap()];
        spec.parse::<FaultRule>()
            .unwrap_or_else(|e| panic!("docs --fault {spec:?}: {e}"));
        flags += 1;
    }
    assert!(flags >= ALL_KINDS.len(), "one --fault recipe per kind");
}

/// The test server mode's state stays bounded however many distinct ids clients send: the
/// fault counters and the transcript in memory (the file keeps every line).
#[tokio::test]
async fn client_supplied_ids_do_not_grow_the_test_server_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let store = bitsd::SessionStore::open(&dir.path().join("data"))
        .await
        .unwrap();
    let service = bitsd::BitsService::builder(store)
        .route(bitsd::Route::upload_reply("/echo/", bitsd::EchoHandler))
        .build()
        .unwrap();
    let transcript_file = dir.path().join("t.jsonl");
    let transcript = bitsd::Transcript::with_file(&transcript_file).unwrap();
    let plan = FaultPlan::from_specs(1, &["GET#2:status=503"]).unwrap();
    let svc = bitsd::FaultInjectingService::new(service, plan, Some(transcript.clone())).unwrap();
    let requests = 12_000u32;
    for i in 0..requests {
        let req = http::Request::get(format!(
            "/echo/BITS-Sessions/{{{i:08x}-0000-4000-8000-000000000000}}/response"
        ))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
        let res = svc.handle(req).await.unwrap();
        assert_eq!(res.status(), 404);
    }
    // Ids that are not session ids at all share one counter.
    for i in 0..1_000u32 {
        let req = http::Request::get(format!("/echo/BITS-Sessions/not-an-id-{i}/response"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        svc.handle(req).await.unwrap();
    }
    assert!(
        svc.counted_sessions() <= 10_001,
        "{} sessions counted",
        svc.counted_sessions()
    );
    assert_eq!(transcript.len(), bitsd::Transcript::MEMORY_LINES);
    assert_eq!(transcript.recorded(), u64::from(requests) + 1_000);
    transcript.written().await;
    let lines = std::fs::read_to_string(&transcript_file)
        .unwrap()
        .lines()
        .count();
    assert_eq!(
        lines as u64,
        u64::from(requests) + 1_000,
        "the file keeps every line"
    );
}
