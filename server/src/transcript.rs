//! The transcript of the test server mode: one JSON object per request the BITS listener
//! answered (or dropped), with the request's headers and the answer's status and BITS headers,
//! and the fault the fault plan injected, if any. The newest lines are kept in memory (served on
//! the admin listener at `GET /transcript`; at most [`Transcript::MEMORY_LINES`]) and, when a
//! file is given, every line is appended to it by a writer thread, off the async workers.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Where the transcript goes besides memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TranscriptOptions {
    /// A file the JSON lines are written to (created, or truncated, when the server starts).
    pub file: Option<PathBuf>,
}

/// One line of the transcript: a request and what became of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TranscriptEntry {
    /// Requests numbered in the order they arrived, from 1. Lines are written when the answer
    /// is decided, so a delayed answer may appear after a later request's line.
    pub seq: u64,
    /// When the request arrived, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The same instant in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Milliseconds from the request's arrival to its answer (or to the dropped connection).
    pub elapsed_ms: u64,
    /// The HTTP method (`BITS_POST`, `GET`, `HEAD`, …).
    pub method: String,
    /// The request's path and query.
    pub path: String,
    /// `Ping`, `Create-Session`, `Fragment`, `Close-Session`, `Cancel-Session` for `BITS_POST`
    /// (`invalid` when `BITS-Packet-Type` is missing or unknown), else the method (`GET`, `HEAD`).
    pub packet: String,
    /// The session: the request's `BITS-Session-Id`, the new id of a Create-Session Ack, or the
    /// id in a reply URL.
    pub session: Option<String>,
    /// Every request header (names lower case; repeated headers joined with `, `;
    /// credentials replaced by `<redacted>` after the scheme).
    pub request_headers: BTreeMap<String, String>,
    /// `Content-Range` of a Fragment, `Range` of a reply download.
    pub range: Option<String>,
    /// The answer's HTTP status; `null` when the connection was dropped before any answer
    /// was produced. With `answered: false` it is the answer the server produced but never sent.
    pub status: Option<u16>,
    /// `BITS-Error-Code` of the answer.
    pub error_code: Option<String>,
    /// `BITS-Error-Context` of the answer.
    pub error_context: Option<String>,
    /// `BITS-Received-Content-Range` of the answer.
    pub received: Option<u64>,
    /// `BITS-Reply-URL` of the answer.
    pub reply_url: Option<String>,
    /// Every header of the answer (names lower case).
    pub response_headers: BTreeMap<String, String>,
    /// The injected fault's kind (`lose-ack`, `truncate`, …), `null` when none was injected.
    pub fault: Option<String>,
    /// The fault rule that fired, in the compact `--fault` form.
    pub rule: Option<String>,
    /// Whether the answer's head reached the connection (`false`: the connection was dropped).
    pub answered: bool,
    /// What the fault did, in words.
    pub detail: Option<String>,
}

/// A live transcript. Cheap to clone; every clone records into the same transcript.
#[derive(Clone)]
pub struct Transcript {
    inner: Arc<Inner>,
}

struct Inner {
    memory: Mutex<Memory>,
    file: Option<FileSink>,
    seq: AtomicU64,
}

/// The lines kept in memory: the newest [`Transcript::MEMORY_LINES`] (the file keeps all).
struct Memory {
    lines: VecDeque<String>,
    /// Lines recorded in total (the file's line count once the writer caught up).
    recorded: u64,
    cap: usize,
}

/// The transcript file, written by a thread of its own: recording a line never does file
/// I/O on the async workers.
struct FileSink {
    path: PathBuf,
    lines: std::sync::mpsc::Sender<String>,
    /// Lines the writer thread has written (or failed to write) so far.
    written: tokio::sync::watch::Receiver<u64>,
}

impl FileSink {
    fn start(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::create(path)?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let (written_tx, written) = tokio::sync::watch::channel(0u64);
        let shown = path.to_owned();
        std::thread::Builder::new()
            .name("bitsd-transcript".into())
            .spawn(move || write_lines(file, &shown, &rx, &written_tx))?;
        Ok(FileSink {
            path: path.to_owned(),
            lines: tx,
            written,
        })
    }
}

/// The writer thread: appends every line it is sent, flushing whenever it has caught up, until
/// the transcript is dropped.
fn write_lines(
    file: std::fs::File,
    path: &Path,
    rx: &std::sync::mpsc::Receiver<String>,
    written: &tokio::sync::watch::Sender<u64>,
) {
    let mut out = std::io::BufWriter::new(file);
    let mut count = 0u64;
    let mut failed = false;
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(line) = next {
            if let Err(e) = out
                .write_all(line.as_bytes())
                .and_then(|()| out.write_all(b"\n"))
            {
                if !failed {
                    tracing::warn!(error = %e, path = %path.display(), "transcript write failed");
                }
                failed = true;
            }
            count += 1;
            next = rx.try_recv().ok();
        }
        if let Err(e) = out.flush() {
            if !failed {
                tracing::warn!(error = %e, path = %path.display(), "transcript write failed");
            }
            failed = true;
        }
        written.send_replace(count);
    }
}

impl std::fmt::Debug for Transcript {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transcript")
            .field("file", &self.file())
            .field("lines", &self.len())
            .finish()
    }
}

impl Transcript {
    /// How many of the newest lines are kept in memory (and served at `GET /transcript`); the
    /// file, when there is one, keeps every line.
    pub const MEMORY_LINES: usize = 10_000;

    fn with_sink(file: Option<FileSink>, cap: usize) -> Self {
        Transcript {
            inner: Arc::new(Inner {
                memory: Mutex::new(Memory {
                    lines: VecDeque::new(),
                    recorded: 0,
                    cap: cap.max(1),
                }),
                file,
                seq: AtomicU64::new(0),
            }),
        }
    }

    /// A transcript kept in memory only (the newest [`Transcript::MEMORY_LINES`] lines).
    pub fn in_memory() -> Self {
        Self::with_sink(None, Self::MEMORY_LINES)
    }

    /// A transcript that keeps only the newest `lines` lines in memory.
    pub fn in_memory_capped(lines: usize) -> Self {
        Self::with_sink(None, lines)
    }

    /// A transcript kept in memory (the newest lines) and written whole to `path` (created or
    /// truncated now) by a thread of its own.
    pub fn with_file(path: &Path) -> std::io::Result<Self> {
        Ok(Self::with_sink(
            Some(FileSink::start(path)?),
            Self::MEMORY_LINES,
        ))
    }

    /// The transcript the options describe.
    pub fn open(options: &TranscriptOptions) -> std::io::Result<Self> {
        match &options.file {
            Some(path) => Self::with_file(path),
            None => Ok(Self::in_memory()),
        }
    }

    /// The file it is written to, if any.
    pub fn file(&self) -> Option<&Path> {
        self.inner.file.as_ref().map(|f| f.path.as_path())
    }

    /// The next request number.
    pub(crate) fn next_seq(&self) -> u64 {
        self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Appends one entry: to memory (dropping the oldest line past the cap) and, when there
    /// is a file, hands it to the writer thread. Never blocks on the file.
    pub fn record(&self, entry: &TranscriptEntry) {
        let line = match serde_json::to_string(entry) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "transcript entry not serializable");
                return;
            }
        };
        // The file gets the lines in the same order as memory.
        let mut memory = self.inner.memory.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = &self.inner.file {
            // The writer only stops when the transcript is dropped.
            let _ = file.lines.send(line.clone());
        }
        memory.recorded += 1;
        if memory.lines.len() >= memory.cap {
            memory.lines.pop_front();
        }
        memory.lines.push_back(line);
    }

    /// Waits (without blocking the runtime) until every line recorded so far is in the file.
    pub async fn written(&self) {
        let Some(file) = &self.inner.file else {
            return;
        };
        let target = self
            .inner
            .memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recorded;
        let mut rx = file.written.clone();
        // An error means the writer is gone: nothing more will be written.
        let _ = rx.wait_for(|n| *n >= target).await;
    }

    /// How many lines are recorded in total (memory keeps the newest of them).
    pub fn recorded(&self) -> u64 {
        self.inner
            .memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recorded
    }

    /// How many lines memory holds (at most [`Transcript::MEMORY_LINES`]).
    pub fn len(&self) -> usize {
        self.inner
            .memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
            .len()
    }

    /// Whether it holds no line yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The lines memory holds (the newest), as JSON text.
    pub fn lines(&self) -> Vec<String> {
        let memory = self.inner.memory.lock().unwrap_or_else(|p| p.into_inner());
        memory.lines.iter().cloned().collect()
    }

    /// The lines memory holds, each followed by a newline (`application/x-ndjson`).
    pub fn ndjson(&self) -> String {
        let memory = self.inner.memory.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::with_capacity(memory.lines.iter().map(|l| l.len() + 1).sum());
        for l in &memory.lines {
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    /// The entries memory holds.
    pub fn entries(&self) -> Vec<TranscriptEntry> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// RFC 3339 UTC with milliseconds for a Unix time in milliseconds, e.g.
/// `2024-05-01T12:00:00.123Z`.
pub(crate) fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// A header map as the transcript shows it.
pub(crate) fn header_map(headers: &http::HeaderMap, redact: bool) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let mut v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        if redact
            && (name == http::header::AUTHORIZATION || name == http::header::PROXY_AUTHORIZATION)
        {
            let scheme = v.split_whitespace().next().unwrap_or("").to_owned();
            v = format!("{scheme} <redacted>");
        }
        out.entry(name.as_str().to_owned())
            .and_modify(|e| {
                e.push_str(", ");
                e.push_str(&v);
            })
            .or_insert(v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
        assert_eq!(rfc3339(4_102_444_800_000), "2100-01-01T00:00:00.000Z");
    }

    #[test]
    fn credentials_are_redacted_and_repeats_joined() {
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Basic dXNlcjpwdw==".parse().unwrap());
        h.append("x-a", "1".parse().unwrap());
        h.append("x-a", "2".parse().unwrap());
        let m = header_map(&h, true);
        assert_eq!(m["authorization"], "Basic <redacted>");
        assert_eq!(m["x-a"], "1, 2");
    }

    fn entry(seq: u64) -> TranscriptEntry {
        TranscriptEntry {
            seq,
            time: rfc3339(0),
            time_ms: 0,
            elapsed_ms: 0,
            method: "GET".into(),
            path: format!("/echo/BITS-Sessions/{seq}/response"),
            packet: "GET".into(),
            session: None,
            request_headers: BTreeMap::new(),
            range: None,
            status: Some(404),
            error_code: None,
            error_context: None,
            received: None,
            reply_url: None,
            response_headers: BTreeMap::new(),
            fault: None,
            rule: None,
            answered: true,
            detail: None,
        }
    }

    #[test]
    fn memory_keeps_the_newest_lines_only() {
        let t = Transcript::in_memory_capped(100);
        for seq in 1..=5_000 {
            t.record(&entry(seq));
            assert!(t.len() <= 100);
        }
        assert_eq!(t.len(), 100);
        assert_eq!(t.recorded(), 5_000);
        let seqs: Vec<u64> = t.entries().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (4_901..=5_000).collect::<Vec<_>>());
        assert_eq!(t.ndjson().lines().count(), 100);
    }

    #[tokio::test]
    async fn the_file_keeps_every_line_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let t = Transcript::with_file(&path).unwrap();
        let lines = Transcript::MEMORY_LINES as u64 + 500;
        for seq in 1..=lines {
            t.record(&entry(seq));
        }
        t.written().await;
        assert_eq!(t.len(), Transcript::MEMORY_LINES);
        let text = std::fs::read_to_string(&path).unwrap();
        let seqs: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<TranscriptEntry>(l).unwrap().seq)
            .collect();
        assert_eq!(seqs, (1..=lines).collect::<Vec<_>>());
    }
}
