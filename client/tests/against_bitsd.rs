//! The client against a real bitsd server started in-process: plain uploads, upload-reply,
//! 413 halving, server restarts, lost sessions, refused overwrites, cancellation.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bitsd_client::{
    hresult, ClientError, ErrorContext, JobEvent, JobState, Progress, ProgressObserver,
    ReplyDestination, Request, UploadJob, BG_SIZE_UNKNOWN,
};
use common::{pattern, quick_uploader, write_temp, Recorder};
use tokio::sync::oneshot;

const TEST_LIMIT: Duration = Duration::from_secs(90);

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test took too long")
}

/// `bitsd upload` arguments as clap fills them when only URL and FILE are given.
fn cli_defaults() -> bitsd_client::UploadArgs {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: bitsd_client::UploadArgs,
    }
    Cli::try_parse_from(["bitsd", "http://unused/", "unused"])
        .unwrap()
        .args
}

async fn start_server(
    dir: &Path,
    port: u16,
    adjust: impl Fn(&mut bitsd::ServerConfig),
) -> bitsd::RunningServer {
    let mut config = bitsd::ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        admin_listen: None,
        data_dir: dir.into(),
        shutdown_grace: Duration::from_secs(5),
        ..Default::default()
    };
    adjust(&mut config);
    // On a restart the previous server may still hold the port or the sled lock for a moment.
    let mut tries = 0;
    loop {
        match bitsd::start(config.clone()).await {
            Ok(s) => return s,
            Err(e) if tries < 100 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("server failed to start: {e}"),
        }
    }
}

#[tokio::test]
async fn plain_uploads_of_several_sizes() {
    bounded(async {
        let data_dir = tempfile::tempdir().unwrap();
        let server = start_server(data_dir.path(), 0, |_| {}).await;
        let base = format!("http://{}", server.addr());
        let files = tempfile::tempdir().unwrap();
        for (i, size) in [0usize, 1, 4096, 3 * 4096 + 17, 100_000]
            .into_iter()
            .enumerate()
        {
            let data = pattern(size, i as u8);
            let name = format!("f{i}.bin");
            let file = write_temp(files.path(), &name, &data);
            let (b, rec) = quick_uploader();
            let out = b
                .fragment_size(4096)
                .build()
                .upload(&format!("{base}/upload/dir/{name}"), &file)
                .await
                .unwrap_or_else(|e| panic!("{size} bytes: {e}"));
            assert_eq!(out.bytes_uploaded, size as u64);
            assert!(out.closed);
            assert!(out.reply.is_none());
            assert_eq!((out.restarts, out.retries), (0, 0));
            let landed = std::fs::read(data_dir.path().join("files/dir").join(&name)).unwrap();
            assert_eq!(landed, data, "{size} bytes");
            let progress = rec.seen();
            let last = progress.last().unwrap();
            assert_eq!(last.state, JobState::Acknowledged);
            assert_eq!(last.upload.bytes_total, size as u64);
            assert_eq!(last.upload.bytes_transferred, size as u64);
            assert_eq!(last.reply.bytes_total, BG_SIZE_UNKNOWN);
            // Transferred bytes never decrease in a clean upload and follow the fragments.
            let steps: Vec<u64> = progress
                .iter()
                .map(|p| p.upload.bytes_transferred)
                .collect();
            assert!(steps.windows(2).all(|w| w[0] <= w[1]));
        }
        server.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn upload_reply_echo_returns_the_upload() {
    bounded(async {
        let data_dir = tempfile::tempdir().unwrap();
        let server = start_server(data_dir.path(), 0, |_| {}).await;
        let base = format!("http://{}", server.addr());
        let files = tempfile::tempdir().unwrap();
        for (i, size) in [0usize, 5000, 70_001].into_iter().enumerate() {
            let data = pattern(size, 40 + i as u8);
            let file = write_temp(files.path(), &format!("q{i}.bin"), &data);

            // Into memory.
            let (b, rec) = quick_uploader();
            let out = b
                .fragment_size(16 * 1024)
                .build()
                .upload_reply(
                    &format!("{base}/echo/q{i}.bin"),
                    &file,
                    ReplyDestination::Memory,
                )
                .await
                .unwrap();
            let reply = out.reply.unwrap();
            assert_eq!(reply.size, size as u64);
            assert_eq!(reply.bytes.as_deref(), Some(&data[..]));
            assert!(reply.url.contains("/echo/BITS-Sessions/"), "{}", reply.url);
            let progress = rec.seen();
            let last = progress.last().unwrap();
            assert_eq!(last.reply.bytes_total, size as u64);
            assert_eq!(last.reply.bytes_transferred, size as u64);
            // BG_SIZE_UNKNOWN until the reply download began.
            assert!(progress
                .iter()
                .take_while(|p| p.upload.bytes_transferred < size as u64 || size == 0)
                .all(|p| p.reply.bytes_total == BG_SIZE_UNKNOWN || size == 0));
            assert!(rec
                .events()
                .iter()
                .any(|e| matches!(e, JobEvent::UploadComplete { reply_url: Some(_) })));

            // Into a file.
            let out_path = files.path().join(format!("reply{i}.bin"));
            let (b, _) = quick_uploader();
            let out = b
                .fragment_size(4096)
                .reply_chunk_size(3000)
                .build()
                .upload_reply(
                    &format!("{base}/echo/q{i}.bin"),
                    &file,
                    ReplyDestination::File(out_path.clone()),
                )
                .await
                .unwrap();
            assert_eq!(std::fs::read(&out_path).unwrap(), data);
            assert_eq!(out.reply.unwrap().path, Some(out_path));
            assert!(out.closed);
        }
        server.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn fragments_halve_on_413() {
    bounded(async {
        let data_dir = tempfile::tempdir().unwrap();
        let server = start_server(data_dir.path(), 0, |c| {
            c.limits.max_fragment_size = 64 * 1024;
        })
        .await;
        let files = tempfile::tempdir().unwrap();
        let data = pattern(1_500_000, 9);
        let file = write_temp(files.path(), "big.bin", &data);
        let (b, rec) = quick_uploader();
        let out = b
            .fragment_size(1024 * 1024)
            .build()
            .upload(&format!("http://{}/upload/big.bin", server.addr()), &file)
            .await
            .unwrap();
        assert_eq!(out.fragment_size, 64 * 1024);
        let reductions: Vec<(u64, u64)> = rec
            .events()
            .iter()
            .filter_map(|e| match e {
                JobEvent::FragmentSizeReduced { from, to } => Some((*from, *to)),
                _ => None,
            })
            .collect();
        assert_eq!(
            reductions,
            vec![
                (1 << 20, 1 << 19),
                (1 << 19, 1 << 18),
                (1 << 18, 1 << 17),
                (1 << 17, 1 << 16)
            ]
        );
        assert_eq!(
            std::fs::read(data_dir.path().join("files/big.bin")).unwrap(),
            data
        );
        server.shutdown().await.unwrap();
    })
    .await;
}

/// Blocks the client (inside its progress callback) once the upload has passed `threshold`,
/// until the test releases it; records everything.
struct Gate {
    threshold: u64,
    reached: Mutex<Option<oneshot::Sender<()>>>,
    release: Mutex<Option<mpsc::Receiver<()>>>,
    rec: Recorder,
}

impl Gate {
    fn new(threshold: u64) -> (Arc<Gate>, oneshot::Receiver<()>, mpsc::Sender<()>) {
        let (reached_tx, reached_rx) = oneshot::channel();
        let (release_tx, release_rx) = mpsc::channel();
        let gate = Arc::new(Gate {
            threshold,
            reached: Mutex::new(Some(reached_tx)),
            release: Mutex::new(Some(release_rx)),
            rec: Recorder::default(),
        });
        (gate, reached_rx, release_tx)
    }
}

impl ProgressObserver for Gate {
    fn progress(&self, p: &Progress) {
        self.rec.progress(p);
        if p.upload.bytes_transferred >= self.threshold {
            if let Some(tx) = self.reached.lock().unwrap().take() {
                let _ = tx.send(());
                let rx = self.release.lock().unwrap().take().unwrap();
                tokio::task::block_in_place(|| {
                    let _ = rx.recv_timeout(Duration::from_secs(30));
                });
            }
        }
    }

    fn event(&self, e: &JobEvent) {
        self.rec.event(e);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_between_fragments_resumes_the_session() {
    bounded(async {
        let data_dir = tempfile::tempdir().unwrap();
        let server = start_server(data_dir.path(), 0, |_| {}).await;
        let port = server.addr().port();
        let files = tempfile::tempdir().unwrap();
        let data = pattern(1024 * 1024 + 123, 77);
        let file = write_temp(files.path(), "r.bin", &data);
        let (gate, reached, release) = Gate::new(3 * 64 * 1024);
        let (b, _) = quick_uploader();
        let uploader = b.fragment_size(64 * 1024).observer(gate.clone()).build();
        let url = format!("http://127.0.0.1:{port}/echo/r.bin");
        let task = tokio::spawn(async move {
            uploader
                .upload_reply(&url, &file, ReplyDestination::Memory)
                .await
        });
        reached.await.unwrap();
        server.shutdown().await.unwrap();
        // The client goes on while the server is down: connection refused, back-off, retry.
        release.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let server = start_server(data_dir.path(), port, |_| {}).await;
        let out = task.await.unwrap().unwrap();
        assert_eq!(out.restarts, 0, "the session survived the restart");
        assert!(out.retries >= 1);
        assert_eq!(out.reply.unwrap().bytes.unwrap(), data);
        let events = gate.rec.events();
        assert!(events
            .iter()
            .any(|e| matches!(e, JobEvent::Retrying { .. })));
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, JobEvent::SessionCreated { .. }))
                .count(),
            1
        );
        server.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_session_restarts_with_create_session() {
    bounded(async {
        let first_dir = tempfile::tempdir().unwrap();
        let server = start_server(first_dir.path(), 0, |_| {}).await;
        let port = server.addr().port();
        let files = tempfile::tempdir().unwrap();
        let data = pattern(500_000, 5);
        let file = write_temp(files.path(), "s.bin", &data);
        let (gate, reached, release) = Gate::new(2 * 50_000);
        let (b, _) = quick_uploader();
        let uploader = b.fragment_size(50_000).observer(gate.clone()).build();
        let url = format!("http://127.0.0.1:{port}/upload/s.bin");
        let task = tokio::spawn(async move { uploader.upload(&url, &file).await });
        reached.await.unwrap();
        server.shutdown().await.unwrap();
        // A server with an empty data directory on the same port: the session is gone.
        let second_dir = tempfile::tempdir().unwrap();
        let server = start_server(second_dir.path(), port, |_| {}).await;
        release.send(()).unwrap();
        let out = task.await.unwrap().unwrap();
        assert_eq!(out.restarts, 1);
        assert_eq!(
            std::fs::read(second_dir.path().join("files/s.bin")).unwrap(),
            data
        );
        assert!(!first_dir.path().join("files/s.bin").exists());
        let events = gate.rec.events();
        assert!(events
            .iter()
            .any(|e| matches!(e, JobEvent::SessionRestarted { .. })));
        // After the restart the upload went back to 0.
        let progress = gate.rec.seen();
        let max_before = 2 * 50_000;
        let back_to_zero = progress
            .iter()
            .skip_while(|p| p.upload.bytes_transferred < max_before)
            .any(|p| p.upload.bytes_transferred == 0);
        assert!(back_to_zero);
        server.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn refused_overwrite_is_fatal_access_denied() {
    bounded(async {
        let data_dir = tempfile::tempdir().unwrap();
        let server = start_server(data_dir.path(), 0, |_| {}).await;
        let files = tempfile::tempdir().unwrap();
        let file = write_temp(files.path(), "x.bin", &pattern(1000, 1));
        let url = format!("http://{}/upload/x.bin", server.addr());
        let (b, _) = quick_uploader();
        let up = b.build();
        up.upload(&url, &file).await.unwrap();
        let err = up.upload(&url, &file).await.unwrap_err();
        let f = err.bits().unwrap();
        assert_eq!(f.code(), hresult::E_ACCESSDENIED);
        assert_eq!(f.context(), ErrorContext::RemoteFile);
        assert_eq!(f.status(), Some(403));
        assert_eq!(f.request(), Some(Request::CreateSession));
        assert!(!err.is_transient());
        assert_eq!(f.to_string(), "E_ACCESSDENIED (0x80070005)");
        assert!(err
            .to_string()
            .starts_with("E_ACCESSDENIED (0x80070005), context 0x5"));
        server.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn cancel_mid_upload_sends_cancel_session() {
    bounded(async {
        let data_dir = tempfile::tempdir().unwrap();
        let server = start_server(data_dir.path(), 0, |_| {}).await;
        let files = tempfile::tempdir().unwrap();
        let file = write_temp(files.path(), "c.bin", &pattern(100_000, 2));
        let job = UploadJob::new(format!("http://{}/upload/c.bin", server.addr()), &file);
        let cancel = job.cancel_handle();
        let rec = Arc::new(Recorder::default());
        struct CancelAt(bitsd_client::CancelHandle, Arc<Recorder>);
        impl ProgressObserver for CancelAt {
            fn progress(&self, p: &Progress) {
                self.1.progress(p);
                if p.upload.bytes_transferred >= 20_000 {
                    self.0.cancel();
                }
            }
            fn event(&self, e: &JobEvent) {
                self.1.event(e);
            }
        }
        let (b, _) = quick_uploader();
        let up = b
            .fragment_size(10_000)
            .observer(Arc::new(CancelAt(cancel, rec.clone())))
            .build();
        let err = up.run(job).await.unwrap_err();
        assert!(matches!(err, ClientError::Cancelled));
        assert!(rec
            .events()
            .iter()
            .any(|e| matches!(e, JobEvent::SessionCancelled { .. })));
        assert_eq!(rec.seen().last().unwrap().state, JobState::Cancelled);
        assert!(!data_dir.path().join("files/c.bin").exists());
        server.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn upload_reply_over_https_with_a_trusted_ca_or_insecure() {
    bounded(async {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let keys = tempfile::tempdir().unwrap();
        let cert_path = keys.path().join("cert.pem");
        let key_path = keys.path().join("key.pem");
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
        let data_dir = tempfile::tempdir().unwrap();
        let server = start_server(data_dir.path(), 0, |c| {
            c.tls = Some(bitsd::TlsFiles {
                cert: cert_path.clone(),
                key: key_path.clone(),
            });
        })
        .await;
        let url = format!("https://localhost:{}/echo/t.bin", server.addr().port());
        let files = tempfile::tempdir().unwrap();
        let data = pattern(150_000, 21);
        let file = write_temp(files.path(), "t.bin", &data);

        // Not trusted: the handshake fails (a transport error, retried, then reported).
        let (b, _) = quick_uploader();
        let err = b
            .retry_policy(bitsd_client::RetryPolicy {
                initial_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(10),
                max_retries: 1,
            })
            .build()
            .upload_reply(&url, &file, ReplyDestination::Memory)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("TLS handshake failed"), "{err}");

        // Trusted through the test CA: the reply URL is https too.
        let (b, _) = quick_uploader();
        let done = b
            .add_root_certificate(cert.cert.der().to_vec())
            .build()
            .upload_reply(&url, &file, ReplyDestination::Memory)
            .await
            .unwrap();
        let reply = done.reply.unwrap();
        assert!(reply.url.starts_with("https://localhost:"), "{}", reply.url);
        assert_eq!(reply.bytes.unwrap().as_ref(), data.as_slice());

        // --insecure: any certificate.
        let (b, _) = quick_uploader();
        let done = b
            .tls_insecure(true)
            .build()
            .upload_reply(&url, &file, ReplyDestination::Memory)
            .await
            .unwrap();
        assert_eq!(done.reply.unwrap().bytes.unwrap().as_ref(), data.as_slice());

        // The CLI with --ca-file.
        let args = bitsd_client::UploadArgs {
            url: url.clone(),
            file: file.clone(),
            reply_file: Some(files.path().join("out.bin")),
            fragment_size: 64 * 1024,
            user: None,
            password: None,
            insecure: false,
            ca_file: Some(cert_path.clone()),
            no_progress: true,
            ..cli_defaults()
        };
        bitsd_client::run_upload_cli(args).await.unwrap();
        assert_eq!(std::fs::read(files.path().join("out.bin")).unwrap(), data);
        server.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn cli_entry_point_uploads_and_writes_the_reply_file() {
    bounded(async {
        let data_dir = tempfile::tempdir().unwrap();
        let server = start_server(data_dir.path(), 0, |_| {}).await;
        let files = tempfile::tempdir().unwrap();
        let data = pattern(200_000, 11);
        let file = write_temp(files.path(), "cli.bin", &data);
        let out = files.path().join("cli.reply");
        let args = bitsd_client::UploadArgs {
            url: format!("http://{}/echo/cli.bin", server.addr()),
            file: file.clone(),
            reply_file: Some(out.clone()),
            fragment_size: 64 * 1024,
            user: None,
            password: None,
            insecure: false,
            ca_file: None,
            no_progress: true,
            ..cli_defaults()
        };
        bitsd_client::run_upload_cli(args.clone()).await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);

        let plain = bitsd_client::UploadArgs {
            url: format!("http://{}/upload/cli.bin", server.addr()),
            reply_file: None,
            ..args.clone()
        };
        bitsd_client::run_upload_cli(plain.clone()).await.unwrap();
        assert_eq!(
            std::fs::read(data_dir.path().join("files/cli.bin")).unwrap(),
            data
        );
        // Second time: the overwrite is refused, reported and returned.
        let err = bitsd_client::run_upload_cli(plain).await.unwrap_err();
        assert_eq!(err.hresult(), Some(hresult::E_ACCESSDENIED));

        server.shutdown().await.unwrap();
    })
    .await;
}
