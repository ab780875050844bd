//! `bitsd upload` as a user runs it: the real binary against a scripted server (Ctrl-C and
//! `--resume`, `--retries`, a terminal as stdout).
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bounded, pattern, write_temp, Fake, Script};

/// Builds the `bitsd` binary (once per test binary) before a test's time limit starts: the
/// build can take minutes on a loaded machine, the test itself seconds.
async fn binary_built() {
    tokio::task::spawn_blocking(bitsd_tests::bitsd_binary)
        .await
        .unwrap();
}

fn upload_command(args: &[&str]) -> Command {
    let mut c = Command::new(bitsd_tests::bitsd_binary());
    c.arg("upload")
        .args(args)
        .env_remove("BITSD_PASSWORD")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

async fn output(mut c: Command) -> Output {
    tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Waits until the scripted server has seen `n` Fragments.
async fn wait_for_fragments(fake: &Fake, n: usize) {
    let start = Instant::now();
    while fake.packets("Fragment").len() < n {
        assert!(start.elapsed() < Duration::from_secs(30), "no fragments");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn first_byte(range: &str) -> u64 {
    range
        .trim_start_matches("bytes ")
        .split('-')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_suspends_and_resume_continues_from_the_server_offset() {
    binary_built().await;
    bounded(async {
        let fake = Fake::new(Script {
            fragment_delay: Some(Duration::from_millis(40)),
            ..Script::default()
        });
        let addr = fake.listen("127.0.0.1:0", 0).await;
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(64 * 1024, 3);
        let file = write_temp(dir.path(), "big.bin", &data);
        let url = format!("http://{addr}/upload/big.bin");
        let file_arg = file.to_str().unwrap();
        let args = ["--no-progress", "--fragment-size", "1K", &url, file_arg];

        let child = upload_command(&args).spawn().unwrap();
        wait_for_fragments(&fake, 6).await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("state: SUSPENDED"), "{err}");
        assert!(!err.contains("CANCELLED"), "{err}");
        // Suspended, not cancelled: the session stays on the server.
        assert!(fake.packets("Cancel-Session").is_empty());
        let state = dir.path().join("big.bin.bitsd-resume");
        let saved = std::fs::read_to_string(&state).unwrap();
        let offset: u64 = saved
            .lines()
            .find_map(|l| l.strip_prefix("offset="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(offset > 0 && offset < data.len() as u64, "{saved}");
        let before = fake.packets("Fragment").len();

        fake.script(|s| s.fragment_delay = None);
        let mut resume_args = vec!["--resume"];
        resume_args.extend_from_slice(&args);
        let out = output(upload_command(&resume_args)).await;
        let err = text(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains("state: ACKNOWLEDGED"), "{err}");
        // The same session, continued where the server was, not from zero.
        assert_eq!(fake.packets("Create-Session").len(), 1);
        let resumed = &fake.packets("Fragment")[before];
        assert!(first_byte(&resumed.range) >= offset, "{resumed:?}");
        let session = &fake.packets("Close-Session")[0].session;
        assert_eq!(fake.uploaded(session).unwrap(), data);
        assert!(!state.exists());
    })
    .await;
}

/// A job that gives up on a transient error (503s past `--retries`) leaves its session on
/// the server and its state file beside the source, and `--resume` continues that session
/// once the server is back. (Before, the client sent Cancel-Session on giving up and kept the
/// state file, so `--resume` found the session gone and started over.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn giving_up_on_a_transient_error_keeps_the_session_for_resume() {
    binary_built().await;
    bounded(async {
        let fake = Fake::new(Script::default());
        let addr = fake.listen("127.0.0.1:0", 0).await;
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(8 * 1024, 6);
        let file = write_temp(dir.path(), "t.bin", &data);
        let file_arg = file.to_str().unwrap();
        let url = format!("http://{addr}/upload/t.bin");
        fake.script(|s| s.fragment_failures = vec![(503, None); 8]);
        let args = [
            "--no-progress",
            "--retries",
            "1",
            "--fragment-size",
            "1K",
            &url,
            file_arg,
        ];
        let out = output(upload_command(&args)).await;
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("state: ERROR"), "{err}");
        assert!(
            fake.packets("Cancel-Session").is_empty(),
            "the session was cancelled on a transient error: {err}"
        );
        assert!(dir.path().join("t.bin.bitsd-resume").exists(), "{err}");
        assert!(err.contains("the session stays on the server"), "{err}");

        fake.script(|s| s.fragment_failures.clear());
        let mut resume_args = vec!["--resume"];
        resume_args.extend_from_slice(&args);
        let out = output(upload_command(&resume_args)).await;
        let err = text(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(!err.contains("starting over"), "{err}");
        assert_eq!(fake.packets("Create-Session").len(), 1, "{err}");
        let session = &fake.packets("Close-Session")[0].session;
        assert_eq!(fake.uploaded(session).unwrap(), data);
        assert!(!dir.path().join("t.bin.bitsd-resume").exists());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_on_interrupt_cancels_the_session() {
    binary_built().await;
    bounded(async {
        let fake = Fake::new(Script {
            fragment_delay: Some(Duration::from_millis(40)),
            ..Script::default()
        });
        let addr = fake.listen("127.0.0.1:0", 0).await;
        let dir = tempfile::tempdir().unwrap();
        let file = write_temp(dir.path(), "c.bin", &pattern(64 * 1024, 4));
        let url = format!("http://{addr}/upload/c.bin");
        let child = upload_command(&[
            "--no-progress",
            "--cancel-on-interrupt",
            "--fragment-size",
            "1K",
            &url,
            file.to_str().unwrap(),
        ])
        .spawn()
        .unwrap();
        wait_for_fragments(&fake, 3).await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        let err = text(&out.stderr);
        assert!(err.contains("state: CANCELLED"), "{err}");
        assert_eq!(fake.packets("Cancel-Session").len(), 1);
        assert!(!dir.path().join("c.bin.bitsd-resume").exists());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_flag_is_honoured() {
    binary_built().await;
    bounded(async {
        let fake = Fake::new(Script {
            fragment_failures: vec![(503, None); 20],
            ..Script::default()
        });
        let addr = fake.listen("127.0.0.1:0", 0).await;
        let dir = tempfile::tempdir().unwrap();
        let file = write_temp(dir.path(), "r.bin", &pattern(100, 4));
        let url = format!("http://{addr}/upload/r.bin");
        let out = output(upload_command(&[
            "--no-progress",
            "--retries",
            "1",
            &url,
            file.to_str().unwrap(),
        ]))
        .await;
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("BG_E_HTTP_ERROR_503"), "{err}");
        // The first try and one retry.
        assert_eq!(fake.packets("Fragment").len(), 2, "{err}");
    })
    .await;
}

fn have_script() -> bool {
    Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_is_not_written_to_a_terminal() {
    if !have_script() {
        eprintln!("`script` (util-linux) is not installed; skipping the terminal test");
        return;
    }
    binary_built().await;
    bounded(async {
        let fake = Fake::new(Script {
            echo: true,
            ..Script::default()
        });
        let addr = fake.listen("127.0.0.1:0", 0).await;
        let dir = tempfile::tempdir().unwrap();
        // Printable bytes, so they would be visible in the terminal's transcript.
        let data: Vec<u8> = (0..3000).map(|i| b'A' + (i % 26) as u8).collect();
        let file = write_temp(dir.path(), "t.bin", &data);
        let url = format!("http://{addr}/echo/t.bin");
        let bin = bitsd_tests::bitsd_binary();
        let shell = format!(
            "{} upload --no-progress {url} {}",
            bin.display(),
            file.display()
        );
        let mut c = Command::new("script");
        c.args(["-qec", &shell, "/dev/null"])
            .env_remove("BITSD_PASSWORD")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = output(c).await;
        let shown = text(&out.stdout);
        assert!(out.status.success(), "{shown}");
        let reply = dir.path().join("t.bin.reply");
        assert_eq!(std::fs::read(&reply).unwrap(), data, "{shown}");
        assert!(!shown.contains("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), "{shown}");
        assert!(shown.contains(&reply.display().to_string()), "{shown}");
        // Again on the terminal: the reply file exists, so the upload is refused before it
        // starts unless --force.
        let creates = fake.packets("Create-Session").len();
        let mut c = Command::new("script");
        c.args(["-qec", &shell, "/dev/null"])
            .env_remove("BITSD_PASSWORD")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = output(c).await;
        let shown = text(&out.stdout);
        assert!(shown.contains("--force"), "{shown}");
        assert_eq!(fake.packets("Create-Session").len(), creates);
        // Piped, it goes to stdout as before.
        let out = output(upload_command(&[
            "--no-progress",
            &url,
            file.to_str().unwrap(),
            "--reply-file",
            "-",
        ]))
        .await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(out.stdout, data);
    })
    .await;
}
