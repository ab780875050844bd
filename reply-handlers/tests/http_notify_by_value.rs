//! The `http` handler against a real HTTP backend playing the IIS server application (§9):
//! notification by value, and where the notification goes (the notification URL).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bitsd_reply_handlers::{
    HandlerError, Notification, ReplyBody, ReplyHandler, NOTIFICATION_REPLY_FILE,
};
use common::{is_run_file, pattern, reply_bytes, reply_file, upload};

use common::http_backend::*;

// ---------------------------------------------------------------- by value

#[tokio::test]
async fn by_value_posts_the_upload_and_the_response_body_is_the_reply() {
    let data = pattern(1024 * 1024 + 3);
    let answer = pattern(2 * 1024 * 1024 + 1);
    let backend = Backend::start(body(answer.clone())).await;
    let fx = upload(&data, REMOTE, Some("file.bin"));
    let reply = handler(&backend.url("/app/notify"), Notification::ByValue)
        .reply(fx.upload.clone())
        .await
        .unwrap();

    let seen = backend.only();
    assert_common_headers(&seen, &backend.host(), REMOTE);
    assert_eq!(seen.target, "/app/notify");
    assert_eq!(
        seen.header("content-length"),
        Some(&*data.len().to_string())
    );
    assert!(seen.body == data, "the backend got other bytes");
    assert_eq!(seen.header("bits-request-datafile-name"), None);
    assert_eq!(seen.header("bits-response-datafile-name"), None);

    assert!(is_run_file(
        &reply_file(&reply),
        fx.session_dir(),
        NOTIFICATION_REPLY_FILE
    ));
    assert!(reply_bytes(&reply) == answer, "the reply differs");
    assert!(!reply.commit_upload);
}

#[tokio::test]
async fn two_notifications_for_one_session_store_bodies_of_their_own() {
    let backend = Backend::start(Answer {
        body: pattern(200_000),
        delay: Duration::from_millis(200),
        ..Answer::default()
    })
    .await;
    let fx = upload(b"u", REMOTE, None);
    let h = handler(&backend.url("/n"), Notification::ByValue);
    let (a, b) = tokio::join!(h.reply(fx.upload.clone()), h.reply(fx.upload.clone()));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(reply_file(&a), reply_file(&b));
    for reply in [&a, &b] {
        assert!(is_run_file(
            &reply_file(reply),
            fx.session_dir(),
            NOTIFICATION_REPLY_FILE
        ));
        assert!(reply_bytes(reply) == pattern(200_000));
    }
}

#[tokio::test]
async fn by_value_empty_upload_and_empty_response() {
    let backend = Backend::start(Answer::default()).await;
    let fx = upload(b"", REMOTE, None);
    let reply = handler(&backend.url("/n"), Notification::ByValue)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    let seen = backend.only();
    assert_eq!(seen.header("content-length"), Some("0"));
    assert!(seen.body.is_empty());
    assert!(matches!(reply.body, ReplyBody::Empty), "{reply:?}");
}

#[tokio::test]
async fn slow_reading_backend_is_not_a_timeout_while_the_upload_moves() {
    // The backend takes well over the timeout to read the upload, but never stalls that long
    // (the client's send buffer, at most 4 MiB here, drains in about 0.4 s).
    let data = pattern(16 * 1024 * 1024);
    let backend = Backend::start(Answer {
        slow_read: true,
        body: b"ok".to_vec(),
        ..Answer::default()
    })
    .await;
    let fx = upload(&data, REMOTE, None);
    let started = Instant::now();
    let reply = with_timeout(
        &backend.url("/n"),
        Notification::ByValue,
        Duration::from_millis(1000),
    )
    .reply(fx.upload.clone())
    .await
    .unwrap();
    assert!(started.elapsed() > Duration::from_millis(1000));
    assert_eq!(reply_bytes(&reply), b"ok");
    assert!(backend.only().body == data);
}

// ---------------------------------------------------------------- URLs

#[tokio::test]
async fn query_string_is_appended_to_the_notification_url() {
    let backend = Backend::start(Answer::default()).await;
    let remote = "http://myserver/myvdir/subdir/file.asp?ACCOUNT=86433";
    let fx = upload(b"q", remote, None);
    handler(&backend.url("/myvdir2/bag.asp"), Notification::ByValue)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    let seen = backend.only();
    assert_eq!(seen.target, "/myvdir2/bag.asp?ACCOUNT=86433");
    assert_common_headers(&seen, &backend.host(), remote);
}

#[tokio::test]
async fn relative_notification_url_resolves_against_the_remote_directory() {
    let backend = Backend::start(Answer::default()).await;
    let remote = format!(
        "http://{}/myvdir/file.txt?ACCOUNT=86433&x=a%20b",
        backend.addr
    );
    let fx = upload(b"r", &remote, None);
    handler("myasp.asp", Notification::ByReference)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    let seen = backend.only();
    assert_eq!(seen.target, "/myvdir/myasp.asp?ACCOUNT=86433&x=a%20b");
    assert_common_headers(&seen, &backend.host(), &remote);
}

#[tokio::test]
async fn relative_notification_url_never_follows_the_clients_host() {
    // The remote URL names a backend (its host came from the client); the server's own URL
    // names another. The relative URL follows the server's.
    let clients_pick = Backend::start(Answer::default()).await;
    let servers_own = Backend::start(Answer::default()).await;
    let mut fx = upload(b"r", &clients_pick.url("/vdir/file.bin?x=1"), None);
    fx.upload.server_url = Some(servers_own.url("/vdir/file.bin?x=1"));
    handler("notify", Notification::ByValue)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    assert_eq!(servers_own.only().target, "/vdir/notify?x=1");
    assert!(clients_pick.seen.lock().unwrap().is_empty());

    // Without a server URL a relative notification URL fails (500), contacting nobody.
    fx.upload.server_url = None;
    let err = handler("notify", Notification::ByValue)
        .reply(fx.upload.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, HandlerError::Status { status: 500, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("public_url"), "{err}");
    assert!(clients_pick.seen.lock().unwrap().is_empty());
}
