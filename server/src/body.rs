//! The response body of every bitsd response: empty (Acks), small in-memory (admin JSON,
//! errors), or a reply file streamed from disk.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use http_body::{Body, Frame, SizeHint};

/// Called with the number of bytes of a streamed reply range that the connection took.
pub(crate) type DeliveryReport = Box<dyn FnOnce(u64) + Send + Sync>;

/// The body of a bitsd response.
pub struct ResponseBody(Inner);

enum Inner {
    Empty,
    Full(Option<Bytes>),
    File(FileBody),
}

struct FileBody {
    stream: tokio_util::io::ReaderStream<tokio::io::Take<tokio::fs::File>>,
    remaining: u64,
    /// Bytes of chunks the connection has taken (counted when it asks for the next one).
    taken: u64,
    pending: u64,
    report: Option<DeliveryReport>,
}

impl FileBody {
    fn report(&mut self) {
        if let Some(report) = self.report.take() {
            report(self.taken);
        }
    }
}

impl Drop for FileBody {
    fn drop(&mut self) {
        // hyper ends a body once it has the Content-Length bytes, without asking again:
        // when nothing remains, the last chunk was taken too.
        if self.remaining == 0 {
            self.taken += std::mem::take(&mut self.pending);
        }
        self.report();
    }
}

impl ResponseBody {
    /// No body.
    pub fn empty() -> Self {
        ResponseBody(Inner::Empty)
    }

    /// A body in memory.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ResponseBody(Inner::Full(Some(bytes.into())))
    }

    /// `len` bytes of `file` from its current position, in chunks. `report` learns how many of
    /// them the connection took, when the body ends or is dropped.
    pub(crate) fn file(file: tokio::fs::File, len: u64, report: DeliveryReport) -> Self {
        use tokio::io::AsyncReadExt;
        ResponseBody(Inner::File(FileBody {
            stream: tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 * 1024),
            remaining: len,
            taken: 0,
            pending: 0,
            report: Some(report),
        }))
    }
}

impl Default for ResponseBody {
    fn default() -> Self {
        Self::empty()
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Inner::Empty => f.write_str("ResponseBody::Empty"),
            Inner::Full(b) => write!(
                f,
                "ResponseBody::Full({} bytes)",
                b.as_ref().map_or(0, Bytes::len)
            ),
            Inner::File(b) => write!(f, "ResponseBody::File({} bytes left)", b.remaining),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match &mut self.get_mut().0 {
            Inner::Empty => Poll::Ready(None),
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::File(f) => {
                // Being asked again means the previous chunk was taken by the connection.
                f.taken += std::mem::take(&mut f.pending);
                if f.remaining == 0 {
                    f.report();
                    return Poll::Ready(None);
                }
                match Pin::new(&mut f.stream).poll_next(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Ok(chunk))) => {
                        let n = (chunk.len() as u64).min(f.remaining);
                        f.remaining -= n;
                        f.pending = n;
                        Poll::Ready(Some(Ok(Frame::data(chunk))))
                    }
                    Poll::Ready(Some(Err(e))) => {
                        f.report();
                        Poll::Ready(Some(Err(e)))
                    }
                    Poll::Ready(None) => {
                        f.report();
                        Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "reply file shorter than recorded",
                        ))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Empty => true,
            Inner::Full(b) => b.is_none(),
            Inner::File(f) => f.remaining == 0 && f.pending == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Empty => SizeHint::with_exact(0),
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::File(f) => SizeHint::with_exact(f.remaining),
        }
    }
}
