//! [`UploadBody`]: the notification's request body, streamed from the upload file.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio_util::io::ReaderStream;

/// The notification's request body: the upload file streamed in chunks (by value), or
/// nothing (by reference). Each chunk taken by the connection signals `progress`; a failure
/// to read the upload sets `local_failure`.
pub(super) struct UploadBody {
    pub(super) stream: Option<ReaderStream<tokio::io::Take<tokio::fs::File>>>,
    pub(super) remaining: u64,
    pub(super) progress: Arc<Notify>,
    pub(super) local_failure: Arc<AtomicBool>,
}

impl Body for UploadBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        let Some(stream) = this.stream.as_mut() else {
            return Poll::Ready(None);
        };
        match stream.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(bytes))) => {
                this.remaining = this.remaining.saturating_sub(bytes.len() as u64);
                this.progress.notify_one();
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Poll::Ready(Some(Err(e))) => {
                this.stream = None;
                this.local_failure.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.stream = None;
                if this.remaining > 0 {
                    this.local_failure.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the upload file ended {} bytes short", this.remaining),
                    ))));
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_none() || self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}
