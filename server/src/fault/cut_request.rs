//! The request body of `drop-after`: it ends with an error after a number of bytes.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame};

use crate::service::BoxError;

/// A request body that ends with an error after `limit` bytes (`drop-after`).
pub(super) struct CutBody<B> {
    inner: Pin<Box<B>>,
    remaining: u64,
    cut: Arc<AtomicBool>,
}

impl<B> CutBody<B> {
    pub(super) fn new(inner: B, limit: u64, cut: Arc<AtomicBool>) -> Self {
        CutBody {
            inner: Box::pin(inner),
            remaining: limit,
            cut,
        }
    }
}

impl<B> Body for CutBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.remaining == 0 && (this.cut.load(Ordering::SeqCst) || !this.inner.is_end_stream()) {
            this.cut.store(true, Ordering::SeqCst);
            return Poll::Ready(Some(Err("request body cut by the fault plan".into())));
        }
        match ready!(this.inner.as_mut().poll_frame(cx)) {
            None => Poll::Ready(None),
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    let n = data.remaining() as u64;
                    let take = n.min(this.remaining);
                    let bytes = data.copy_to_bytes(take as usize);
                    this.remaining -= take;
                    if take < n {
                        this.cut.store(true, Ordering::SeqCst);
                    }
                    Poll::Ready(Some(Ok(Frame::data(bytes))))
                }
                Err(frame) => Poll::Ready(Some(Ok(
                    frame.map_data(|mut d| d.copy_to_bytes(d.remaining()))
                ))),
            },
        }
    }
}
