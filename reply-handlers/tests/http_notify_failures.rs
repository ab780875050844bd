//! The `http` handler against a real HTTP backend playing the IIS server application (§9):
//! backend failures (statuses, timeouts, dropped, cut and stalled connections) and bad
//! configurations.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bitsd_reply_handlers::{
    HandlerError, HttpNotifyConfig, HttpNotifyHandler, Notification, ReplyHandler,
};
use common::{pattern, reply_bytes, upload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use common::http_backend::*;

// ---------------------------------------------------------------- failures

#[tokio::test]
async fn backend_statuses_other_than_200_are_relayed() {
    for code in [403, 409, 500, 503, 413, 201, 404] {
        let backend = Backend::start(Answer {
            body: b"no".to_vec(),
            ..status(code)
        })
        .await;
        let fx = upload(b"f", REMOTE, None);
        let err = handler(&backend.url("/n"), Notification::ByValue)
            .reply(fx.upload.clone())
            .await
            .unwrap_err();
        match err {
            HandlerError::Status { status, .. } => assert_eq!(status, code),
            other => panic!("{code}: {other:?}"),
        }
        assert_eq!(backend.seen.lock().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn a_slow_answer_past_the_timeout_is_unreachable() {
    let backend = Backend::start(Answer {
        delay: Duration::from_secs(5),
        ..Answer::default()
    })
    .await;
    let fx = upload(b"slow", REMOTE, None);
    let started = Instant::now();
    let err = with_timeout(
        &backend.url("/n"),
        Notification::ByValue,
        Duration::from_millis(300),
    )
    .reply(fx.upload.clone())
    .await
    .unwrap_err();
    assert!(matches!(err, HandlerError::Unreachable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(backend.only().body, b"slow");
}

#[tokio::test]
async fn connection_refused_is_unreachable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let fx = upload(b"r", REMOTE, None);
    let err = handler(&format!("http://{addr}/n"), Notification::ByValue)
        .reply(fx.upload.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, HandlerError::Unreachable(_)), "{err:?}");
}

/// A raw TCP "backend" for one connection: reads the request head, writes `answer`, then
/// waits `hold` and closes the connection.
async fn raw_backend(answer: &'static [u8], hold: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = stream.write_all(answer).await;
        tokio::time::sleep(hold).await;
    });
    addr
}

#[tokio::test]
async fn a_dropped_connection_is_unreachable() {
    let addr = raw_backend(b"", Duration::ZERO).await;
    let fx = upload(b"d", REMOTE, None);
    let err = handler(&format!("http://{addr}/n"), Notification::ByReference)
        .reply(fx.upload.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, HandlerError::Unreachable(_)), "{err:?}");
}

#[tokio::test]
async fn a_response_body_cut_short_is_unreachable() {
    let addr = raw_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this",
        Duration::ZERO,
    )
    .await;
    let fx = upload(b"d", REMOTE, None);
    let err = handler(&format!("http://{addr}/n"), Notification::ByReference)
        .reply(fx.upload.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, HandlerError::Unreachable(_)), "{err:?}");
}

#[tokio::test]
async fn a_stalled_response_body_is_unreachable() {
    let addr = raw_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome",
        Duration::from_secs(5),
    )
    .await;
    let fx = upload(b"d", REMOTE, None);
    let started = Instant::now();
    let err = with_timeout(
        &format!("http://{addr}/n"),
        Notification::ByReference,
        Duration::from_millis(300),
    )
    .reply(fx.upload.clone())
    .await
    .unwrap_err();
    assert!(matches!(err, HandlerError::Unreachable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_chunked_response_body_is_the_reply() {
    let addr = raw_backend(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        Duration::ZERO,
    )
    .await;
    let fx = upload(b"d", REMOTE, None);
    let reply = handler(&format!("http://{addr}/n"), Notification::ByReference)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    assert_eq!(reply_bytes(&reply), b"hello world");
}

#[tokio::test]
async fn https_notification_urls_are_refused_at_construction() {
    let err = HttpNotifyHandler::new(HttpNotifyConfig::new(
        "https://backend/app",
        Notification::ByValue,
    ))
    .unwrap_err();
    assert!(
        matches!(
            err,
            bitsd_reply_handlers::HandlerConfigError::HttpsNotification(_)
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_upload_file_shorter_than_its_length_is_a_500_not_unreachable() {
    let backend = Backend::start(Answer::default()).await;
    let fx = upload(&pattern(100_000), REMOTE, None);
    let mut short = fx.upload.clone();
    short.len += 10;
    let err = handler(&backend.url("/n"), Notification::ByValue)
        .reply(short)
        .await
        .unwrap_err();
    assert!(
        matches!(err, HandlerError::Status { status: 500, .. }),
        "{err:?}"
    );
}
