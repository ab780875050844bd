//! The response body of the fault layer: passed through, cut short (`truncate`) or paused
//! (`stall`).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::body::ResponseBody;

/// How long a truncated answer waits, after its last byte went out, before the connection is
/// closed: enough for the connection to flush those bytes to the client.
const CUT_FLUSH_DELAY: Duration = Duration::from_millis(100);

/// What the fault layer does to a response body.
enum BodyFault {
    Pass,
    /// Close the connection once `at` bytes went out.
    Truncate {
        at: u64,
    },
    /// Pause `pause` once `after` bytes went out.
    Stall {
        after: u64,
        pause: Duration,
        done: bool,
    },
}

/// The response body of a [`FaultInjectingService`](super::FaultInjectingService): the server's body, passed through, cut
/// short (`truncate`) or paused (`stall`).
pub struct FaultResponseBody {
    inner: ResponseBody,
    fault: BodyFault,
    sent: u64,
    pending: Option<Bytes>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl fmt::Debug for FaultResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultResponseBody")
            .field("inner", &self.inner)
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

impl FaultResponseBody {
    fn with(inner: ResponseBody, fault: BodyFault) -> Self {
        FaultResponseBody {
            inner,
            fault,
            sent: 0,
            pending: None,
            sleep: None,
        }
    }

    /// The server's body unchanged.
    pub fn pass(inner: ResponseBody) -> Self {
        Self::with(inner, BodyFault::Pass)
    }

    /// The first `bytes` of the body, then an error that makes hyper close the connection.
    pub fn truncate(inner: ResponseBody, bytes: u64) -> Self {
        Self::with(inner, BodyFault::Truncate { at: bytes })
    }

    /// The body with a pause of `pause` after its first `after` bytes.
    pub fn stall(inner: ResponseBody, after: u64, pause: Duration) -> Self {
        Self::with(
            inner,
            BodyFault::Stall {
                after,
                pause,
                done: false,
            },
        )
    }

    /// The byte count at which the fault acts next, if it still has to.
    fn limit(&self) -> Option<u64> {
        match self.fault {
            BodyFault::Pass => None,
            BodyFault::Truncate { at } => Some(at),
            BodyFault::Stall { after, done, .. } => (!done).then_some(after),
        }
    }
}

impl Body for FaultResponseBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(sleep) = this.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                this.sleep = None;
                match &mut this.fault {
                    BodyFault::Truncate { .. } => {
                        return Poll::Ready(Some(Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "reply truncated by the fault plan",
                        ))))
                    }
                    BodyFault::Stall { done, .. } => *done = true,
                    BodyFault::Pass => {}
                }
            }
            let limit = this.limit();
            let finished = this.pending.is_none() && this.inner.is_end_stream();
            if let Some(limit) = limit {
                if this.sent >= limit && !finished {
                    let wait = match this.fault {
                        BodyFault::Stall { pause, .. } => pause,
                        _ => CUT_FLUSH_DELAY,
                    };
                    this.sleep = Some(Box::pin(tokio::time::sleep(wait)));
                    continue;
                }
            }
            let mut chunk = match this.pending.take() {
                Some(p) => p,
                None => match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                    None => return Poll::Ready(None),
                    Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(d) => d,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    },
                },
            };
            if let Some(limit) = limit {
                let room = limit.saturating_sub(this.sent);
                if chunk.len() as u64 > room {
                    this.pending = Some(chunk.split_off(room as usize));
                }
            }
            this.sent += chunk.len() as u64;
            if chunk.is_empty() {
                continue;
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.sleep.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let pending = self.pending.as_ref().map_or(0, |p| p.len() as u64);
        match self.inner.size_hint().exact() {
            Some(n) => SizeHint::with_exact(n + pending),
            None => SizeHint::default(),
        }
    }
}
