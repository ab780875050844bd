//! The `digest` and `static` handlers.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime};

use bitsd_reply_handlers::{
    DigestHandler, DigestReceipt, HandlerError, ReplyBody, ReplyHandler, StaticHandler,
};
use common::{pattern, reply_bytes, upload};
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn digest_receipt_matches_a_sha256_of_the_upload() {
    let data = pattern(3 * 1024 * 1024 + 5);
    let fx = upload(&data, "http://h/digest/f.bin", Some("f.bin"));
    let before = SystemTime::now() - Duration::from_secs(1);
    let reply = DigestHandler::new().reply(fx.upload.clone()).await.unwrap();
    let json = reply_bytes(&reply);
    let receipt: DigestReceipt = serde_json::from_slice(&json).unwrap();
    assert_eq!(receipt.session_id, fx.upload.session_id.to_string());
    assert_eq!(receipt.size, data.len() as u64);
    assert_eq!(receipt.sha256, hex(&Sha256::digest(&data)));
    assert_eq!(receipt.content_name.as_deref(), Some("f.bin"));
    assert!(receipt.received.ends_with('Z'), "{}", receipt.received);
    let received = humantime::parse_rfc3339(&receipt.received).unwrap();
    assert!(received >= before && received <= SystemTime::now() + Duration::from_secs(1));

    // The field order of the brief, exactly these keys.
    let text = String::from_utf8(json).unwrap();
    let order: Vec<usize> = [
        "\"session_id\"",
        "\"size\"",
        "\"sha256\"",
        "\"received\"",
        "\"content_name\"",
    ]
    .iter()
    .map(|k| text.find(k).unwrap())
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value.as_object().unwrap().len(), 5);
}

#[tokio::test]
async fn digest_of_an_empty_upload_without_content_name() {
    let fx = upload(b"", "http://h/digest/f.bin", None);
    let reply = DigestHandler.reply(fx.upload.clone()).await.unwrap();
    let value: serde_json::Value = serde_json::from_slice(&reply_bytes(&reply)).unwrap();
    assert_eq!(value["size"], 0);
    assert_eq!(
        value["sha256"],
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert!(value["content_name"].is_null());
}

#[tokio::test]
async fn digest_reads_only_the_upload_length() {
    // The upload file may hold more bytes than were acknowledged; only `len` count.
    let fx = upload(b"hello world", "http://h/digest/f", None);
    let mut short = fx.upload.clone();
    short.len = 5;
    let reply = DigestHandler.reply(short).await.unwrap();
    let receipt: DigestReceipt = serde_json::from_slice(&reply_bytes(&reply)).unwrap();
    assert_eq!(receipt.size, 5);
    assert_eq!(receipt.sha256, hex(&Sha256::digest(b"hello")));
}

#[tokio::test]
async fn static_file_is_every_clients_reply() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shared-reply.bin");
    std::fs::write(&file, b"the same for all").unwrap();
    let handler = StaticHandler::file(&file);
    assert_eq!(handler.reply_file(), Some(file.as_path()));
    for _ in 0..2 {
        let fx = upload(b"whatever", "http://h/static/x", None);
        let reply = handler.reply(fx.upload.clone()).await.unwrap();
        match &reply.body {
            ReplyBody::File(p) => assert_eq!(p, &file),
            other => panic!("{other:?}"),
        }
        assert_eq!(reply_bytes(&reply), b"the same for all");
        assert!(!reply.commit_upload);
    }
}

#[tokio::test]
async fn missing_static_file_is_a_500() {
    let dir = tempfile::tempdir().unwrap();
    let fx = upload(b"x", "http://h/static/x", None);
    for path in [dir.path().join("missing"), dir.path().to_path_buf()] {
        let err = StaticHandler::file(&path)
            .reply(fx.upload.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(err, HandlerError::Status { status: 500, .. }),
            "{err:?}"
        );
    }
}

#[tokio::test]
async fn static_url_is_every_clients_reply_url() {
    let handler = StaticHandler::url("http://cdn.example/replies/today.bin").unwrap();
    assert_eq!(
        handler.reply_url(),
        Some("http://cdn.example/replies/today.bin")
    );
    let fx = upload(b"x", "http://h/static/x", None);
    let reply = handler.reply(fx.upload.clone()).await.unwrap();
    match reply.body {
        ReplyBody::StaticUrl(u) => assert_eq!(u, "http://cdn.example/replies/today.bin"),
        other => panic!("{other:?}"),
    }
    assert!(StaticHandler::url("replies/today.bin").is_err());
}
