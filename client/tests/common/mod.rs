//! Test helpers: a recording observer, quick retry settings, and a scripted BITS server that
//! plays behaviours bitsd never shows (farms, failing backends, bad reply URLs, dropped
//! connections).
#![allow(dead_code, clippy::unwrap_used)]

mod fake;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bitsd_client::{
    BitsUploader, BitsUploaderBuilder, JobEvent, Progress, ProgressObserver, RetryPolicy,
};
use tokio::net::TcpListener;

#[allow(unused_imports)]
pub use fake::{Entry, Fake, Script, Serve};

/// Deterministic test bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 ^ seed)
        .collect()
}

/// Short back-off so tests stay fast.
pub fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        initial_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(80),
        max_retries: 40,
    }
}

/// Everything the observer saw.
#[derive(Default)]
pub struct Recorder {
    pub progress: Mutex<Vec<Progress>>,
    pub events: Mutex<Vec<JobEvent>>,
}

impl Recorder {
    pub fn events(&self) -> Vec<JobEvent> {
        self.events.lock().unwrap().clone()
    }

    pub fn seen(&self) -> Vec<Progress> {
        self.progress.lock().unwrap().clone()
    }
}

impl ProgressObserver for Recorder {
    fn progress(&self, p: &Progress) {
        self.progress.lock().unwrap().push(*p);
    }

    fn event(&self, e: &JobEvent) {
        self.events.lock().unwrap().push(e.clone());
    }
}

/// A builder with quick retries, short timeouts and a recorder.
pub fn quick_uploader() -> (BitsUploaderBuilder, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let b = BitsUploader::builder()
        .retry_policy(quick_retry())
        .connect_timeout(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(10))
        .observer(rec.clone());
    (b, rec)
}

/// An unused local port (bound, then released): connecting to it is refused.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

pub fn write_temp(dir: &std::path::Path, name: &str, data: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// How long one test may take before it fails as hung.
pub const TEST_LIMIT: Duration = Duration::from_secs(60);

/// Runs a test body, failing it if it takes longer than [`TEST_LIMIT`].
pub async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test took too long")
}

/// A scripted server listening on loopback and a source file of `size` bytes for it.
pub struct Setup {
    /// The scripted server.
    pub fake: Fake,
    /// The upload URL on it.
    pub url: String,
    /// The source file.
    pub file: std::path::PathBuf,
    /// The source file's bytes.
    pub data: Vec<u8>,
    /// Keeps the source file's directory.
    pub _dir: tempfile::TempDir,
}

/// Starts a scripted server with `script` and writes a `size`-byte source file.
pub async fn setup(script: Script, size: usize) -> Setup {
    let fake = Fake::new(script);
    let addr = fake.listen("127.0.0.1:0", 0).await;
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(size, 7);
    let file = write_temp(dir.path(), "payload.bin", &data);
    Setup {
        fake,
        url: format!("http://{addr}/upload/payload.bin"),
        file,
        data,
        _dir: dir,
    }
}
