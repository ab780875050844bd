//! `object_store` errors into [`StorageError`]: unreachable or overloaded stores are the
//! transient [`StorageError::ObjectStoreUnreachable`].

use object_store::client::{HttpError, HttpErrorKind};

use crate::StorageError;

/// Maps an error of `op` on `key`.
pub(crate) fn map_err(
    op: &'static str,
    key: &str,
) -> impl FnOnce(object_store::Error) -> StorageError {
    let key = key.to_string();
    move |e| classify(op, key, e)
}

fn classify(op: &'static str, key: String, e: object_store::Error) -> StorageError {
    if let object_store::Error::NotFound { .. } = e {
        return StorageError::ObjectNotFound { key };
    }
    let why = error_chain(&e);
    if is_transient(&e) {
        StorageError::ObjectStoreUnreachable { op, key, why }
    } else {
        StorageError::ObjectStore { op, key, why }
    }
}

/// S3 error codes that mean "busy, try again" when a store reports them in a successful
/// answer: per key inside a DeleteObjects result (Garage's SQLite engine answers
/// `ServiceUnavailable` with `database is locked` under load), or as the body of a 200 that
/// the client's own retries gave up on (`SlowDown`).
const RETRYABLE_CODES: [&str; 7] = [
    "ServiceUnavailable",
    "SlowDown",
    "InternalError",
    "RequestTimeout",
    "OperationAborted",
    "TooManyRequests",
    "Throttling",
];

/// Whether `text` (one error of the chain) is a store's "busy" code in a 200 answer:
/// `Some(true)` busy, `Some(false)` another code, `None` not such an answer.
fn busy_code(text: &str) -> Option<bool> {
    if text.contains("DeleteObjects request failed for key") {
        // A per-key failure (not a public type) ends with its code; a message could name
        // another.
        return Some(
            RETRYABLE_CODES
                .iter()
                .any(|code| text.ends_with(&format!("(code: {code})"))),
        );
    }
    if text.contains("Server returned error response") {
        return Some(
            RETRYABLE_CODES
                .iter()
                .any(|code| text.contains(&format!("<Code>{code}</Code>"))),
        );
    }
    None
}

/// Connection failures, timeouts, interrupted transfers, 5xx and 429 answers, and a store's
/// "busy" codes in a 200 answer ([`busy_code`]).
fn is_transient(e: &object_store::Error) -> bool {
    if let object_store::Error::JoinError { .. } = e {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        let text = err.to_string();
        if let Some(busy) = busy_code(&text) {
            return busy;
        }
        // The client's retry error (not a public type) shows its status in its text.
        if let Some(status) = text
            .split_once("non-2xx status code: ")
            .and_then(|(_, rest)| rest.get(..3))
            .and_then(|code| code.parse::<u16>().ok())
        {
            return (500..600).contains(&status) || status == 429;
        }
        if let Some(http) = err.downcast_ref::<HttpError>() {
            return matches!(
                http.kind(),
                HttpErrorKind::Connect
                    | HttpErrorKind::Request
                    | HttpErrorKind::Timeout
                    | HttpErrorKind::Interrupted
            );
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | TimedOut
                    | BrokenPipe
                    | NotConnected
                    | UnexpectedEof
            ) {
                return true;
            }
        }
        source = err.source();
    }
    false
}

/// The error and its sources, as one line.
fn error_chain(e: &object_store::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        let text = err.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = err.source();
    }
    // Stores put whole XML error documents in their answers: keep log lines readable.
    if out.len() > MAX_WHY {
        let mut cut = MAX_WHY;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// Longest error text kept in a [`StorageError`].
const MAX_WHY: usize = 600;
