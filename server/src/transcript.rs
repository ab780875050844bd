//! The transcript of the test server mode: one JSON object per request the BITS listener
//! answered (or dropped), with the request's headers and the answer's status and BITS headers,
//! and the fault the fault plan injected, if any. Kept in memory (served on the admin listener
//! at `GET /transcript`) and, when a file is given, appended to it line by line.

use std::collections::BTreeMap;
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
    lines: Mutex<Vec<String>>,
    file: Option<(PathBuf, Mutex<std::fs::File>)>,
    seq: AtomicU64,
}

impl std::fmt::Debug for Transcript {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transcript")
            .field("file", &self.inner.file.as_ref().map(|(p, _)| p))
            .field("lines", &self.len())
            .finish()
    }
}

impl Transcript {
    /// A transcript kept in memory only.
    pub fn in_memory() -> Self {
        Transcript {
            inner: Arc::new(Inner {
                lines: Mutex::new(Vec::new()),
                file: None,
                seq: AtomicU64::new(0),
            }),
        }
    }

    /// A transcript kept in memory and written to `path` (created or truncated now).
    pub fn with_file(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::create(path)?;
        Ok(Transcript {
            inner: Arc::new(Inner {
                lines: Mutex::new(Vec::new()),
                file: Some((path.to_owned(), Mutex::new(file))),
                seq: AtomicU64::new(0),
            }),
        })
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
        self.inner.file.as_ref().map(|(p, _)| p.as_path())
    }

    /// The next request number.
    pub(crate) fn next_seq(&self) -> u64 {
        self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Appends one entry (to memory, and to the file when there is one).
    pub fn record(&self, entry: &TranscriptEntry) {
        let line = match serde_json::to_string(entry) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "transcript entry not serializable");
                return;
            }
        };
        {
            // The file gets the lines in the same order as memory.
            let mut lines = self.inner.lines.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((path, file)) = &self.inner.file {
                let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                let mut bytes = Vec::with_capacity(line.len() + 1);
                bytes.extend_from_slice(line.as_bytes());
                bytes.push(b'\n');
                if let Err(e) = f.write_all(&bytes) {
                    tracing::warn!(error = %e, path = %path.display(), "transcript write failed");
                }
            }
            lines.push(line);
        }
    }

    /// How many lines it holds.
    pub fn len(&self) -> usize {
        self.inner
            .lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Whether it holds no line yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every line so far, as JSON text.
    pub fn lines(&self) -> Vec<String> {
        self.inner
            .lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every line so far, each followed by a newline (`application/x-ndjson`).
    pub fn ndjson(&self) -> String {
        let lines = self.inner.lines.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for l in lines.iter() {
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    /// Every entry so far.
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
}
