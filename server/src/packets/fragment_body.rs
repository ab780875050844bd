//! A Fragment's body: read at the client's pace (idle timeout, minimum rate), the bytes the
//! session needs written to the backend's sink, the rest discarded; and, on a backend that
//! opens a fragment's write before the session is loaded
//! ([`bitsd_storage::SessionBackend::early_fragment`]), the body fed to that early write
//! during the load's round trip, kept so that it can be read again if the load says the
//! fragment is something else (a re-send, an overlap).

use std::pin::Pin;

use bitsd_protocol::BitsError;
use bitsd_storage::{EarlyFragment, FragmentSink, FragmentSlot, SessionRecord, StorageError};
use bytes::{Buf, Bytes};
use http_body_util::BodyExt;

use crate::service::{storage_failure, BoxError};

/// A fragment's body, and what was read from it before the session was loaded.
pub(super) struct FragmentBody<B> {
    body: Pin<Box<B>>,
    /// Chunks read so far (by [`FragmentBody::feed_early`]), in order.
    read: Vec<Bytes>,
    /// Their length.
    read_len: u64,
    /// The body has ended.
    ended: bool,
}

/// What [`FragmentBody::feed_early`] leaves: the load's result, and the early write with
/// whether every byte read so far went into it.
pub(super) struct FedEarly {
    /// The session's load, as `load_for_fragment` gives it.
    pub(super) loaded: Result<(Option<SessionRecord>, Option<FragmentSlot>), StorageError>,
    /// The early write.
    pub(super) sink: Box<dyn FragmentSink>,
    /// Every byte read so far was written to `sink` (else it can only be dropped).
    pub(super) whole: bool,
}

impl<B> FragmentBody<B>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    /// A body nothing was read from.
    pub(super) fn new(body: B) -> Self {
        FragmentBody {
            body: Box::pin(body),
            read: Vec::new(),
            read_len: 0,
            ended: false,
        }
    }

    /// Writes the body to `early`'s sink while its load runs, and returns when the load
    /// has. At most `expected` bytes are written (a longer body stops the feeding; the error
    /// is the usual path's to give). Memory: the read chunks are kept (shared with the sink,
    /// which holds the same bytes until its commit), at most `expected` bytes, which the
    /// backend offers early writes only for when it would hold them anyway.
    pub(super) async fn feed_early(
        &mut self,
        early: EarlyFragment,
        expected: u64,
        pace: BodyPace,
    ) -> Result<FedEarly, BitsError> {
        let EarlyFragment { mut sink, mut load } = early;
        let mut whole = true;
        let loaded = loop {
            if !whole || self.ended {
                break load.await;
            }
            // The load wins a tie: its answer decides what the body is for. `frame()` is
            // cancel-safe, so a frame is never lost when the load wins.
            let next = tokio::select! {
                biased;
                loaded = &mut load => break loaded,
                next = next_frame(self.body.as_mut(), pace, self.read_len) => next,
            };
            let frame = match next? {
                None => {
                    self.ended = true;
                    continue;
                }
                Some(frame) => frame.map_err(|e| body_error(e, self.read_len, expected))?,
            };
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            let chunk = data.copy_to_bytes(data.remaining());
            if chunk.is_empty() {
                continue;
            }
            let end = self.read_len + chunk.len() as u64;
            whole = end <= expected && sink.write(chunk.clone()).await.is_ok();
            self.read.push(chunk);
            self.read_len = end;
        };
        Ok(FedEarly {
            loaded,
            sink,
            whole,
        })
    }

    /// Reads what is left of the body and drops it (bounded, as a body never read is before
    /// an error Ack: see [`super::discard_unread`]).
    pub(super) async fn discard(self)
    where
        B: Send + 'static,
        B::Data: Send,
    {
        if !self.ended {
            super::discard_unread(self.body).await;
        }
    }

    /// Reads the body (what was read early first), discards the first `skip` bytes, writes
    /// the next `len` bytes to `writer` (with none, the whole body is read and dropped: a
    /// fragment the server already holds); the body must be exactly `expected` bytes long.
    /// `early_written`: the bytes read early went to `writer` already (its early write is
    /// kept, with `skip` 0). Memory use is bounded: the writer holds at most
    /// [`bitsd_storage::GATHER_BYTES`] of frames before it writes them.
    pub(super) async fn stream(
        mut self,
        expected: u64,
        skip: u64,
        len: u64,
        pace: BodyPace,
        mut writer: Option<&mut dyn FragmentSink>,
        early_written: bool,
    ) -> Result<(), BitsError> {
        let mut seen = 0u64;
        let window = Window {
            expected,
            skip,
            len,
        };
        if early_written {
            seen = self.read_len;
            self.read = Vec::new();
        } else {
            for chunk in std::mem::take(&mut self.read) {
                seen = window.place(chunk, seen, writer.as_deref_mut()).await?;
            }
        }
        while !self.ended {
            let Some(frame) = next_frame(self.body.as_mut(), pace, seen).await? else {
                break;
            };
            let frame = frame.map_err(|e| body_error(e, seen, expected))?;
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            // Zero-copy for hyper's own body type (its frames are `Bytes`).
            let chunk = data.copy_to_bytes(data.remaining());
            seen = window.place(chunk, seen, writer.as_deref_mut()).await?;
        }
        if seen != expected {
            return Err(BitsError::invalid_arg(format!(
                "body ended after {seen} of {expected} bytes"
            )));
        }
        Ok(())
    }
}

/// Which of a body's bytes are written: `[skip, skip + len)` of `expected`.
struct Window {
    expected: u64,
    skip: u64,
    len: u64,
}

impl Window {
    /// Writes the part of `chunk` (the body's bytes from `seen`) inside the window; returns
    /// the body's length read so far.
    async fn place<'w>(
        &self,
        chunk: Bytes,
        seen: u64,
        writer: Option<&mut (dyn FragmentSink + 'w)>,
    ) -> Result<u64, BitsError> {
        let (start, end) = (seen, seen + chunk.len() as u64);
        if end > self.expected {
            return Err(BitsError::invalid_arg(format!(
                "body longer than its Content-Length {}",
                self.expected
            )));
        }
        // The part of [start, end) that falls in [skip, skip + len).
        let from = self.skip.clamp(start, end);
        let to = (self.skip + self.len).clamp(start, end);
        if let (Some(w), true) = (writer, from < to) {
            w.write(chunk.slice((from - start) as usize..(to - start) as usize))
                .await
                .map_err(storage_failure)?;
        }
        Ok(end)
    }
}

/// How long a fragment's body may take: it may send nothing for `idle`, and after `grace` it
/// must keep up `min_rate` bytes per second on average since it started (IIS
/// `minBytesPerSecond`), so a body that trickles is cut off however often it sends a byte.
#[derive(Clone, Copy, Debug)]
pub(super) struct BodyPace {
    started: tokio::time::Instant,
    idle: std::time::Duration,
    min_rate: u64,
    grace: std::time::Duration,
}

impl BodyPace {
    /// The pace of a body whose reading starts now.
    pub(super) fn start(limits: &crate::session_limits::SessionLimits) -> Self {
        BodyPace {
            started: tokio::time::Instant::now(),
            idle: limits.body_idle_timeout,
            min_rate: limits.min_body_rate,
            grace: limits.min_body_rate_grace,
        }
    }

    /// When a body that has sent `seen` bytes must have sent more: the earlier of the idle
    /// deadline and the time the minimum rate makes `seen` bytes due; whether it is the rate's.
    fn deadline(&self, seen: u64) -> (tokio::time::Instant, bool) {
        let idle = tokio::time::Instant::now() + self.idle;
        if self.min_rate == 0 {
            return (idle, false);
        }
        let due = self.started
            + self.grace
            + std::time::Duration::from_secs_f64(seen as f64 / self.min_rate as f64);
        if due < idle {
            (due, true)
        } else {
            (idle, false)
        }
    }
}

/// The next frame, with the body's error already boxed (so no non-`Send` error is held);
/// a body that sends nothing for the idle timeout, or falls below the minimum rate after its
/// grace period, is abandoned (500, transient for the client; the session lock is released
/// with the request).
async fn next_frame<B>(
    mut body: Pin<&mut B>,
    pace: BodyPace,
    seen: u64,
) -> Result<Option<Result<http_body::Frame<B::Data>, BoxError>>, BitsError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let (deadline, by_rate) = pace.deadline(seen);
    match tokio::time::timeout_at(deadline, body.frame()).await {
        Ok(next) => Ok(next.map(|r| r.map_err(Into::into))),
        Err(_) if by_rate => Err(BitsError::internal(
            bitsd_protocol::HResult::E_FAIL,
            format!(
                "request body slower than {} bytes/s ({seen} bytes in {} s)",
                pace.min_rate,
                pace.started.elapsed().as_secs()
            ),
        )),
        Err(_) => Err(BitsError::internal(
            bitsd_protocol::HResult::E_FAIL,
            format!("request body idle for {} s", pace.idle.as_secs()),
        )),
    }
}

fn body_error(e: BoxError, seen: u64, expected: u64) -> BitsError {
    BitsError::invalid_arg(format!(
        "body read failed after {seen} of {expected} bytes: {e}"
    ))
}
