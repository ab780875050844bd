//! The response body of every bitsd response: empty (Acks), small in-memory (admin JSON,
//! errors), or a reply file streamed from disk.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::task::JoinHandle;

use crate::conn_send::ConnSend;

/// Called with the number of bytes of a streamed reply range that the connection took.
pub(crate) type DeliveryReport = Box<dyn FnOnce(u64) + Send + Sync>;

/// The body of a bitsd response.
pub struct ResponseBody(Inner);

enum Inner {
    Empty,
    Full(Option<Bytes>),
    File(FileBody),
    Stream(StreamedBody),
}

/// A reply range streamed from a storage backend that keeps no local file (a shared
/// backend's object store): chunks go out as the backend yields them, and delivery is
/// counted as for a file.
struct StreamedBody {
    stream: bitsd_storage::ByteStream,
    remaining: u64,
    taken: u64,
    pending: u64,
    report: Option<DeliveryReport>,
    conn: Option<ConnSend>,
}

impl StreamedBody {
    fn report(&mut self) {
        if let Some(report) = self.report.take() {
            match &self.conn {
                Some(conn) => conn.body_ended(self.taken, report),
                None => report(self.taken),
            }
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        // Being asked again means the previous chunk was taken by the connection.
        self.taken += std::mem::take(&mut self.pending);
        if self.remaining == 0 {
            self.report();
            return Poll::Ready(None);
        }
        match self.stream.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(mut chunk))) => {
                chunk.truncate(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                let n = chunk.len() as u64;
                self.remaining -= n;
                self.pending = n;
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(Some(Err(e))) => {
                self.report();
                Poll::Ready(Some(Err(io::Error::other(e))))
            }
            Poll::Ready(None) => {
                self.report();
                Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "reply shorter than recorded",
                ))))
            }
        }
    }
}

impl Drop for StreamedBody {
    fn drop(&mut self) {
        if self.remaining == 0 {
            self.taken += std::mem::take(&mut self.pending);
        }
        self.report();
    }
}

/// Bytes per read of a streamed reply.
pub(crate) const FILE_CHUNK: usize = 256 * 1024;

/// A reply range streamed from its file: each chunk is read off the runtime, and the next read
/// starts as soon as a chunk is handed to the connection, so reading the file overlaps with
/// writing the socket (at most two chunks in memory: one being sent, one read ahead).
struct FileBody {
    file: Arc<std::fs::File>,
    /// File offset of the next read to start.
    read_at: u64,
    /// Bytes not yet read.
    unread: u64,
    /// A chunk read ahead and not yet handed out.
    ready: Option<Bytes>,
    /// The read in flight.
    reading: Option<JoinHandle<io::Result<Bytes>>>,
    /// Bytes not yet handed out.
    remaining: u64,
    /// Bytes of chunks the connection has taken (counted when it asks for the next one).
    taken: u64,
    pending: u64,
    report: Option<DeliveryReport>,
    /// The connection it is sent on: what went out of it is what counts as delivered.
    conn: Option<ConnSend>,
}

/// Reads `len` bytes at `at` (a short file is an error: the record promised more).
pub(crate) fn read_chunk(file: &std::fs::File, at: u64, len: usize) -> io::Result<Bytes> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        match file.read_at(&mut buf[filled..], at + filled as u64) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "reply file shorter than recorded",
                ))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Bytes::from(buf))
}

impl FileBody {
    fn report(&mut self) {
        if let Some(report) = self.report.take() {
            match &self.conn {
                // What went out to the client's socket, once it did.
                Some(conn) => conn.body_ended(self.taken, report),
                None => report(self.taken),
            }
        }
    }

    /// Starts reading the next chunk, if any bytes are left to read.
    fn read_ahead(&mut self) {
        if self.unread == 0 || self.reading.is_some() {
            return;
        }
        let len = (self.unread as usize).min(FILE_CHUNK);
        let (file, at) = (self.file.clone(), self.read_at);
        self.read_at += len as u64;
        self.unread -= len as u64;
        self.reading = Some(tokio::task::spawn_blocking(move || {
            read_chunk(&file, at, len)
        }));
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        if let Some(chunk) = self.ready.take() {
            return Poll::Ready(Ok(chunk));
        }
        self.read_ahead();
        let Some(reading) = self.reading.as_mut() else {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "reply file shorter than recorded",
            )));
        };
        match Pin::new(reading).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                self.reading = None;
                Poll::Ready(result.unwrap_or_else(|e| Err(io::Error::other(e))))
            }
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

    /// `len` bytes of `file` from offset `at`, of which `first` (the first chunk, read when
    /// the file was opened) is already in memory. `report` learns how many of them the
    /// connection took, when the body ends or is dropped.
    pub(crate) fn file(
        file: std::fs::File,
        at: u64,
        len: u64,
        first: Bytes,
        report: DeliveryReport,
        conn: Option<ConnSend>,
    ) -> Self {
        let read = (first.len() as u64).min(len);
        if let Some(c) = &conn {
            c.body_started();
        }
        ResponseBody(Inner::File(FileBody {
            file: Arc::new(file),
            read_at: at + read,
            unread: len - read,
            ready: Some(first),
            reading: None,
            remaining: len,
            taken: 0,
            pending: 0,
            report: Some(report),
            conn,
        }))
    }
}

impl ResponseBody {
    /// `len` bytes from a storage backend's stream (a reply with no local file). `report`
    /// learns how many of them the connection took, when the body ends or is dropped.
    pub(crate) fn stream(
        stream: bitsd_storage::ByteStream,
        len: u64,
        report: DeliveryReport,
        conn: Option<ConnSend>,
    ) -> Self {
        // Mark where this body starts on the connection, as a file body does: without the
        // mark the connection counts nothing of it as delivered.
        if let Some(c) = &conn {
            c.body_started();
        }
        ResponseBody(Inner::Stream(StreamedBody {
            stream,
            remaining: len,
            taken: 0,
            pending: 0,
            report: Some(report),
            conn,
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
            Inner::Stream(b) => write!(f, "ResponseBody::Stream({} bytes left)", b.remaining),
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
            Inner::Stream(s) => s.poll_frame(cx),
            Inner::File(f) => {
                // Being asked again means the previous chunk was taken by the connection.
                f.taken += std::mem::take(&mut f.pending);
                if f.remaining == 0 {
                    f.report();
                    return Poll::Ready(None);
                }
                match f.poll_chunk(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Ok(chunk)) => {
                        let n = (chunk.len() as u64).min(f.remaining);
                        f.remaining -= n;
                        f.pending = n;
                        // The next chunk is read while the connection writes this one.
                        f.read_ahead();
                        Poll::Ready(Some(Ok(Frame::data(chunk))))
                    }
                    Poll::Ready(Err(e)) => {
                        f.report();
                        Poll::Ready(Some(Err(e)))
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
            Inner::Stream(s) => s.remaining == 0 && s.pending == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Empty => SizeHint::with_exact(0),
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::File(f) => SizeHint::with_exact(f.remaining),
            Inner::Stream(s) => SizeHint::with_exact(s.remaining),
        }
    }
}
