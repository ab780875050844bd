//! The handlers that run inside bitsd, end to end through the server (§9, §10): the command
//! handler with real programs, the digest and static handlers, and closure handlers that
//! panic.
#![allow(clippy::unwrap_used)]

mod handler_support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitsd::config::HandlerSpec;
use bitsd::{HandlerError, Reply, Route, Upload};
use bitsd_tests::{pattern, sha256_hex};

use handler_support::*;

// ---------------------------------------------------------------------------------------------
// The command handler with real programs.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn command_handler_reply_is_the_programs_stdout() {
    let server = start(vec![
        command_route(
            "/size/",
            "sh",
            &["-c", r#"printf "%s:" "$BITS_UPLOAD_SIZE"; cat"#],
            None,
        ),
        command_route(
            "/env/",
            "sh",
            &[
                "-c",
                concat!(
                    r#"printf "%s\n%s\n%s\n%s\n" "$BITS_SESSION_ID" "$BITS_ORIGINAL_URL" "#,
                    r#""$BITS_CONTENT_NAME" "$BITS_UPLOAD_SIZE"; "#,
                    r#"cmp -s - "$BITS_UPLOAD_PATH" && echo stdin-is-the-upload-file"#,
                ),
            ],
            None,
        ),
    ])
    .await;
    let mut c = server.connect().await;
    let data = pattern(100_000, 50);
    let job = Job::start(&mut c, HOST, "/size/q.bin", data.clone(), 40_000).await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    let mut expected = b"100000:".to_vec();
    expected.extend_from_slice(&data);
    assert!(fetch_reply(&mut c, &url).await == expected);

    // The session facts in the environment; Content-Name comes with the first fragment.
    let job = Job::start(&mut c, HOST, "/env/q.bin?x=1", data.clone(), 100_000).await;
    let fin = job
        .send_fragment(&mut c, 0, data.len(), Some("report.bin"))
        .await;
    let url = assert_final_ok(&fin, &job);
    let reply = String::from_utf8(fetch_reply(&mut c, &url).await).unwrap();
    assert_eq!(
        reply,
        format!(
            "{}\nhttp://{HOST}/env/q.bin?x=1\nreport.bin\n100000\nstdin-is-the-upload-file\n",
            job.sid
        )
    );
}

#[tokio::test]
async fn command_handler_failures_and_timeouts() {
    let pid_dir = tempfile::tempdir().unwrap();
    let pid_file = pid_dir.path().join("sleep.pid");
    let sleeper = spec_route(
        "/sleep/",
        HandlerSpec::Command {
            program: "sh".into(),
            args: vec![
                "-c".into(),
                format!("sleep 30 & echo $! > {}; wait", pid_file.display()),
            ],
            timeout_secs: Some(1),
            failure_status: None,
            env: BTreeMap::new(),
            pass_env: Vec::new(),
        },
    );
    let server = start(vec![
        command_route("/false/", "false", &[], None),
        command_route("/busy/", "false", &[], Some(503)),
        sleeper,
    ])
    .await;
    let mut c = server.connect().await;
    let data = pattern(5000, 51);

    let job = Job::start(&mut c, HOST, "/false/q.bin", data.clone(), 4096).await;
    assert_app_error(&job.finish(&mut c).await, &job, 500, "0x801901f4");
    // Still failing on the retry: the program runs again, the upload is kept.
    assert_app_error(&job.finish(&mut c).await, &job, 500, "0x801901f4");

    let job = Job::start(&mut c, HOST, "/busy/q.bin", data.clone(), 4096).await;
    assert_app_error(&job.finish(&mut c).await, &job, 503, "0x801901f7");

    let job = Job::start(&mut c, HOST, "/sleep/q.bin", data.clone(), 4096).await;
    let started = Instant::now();
    assert_app_error(&job.finish(&mut c).await, &job, 504, "0x801901f8");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The whole process group is gone, the backgrounded `sleep` included.
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for its new parent to reap it.
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .chars()
            .next();
        if stat.is_empty() || state == Some('Z') {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sleep {pid} still running: {stat}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The digest and static handlers.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn digest_handler_replies_with_a_json_receipt() {
    let server = start(vec![spec_route("/sum/", HandlerSpec::Digest)]).await;
    let mut c = server.connect().await;
    let data = pattern(123_457, 60);
    let job = Job::start(&mut c, HOST, "/sum/q.bin", data.clone(), 50_000).await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    let reply = fetch_reply(&mut c, &url).await;
    let receipt: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(receipt["session_id"], job.sid.as_str(), "{receipt}");
    assert_eq!(receipt["size"], 123_457);
    assert_eq!(receipt["sha256"], sha256_hex(&data));
    assert!(
        receipt["received"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{receipt}"
    );
    let p = progress(&server, &job.sid).await;
    assert_eq!(p["reply"]["bytes_total"], reply.len());
}

#[tokio::test]
async fn static_handler_gives_every_client_the_same_reply() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("common.bin");
    let common = pattern(40_000, 61);
    std::fs::write(&file, &common).unwrap();
    const STATIC: &str = "http://cdn.example.test/common.bin";
    let server = start(vec![
        spec_route(
            "/same/",
            HandlerSpec::Static {
                file: Some(file),
                url: None,
            },
        ),
        spec_route(
            "/elsewhere/",
            HandlerSpec::Static {
                file: None,
                url: Some(STATIC.into()),
            },
        ),
    ])
    .await;
    let mut urls = Vec::new();
    for seed in 0..3 {
        let mut c = server.connect().await;
        let job = Job::start(
            &mut c,
            HOST,
            "/same/q.bin",
            pattern(1000 + seed * 10, seed as u64),
            512,
        )
        .await;
        let url = assert_final_ok(&job.finish(&mut c).await, &job);
        assert!(fetch_reply(&mut c, &url).await == common);
        urls.push(url);
    }
    urls.sort();
    urls.dedup();
    assert_eq!(urls.len(), 3, "each session has its own reply URL");

    let mut c = server.connect().await;
    let job = Job::start(&mut c, HOST, "/elsewhere/q.bin", pattern(1000, 62), 512).await;
    assert_eq!(assert_final_ok(&job.finish(&mut c).await, &job), STATIC);
    let p = progress(&server, &job.sid).await;
    assert_eq!(p["reply"]["bytes_total"], serde_json::Value::Null);
}

// ---------------------------------------------------------------------------------------------
// Closure handlers that panic.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn panicking_handler_fails_the_attempt_not_the_server() {
    let calls = Arc::new(AtomicUsize::new(0));
    let flaky = {
        let calls = Arc::clone(&calls);
        move |upload: Upload| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    panic!("handler bug (test)");
                }
                Ok::<_, HandlerError>(Reply::bytes(format!("{} bytes", upload.len)))
            }
        }
    };
    let server = start(vec![
        Route::upload_reply("/flaky/", flaky),
        Route::upload_reply("/ok/", |upload: Upload| async move {
            Ok::<_, HandlerError>(Reply::bytes(format!("ok {}", upload.len)))
        }),
    ])
    .await;
    let mut c = server.connect().await;
    let job = Job::start(&mut c, HOST, "/flaky/q.bin", pattern(3000, 70), 1024).await;
    let fin = job.finish(&mut c).await;
    assert!((500..600).contains(&fin.status), "{fin:?}");
    assert_app_error(&fin, &job, 500, "0x801901f4");

    // The server keeps serving: another upload on the same connection, and on another route.
    let other = Job::start(&mut c, HOST, "/ok/q.bin", pattern(2000, 71), 1024).await;
    let url = assert_final_ok(&other.finish(&mut c).await, &other);
    assert_eq!(fetch_reply(&mut c, &url).await, b"ok 2000");
    // The client's retry of the panicked session runs the handler again and succeeds.
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    assert_eq!(fetch_reply(&mut c, &url).await, b"3000 bytes");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn handler_panicking_before_it_returns_its_future_is_a_context_7_error() {
    // A closure whose body panics before building its future: the panic happens when the
    // server calls `ReplyHandler::reply`, not inside the spawned future.
    let server = start(vec![
        Route::upload_reply(
            "/eager/",
            |_upload: Upload| -> std::future::Ready<Result<Reply, HandlerError>> {
                panic!("handler bug before the future (test)")
            },
        ),
        Route::upload_reply("/ok/", |upload: Upload| async move {
            Ok::<_, HandlerError>(Reply::bytes(format!("ok {}", upload.len)))
        }),
    ])
    .await;
    let mut c = server.connect().await;
    let job = Job::start(&mut c, HOST, "/eager/q.bin", pattern(3000, 72), 1024).await;
    let raw = job.fragment_request(job.last_start(), job.data.len() - job.last_start(), None);
    let fin = c.try_send(&raw).await;
    let mut c2 = server.connect().await;
    let other = Job::start(&mut c2, HOST, "/ok/q.bin", pattern(2000, 73), 1024).await;
    let url = assert_final_ok(&other.finish(&mut c2).await, &other);
    assert_eq!(fetch_reply(&mut c2, &url).await, b"ok 2000");
    let fin = fin.expect("the client gets an Ack, not a dropped connection");
    assert_app_error(&fin, &job, 500, "0x801901f4");
}
