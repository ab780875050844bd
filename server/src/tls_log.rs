//! Warnings about failed TLS handshakes, at most one line per second.
//!
//! A client that does not trust the certificate, or speaks plain HTTP to the TLS port, fails
//! before any request exists, so without these lines an operator sees nothing at all. A
//! scanner or a retrying client can fail many times a second: the lines are rate-limited, and
//! the next line says how many were left out.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a TLS connection never got to HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsFailure {
    /// The client sent plain HTTP to the TLS port.
    PlainHttp,
    /// The handshake failed (certificate not trusted, no common protocol version, ...).
    Handshake,
    /// The client sent nothing within the timeout.
    Timeout,
    /// The client closed the connection before sending anything (a TCP health probe).
    Closed,
}

/// At most one warning per interval; the rest are counted.
pub(crate) struct RateLimitedLog {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
    interval: Duration,
}

impl RateLimitedLog {
    /// A limiter that lets one line through per `interval`.
    pub(crate) const fn new(interval: Duration) -> Self {
        RateLimitedLog {
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
            interval,
        }
    }

    /// `Some(number of lines left out since the last one)` when a line may be written now.
    pub(crate) fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some(t) if now.duration_since(t) < self.interval => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }
}

static TLS_FAILURES: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(1));

/// Logs a failed TLS connection from `peer` (rate-limited).
pub(crate) fn log_tls_failure(peer: SocketAddr, kind: TlsFailure, error: Option<&str>) {
    if kind == TlsFailure::Closed {
        tracing::debug!(%peer, "connection closed before the TLS handshake");
        return;
    }
    let Some(suppressed) = TLS_FAILURES.allow() else {
        tracing::debug!(%peer, ?kind, error = error.unwrap_or(""), "TLS connection failed");
        return;
    };
    match kind {
        TlsFailure::PlainHttp => tracing::warn!(
            %peer,
            suppressed,
            "plain HTTP on the TLS port: the client must use https:// URLs"
        ),
        TlsFailure::Handshake => tracing::warn!(
            %peer,
            suppressed,
            error = error.unwrap_or(""),
            "TLS handshake failed (does the client trust the certificate?)"
        ),
        TlsFailure::Timeout => tracing::warn!(%peer, suppressed, "TLS handshake timed out"),
        TlsFailure::Closed => {}
    }
}

/// Whether the first bytes of a connection look like a plain HTTP request line (a TLS
/// ClientHello starts with the record type 0x16).
pub(crate) fn looks_like_plain_http(first: &[u8]) -> bool {
    first.first().is_some_and(u8::is_ascii_uppercase)
        && first
            .iter()
            .all(|b| b.is_ascii_uppercase() || *b == b'_' || *b == b' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_a_count_of_the_rest() {
        let log = RateLimitedLog::new(Duration::from_millis(200));
        assert_eq!(log.allow(), Some(0));
        assert_eq!(log.allow(), None);
        assert_eq!(log.allow(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(log.allow(), Some(2));
    }

    #[test]
    fn request_lines_are_plain_http() {
        assert!(looks_like_plain_http(b"BITS"));
        assert!(looks_like_plain_http(b"GET "));
        assert!(looks_like_plain_http(b"GE"));
        assert!(!looks_like_plain_http(b" GET"));
        assert!(!looks_like_plain_http(&[0x16, 0x03, 0x01]));
        assert!(!looks_like_plain_http(b""));
    }
}
