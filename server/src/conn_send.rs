//! The sending side of a connection: a send idle timeout and a minimum send rate for response
//! bodies (a client that asks for a reply and never reads it does not keep a connection slot,
//! its buffers and the reply file open for as long as it likes), and the count of written
//! bytes that reply progress is measured against.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::body::DeliveryReport;
use tokio::time::{Instant, Sleep};

/// How slow a client may be to take what the server sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendLimits {
    /// How long a write may wait for the client to make room before the connection is closed.
    pub idle_timeout: Duration,
    /// The slowest a response body may be taken, in bytes per second, once its grace period is
    /// over (IIS `minBytesPerSecond`); 0: no minimum.
    pub min_rate: u64,
    /// How long a response body may be taken slower than `min_rate`.
    pub grace: Duration,
}

impl Default for SendLimits {
    /// 60 s send idle timeout; at least 240 bytes/s after 10 s.
    fn default() -> Self {
        SendLimits {
            idle_timeout: Duration::from_secs(60),
            min_rate: 240,
            grace: Duration::from_secs(10),
        }
    }
}

/// What one connection has sent, shared by its I/O and the response body being streamed on it
/// (handed to the service as a request extension).
#[derive(Clone, Debug)]
pub(crate) struct ConnSend(Arc<Mutex<SendState>>);

#[derive(Debug, Default)]
struct SendState {
    /// Bytes written to the connection (plain text, under TLS).
    written: u64,
    /// The streamed response body in progress.
    body: Option<BodyMark>,
    /// The connection has ended: nothing more goes out.
    closed: bool,
}

struct BodyMark {
    since: Instant,
    /// `written` when the body started.
    written_at_start: u64,
    /// Where the scan for the end of its head (`\r\n\r\n`) stands: bytes of it matched.
    matched: u8,
    /// Stream offset of the body's first byte, once its head went out.
    first_byte_at: Option<u64>,
    /// Once the body has handed all it will to the connection: how many bytes, and whom to
    /// tell how many of them went out (when they all did, or when the connection ends).
    ended: Option<(u64, DeliveryReport)>,
}

impl std::fmt::Debug for BodyMark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyMark")
            .field("first_byte_at", &self.first_byte_at)
            .field("ended", &self.ended.as_ref().map(|e| e.0))
            .finish_non_exhaustive()
    }
}

impl BodyMark {
    /// Bytes of the body written by the time `written` bytes of the stream were.
    fn out(&self, written: u64) -> u64 {
        self.first_byte_at
            .map_or(0, |at| written.saturating_sub(at))
    }
}

impl ConnSend {
    fn new() -> Self {
        ConnSend(Arc::new(Mutex::new(SendState::default())))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SendState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A streamed response body starts: its head has not been written yet.
    pub(crate) fn body_started(&self) {
        let previous = {
            let mut st = self.state();
            let written = st.written;
            let previous = st.body.take();
            st.body = Some(BodyMark {
                since: Instant::now(),
                written_at_start: written,
                matched: 0,
                first_byte_at: None,
                ended: None,
            });
            previous.map(|p| (p.out(written), p))
        };
        // A previous body still waiting for its last bytes to go out (a pipelined request).
        if let Some((
            out,
            BodyMark {
                ended: Some((taken, report)),
                ..
            },
        )) = previous
        {
            report(out.min(taken));
        }
    }

    /// The streamed response body has handed `taken` bytes to the connection and ended (or
    /// was dropped): `report` learns how many of them went out to the client's socket, once
    /// they all did or when the connection ends.
    pub(crate) fn body_ended(&self, taken: u64, report: DeliveryReport) {
        let mut st = self.state();
        let written = st.written;
        let closed = st.closed;
        let Some(body) = st.body.as_mut() else {
            drop(st);
            report(0);
            return;
        };
        if closed {
            let out = body.out(written).min(taken);
            st.body = None;
            drop(st);
            report(out);
            return;
        }
        body.ended = Some((taken, report));
        let done = Self::take_if_out(&mut st);
        drop(st);
        if let Some((n, report)) = done {
            report(n);
        }
    }

    /// The ended body's report, if all its bytes went out.
    fn take_if_out(st: &mut SendState) -> Option<(u64, DeliveryReport)> {
        let body = st.body.as_ref()?;
        let (taken, _) = body.ended.as_ref()?;
        if body.first_byte_at.is_none() || body.out(st.written) < *taken {
            return None;
        }
        let taken = *taken;
        st.body.take()?.ended.map(|(_, r)| (taken, r))
    }

    /// The connection ended: an ended body's report learns what went out of it.
    fn closed(&self) {
        let body = {
            let mut st = self.state();
            st.closed = true;
            let written = st.written;
            // A body not ended yet reports when it is dropped.
            match st.body.as_ref() {
                Some(b) if b.ended.is_some() => st.body.take().map(|b| (b.out(written), b)),
                _ => None,
            }
        };
        if let Some((
            out,
            BodyMark {
                ended: Some((taken, report)),
                ..
            },
        )) = body
        {
            report(out.min(taken));
        }
    }

    /// `bytes` went out.
    fn wrote(&self, bytes: &[u8]) {
        let done = self.scan(bytes);
        if let Some((n, report)) = done {
            report(n);
        }
    }

    fn scan(&self, bytes: &[u8]) -> Option<(u64, DeliveryReport)> {
        let mut st = self.state();
        let start = st.written;
        st.written += bytes.len() as u64;
        let body = st.body.as_mut()?;
        if body.first_byte_at.is_some() {
            return Self::take_if_out(&mut st);
        }
        // The head of a response cannot hold "\r\n\r\n" before its end: the first one after
        // the body started ends its head.
        const END: &[u8; 4] = b"\r\n\r\n";
        for (i, b) in bytes.iter().enumerate() {
            let m = usize::from(body.matched);
            body.matched = if *b == END[m] {
                body.matched + 1
            } else if *b == END[0] {
                1
            } else {
                0
            };
            if body.matched == 4 {
                body.first_byte_at = Some(start + i as u64 + 1);
                return Self::take_if_out(&mut st);
            }
        }
        None
    }

    /// When the body in progress falls below `limits.min_rate`, if one is streaming.
    fn rate_deadline(&self, limits: &SendLimits) -> Option<Instant> {
        if limits.min_rate == 0 {
            return None;
        }
        let st = self.state();
        let body = st.body.as_ref()?;
        let sent = st.written.saturating_sub(body.written_at_start);
        Some(
            body.since
                + limits.grace
                + Duration::from_secs_f64(sent as f64 / limits.min_rate as f64),
        )
    }
}

/// A connection's stream that knows its TCP socket.
pub(crate) trait TcpBacked {
    /// The TCP socket under it.
    fn tcp(&self) -> &tokio::net::TcpStream;
}

impl TcpBacked for tokio::net::TcpStream {
    fn tcp(&self) -> &tokio::net::TcpStream {
        self
    }
}

impl TcpBacked for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    fn tcp(&self) -> &tokio::net::TcpStream {
        self.get_ref().0
    }
}

/// A connection's I/O with the send limits applied: a write the client leaves waiting past the
/// idle timeout, or a response body taken slower than the minimum rate, fails with `TimedOut`,
/// and hyper closes the connection (releasing its slot, buffers and open files).
pub(crate) struct PacedIo<T> {
    inner: T,
    conn: ConnSend,
    limits: SendLimits,
    /// Since when writes have been waiting for the client.
    blocked_since: Option<Instant>,
    timer: Pin<Box<Sleep>>,
}

impl<T: TcpBacked> PacedIo<T> {
    /// Wraps a connection's stream; the [`ConnSend`] goes to its requests.
    pub(crate) fn new(inner: T, limits: SendLimits) -> (Self, ConnSend) {
        let conn = ConnSend::new();
        let io = PacedIo {
            inner,
            conn: conn.clone(),
            limits,
            blocked_since: None,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        };
        (io, conn)
    }

    /// The write could not go out now: fails once the client has been too slow, else waits
    /// (the inner stream or the timer wakes the task).
    fn poll_blocked(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let now = Instant::now();
        let since = *self.blocked_since.get_or_insert(now);
        let idle = since + self.limits.idle_timeout;
        let (deadline, why) = match self.conn.rate_deadline(&self.limits) {
            Some(rate) if rate < idle => (
                rate,
                format!(
                    "client took the response slower than {} bytes/s",
                    self.limits.min_rate
                ),
            ),
            _ => (
                idle,
                format!(
                    "client took nothing for {} s",
                    self.limits.idle_timeout.as_secs()
                ),
            ),
        };
        if now >= deadline {
            return Poll::Ready(self.give_up(why));
        }
        self.timer.as_mut().reset(deadline);
        ready!(self.timer.as_mut().poll(cx));
        Poll::Ready(self.give_up(why))
    }

    /// The client was too slow: the connection is reset when it closes, so that what is still
    /// queued for it in the kernel goes too (a plain close would keep sending it).
    fn give_up(&self, why: String) -> io::Error {
        tracing::info!(reason = %why, "connection closed: client too slow");
        let _ = socket2::SockRef::from(self.inner.tcp()).set_linger(Some(Duration::ZERO));
        io::Error::new(io::ErrorKind::TimedOut, why)
    }
}

impl<T> Drop for PacedIo<T> {
    fn drop(&mut self) {
        self.conn.closed();
    }
}

use std::future::Future;

impl<T: AsyncRead + Unpin> AsyncRead for PacedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + TcpBacked + Unpin> AsyncWrite for PacedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.blocked_since = None;
                this.conn.wrote(&buf[..n]);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_blocked(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                this.blocked_since = None;
                let mut left = n;
                for b in bufs {
                    if left == 0 {
                        break;
                    }
                    let take = left.min(b.len());
                    this.conn.wrote(&b[..take]);
                    left -= take;
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_blocked(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(r) => {
                if r.is_ok() {
                    this.blocked_since = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => this.poll_blocked(cx).map(Err),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A connection's service with its [`ConnSend`] added to every request's extensions.
#[derive(Clone, Debug)]
pub(crate) struct WithConn<S> {
    inner: S,
    conn: ConnSend,
}

impl<S> WithConn<S> {
    pub(crate) fn new(inner: S, conn: ConnSend) -> Self {
        WithConn { inner, conn }
    }
}

impl<S, B> hyper::service::Service<http::Request<B>> for WithConn<S>
where
    S: hyper::service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut req: http::Request<B>) -> Self::Future {
        req.extensions_mut().insert(self.conn.clone());
        self.inner.call(req)
    }
}
