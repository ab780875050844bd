//! Helpers shared by the integration tests: uploads in temp dirs, reading replies.
#![allow(clippy::unwrap_used, clippy::panic, dead_code)]

pub mod http_backend;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bitsd_protocol::SessionId;
use bitsd_reply_handlers::{Reply, ReplyBody, Upload};
use tempfile::TempDir;

/// An upload in a temp dir: the upload file and a session dir beside it.
pub struct Fixture {
    /// Owns the files.
    pub dir: TempDir,
    /// The upload, pointing into `dir`.
    pub upload: Upload,
}

impl Fixture {
    /// The session dir.
    pub fn session_dir(&self) -> &Path {
        &self.upload.session_dir
    }
}

/// An upload of `bytes` for the remote URL `original_url`.
pub fn upload(bytes: &[u8], original_url: &str, content_name: Option<&str>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let session_dir = dir.path().join("session");
    std::fs::create_dir(&session_dir).unwrap();
    let path = dir.path().join("upload-data");
    std::fs::write(&path, bytes).unwrap();
    let upload = Upload {
        session_id: SessionId::random(),
        original_url: original_url.to_owned(),
        server_url: Some(original_url.to_owned()),
        content_name: content_name.map(str::to_owned),
        len: bytes.len() as u64,
        path,
        session_dir,
    };
    Fixture { dir, upload }
}

/// `len` deterministic pseudo-random bytes.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The bytes of a stored reply (empty, in memory, or a file); panics on other kinds.
pub fn reply_bytes(reply: &Reply) -> Vec<u8> {
    match &reply.body {
        ReplyBody::Empty => Vec::new(),
        ReplyBody::Bytes(b) => b.to_vec(),
        ReplyBody::File(p) => std::fs::read(p).unwrap(),
        other => panic!("unexpected reply body {other:?}"),
    }
}

/// Whether `path` is a file of one handler run named after `name` in `dir`
/// (`command-reply.tmp` → `command-reply.<unique>.tmp`).
pub fn is_run_file(path: &Path, dir: &Path, name: &str) -> bool {
    let (stem, ext) = name.rsplit_once('.').unwrap();
    let file = path.file_name().unwrap().to_str().unwrap();
    path.parent() == Some(dir)
        && file.starts_with(&format!("{stem}."))
        && file.ends_with(&format!(".{ext}"))
        && file.len() > name.len() + 1
}

/// The file of a file reply; panics on other kinds.
pub fn reply_file(reply: &Reply) -> PathBuf {
    match &reply.body {
        ReplyBody::File(p) => p.clone(),
        other => panic!("expected a file reply, got {other:?}"),
    }
}

/// A `tracing` writer that keeps everything written, for asserting on log lines.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Makes this thread's default subscriber write here (until the guard drops).
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
