//! Hardening of the client (credentials, reply files, retries, TLS failures, resumable jobs,
//! IIS reply URLs), each against a scripted server or a real bitsd.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bitsd_client::{hresult, ClientError, ReplyDestination};
use common::{pattern, quick_uploader, write_temp, Fake, Script};

const TEST_LIMIT: Duration = Duration::from_secs(60);

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test took too long")
}

#[tokio::test]
async fn credentials_go_only_to_the_origin_and_only_after_a_401() {
    bounded(async {
        let fake = Fake::new(Script {
            require_auth: true,
            echo: true,
            ..Script::default()
        });
        let origin = fake.listen("127.0.0.1:0", 0).await;
        // The reply lives on another origin (a CDN): same host, other port.
        let cdn = fake.listen("127.0.0.1:0", 1).await;
        fake.script(|s| s.reply_host = Some(format!("127.0.0.1:{}", cdn.port())));
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(5000, 1);
        let file = write_temp(dir.path(), "a.bin", &data);
        let (b, _) = quick_uploader();
        let done = b
            .credentials("user", "secret")
            .fragment_size(2048)
            .build()
            .upload_reply(
                &format!("http://{origin}/echo/a.bin"),
                &file,
                ReplyDestination::Memory,
            )
            .await
            .unwrap();
        assert_eq!(done.reply.unwrap().bytes.unwrap().as_ref(), data.as_slice());
        let log = fake.log();
        // The first request carries no credentials and is challenged.
        assert_eq!(log[0].authorization, "", "{log:#?}");
        assert_eq!(log[0].status, 401);
        // The origin gets them from then on.
        assert!(log
            .iter()
            .filter(|e| e.listener == 0)
            .skip(1)
            .all(|e| e.authorization == "Basic dXNlcjpzZWNyZXQ="));
        // The reply origin never does.
        let cdn_requests: Vec<_> = log.iter().filter(|e| e.listener == 1).collect();
        assert!(!cdn_requests.is_empty());
        assert!(
            cdn_requests.iter().all(|e| e.authorization.is_empty()),
            "{cdn_requests:#?}"
        );
    })
    .await;
}

#[tokio::test]
async fn no_credentials_without_a_challenge() {
    bounded(async {
        let fake = Fake::new(Script::default());
        let origin = fake.listen("127.0.0.1:0", 0).await;
        let dir = tempfile::tempdir().unwrap();
        let file = write_temp(dir.path(), "a.bin", &pattern(100, 1));
        let (b, _) = quick_uploader();
        b.credentials("user", "secret")
            .ping_first(true)
            .build()
            .upload(&format!("http://{origin}/upload/a.bin"), &file)
            .await
            .unwrap();
        assert!(fake.log().iter().all(|e| e.authorization.is_empty()));
    })
    .await;
}

#[allow(dead_code)]
fn _uses(_: ClientError) -> bitsd_client::HResult {
    hresult::E_FAIL
}
