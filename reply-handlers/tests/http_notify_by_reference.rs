//! The `http` handler against a real HTTP backend playing the IIS server application (§9):
//! notification by reference, and the response headers (static response URL, copy to
//! destination).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use bitsd_reply_handlers::{
    HandlerError, HttpNotifyConfig, HttpNotifyHandler, Notification, Reply, ReplyBody,
    ReplyHandler, NOTIFICATION_REPLY_FILE, RESPONSE_FILE,
};
use common::{is_run_file, pattern, reply_bytes, reply_file, upload};

use common::http_backend::*;

// ---------------------------------------------------------------- by reference

#[tokio::test]
async fn by_reference_names_the_files_and_the_backend_writes_the_reply() {
    let data = pattern(300_000);
    let backend = Backend::start(Answer {
        response_file: Some(b"written by the backend".to_vec()),
        ..Answer::default()
    })
    .await;
    let fx = upload(&data, REMOTE, None);
    let reply = handler(&backend.url("/app/byref"), Notification::ByReference)
        .reply(fx.upload.clone())
        .await
        .unwrap();

    let seen = backend.only();
    assert_common_headers(&seen, &backend.host(), REMOTE);
    assert_eq!(seen.header("content-length"), Some("0"));
    assert!(seen.body.is_empty());
    let request_file = PathBuf::from(seen.header("bits-request-datafile-name").unwrap());
    let response_file = PathBuf::from(seen.header("bits-response-datafile-name").unwrap());
    assert!(request_file.is_absolute() && response_file.is_absolute());
    assert_eq!(request_file, fx.upload.path);
    assert!(seen.request_file.as_deref() == Some(&data[..]));
    assert_eq!(response_file, fx.session_dir().join(RESPONSE_FILE));
    assert_eq!(seen.header("bits-request-dataentity-name"), None);
    assert_eq!(seen.header("bits-response-dataentity-name"), None);

    assert_eq!(reply_file(&reply), response_file);
    assert_eq!(reply_bytes(&reply), b"written by the backend");
}

#[tokio::test]
async fn by_reference_sends_the_data_entity_names_when_configured() {
    let backend = Backend::start(Answer::default()).await;
    let fx = upload(b"e", REMOTE, None);
    let handler = HttpNotifyHandler::new(
        HttpNotifyConfig::new(backend.url("/n"), Notification::ByReference)
            .also_send_data_entity_headers(true),
    )
    .unwrap();
    handler.reply(fx.upload.clone()).await.unwrap();
    let seen = backend.only();
    assert!(seen.header("bits-request-datafile-name").is_some());
    assert_eq!(
        seen.header("bits-request-dataentity-name"),
        seen.header("bits-request-datafile-name")
    );
    assert_eq!(
        seen.header("bits-response-dataentity-name"),
        seen.header("bits-response-datafile-name")
    );
}

#[tokio::test]
async fn by_reference_a_response_body_wins_over_the_file() {
    let backend = Backend::start(Answer {
        body: b"from the body".to_vec(),
        response_file: Some(b"from the file".to_vec()),
        ..Answer::default()
    })
    .await;
    let fx = upload(b"b", REMOTE, None);
    let reply = handler(&backend.url("/n"), Notification::ByReference)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    assert!(is_run_file(
        &reply_file(&reply),
        fx.session_dir(),
        NOTIFICATION_REPLY_FILE
    ));
    assert_eq!(reply_bytes(&reply), b"from the body");
}

#[tokio::test]
async fn by_reference_no_body_and_no_file_is_an_empty_reply_even_with_a_stale_file() {
    let backend = Backend::start(Answer::default()).await;
    let fx = upload(b"s", REMOTE, None);
    // Left by an earlier attempt: must not become this reply.
    std::fs::write(fx.session_dir().join(RESPONSE_FILE), b"stale").unwrap();
    let reply = handler(&backend.url("/n"), Notification::ByReference)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    assert!(matches!(reply.body, ReplyBody::Empty), "{reply:?}");
}

// ---------------------------------------------------------------- response headers

#[tokio::test]
async fn static_response_url_is_the_reply() {
    for mode in [Notification::ByValue, Notification::ByReference] {
        let backend = Backend::start(Answer {
            headers: vec![(
                "BITS-Static-Response-URL",
                "http://cdn.example/replies/shared.bin".into(),
            )],
            body: b"ignored".to_vec(),
            ..Answer::default()
        })
        .await;
        let fx = upload(b"u", REMOTE, None);
        let reply = handler(&backend.url("/n"), mode)
            .reply(fx.upload.clone())
            .await
            .unwrap();
        match &reply.body {
            ReplyBody::StaticUrl(u) => assert_eq!(u, "http://cdn.example/replies/shared.bin"),
            other => panic!("{mode:?}: {other:?}"),
        }
        assert!(!reply.commit_upload);
    }
}

#[tokio::test]
async fn relative_static_response_url_is_a_500() {
    for bad in ["/replies/shared.bin", "shared.bin", "ftp://cdn.example/x"] {
        let backend = Backend::start(Answer {
            headers: vec![("BITS-Static-Response-URL", bad.into())],
            ..Answer::default()
        })
        .await;
        let fx = upload(b"u", REMOTE, None);
        let err = handler(&backend.url("/n"), Notification::ByReference)
            .reply(fx.upload.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(err, HandlerError::Status { status: 500, .. }),
            "{bad}: {err:?}"
        );
    }
}

#[tokio::test]
async fn copy_file_to_destination_commits_the_upload() {
    let backend = Backend::start(Answer {
        headers: vec![("BITS-Copy-File-To-Destination", "1".into())],
        body: b"reply".to_vec(),
        ..Answer::default()
    })
    .await;
    let fx = upload(b"c", REMOTE, None);
    let reply: Reply = handler(&backend.url("/n"), Notification::ByValue)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    assert!(reply.commit_upload);
    assert_eq!(reply_bytes(&reply), b"reply");

    // With a static URL too, and an empty value ("any value").
    let backend = Backend::start(Answer {
        headers: vec![
            ("BITS-Copy-File-To-Destination", String::new()),
            ("BITS-Static-Response-URL", "https://cdn.example/r".into()),
        ],
        ..Answer::default()
    })
    .await;
    let reply = handler(&backend.url("/n"), Notification::ByReference)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    assert!(reply.commit_upload);
    assert!(matches!(reply.body, ReplyBody::StaticUrl(ref u) if u == "https://cdn.example/r"));
}
