//! The reply download against a scripted server: reply URLs without sizes or ranges, and
//! dropped connections in the middle of a reply.
#![allow(clippy::unwrap_used)]

mod common;

use bitsd_client::{hresult, JobEvent, ReplyDestination, Request, BG_SIZE_UNKNOWN};
use common::{bounded, quick_uploader, setup, Script, Serve};

#[tokio::test]
async fn reply_without_content_length_fails_with_missing_file_size() {
    bounded(async {
        let s = setup(
            Script {
                echo: true,
                serve: Serve::NoContentLength,
                ..Script::default()
            },
            500,
        )
        .await;
        let (b, _) = quick_uploader();
        let err = b
            .build()
            .upload_reply(&s.url, &s.file, ReplyDestination::Memory)
            .await
            .unwrap_err();
        assert_eq!(err.hresult(), Some(hresult::BG_E_MISSING_FILE_SIZE));
        assert!(err
            .to_string()
            .starts_with("BG_E_MISSING_FILE_SIZE (0x80200011)"));
        assert_eq!(err.bits().unwrap().request(), Some(Request::ReplyHead));
        assert!(s.fake.log().iter().all(|e| e.method != "GET"));
    })
    .await;
}

#[tokio::test]
async fn reply_without_range_support() {
    bounded(async {
        // A 200 with the whole reply is fine for the first GET...
        let s = setup(
            Script {
                echo: true,
                serve: Serve::IgnoreRange,
                ..Script::default()
            },
            3000,
        )
        .await;
        let (b, _) = quick_uploader();
        let out = b
            .build()
            .upload_reply(&s.url, &s.file, ReplyDestination::Memory)
            .await
            .unwrap();
        assert_eq!(out.reply.unwrap().bytes.unwrap(), s.data);

        // ...but not to resume after a dropped connection.
        let s = setup(
            Script {
                echo: true,
                serve: Serve::IgnoreRange,
                drop_reply_after: Some((1000, 1)),
                ..Script::default()
            },
            3000,
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let out_path = dir.path().join("reply.bin");
        let (b, _) = quick_uploader();
        let err = b
            .build()
            .upload_reply(&s.url, &s.file, ReplyDestination::File(out_path.clone()))
            .await
            .unwrap_err();
        assert_eq!(
            err.hresult(),
            Some(hresult::BG_E_INSUFFICIENT_RANGE_SUPPORT)
        );
        assert!(err
            .to_string()
            .starts_with("BG_E_INSUFFICIENT_RANGE_SUPPORT (0x80200013)"));
        assert!(!out_path.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no .part left"
        );

        // A 206 whose Content-Range does not match the request.
        let s = setup(
            Script {
                echo: true,
                serve: Serve::BadContentRange,
                ..Script::default()
            },
            3000,
        )
        .await;
        let (b, _) = quick_uploader();
        let err = b
            .build()
            .upload_reply(&s.url, &s.file, ReplyDestination::Memory)
            .await
            .unwrap_err();
        assert_eq!(
            err.hresult(),
            Some(hresult::BG_E_INSUFFICIENT_RANGE_SUPPORT)
        );
    })
    .await;
}

#[tokio::test]
async fn reply_resumes_after_dropped_connections() {
    bounded(async {
        let s = setup(
            Script {
                echo: true,
                drop_reply_after: Some((1000, 3)),
                ..Script::default()
            },
            10_000,
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let out_path = dir.path().join("reply.bin");
        let (b, rec) = quick_uploader();
        let out = b
            .fragment_size(4096)
            .reply_chunk_size(6000)
            .build()
            .upload_reply(&s.url, &s.file, ReplyDestination::File(out_path.clone()))
            .await
            .unwrap();
        assert_eq!(std::fs::read(&out_path).unwrap(), s.data);
        let reply = out.reply.unwrap();
        assert_eq!((reply.size, reply.path), (10_000, Some(out_path)));
        let gets: Vec<String> = s
            .fake
            .log()
            .into_iter()
            .filter(|e| e.method == "GET")
            .map(|e| e.range)
            .collect();
        assert_eq!(
            gets,
            vec![
                "bytes=0-5999",
                "bytes=1000-6999",
                "bytes=2000-7999",
                "bytes=3000-8999",
                "bytes=9000-9999",
            ]
        );
        let heads = s.fake.log().iter().filter(|e| e.method == "HEAD").count();
        assert_eq!(heads, 1);
        let events = rec.events();
        assert!(events.contains(&JobEvent::ReplyResumed { offset: 3000 }));
        // Reply progress: unknown until the download begins, then the size.
        let progress = rec.seen();
        let first_known = progress
            .iter()
            .position(|p| p.reply.bytes_total != BG_SIZE_UNKNOWN)
            .unwrap();
        assert!(first_known > 0);
        assert!(progress[..first_known]
            .iter()
            .all(|p| p.reply.bytes_total == BG_SIZE_UNKNOWN));
        assert!(progress[first_known..]
            .iter()
            .all(|p| p.reply.bytes_total == 10_000));
        let last = progress.last().unwrap();
        assert_eq!(last.reply.bytes_transferred, 10_000);
        assert_eq!(last.upload.bytes_transferred, 10_000);
    })
    .await;
}

#[tokio::test]
async fn a_reply_url_whose_host_does_not_resolve_says_where_such_a_host_comes_from() {
    bounded(async {
        let s = setup(
            Script {
                echo: true,
                reply_host: Some("bitsd-test.invalid:1".into()),
                ..Script::default()
            },
            500,
        )
        .await;
        let (b, _) = quick_uploader();
        let err = b
            .retry_policy(bitsd_client::RetryPolicy {
                max_retries: 1,
                ..common::quick_retry()
            })
            .build()
            .upload_reply(&s.url, &s.file, ReplyDestination::Memory)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(err.is_transient(), "{text}");
        assert!(
            text.contains("cannot resolve the host name \"bitsd-test.invalid\"")
                && text.contains("proxy_set_header Host")
                && text.contains("public_url"),
            "{text}"
        );
    })
    .await;
}
