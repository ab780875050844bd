//! The completion step against clients that hang up and re-send (§6.2), and the session
//! limits across restarts, Close and Cancel: one handler run per completion whatever the
//! connections do, live-session counts that match the store.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bitsd::config::{build_handler, HandlerSpec};
use bitsd::Route;
use bitsd_tests::{pattern, url_path, BitsdProcess, RawClient, TestServer};

/// A command route whose program appends a line to `runs` each time it starts, then writes the
/// upload as its reply in two halves with `pause` seconds between them (a slow handler).
fn slow_echo_route(prefix: &str, runs: &Path, pause: &str) -> Route {
    let script = format!(
        "echo run >> '{runs}'; head -c 30000 \"$BITS_UPLOAD_PATH\"; sleep {pause}; \
         tail -c +30001 \"$BITS_UPLOAD_PATH\"",
        runs = runs.display()
    );
    let spec = HandlerSpec::Command {
        program: "sh".into(),
        args: vec!["-c".into(), script],
        timeout_secs: Some(20),
        failure_status: None,
        env: BTreeMap::new(),
        pass_env: Vec::new(),
    };
    Route::upload_reply_shared(prefix, build_handler(&spec).unwrap())
}

/// The bytes of a Fragment carrying `data[first..first + len]`.
fn fragment_request(path: &str, sid: &str, data: &[u8], first: usize, len: usize) -> Vec<u8> {
    let mut req = format!(
        "BITS_POST {path} HTTP/1.1\r\nHost: bits.example.test\r\nBITS-Packet-Type: Fragment\r\n\
         BITS-Session-Id: {sid}\r\nContent-Range: bytes {first}-{}/{}\r\nContent-Length: {len}\r\n\r\n",
        first + len - 1,
        data.len()
    )
    .into_bytes();
    req.extend_from_slice(&data[first..first + len]);
    req
}

/// Lines in the runs file (0 while it does not exist).
fn runs(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

async fn wait_for_runs(path: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while runs(path) < n {
        assert!(Instant::now() < deadline, "the handler never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn hangup_and_resends_during_completion_run_the_handler_once() {
    let tmp = tempfile::tempdir().unwrap();
    let runs_file = tmp.path().join("runs");
    let route = slow_echo_route("/slow/", &runs_file, "2");
    let server = TestServer::start_with(move |cfg| cfg.routes = vec![route]).await;
    let path = "/slow/report.bin";
    let data = pattern(60_000, 71);
    let mut c = server.connect().await;
    let sid = c.create_session(path).await;
    let first = c.fragment(path, &sid, &data, 0, 40_000).await;
    assert_eq!(first.status, 200, "{first:?}");
    let last = fragment_request(path, &sid, &data, 40_000, 20_000);

    // The final fragment, then a hang-up while the handler writes its first half.
    c.write(&last).await;
    wait_for_runs(&runs_file, 1).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A re-send that hangs up too, while the completion still runs.
    let mut c = server.connect().await;
    c.write(&last).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(c);

    // Two re-sends at once that wait for the answer.
    let (a, b) = tokio::join!(
        async {
            let mut c = server.connect().await;
            c.send(&last).await
        },
        async {
            let mut c = server.connect().await;
            c.send(&last).await
        }
    );
    for ack in [&a, &b] {
        ack.assert_ack();
        assert_eq!(ack.status, 200, "{ack:?}");
        assert_eq!(ack.header("bits-received-content-range"), Some("60000"));
    }
    let url = a.header("bits-reply-url").unwrap();
    assert_eq!(b.header("bits-reply-url"), Some(url));
    let mut c = server.connect().await;
    let reply = c.get("GET", &url_path(url), &[]).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.body == data,
        "the reply is the one run's output, byte for byte"
    );
    assert_eq!(runs(&runs_file), 1, "exactly one handler run");

    // A later re-send answers from the stored reply.
    let again = c.send(&last).await;
    assert_eq!(again.header("bits-reply-url"), Some(url));
    assert_eq!(runs(&runs_file), 1);
    // Nothing of the run is left but the reply: no temp file of a second run.
    let id: bitsd::protocol::SessionId = sid.parse().unwrap();
    let dir = server.data_dir().join("sessions").join(id.simple());
    let tmp_files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(tmp_files.len() <= 1, "{tmp_files:?}");
}

#[tokio::test]
async fn sigterm_lets_a_running_completion_finish() {
    let dir = tempfile::tempdir().unwrap();
    let runs_file = dir.path().join("runs");
    let script = dir.path().join("slow-echo.sh");
    std::fs::write(
        &script,
        format!(
            "echo run >> '{}'\nhead -c 30000 \"$BITS_UPLOAD_PATH\"\nsleep 1\n\
             tail -c +30001 \"$BITS_UPLOAD_PATH\"\n",
            runs_file.display()
        ),
    )
    .unwrap();
    let config = dir.path().join("bitsd.toml");
    std::fs::write(
        &config,
        format!(
            "[[route]]\nprefix = \"/slow/\"\nmode = \"upload-reply\"\n\
             handler = {{ kind = \"command\", program = \"sh\", args = [{:?}] }}\n",
            script.display().to_string()
        ),
    )
    .unwrap();
    let data_dir = dir.path().join("data");
    let args = ["--config", config.to_str().unwrap()];
    let proc = BitsdProcess::start(&data_dir, &args);
    let path = "/slow/report.bin";
    let data = pattern(40_000, 74);
    let mut c = RawClient::connect(proc.addr).await;
    let sid = c.create_session(path).await;
    let last = fragment_request(path, &sid, &data, 0, data.len());
    c.write(&last).await;
    wait_for_runs(&runs_file, 1).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Stopped while the handler runs for a client that is gone: the run still ends and its
    // reply is stored, so the client's re-send after the restart needs no second run.
    assert!(proc.terminate());
    let proc = BitsdProcess::start(&data_dir, &args);
    let mut c = RawClient::connect(proc.addr).await;
    let fin = c.send(&last).await;
    assert_eq!(fin.status, 200, "{fin:?}");
    let reply = c
        .get("GET", &url_path(fin.header("bits-reply-url").unwrap()), &[])
        .await;
    assert!(reply.body == data);
    assert_eq!(runs(&runs_file), 1);
}

#[tokio::test]
async fn close_during_a_completion_waits_for_it() {
    let tmp = tempfile::tempdir().unwrap();
    let runs_file = tmp.path().join("runs");
    let route = slow_echo_route("/slow/", &runs_file, "1");
    let server = TestServer::start_with(move |cfg| cfg.routes = vec![route]).await;
    let path = "/slow/report.bin";
    let data = pattern(40_000, 72);
    let mut c = server.connect().await;
    let sid = c.create_session(path).await;
    c.write(&fragment_request(path, &sid, &data, 0, data.len()))
        .await;
    wait_for_runs(&runs_file, 1).await;
    drop(c);
    let mut c = server.connect().await;
    let close = c.close_session(path, &sid).await;
    assert_eq!(close.status, 200, "{close:?}");
    // The completion finished before the Close: the session is a tombstone, not a
    // half-stored reply, and its directory is gone.
    let (_, json) = server.admin_get(&format!("/sessions/{sid}")).await;
    assert_eq!(json["state"], "closed", "{json}");
    let id: bitsd::protocol::SessionId = sid.parse().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!server
        .data_dir()
        .join("sessions")
        .join(id.simple())
        .exists());
    assert_eq!(runs(&runs_file), 1);
}

// ---------------------------------------------------------------------------------------------
// Session limits and the end of a session.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn session_limits_hold_across_a_restart_of_the_real_binary() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bitsd.toml");
    std::fs::write(&config, "max_sessions = 2\n").unwrap();
    let data = dir.path().join("data");
    let args = ["--config", config.to_str().unwrap()];
    let proc = BitsdProcess::start(&data, &args);
    let mut c = RawClient::connect(proc.addr).await;
    let a = c.create_session("/upload/a.bin").await;
    let _b = c.create_session("/upload/b.bin").await;
    c.try_create_session("/upload/c.bin")
        .await
        .assert_error(503, "0x80070045");
    drop(c);
    assert!(proc.terminate());

    let proc = BitsdProcess::start(&data, &args);
    let mut c = RawClient::connect(proc.addr).await;
    // The first packet after the restart ends a session.
    assert_eq!(c.close_session("/upload/a.bin", &a).await.status, 200);
    let mut created = 0;
    for name in ["d", "e", "f"] {
        let res = c.try_create_session(&format!("/upload/{name}.bin")).await;
        if res.status == 200 {
            created += 1;
        } else {
            res.assert_error(503, "0x80070045");
        }
    }
    assert_eq!(
        created, 1,
        "one free slot after the Close: two live sessions in all"
    );
}

#[tokio::test]
async fn close_and_cancel_on_another_route_are_refused() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    let data = pattern(10_000, 73);
    let sid = c.create_session("/upload/mine.bin").await;
    assert_eq!(
        c.fragment("/upload/mine.bin", &sid, &data, 0, 4000)
            .await
            .status,
        200
    );
    for res in [
        c.close_session("/echo/mine.bin", &sid).await,
        c.cancel_session("/echo/mine.bin", &sid).await,
    ] {
        res.assert_error(500, "0x8020001f");
        assert_eq!(res.header("bits-session-id"), Some(sid.as_str()));
    }
    // The session is untouched: the upload goes on and commits.
    let (_, json) = server.admin_get(&format!("/sessions/{sid}")).await;
    assert_eq!(json["state"], "receiving", "{json}");
    let fin = c
        .fragment("/upload/mine.bin", &sid, &data, 4000, 6000)
        .await;
    assert_eq!(fin.status, 200, "{fin:?}");
    assert_eq!(
        std::fs::read(server.data_dir().join("files").join("mine.bin")).unwrap(),
        data
    );
    assert_eq!(c.close_session("/upload/mine.bin", &sid).await.status, 200);
}

#[tokio::test]
async fn a_failed_end_of_session_still_releases_its_slot() {
    let server = TestServer::start_with(|cfg| cfg.session_limits.max_sessions = Some(1)).await;
    let mut c = server.connect().await;
    let sid = c.create_session("/upload/a.bin").await;
    // The session's directory cannot be removed: a file stands where it would be.
    let id: bitsd::protocol::SessionId = sid.parse().unwrap();
    let blocker = server.data_dir().join("sessions").join(id.simple());
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"not a directory").unwrap();
    let close = c.close_session("/upload/a.bin", &sid).await;
    assert_eq!(close.status, 500, "{close:?}");
    // The tombstone was saved: the session is over, and so is its place in the limit.
    let (_, json) = server.admin_get(&format!("/sessions/{sid}")).await;
    assert_eq!(json["state"], "closed", "{json}");
    let res = c.try_create_session("/upload/b.bin").await;
    assert_eq!(res.status, 200, "{res:?}");
    std::fs::remove_file(&blocker).unwrap();
    // A repeated Close finds the tombstone and gives nothing back twice.
    assert_eq!(c.close_session("/upload/a.bin", &sid).await.status, 200);
    c.try_create_session("/upload/c.bin")
        .await
        .assert_error(503, "0x80070045");
}
