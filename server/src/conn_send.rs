//! The sending side of a connection: a send idle timeout and a minimum send rate for response
//! bodies (a client that asks for a reply and never reads it does not keep a connection slot,
//! its buffers and the reply file open for as long as it likes), and the count of written
//! bytes that reply progress is measured against.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub(crate) use crate::delivery::ConnSend;
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

/// How often reply progress is sampled while a reply body is written, and while writes wait
/// for the client. A reset discards what the kernel knew, so the last sample before it is what
/// counts; one sample costs about 10 µs.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);
/// How often a connection whose writes wait for the client wakes up to sample.
const SAMPLE_BLOCKED: Duration = Duration::from_millis(100);

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
    /// When the reply's progress is sampled next while writes wait.
    next_sample: Instant,
    timer: Pin<Box<Sleep>>,
    /// The server has started shutting its side down.
    shutting_down: bool,
}

impl<T: TcpBacked> PacedIo<T> {
    /// Wraps a connection's stream; the [`ConnSend`] goes to its requests.
    pub(crate) fn new(inner: T, limits: SendLimits) -> (Self, ConnSend) {
        let tcp = inner.tcp();
        let addrs = tcp.local_addr().ok().zip(tcp.peer_addr().ok());
        let conn = ConnSend::new(addrs);
        let io = PacedIo {
            inner,
            conn: conn.clone(),
            limits,
            blocked_since: None,
            next_sample: Instant::now(),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            shutting_down: false,
        };
        (io, conn)
    }

    /// The write could not go out now: fails once the client has been too slow, else waits
    /// (the inner stream or the timer wakes the task).
    fn poll_blocked(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let now = Instant::now();
        let since = *self.blocked_since.get_or_insert(now);
        let idle = since + self.limits.idle_timeout;
        let (deadline, why) = match self.conn.rate_deadline(&self.limits, since) {
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
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Poll::Ready(self.give_up(why));
            }
            // While the client makes the server wait, what it acknowledged is sampled now and
            // then: if it resets the connection, the last sample is what was delivered.
            let mut wake = deadline;
            if self.conn.sampling() {
                if now >= self.next_sample {
                    self.conn.sample();
                    self.next_sample = now + SAMPLE_BLOCKED;
                }
                wake = wake.min(self.next_sample);
            }
            self.timer.as_mut().reset(wake);
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// Writes go out again: the wait is added to the body's.
    fn unblocked(&mut self) {
        if let Some(since) = self.blocked_since.take() {
            self.conn.waited(since.elapsed());
        }
    }

    /// Samples reply progress if a reply body is being written and the last sample is old.
    fn sample_now_and_then(&mut self) {
        let now = Instant::now();
        if now >= self.next_sample && self.conn.sampling() {
            self.conn.sample();
            self.next_sample = now + SAMPLE_EVERY;
        }
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
        // The client's FIN needs no look of its own: the socket stays (CLOSE_WAIT) until the
        // server shuts its side down, and that is where the last look is taken.
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
                this.unblocked();
                this.conn.wrote(&buf[..n]);
                this.sample_now_and_then();
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
                this.unblocked();
                let mut left = n;
                for b in bufs {
                    if left == 0 {
                        break;
                    }
                    let take = left.min(b.len());
                    this.conn.wrote(&b[..take]);
                    left -= take;
                }
                this.sample_now_and_then();
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
                    this.unblocked();
                }
                Poll::Ready(r)
            }
            Poll::Pending => this.poll_blocked(cx).map(Err),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.shutting_down {
            // Once both sides are closed the kernel forgets the connection at once.
            this.shutting_down = true;
            this.conn.ending();
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// A connection's service with a per-connection value (its [`ConnSend`], its peer address)
/// added to every request's extensions.
#[derive(Clone, Debug)]
pub(crate) struct WithExtension<S, T> {
    inner: S,
    value: T,
}

impl<S, T> WithExtension<S, T> {
    pub(crate) fn new(inner: S, value: T) -> Self {
        WithExtension { inner, value }
    }
}

impl<S, T, B> hyper::service::Service<http::Request<B>> for WithExtension<S, T>
where
    S: hyper::service::Service<http::Request<B>>,
    T: Clone + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut req: http::Request<B>) -> Self::Future {
        req.extensions_mut().insert(self.value.clone());
        self.inner.call(req)
    }
}
