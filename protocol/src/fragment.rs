//! The session range state machine (§5): what one Fragment means for a session's upload.

use crate::{BitsError, ContentRange};

/// How much of the upload a session holds: `received` contiguous bytes from offset 0,
/// and the size fixed by the first fragment (`None` before it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadProgress {
    /// Bytes held contiguously from offset 0.
    pub received: u64,
    /// Size of the whole upload, once the first fragment has told it.
    pub total: Option<u64>,
}

impl UploadProgress {
    /// A new session: nothing held, size unknown.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether every byte of the upload is held.
    pub fn is_complete(&self) -> bool {
        self.total == Some(self.received)
    }
}

/// The server's limits that apply to fragments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadLimits {
    /// Largest whole upload (`BITSMaximumUploadSize`); over it → 400 `BG_E_TOO_LARGE`.
    pub max_upload_size: u64,
    /// Largest single fragment body; over it → 413, and the client sends smaller fragments.
    pub max_fragment_size: u64,
}

impl Default for UploadLimits {
    /// Unlimited upload size; fragments up to 64 MiB (the reference asks for at least 32 MiB).
    fn default() -> Self {
        UploadLimits {
            max_upload_size: u64::MAX,
            max_fragment_size: 64 * 1024 * 1024,
        }
    }
}

/// New bytes to store: skip `skip` body bytes, then write the next `len` at `write_at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentWrite {
    /// Body bytes already held, to read and discard first.
    pub skip: u64,
    /// File offset of the first new byte (always the old `received`).
    pub write_at: u64,
    /// New bytes to write (zero only for a zero-byte upload).
    pub len: u64,
    /// `received` once the write is durable; the Ack's `BITS-Received-Content-Range`.
    pub received_after: u64,
    /// The size of the upload, fixed by this fragment if it is the first.
    pub total: u64,
    /// Whether this write completes the upload.
    pub completes: bool,
}

impl FragmentWrite {
    /// The progress once this write is durable.
    pub fn progress_after(&self) -> UploadProgress {
        UploadProgress {
            received: self.received_after,
            total: Some(self.total),
        }
    }
}

/// What to do with a Fragment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragmentDecision {
    /// Store new bytes, then Ack 200 with `received_after`.
    Write(FragmentWrite),
    /// Every byte is already held (a resend after a lost Ack): drain the body, store nothing,
    /// Ack 200 with `received`. `final_resend` is set when the upload is already complete: the
    /// completion step runs again, idempotently (§5.4, §6.2), so that the Ack that tells the
    /// client it is done always carries what the final Ack carries (the reply URL). Usually
    /// this is a re-sent final fragment; a client that re-sends with other fragment boundaries
    /// (after a 413) gets the same answer.
    AlreadyHeld {
        /// The unchanged `received`.
        received: u64,
        /// A re-sent final fragment of a complete upload.
        final_resend: bool,
    },
    /// The fragment starts past `received`: store nothing, Ack 416 with `received` (§5.3).
    Gap {
        /// What the server holds; the client resumes from here.
        received: u64,
    },
}

/// Decides what a fragment with `range` means for a session at `progress` (§5.2–§5.7).
///
/// Errors: a `total` different from the one the first fragment fixed (400 `E_INVALIDARG`), an
/// upload over `max_upload_size` (400 `BG_E_TOO_LARGE`), a fragment over `max_fragment_size` (413).
pub fn decide_fragment(
    progress: &UploadProgress,
    range: &ContentRange,
    limits: &UploadLimits,
) -> Result<FragmentDecision, BitsError> {
    if let Some(total) = progress.total {
        if total != range.total {
            return Err(BitsError::invalid_arg(format!(
                "Content-Range total {} differs from the {} bytes the first fragment announced",
                range.total, total
            )));
        }
    }
    if range.total > limits.max_upload_size {
        return Err(BitsError::upload_too_large(
            range.total,
            limits.max_upload_size,
        ));
    }
    if range.len > limits.max_fragment_size {
        return Err(BitsError::fragment_too_large(
            range.len,
            limits.max_fragment_size,
        ));
    }
    let received = progress.received;
    if range.first > received {
        return Ok(FragmentDecision::Gap { received });
    }
    let end = range.end();
    if end <= received && progress.total.is_some() {
        return Ok(FragmentDecision::AlreadyHeld {
            received,
            final_resend: progress.is_complete(),
        });
    }
    Ok(FragmentDecision::Write(FragmentWrite {
        skip: received - range.first,
        write_at: received,
        len: end - received,
        received_after: end,
        total: range.total,
        completes: end == range.total,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn r(first: u64, last: u64, total: u64) -> ContentRange {
        ContentRange::new(first, last, total).unwrap()
    }

    const L: UploadLimits = UploadLimits {
        max_upload_size: u64::MAX,
        max_fragment_size: u64::MAX,
    };

    #[test]
    fn examples_b1_overlaps() {
        let p = UploadProgress {
            received: 8192,
            total: Some(10000),
        };
        assert_eq!(
            decide_fragment(&p, &r(4096, 8191, 10000), &L).unwrap(),
            FragmentDecision::AlreadyHeld {
                received: 8192,
                final_resend: false
            }
        );
        let p = UploadProgress {
            received: 6000,
            total: Some(10000),
        };
        let FragmentDecision::Write(w) = decide_fragment(&p, &r(4096, 8191, 10000), &L).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (w.skip, w.write_at, w.len, w.received_after),
            (1904, 6000, 2192, 8192)
        );
    }

    #[test]
    fn examples_b2_gap() {
        let p = UploadProgress {
            received: 4096,
            total: Some(10000),
        };
        assert_eq!(
            decide_fragment(&p, &r(8192, 9999, 10000), &L).unwrap(),
            FragmentDecision::Gap { received: 4096 }
        );
    }

    #[test]
    fn final_resend_and_completion() {
        let p = UploadProgress {
            received: 8192,
            total: Some(10000),
        };
        let FragmentDecision::Write(w) = decide_fragment(&p, &r(8192, 9999, 10000), &L).unwrap()
        else {
            panic!()
        };
        assert!(w.completes);
        let p = w.progress_after();
        assert!(p.is_complete());
        assert_eq!(
            decide_fragment(&p, &r(8192, 9999, 10000), &L).unwrap(),
            FragmentDecision::AlreadyHeld {
                received: 10000,
                final_resend: true
            }
        );
    }

    #[test]
    fn zero_byte_upload() {
        let d = decide_fragment(&UploadProgress::new(), &ContentRange::empty_upload(), &L).unwrap();
        let FragmentDecision::Write(w) = d else {
            panic!("{d:?}")
        };
        assert!(w.completes && w.len == 0);
        let again =
            decide_fragment(&w.progress_after(), &ContentRange::empty_upload(), &L).unwrap();
        assert_eq!(
            again,
            FragmentDecision::AlreadyHeld {
                received: 0,
                final_resend: true
            }
        );
    }

    #[test]
    fn limits_and_total_change() {
        let p = UploadProgress {
            received: 4096,
            total: Some(10000),
        };
        let e = decide_fragment(&p, &r(4096, 8191, 12000), &L).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let lim = UploadLimits {
            max_upload_size: 1_000_000,
            max_fragment_size: 32,
        };
        let e =
            decide_fragment(&UploadProgress::new(), &r(0, 4095, 5_000_000_000), &lim).unwrap_err();
        assert_eq!(
            (e.status(), e.code()),
            (StatusCode::BAD_REQUEST, crate::HResult::BG_E_TOO_LARGE)
        );
        let e = decide_fragment(&UploadProgress::new(), &r(0, 4095, 10000), &lim).unwrap_err();
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
