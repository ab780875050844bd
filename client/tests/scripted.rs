//! The client against a scripted server that plays what bitsd never does: server farms with
//! Host-Id, failing server applications (context 0x7), reply URLs without sizes or ranges,
//! dropped connections, lost Acks and gaps.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bitsd_client::{
    hresult, BitsUploader, ClientError, ErrorContext, HResult, JobEvent, ReplyDestination, Request,
    RetryPolicy,
};
use common::{bounded, closed_port, pattern, quick_uploader, setup, write_temp, Fake, Script};

#[tokio::test]
async fn host_id_redirects_to_the_node_after_a_ping() {
    bounded(async {
        let fake2 = Fake::new(Script::default());
        let front2 = fake2.listen("127.0.0.1:0", 0).await;
        let node = fake2.listen("127.0.0.1:0", 1).await;
        fake2.script(|s| {
            s.host_id = Some(format!("127.0.0.1:{}", node.port()));
            s.host_id_fallback = Some("60".into());
            s.front_forgets_redirected = true;
        });
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(10_000, 3);
        let file = write_temp(dir.path(), "a.bin", &data);
        let (b, rec) = quick_uploader();
        let up = b.fragment_size(4096).build();
        let out = up
            .upload(&format!("http://{front2}/upload/a.bin"), &file)
            .await
            .unwrap();
        assert_eq!(out.url, format!("http://127.0.0.1:{}/upload/a.bin", node.port()));
        let log = fake2.log();
        let seq: Vec<(usize, String)> = log
            .iter()
            .map(|e| (e.listener, e.packet.clone()))
            .collect();
        assert_eq!(
            seq,
            vec![
                (0, "Create-Session".to_owned()),
                (1, "Ping".to_owned()),
                (1, "Fragment".to_owned()),
                (1, "Fragment".to_owned()),
                (1, "Fragment".to_owned()),
                (1, "Close-Session".to_owned()),
            ]
        );
        assert!(log[1..]
            .iter()
            .all(|e| e.host == format!("127.0.0.1:{}", node.port())));
        assert_eq!(fake2.uploaded(&out.session_id).unwrap(), data);
        assert!(rec.events().iter().any(|e| matches!(
            e,
            JobEvent::HostIdRedirect { fallback_timeout: Some(t), .. } if *t == Duration::from_secs(60)
        )));
    })
    .await;
}

#[tokio::test]
async fn host_id_bare_host_keeps_the_port() {
    bounded(async {
        // 127.0.0.2 is loopback too on Linux; skip where it cannot be bound.
        let fake = Fake::new(Script {
            host_id: Some("127.0.0.2".into()),
            front_forgets_redirected: true,
            ..Script::default()
        });
        let front = fake.listen("127.0.0.1:0", 0).await;
        if tokio::net::TcpListener::bind(("127.0.0.2", 0))
            .await
            .is_err()
        {
            eprintln!("127.0.0.2 not bindable here; skipping");
            return;
        }
        let node = fake.listen(&format!("127.0.0.2:{}", front.port()), 1).await;
        assert_eq!(node.port(), front.port());
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(5000, 4);
        let file = write_temp(dir.path(), "a.bin", &data);
        let (b, _rec) = quick_uploader();
        let out = b
            .build()
            .upload(&format!("http://{front}/upload/a.bin"), &file)
            .await
            .unwrap();
        assert_eq!(
            out.url,
            format!("http://127.0.0.2:{}/upload/a.bin", front.port())
        );
        let frags = fake.packets("Fragment");
        assert!(!frags.is_empty() && frags.iter().all(|e| e.listener == 1));
        assert_eq!(fake.uploaded(&out.session_id).unwrap(), data);
    })
    .await;
}

#[tokio::test]
async fn host_id_fallback_timer_returns_to_the_original_url() {
    bounded(async {
        let dead = closed_port().await;
        let mut s = setup(
            Script {
                host_id: Some(format!("127.0.0.1:{}", dead.port())),
                host_id_fallback: Some("1".into()),
                host_id_once: true,
                front_forgets_redirected: true,
                ..Script::default()
            },
            9000,
        )
        .await;
        let (b, rec) = quick_uploader();
        let started = Instant::now();
        let out = b
            .fragment_size(4096)
            .build()
            .upload(&s.url, &s.file)
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_secs(1));
        let events = rec.events();
        assert!(events
            .iter()
            .any(|e| matches!(e, JobEvent::HostIdFallback { url } if *url == s.url)));
        // The front does not know the redirected session: session-not-found, new session
        // (without Host-Id this time), upload from 0, all on the original URL.
        assert_eq!(out.restarts, 1);
        assert_eq!(out.url, s.url);
        assert_eq!(s.fake.packets("Create-Session").len(), 2);
        assert!(s.fake.log().iter().all(|e| e.listener == 0));
        assert_eq!(s.fake.uploaded(&out.session_id).unwrap(), s.data);
        s.data.clear();
    })
    .await;
}

#[tokio::test]
async fn host_id_without_fallback_never_goes_back() {
    bounded(async {
        let dead = closed_port().await;
        let s = setup(
            Script {
                host_id: Some(format!("127.0.0.1:{}", dead.port())),
                ..Script::default()
            },
            100,
        )
        .await;
        let (b, _rec) = quick_uploader();
        let err = b
            .retry_policy(RetryPolicy {
                initial_delay: Duration::from_millis(5),
                max_delay: Duration::from_millis(20),
                max_retries: 5,
            })
            .build()
            .upload(&s.url, &s.file)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Transport {
                    request: Request::Ping,
                    ..
                }
            ),
            "{err}"
        );
        assert!(s.fake.packets("Fragment").is_empty());
        // The session is cancelled on the way out (to the node, which is unreachable).
    })
    .await;
}

#[tokio::test]
async fn backend_transient_errors_are_retried() {
    bounded(async {
        // 500, 409, 408, 503, 308 are transient in context 0x7.
        let s = setup(
            Script {
                echo: true,
                backend_failures: vec![500, 409, 408, 503, 308],
                ..Script::default()
            },
            5000,
        )
        .await;
        let (b, rec) = quick_uploader();
        let out = b
            .fragment_size(2048)
            .build()
            .upload_reply(&s.url, &s.file, ReplyDestination::Memory)
            .await
            .unwrap();
        assert_eq!(out.reply.unwrap().bytes.unwrap(), s.data);
        let finals: Vec<_> = s
            .fake
            .packets("Fragment")
            .into_iter()
            .filter(|e| e.range == "bytes 4096-4999/5000")
            .collect();
        assert_eq!(finals.len(), 6);
        let retries = rec
            .events()
            .iter()
            .filter(|e| matches!(e, JobEvent::Retrying { .. }))
            .count();
        assert_eq!(retries, 5);
    })
    .await;
}

#[tokio::test]
async fn backend_fatal_errors_stop_the_job() {
    bounded(async {
        for status in [403u16, 404, 400, 300, 305, 307, 501, 505] {
            let s = setup(
                Script {
                    echo: true,
                    backend_failures: vec![status],
                    ..Script::default()
                },
                100,
            )
            .await;
            let (b, _rec) = quick_uploader();
            let err = b
                .build()
                .upload_reply(&s.url, &s.file, ReplyDestination::Memory)
                .await
                .unwrap_err();
            let f = err.bits().unwrap_or_else(|| panic!("{status}: {err}"));
            assert_eq!(f.code(), HResult::http_error(status), "{status}");
            assert_eq!(f.context(), ErrorContext::RemoteApplication);
            assert_eq!(f.status(), Some(status));
            assert!(!err.is_transient());
            assert!(err.to_string().starts_with(&format!(
                "BG_E_HTTP_ERROR_{status} (0x{:08x}), context 0x7",
                0x8019_0000u32 + u32::from(status)
            )));
            assert_eq!(
                s.fake.packets("Fragment").len(),
                1,
                "{status}: never re-posted"
            );
            // Cancel-Session was sent after the fatal error.
            assert_eq!(s.fake.packets("Cancel-Session").len(), 1);
        }
    })
    .await;
}

#[tokio::test]
async fn server_errors_classified_by_the_error_table() {
    bounded(async {
        // 5xx (context 0x5) transient: retried.
        let s = setup(
            Script {
                fragment_failures: vec![(503, None), (500, Some(0x8007_0070))],
                ..Script::default()
            },
            300,
        )
        .await;
        let (b, _) = quick_uploader();
        let out = b.build().upload(&s.url, &s.file).await.unwrap();
        assert_eq!(out.retries, 2);
        assert_eq!(s.fake.uploaded(&out.session_id).unwrap(), s.data);

        // 400 E_INVALIDARG fatal.
        let s = setup(
            Script {
                fragment_failures: vec![(400, Some(0x8007_0057))],
                ..Script::default()
            },
            300,
        )
        .await;
        let (b, _) = quick_uploader();
        let err = b.build().upload(&s.url, &s.file).await.unwrap_err();
        assert_eq!(err.hresult(), Some(hresult::E_INVALIDARG));
        assert!(err
            .to_string()
            .starts_with("E_INVALIDARG (0x80070057), context 0x5"));
        assert_eq!(s.fake.packets("Fragment").len(), 1);

        // 501 E_ACCESSDENIED fatal; no BITS error header → BG_E_HTTP_ERROR_404 fatal.
        for (status, code, expect) in [
            (501, Some(0x8007_0005), hresult::E_ACCESSDENIED),
            (404, None, HResult(0x8019_0194)),
        ] {
            let s = setup(
                Script {
                    fragment_failures: vec![(status, code)],
                    ..Script::default()
                },
                10,
            )
            .await;
            let (b, _) = quick_uploader();
            let err = b.build().upload(&s.url, &s.file).await.unwrap_err();
            assert_eq!(err.hresult(), Some(expect), "{status}");
            assert_eq!(err.context(), Some(ErrorContext::RemoteFile));
        }
    })
    .await;
}

#[tokio::test]
async fn lost_ack_and_gap_resync() {
    bounded(async {
        let s = setup(
            Script {
                lose_ack_on_fragment: Some(2),
                gap_on_fragment: Some(4),
                ..Script::default()
            },
            10_000,
        )
        .await;
        let (b, rec) = quick_uploader();
        let out = b
            .fragment_size(2000)
            .build()
            .upload(&s.url, &s.file)
            .await
            .unwrap();
        assert_eq!(s.fake.uploaded(&out.session_id).unwrap(), s.data);
        let ranges: Vec<String> = s
            .fake
            .packets("Fragment")
            .into_iter()
            .map(|e| e.range)
            .collect();
        // Fragment 2's Ack is lost: re-sent (overlap → 200). Fragment 4 (the re-send counts)
        // finds the server 100 bytes short: 416 → resync to 3900.
        assert_eq!(
            ranges,
            vec![
                "bytes 0-1999/10000",
                "bytes 2000-3999/10000",
                "bytes 2000-3999/10000",
                "bytes 4000-5999/10000",
                "bytes 3900-5899/10000",
                "bytes 5900-7899/10000",
                "bytes 7900-9899/10000",
                "bytes 9900-9999/10000",
            ]
        );
        assert!(rec.events().contains(&JobEvent::Resync {
            from: 4000,
            to: 3900
        }));
        assert_eq!(out.retries, 1);
    })
    .await;
}

#[tokio::test]
async fn protocol_mismatch_is_fatal() {
    bounded(async {
        let s = setup(
            Script {
                protocol: Some("{00000000-0000-0000-0000-000000000001}".into()),
                ..Script::default()
            },
            10,
        )
        .await;
        let (b, _) = quick_uploader();
        let err = b.build().upload(&s.url, &s.file).await.unwrap_err();
        assert_eq!(
            err.hresult(),
            Some(hresult::BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH)
        );
        assert!(s.fake.packets("Fragment").is_empty());
    })
    .await;
}

#[tokio::test]
async fn upload_reply_without_reply_url_is_an_error() {
    bounded(async {
        let s = setup(Script::default(), 10).await;
        let (b, _) = quick_uploader();
        let err = b
            .build()
            .upload_reply(&s.url, &s.file, ReplyDestination::Memory)
            .await
            .unwrap_err();
        assert_eq!(err.hresult(), Some(hresult::BG_E_INVALID_SERVER_RESPONSE));
    })
    .await;
}

#[tokio::test]
async fn close_session_retried_on_5xx_not_on_session_not_found() {
    bounded(async {
        let s = setup(
            Script {
                close_failures: vec![(503, None), (500, Some(0x8000_4005))],
                ..Script::default()
            },
            10,
        )
        .await;
        let (b, _) = quick_uploader();
        let out = b.build().upload(&s.url, &s.file).await.unwrap();
        assert!(out.closed);
        assert_eq!(s.fake.packets("Close-Session").len(), 3);

        let s = setup(
            Script {
                close_failures: vec![(500, Some(0x8020_001f))],
                ..Script::default()
            },
            10,
        )
        .await;
        let (b, _) = quick_uploader();
        let out = b.build().upload(&s.url, &s.file).await.unwrap();
        assert!(out.closed);
        assert_eq!(s.fake.packets("Close-Session").len(), 1);
        assert_eq!(s.fake.packets("Create-Session").len(), 1);

        let s = setup(
            Script {
                close_failures: vec![(400, Some(0x8007_0057))],
                ..Script::default()
            },
            10,
        )
        .await;
        let (b, _) = quick_uploader();
        let out = b.build().upload(&s.url, &s.file).await.unwrap();
        assert!(!out.closed);
        assert_eq!(s.fake.packets("Close-Session").len(), 1);
    })
    .await;
}

#[tokio::test]
async fn basic_auth_and_ping_first() {
    bounded(async {
        let s = setup(
            Script {
                require_auth: true,
                ..Script::default()
            },
            10,
        )
        .await;
        let (b, _) = quick_uploader();
        b.credentials("user", "secret")
            .ping_first(true)
            .build()
            .upload(&s.url, &s.file)
            .await
            .unwrap();
        let log = s.fake.log();
        // Never pre-emptively: the first Ping goes without credentials, gets 401, and is
        // re-sent with them; every later packet carries them.
        assert_eq!((log[0].packet.as_str(), log[0].status), ("Ping", 401));
        assert_eq!(log[0].authorization, "");
        assert_eq!((log[1].packet.as_str(), log[1].status), ("Ping", 200));
        assert_eq!(log[2].packet, "Create-Session");
        // base64("user:secret")
        assert!(log[1..]
            .iter()
            .all(|e| e.authorization == "Basic dXNlcjpzZWNyZXQ="));
    })
    .await;
}

#[tokio::test]
async fn cancel_session_api() {
    bounded(async {
        let s = setup(Script::default(), 10).await;
        let up = BitsUploader::builder().build();
        // Unknown session: BG_E_SESSION_NOT_FOUND counts as done, not retried.
        up.cancel_session(&s.url, "{nope}").await.unwrap();
        up.close_session(&s.url, "{nope}").await.unwrap();
        assert_eq!(s.fake.packets("Cancel-Session").len(), 1);
        assert_eq!(s.fake.packets("Close-Session").len(), 1);
    })
    .await;
}
