//! The `command` handler with real programs.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bitsd_reply_handlers::{
    CommandConfig, CommandHandler, HandlerError, ReplyHandler, COMMAND_REPLY_FILE,
};
use common::{is_run_file, pattern, reply_bytes, reply_file, upload, LogCapture};

fn sh(script: &str) -> CommandHandler {
    CommandHandler::new(CommandConfig::new("sh").args(["-c", script])).unwrap()
}

#[tokio::test]
async fn stdout_is_the_reply_and_stdin_is_the_upload() {
    let fx = upload(b"hello", "http://h/cmd/x", None);
    let reply = sh("echo $BITS_UPLOAD_SIZE; cat")
        .reply(fx.upload.clone())
        .await
        .unwrap();
    assert_eq!(reply_bytes(&reply), b"5\nhello");
    assert!(is_run_file(
        &reply_file(&reply),
        fx.session_dir(),
        COMMAND_REPLY_FILE
    ));
    assert!(!reply.commit_upload);
}

#[tokio::test]
async fn cat_streams_a_large_upload_through() {
    let data = pattern(6 * 1024 * 1024 + 17);
    let fx = upload(&data, "http://h/cmd/x", None);
    let handler = CommandHandler::new(CommandConfig::new("cat")).unwrap();
    let reply = handler.reply(fx.upload.clone()).await.unwrap();
    assert!(is_run_file(
        &reply_file(&reply),
        fx.session_dir(),
        COMMAND_REPLY_FILE
    ));
    assert!(
        reply_bytes(&reply) == data,
        "cat's reply differs from the upload"
    );
}

#[tokio::test]
async fn empty_upload_and_empty_output() {
    let fx = upload(b"", "http://h/cmd/x", None);
    let reply = CommandHandler::new(CommandConfig::new("cat"))
        .unwrap()
        .reply(fx.upload.clone())
        .await
        .unwrap();
    assert_eq!(reply_bytes(&reply), b"");
}

#[tokio::test]
async fn environment_describes_the_upload() {
    let script = r#"printf '%s\n' "$BITS_SESSION_ID" "$BITS_ORIGINAL_URL" "$BITS_CONTENT_NAME" "$BITS_UPLOAD_PATH" "$BITS_UPLOAD_SIZE" "$EXTRA" "$PATH""#;
    let url = "http://h/cmd/file.bin?ACCOUNT=86433&x=a%20b";
    let fx = upload(b"0123456789", url, Some("report.csv"));
    let handler = CommandHandler::new(
        CommandConfig::new("sh")
            .args(["-c", script])
            .env("EXTRA", "extra value")
            .env("BITS_UPLOAD_SIZE", "overridden?"),
    )
    .unwrap();
    let reply = handler.reply(fx.upload.clone()).await.unwrap();
    let text = String::from_utf8(reply_bytes(&reply)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], fx.upload.session_id.to_string());
    assert!(lines[0].starts_with('{') && lines[0].ends_with('}'));
    assert_eq!(lines[1], url);
    assert_eq!(lines[2], "report.csv");
    assert!(Path::new(lines[3]).is_absolute());
    assert_eq!(std::fs::read(lines[3]).unwrap(), b"0123456789");
    assert_eq!(
        lines[4], "10",
        "the BITS_* variables win over configured env"
    );
    assert_eq!(lines[5], "extra value");
    assert!(!lines[6].is_empty(), "PATH is set");

    // No Content-Name: the variable is set, empty.
    let fx = upload(b"x", url, None);
    let reply = sh(r#"printf '[%s]' "${BITS_CONTENT_NAME-unset}""#)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    assert_eq!(reply_bytes(&reply), b"[]");
}

#[tokio::test]
async fn non_zero_exit_fails_with_the_failure_status() {
    let fx = upload(b"data", "http://h/cmd/x", None);
    let err = CommandHandler::new(CommandConfig::new("false"))
        .unwrap()
        .reply(fx.upload.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, HandlerError::Status { status: 500, .. }),
        "{err:?}"
    );

    let err = CommandHandler::new(
        CommandConfig::new("sh")
            .args(["-c", "cat >/dev/null; echo partial; exit 3"])
            .failure_status(503),
    )
    .unwrap()
    .reply(fx.upload.clone())
    .await
    .unwrap_err();
    match err {
        HandlerError::Status { status, message } => {
            assert_eq!(status, 503);
            assert!(message.contains('3'), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn two_runs_for_one_session_write_files_of_their_own() {
    let fx = upload(b"data", "http://h/cmd/x", None);
    // Each run writes its pid, pauses, then writes it again: a shared file would mix them.
    let handler = sh(r#"printf '%s-' $$; sleep 0.3; printf '%s' $$"#);
    let (a, b) = tokio::join!(handler.reply(fx.upload.clone()), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        handler.reply(fx.upload.clone()).await
    });
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(reply_file(&a), reply_file(&b));
    for reply in [&a, &b] {
        assert!(is_run_file(
            &reply_file(reply),
            fx.session_dir(),
            COMMAND_REPLY_FILE
        ));
        let text = String::from_utf8(reply_bytes(reply)).unwrap();
        let (first, second) = text.split_once('-').unwrap();
        assert_eq!(first, second, "a reply mixed from two runs: {text:?}");
    }
}

#[tokio::test]
async fn a_failed_run_leaves_no_file_behind() {
    let fx = upload(b"data", "http://h/cmd/x", None);
    let err = sh("echo partial; exit 3")
        .reply(fx.upload.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, HandlerError::Status { .. }), "{err:?}");
    let left: Vec<_> = std::fs::read_dir(fx.session_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn a_program_that_cannot_be_spawned_is_a_500() {
    let fx = upload(b"data", "http://h/cmd/x", None);
    let err = CommandHandler::new(CommandConfig::new("/nonexistent/bitsd-no-such-program"))
        .unwrap()
        .reply(fx.upload.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, HandlerError::Status { status: 500, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_program_that_does_not_read_stdin_is_fine() {
    // Several MB: far more than a pipe buffer, so writing hits a broken pipe.
    let data = pattern(8 * 1024 * 1024);
    let fx = upload(&data, "http://h/cmd/x", None);
    let reply = sh("echo ignored").reply(fx.upload.clone()).await.unwrap();
    assert_eq!(reply_bytes(&reply), b"ignored\n");

    let reply = CommandHandler::new(CommandConfig::new("head").args(["-c", "10"]))
        .unwrap()
        .reply(fx.upload.clone())
        .await
        .unwrap();
    assert_eq!(reply_bytes(&reply), &data[..10]);
}

#[tokio::test]
async fn a_timeout_is_unreachable() {
    let fx = upload(b"data", "http://h/cmd/x", None);
    let handler = CommandHandler::new(
        CommandConfig::new("sleep")
            .args(["10"])
            .timeout(Duration::from_millis(200)),
    )
    .unwrap();
    let started = Instant::now();
    let err = handler.reply(fx.upload.clone()).await.unwrap_err();
    assert!(matches!(err, HandlerError::Unreachable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Whether `pid` is still a live (non-zombie) process.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next()),
            Some(Some('Z' | 'X'))
        ),
        Err(_) => false,
    }
}

/// Waits until none of `pids` is alive, up to 3 s; returns the survivors.
async fn survivors(pids: &[u32]) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads the pids a script wrote to `file`, waiting for it to appear.
async fn read_pids(file: &Path, count: usize) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(text) = std::fs::read_to_string(file) {
            let pids: Vec<u32> = text
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            if pids.len() >= count {
                return pids;
            }
        }
        assert!(Instant::now() < deadline, "the script never wrote its pids");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let fx = upload(b"data", "http://h/cmd/x", None);
    let pid_file = fx.dir.path().join("pids");
    // A shell with a background child and a foreground child, both holding stdout.
    let script = format!(
        "sleep 30 & echo $! >> '{f}'; sleep 31 & echo $! >> '{f}'; echo $$ >> '{f}'; wait",
        f = pid_file.display()
    );
    let handler = CommandHandler::new(
        CommandConfig::new("sh")
            .args(["-c", &script])
            .timeout(Duration::from_millis(300)),
    )
    .unwrap();
    let started = Instant::now();
    let err = handler.reply(fx.upload.clone()).await.unwrap_err();
    assert!(matches!(err, HandlerError::Unreachable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let pids = read_pids(&pid_file, 3).await;
    assert_eq!(survivors(&pids).await, Vec::<u32>::new(), "pids {pids:?}");
}

#[tokio::test]
async fn dropping_the_reply_future_kills_the_process_group() {
    let fx = upload(b"data", "http://h/cmd/x", None);
    let pid_file = fx.dir.path().join("pids");
    let script = format!(
        "sleep 30 & echo $! >> '{f}'; echo $$ >> '{f}'; wait",
        f = pid_file.display()
    );
    let handler = sh(&script);
    let fut = handler.reply(fx.upload.clone());
    let pids = tokio::select! {
        r = fut => panic!("the command finished: {r:?}"),
        pids = read_pids(&pid_file, 2) => pids,
    };
    assert_eq!(survivors(&pids).await, Vec::<u32>::new(), "pids {pids:?}");
}

#[tokio::test]
async fn stderr_lines_are_logged_with_the_session_id() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let fx = upload(b"data", "http://h/cmd/x", None);
    let reply = sh("echo 'first problem' >&2; printf 'second problem' >&2; echo out")
        .reply(fx.upload.clone())
        .await
        .unwrap();
    assert_eq!(reply_bytes(&reply), b"out\n");
    let text = logs.text();
    let id = fx.upload.session_id.to_string();
    for needle in ["first problem", "second problem"] {
        let line = text
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not logged in:\n{text}"));
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains(&id), "{line}");
    }
}
