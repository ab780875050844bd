//! Hardening of the client (credentials, reply files, retries, TLS failures, resumable jobs,
//! IIS reply URLs), each against a scripted server or a real bitsd.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bitsd_client::{hresult, ClientError, ReplyDestination};
use common::{bounded, pattern, quick_uploader, write_temp, Fake, Script};

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

async fn echo_setup(size: usize) -> (Fake, String, tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let fake = Fake::new(Script {
        echo: true,
        ..Script::default()
    });
    let addr = fake.listen("127.0.0.1:0", 0).await;
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(size, 9);
    let file = write_temp(dir.path(), "q.bin", &data);
    (fake, format!("http://{addr}/echo/q.bin"), dir, file, data)
}

#[cfg(unix)]
#[tokio::test]
async fn reply_file_is_never_written_through_a_planted_link() {
    bounded(async {
        let (_fake, url, dir, file, data) = echo_setup(20_000).await;
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let out = dir.path().join("out");
        std::os::unix::fs::symlink(&victim, dir.path().join("out.part")).unwrap();
        let (b, _) = quick_uploader();
        b.build()
            .upload_reply(&url, &file, ReplyDestination::File(out.clone()))
            .await
            .unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(&out)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&out).unwrap(), data);
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".part") && n != "out.part")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    })
    .await;
}

#[tokio::test]
async fn existing_reply_file_is_replaced_only_when_asked() {
    bounded(async {
        let (fake, url, dir, file, data) = echo_setup(3000).await;
        let out = dir.path().join("out");
        std::fs::write(&out, b"old reply").unwrap();
        let (b, _) = quick_uploader();
        let up = b.build();
        let err = up
            .run(
                bitsd_client::UploadJob::new(&url, &file)
                    .reply_to(ReplyDestination::File(out.clone())),
            )
            .await
            .unwrap_err();
        match &err {
            ClientError::LocalFile { path, source } => {
                assert_eq!(path, &out);
                assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists);
                assert!(err.to_string().contains("--force"), "{err}");
            }
            e => panic!("unexpected {e}"),
        }
        // Refused before anything was uploaded.
        assert!(fake.log().is_empty());
        assert_eq!(std::fs::read(&out).unwrap(), b"old reply");
        up.run(
            bitsd_client::UploadJob::new(&url, &file)
                .reply_to(ReplyDestination::File(out.clone()))
                .overwrite_reply(true),
        )
        .await
        .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
    })
    .await;
}

#[tokio::test]
async fn memory_reply_is_capped() {
    bounded(async {
        let (fake, url, _dir, file, _data) = echo_setup(5000).await;
        let (b, _) = quick_uploader();
        let err = b
            .max_memory_reply(1000)
            .build()
            .upload_reply(&url, &file, ReplyDestination::Memory)
            .await
            .unwrap_err();
        assert_eq!(err.hresult(), Some(hresult::BG_E_TOO_LARGE), "{err}");
        assert!(fake.log().iter().all(|e| e.method != "GET"));
    })
    .await;
}

#[tokio::test]
async fn iis_relative_backslash_reply_url_is_resolved_and_downloaded() {
    bounded(async {
        let fake = Fake::new(Script {
            echo: true,
            iis_relative_reply: true,
            ..Script::default()
        });
        let addr = fake.listen("127.0.0.1:0", 0).await;
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(30_000, 5);
        let file = write_temp(dir.path(), "q.bin", &data);
        let (b, _) = quick_uploader();
        let done = b
            .build()
            .upload_reply(
                &format!("http://{addr}/dir/q.bin"),
                &file,
                ReplyDestination::Memory,
            )
            .await
            .unwrap();
        let reply = done.reply.unwrap();
        let key = done.session_id.trim_matches(|c| c == '{' || c == '}');
        let want = format!("/dir/BITS-Sessions/Replies/%7B{key}%7D/responsefile.bin");
        assert_eq!(reply.url, format!("http://{addr}{want}"));
        assert_eq!(reply.bytes.unwrap().as_ref(), data.as_slice());
        let gets: Vec<_> = fake
            .log()
            .into_iter()
            .filter(|e| e.method == "GET" || e.method == "HEAD")
            .collect();
        assert!(!gets.is_empty());
        assert!(
            gets.iter().all(|e| e.path == want && e.status < 300),
            "{gets:#?}"
        );
    })
    .await;
}

#[tokio::test]
async fn reply_that_changes_mid_download_is_downloaded_again_from_the_start() {
    bounded(async {
        let fake = Fake::new(Script {
            echo: true,
            drop_reply_after: Some((4000, 1)),
            reply_changes_after_drop: true,
            ..Script::default()
        });
        let addr = fake.listen("127.0.0.1:0", 0).await;
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(20_000, 6);
        let file = write_temp(dir.path(), "q.bin", &data);
        let out = dir.path().join("reply.bin");
        let (b, _) = quick_uploader();
        b.build()
            .upload_reply(
                &format!("http://{addr}/echo/q.bin"),
                &file,
                ReplyDestination::File(out.clone()),
            )
            .await
            .unwrap();
        // The server now serves the changed reply (the upload reversed): the file holds it
        // whole, not the first 4000 bytes of the old one and the rest of the new one.
        let mut want = data.clone();
        want.reverse();
        assert_eq!(std::fs::read(&out).unwrap(), want);
        let ranges: Vec<String> = fake
            .log()
            .into_iter()
            .filter(|e| e.method == "GET")
            .map(|e| e.range)
            .collect();
        assert_eq!(ranges.last().unwrap(), "bytes=0-19999", "{ranges:?}");
    })
    .await;
}

/// A server certificate that is its own CA (what `openssl req -x509` makes by default).
fn self_signed_ca(dir: &std::path::Path) -> (rcgen::Certificate, bitsd::TlsFiles) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let files = bitsd::TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    (cert, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_self_signed_certificate_fails_at_once_and_ca_file_trusts_it() {
    bounded(async {
        let keys = tempfile::tempdir().unwrap();
        let (cert, tls) = self_signed_ca(keys.path());
        let server = bitsd_tests::TestServer::start_with(|c| c.tls = Some(tls)).await;
        let url = format!("https://localhost:{}/upload/s.bin", server.addr().port());
        let dir = tempfile::tempdir().unwrap();
        let file = write_temp(dir.path(), "s.bin", &pattern(1000, 2));

        // The default retry policy (1 s doubling, 10 retries) would take minutes: a trust
        // failure must not be retried at all.
        let started = std::time::Instant::now();
        let err = bitsd_client::BitsUploader::builder()
            .build()
            .upload(&url, &file)
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3), "{err}");
        assert!(matches!(err, ClientError::Connection { .. }), "{err:?}");
        assert!(!err.is_transient());
        let msg = err.to_string();
        assert!(
            msg.contains("self-signed") && msg.contains("--ca-file"),
            "{msg}"
        );
        assert!(!msg.contains("CaUsedAsEndEntity"), "{msg}");

        // The server's own certificate, given as trusted, is accepted as it is.
        let done = bitsd_client::BitsUploader::builder()
            .add_root_certificate(cert.der().to_vec())
            .build()
            .upload(&url, &file)
            .await
            .unwrap();
        assert_eq!(done.bytes_uploaded, 1000);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_mismatch_fails_at_once() {
    bounded(async {
        let keys = tempfile::tempdir().unwrap();
        let (_cert, tls) = self_signed_ca(keys.path());
        let server = bitsd_tests::TestServer::start_with(|c| c.tls = Some(tls)).await;
        let plain = Fake::new(Script::default());
        let plain_addr = plain.listen("127.0.0.1:0", 0).await;
        let dir = tempfile::tempdir().unwrap();
        let file = write_temp(dir.path(), "m.bin", &pattern(1000, 2));
        for (url, hint) in [
            // http:// to a TLS port.
            (
                format!("http://127.0.0.1:{}/upload/m.bin", server.addr().port()),
                "https://",
            ),
            // https:// to a plain HTTP port.
            (
                format!("https://127.0.0.1:{}/upload/m.bin", plain_addr.port()),
                "http://",
            ),
        ] {
            let started = std::time::Instant::now();
            let err = bitsd_client::BitsUploader::builder()
                .build()
                .upload(&url, &file)
                .await
                .unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(3), "{url}: {err}");
            assert!(
                matches!(err, ClientError::Connection { .. }),
                "{url}: {err:?}"
            );
            assert!(err.to_string().contains(hint), "{url}: {err}");
        }
    })
    .await;
}

#[tokio::test]
async fn no_progress_timeout_ends_the_retries() {
    bounded(async {
        let fake = Fake::new(Script {
            fragment_failures: vec![(503, None); 1000],
            ..Script::default()
        });
        let addr = fake.listen("127.0.0.1:0", 0).await;
        let dir = tempfile::tempdir().unwrap();
        let file = write_temp(dir.path(), "n.bin", &pattern(100, 2));
        let started = std::time::Instant::now();
        let err = bitsd_client::BitsUploader::builder()
            .retry_policy(bitsd_client::RetryPolicy {
                initial_delay: Duration::from_millis(100),
                max_delay: Duration::from_millis(100),
                max_retries: 1000,
            })
            .no_progress_timeout(Duration::from_millis(700))
            .build()
            .upload(&format!("http://{addr}/upload/n.bin"), &file)
            .await
            .unwrap_err();
        assert_eq!(err.hresult(), Some(bitsd_client::HResult::http_error(503)));
        assert!(started.elapsed() < Duration::from_secs(3));
        let tries = fake.packets("Fragment").len();
        assert!((4..=9).contains(&tries), "{tries} fragments");
    })
    .await;
}

#[tokio::test]
async fn refused_create_session_shows_the_servers_reason() {
    bounded(async {
        let fake = Fake::new(Script {
            forbid_create: Some("a.bin exists and overwrites are off on /upload/".into()),
            ..Script::default()
        });
        let addr = fake.listen("127.0.0.1:0", 0).await;
        let dir = tempfile::tempdir().unwrap();
        let file = write_temp(dir.path(), "a.bin", &pattern(100, 2));
        let err = bitsd_client::BitsUploader::builder()
            .build()
            .upload(&format!("http://{addr}/upload/a.bin"), &file)
            .await
            .unwrap_err();
        assert_eq!(err.hresult(), Some(hresult::E_ACCESSDENIED));
        assert!(
            err.to_string()
                .contains("the server says: a.bin exists and overwrites are off on /upload/"),
            "{err}"
        );

        // A real bitsd refusing an overwrite says why in X-Bitsd-Error-Message, and the
        // client prints it.
        let server = bitsd_tests::TestServer::start().await;
        let url = format!("http://{}/upload/a.bin", server.addr());
        let up = bitsd_client::BitsUploader::builder().build();
        up.upload(&url, &file).await.unwrap();
        let err = up.upload(&url, &file).await.unwrap_err();
        assert_eq!(err.hresult(), Some(hresult::E_ACCESSDENIED));
        let msg = err.to_string();
        assert!(
            msg.contains("the server says:") && msg.contains("exists and overwrites are off"),
            "{msg}"
        );
    })
    .await;
}

#[tokio::test]
async fn resuming_a_finished_upload_fetches_the_reply() {
    bounded(async {
        let (fake, url, _dir, file, data) = echo_setup(5000).await;
        let (b, _) = quick_uploader();
        let up = b.fragment_size(2000).cancel_on_error(false).build();
        // A first run that completes the upload; its session stays (no Close-Session is
        // needed for the test: the scripted server keeps sessions).
        let first = up
            .upload_reply(&url, &file, ReplyDestination::Memory)
            .await
            .unwrap();
        let before = fake.packets("Fragment").len();
        // Resume that session at its end, as after a suspend during the reply download.
        let done = up
            .run(
                bitsd_client::UploadJob::new(&url, &file)
                    .reply_to(ReplyDestination::Memory)
                    .resume(bitsd_client::ResumeFrom {
                        session_id: first.session_id.clone(),
                        offset: 5000,
                    }),
            )
            .await
            .unwrap();
        assert_eq!(done.session_id, first.session_id);
        assert_eq!(done.reply.unwrap().bytes.unwrap().as_ref(), data.as_slice());
        let again = &fake.packets("Fragment")[before..];
        assert_eq!(again.len(), 1, "{again:#?}");
        assert_eq!(again[0].range, "bytes 3000-4999/5000");
    })
    .await;
}

#[tokio::test]
async fn credentials_never_go_in_clear_text_to_a_host_id_node() {
    bounded(async {
        let fake = Fake::new(Script {
            require_auth: true,
            ..Script::default()
        });
        let front = fake.listen("127.0.0.1:0", 0).await;
        let node = fake.listen("127.0.0.1:0", 1).await;
        fake.script(|s| s.host_id = Some(format!("127.0.0.1:{}", node.port())));
        let dir = tempfile::tempdir().unwrap();
        let file = write_temp(dir.path(), "h.bin", &pattern(3000, 1));
        let (b, _) = quick_uploader();
        b.credentials("user", "secret")
            .build()
            .upload(&format!("http://{front}/upload/h.bin"), &file)
            .await
            .unwrap();
        let log = fake.log();
        assert!(log
            .iter()
            .any(|e| e.listener == 0 && !e.authorization.is_empty()));
        let node_requests: Vec<_> = log.iter().filter(|e| e.listener == 1).collect();
        assert!(!node_requests.is_empty());
        assert!(
            node_requests.iter().all(|e| e.authorization.is_empty()),
            "{node_requests:#?}"
        );
    })
    .await;
}
