//! Reply downloads racing the end of their session, against the real `bitsd` binary: the race
//! is made certain by holding the reply file's `openat` with strace.
#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::time::Duration;

use bitsd_tests::{pattern, url_path, BitsdProcess, RawClient};

/// `strace`, or `None` with the reason printed (the test is then skipped).
fn strace() -> Option<&'static str> {
    let path = "/usr/bin/strace";
    if std::path::Path::new(path).exists() {
        Some(path)
    } else {
        bitsd_tests::skip::missing(
            bitsd_tests::skip::Needs::Strace,
            format_args!("{path} is missing (apt-get install strace)"),
        );
        None
    }
}

/// Attaches strace to `pid`, delaying every `openat` of `paths` by `delay`, and waits until
/// it is attached.
fn hold_openat(
    strace: &str,
    pid: u32,
    paths: &[std::path::PathBuf],
    delay: Duration,
) -> std::process::Child {
    let mut cmd = std::process::Command::new(strace);
    cmd.args(["-f", "-qq", "-o", "/dev/null", "-p", &pid.to_string()]);
    for p in paths {
        cmd.arg("-P").arg(p);
    }
    cmd.arg("-e")
        .arg("trace=openat")
        .arg("-e")
        .arg(format!("inject=openat:delay_enter={}", delay.as_micros()))
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // strace has no "attached" line with -qq; give it time to seize every thread.
    std::thread::sleep(Duration::from_millis(700));
    if let Some(stderr) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                eprintln!("strace: {line}");
            }
        });
    }
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_get_racing_a_close_answers_404_not_500() {
    let Some(strace) = strace() else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let server = BitsdProcess::start(data_dir.path(), &[]);
    let mut c = RawClient::connect(server.addr).await;
    // Fragments of 64 KiB or more: the bytes are in the upload file (smaller ones would be
    // held in the meta store, with no file to hold open).
    let data = pattern(200_000, 5);
    let (sid, fin) = c.upload("/echo/race.bin", &data, 100_000).await;
    let reply = url_path(fin.header("bits-reply-url").unwrap());
    // The session's directory is named by its id, without the braces.
    let name = sid.trim_matches(['{', '}']).to_ascii_lowercase();
    let session_dir = data_dir.path().join("sessions").join(&name);
    assert!(session_dir.is_dir(), "{}", session_dir.display());
    let files = [session_dir.join("upload"), session_dir.join("reply")];
    let mut tracer = hold_openat(strace, server.pid(), &files, Duration::from_millis(1500));

    // The GET reads the record, then waits in openat of the reply file...
    let addr = server.addr;
    let get = tokio::spawn(async move {
        let mut g = RawClient::connect(addr).await;
        g.get("GET", &reply, &[]).await
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    // ... while the session is closed and its reply removed.
    let mut closer = RawClient::connect(server.addr).await;
    let close = closer.close_session("/echo/race.bin", &sid).await;
    assert_eq!(close.status, 200, "{close:?}");
    let got = tokio::time::timeout(Duration::from_secs(20), get)
        .await
        .unwrap()
        .unwrap();
    let _ = tracer.kill();
    let _ = tracer.wait();
    assert_ne!(
        got.status, 500,
        "a reply removed under the GET is gone, not broken: {got:?}"
    );
    assert_eq!(got.status, 404, "{got:?}");
}
