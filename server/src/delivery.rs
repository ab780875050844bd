//! Reply progress: which bytes of a streamed reply count as delivered. A byte counts once the
//! client's TCP stack acknowledged it: the bytes written to the connection, less what the
//! kernel still holds unacknowledged in the socket's send queue, and after a reset (when the
//! queue is gone) as far as the kernel's count of acknowledged bytes went (both sampled
//! through sock_diag, see `tcp_unacked.rs`). Where the kernel cannot tell (not Linux), the bytes written to the
//! socket count, never those still in the server's own buffers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::body::DeliveryReport;
use crate::conn_send::SendLimits;
use crate::tcp_unacked::{sample as tcp_sample, TcpSample};

/// Set once a send-queue sample of any connection was answered: the kernel can tell what
/// clients acknowledged (sock_diag works here), so a new body need not ask to find out.
static KERNEL_TELLS: AtomicBool = AtomicBool::new(false);

/// How long a reply whose bytes all went out waits for the client to acknowledge them before
/// its progress is recorded with what was acknowledged by then.
const SETTLE: Duration = Duration::from_secs(2);
/// How often the send queue is sampled while waiting for acknowledgements.
const SETTLE_EVERY: Duration = Duration::from_millis(50);

/// What one connection has sent, shared by its I/O and the response body being streamed on it
/// (handed to the service as a request extension).
#[derive(Clone, Debug)]
pub(crate) struct ConnSend(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    state: Mutex<SendState>,
    /// The TCP connection's local and peer address (to find its socket in sock_diag).
    addrs: Option<(SocketAddr, SocketAddr)>,
}

#[derive(Debug, Default)]
struct SendState {
    /// Bytes written to the connection (plain text, under TLS).
    written: u64,
    /// The streamed response body in progress.
    body: Option<BodyMark>,
    /// The connection has ended: nothing more goes out.
    closed: bool,
    /// The kernel answered a send-queue sample on this connection.
    kernel: bool,
    /// Settling tasks still waiting for the client to acknowledge an ended body.
    settling: u32,
    /// A stream offset the client had acknowledged up to, and the kernel's count of
    /// acknowledged bytes at the same time: after a reset (the queue gone) the count still
    /// tells how far the acknowledgements went.
    acked_ref: Option<(u64, u64)>,
    /// The furthest stream offset any sample showed acknowledged: what a body settling after
    /// the socket is gone (a proxy that closed its upstream connection at once) still knows.
    acked_upto: u64,
}

impl SendState {
    /// The stream offset the client acknowledged up to, by `s`.
    fn acked_offset(&mut self, s: TcpSample) -> Option<u64> {
        let w = self.acked_offset_of(s)?;
        self.acked_upto = self.acked_upto.max(w);
        Some(w)
    }

    fn acked_offset_of(&mut self, s: TcpSample) -> Option<u64> {
        match (s.unacked, s.bytes_acked) {
            (Some(queued), acked) => {
                let w = self.written.saturating_sub(queued);
                if let Some(a) = acked {
                    self.acked_ref = Some((w, a));
                }
                Some(w)
            }
            (None, Some(a)) => {
                let (w0, a0) = self.acked_ref?;
                Some((w0 + a.saturating_sub(a0)).min(self.written))
            }
            (None, None) => None,
        }
    }
}

struct BodyMark {
    /// How long writes of it have waited for the client so far.
    waited: Duration,
    /// `written` when the body started.
    written_at_start: u64,
    /// Where the scan for the end of its head (`\r\n\r\n`) stands: bytes of it matched.
    matched: u8,
    /// Stream offset of the body's first byte, once its head went out.
    first_byte_at: Option<u64>,
    /// Bytes of the body acknowledged at the last sample.
    acked: u64,
    /// Once the body has handed all it will to the connection: how many bytes, and whom to
    /// tell how many of them were delivered.
    ended: Option<(u64, DeliveryReport)>,
}

impl std::fmt::Debug for BodyMark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyMark")
            .field("first_byte_at", &self.first_byte_at)
            .field("acked", &self.acked)
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

/// A body whose progress is to be reported: `taken` bytes handed out, `report` to call.
type Pending = (u64, DeliveryReport);

impl ConnSend {
    /// The send state of a connection between `local` and `peer` (`None`: not TCP).
    pub(crate) fn new(addrs: Option<(SocketAddr, SocketAddr)>) -> Self {
        ConnSend(Arc::new(Inner {
            state: Mutex::new(SendState::default()),
            addrs,
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SendState> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A streamed response body starts: its head has not been written yet.
    pub(crate) fn body_started(&self) {
        let previous = {
            let mut st = self.state();
            let written = st.written;
            let previous = st.body.replace(BodyMark {
                waited: Duration::ZERO,
                written_at_start: written,
                matched: 0,
                first_byte_at: None,
                acked: 0,
                ended: None,
            });
            previous.and_then(|p| Self::final_count(&st, p))
        };
        // A previous body still waiting for its bytes to be acknowledged (a pipelined request).
        if let Some((n, report)) = previous {
            report(n);
        }
        // Learn early whether the kernel can tell what the client acknowledged: once any
        // connection's sample was answered, it can (one sock_diag round trip less per reply).
        if KERNEL_TELLS.load(Ordering::Relaxed) && self.0.addrs.is_some() {
            self.state().kernel = true;
        } else {
            self.sample();
        }
    }

    /// The streamed response body has handed `taken` bytes to the connection and ended (or
    /// was dropped): `report` learns how many of them were delivered, once they all went out
    /// and were acknowledged, or when the connection ends.
    pub(crate) fn body_ended(&self, taken: u64, report: DeliveryReport) {
        let closed = {
            let mut st = self.state();
            let Some(body) = st.body.as_mut() else {
                drop(st);
                report(0);
                return;
            };
            body.ended = Some((taken, report));
            st.closed
        };
        if closed {
            self.finish();
        } else {
            self.check_out();
        }
    }

    /// What an ended body counts as delivered when nothing more will be learned.
    fn final_count(st: &SendState, body: BodyMark) -> Option<(u64, DeliveryReport)> {
        let n = if st.kernel {
            body.acked
        } else {
            body.out(st.written)
        };
        let (taken, report) = body.ended?;
        Some((n.min(taken), report))
    }

    /// The connection ended: an ended body learns what was delivered of it (a body not ended
    /// yet does when it is dropped).
    pub(crate) fn closed(&self) {
        self.state().closed = true;
        self.finish();
    }

    /// Reports an ended body with a last sample (the socket may still be there).
    fn finish(&self) {
        self.sample();
        let done = {
            let mut st = self.state();
            match st.body.as_ref() {
                Some(b) if b.ended.is_some() => {
                    st.body.take().and_then(|b| Self::final_count(&st, b))
                }
                _ => None,
            }
        };
        if let Some((n, report)) = done {
            report(n);
        }
    }

    /// If the ended body's bytes all went out: its report, once the client acknowledged them
    /// (waited for off this task), or at once when the kernel cannot tell.
    fn check_out(&self) {
        let pending: Option<(Pending, u64, bool)> = {
            let mut st = self.state();
            let written = st.written;
            let kernel = st.kernel;
            let all_out = st.body.as_ref().is_some_and(|b| {
                b.ended
                    .as_ref()
                    .is_some_and(|(taken, _)| b.first_byte_at.is_some() && b.out(written) >= *taken)
            });
            if !all_out {
                return;
            }
            st.body.take().and_then(|b| {
                let end = b.first_byte_at.unwrap_or(written) + b.ended.as_ref().map_or(0, |e| e.0);
                b.ended.map(|p| (p, end, kernel))
            })
        };
        let Some(((taken, report), end, kernel)) = pending else {
            return;
        };
        match (kernel, self.0.addrs, tokio::runtime::Handle::try_current()) {
            (true, Some((local, peer)), Ok(rt)) => {
                // A reference while the socket surely exists: the kernel's count of
                // acknowledged bytes then still tells how far they went if the connection is
                // closed before the settling task first looks (a proxy that closes its
                // upstream connection as soon as the response is in).
                self.sample();
                // Often the client has acknowledged everything already (a small reply on a
                // fast link): then no settling task and no second sample.
                if self.state().acked_upto >= end {
                    report(taken);
                    return;
                }
                self.state().settling += 1;
                let conn = self.clone();
                rt.spawn(async move {
                    let n = conn.settle(local, peer, taken, end).await;
                    conn.state().settling -= 1;
                    report(n);
                });
            }
            _ => report(taken),
        }
    }

    /// Waits (up to [`SETTLE`]) until the client acknowledged a body of `taken` bytes that
    /// ends at stream offset `end`; how many of them it did.
    async fn settle(&self, local: SocketAddr, peer: SocketAddr, taken: u64, end: u64) -> u64 {
        let deadline = Instant::now() + SETTLE;
        let start = end.saturating_sub(taken);
        let mut acked = 0;
        loop {
            let offset = tcp_sample(local, peer).and_then(|s| {
                let open = s.unacked.is_some();
                self.state().acked_offset(s).map(|w| (w, open))
            });
            let Some((w, open)) = offset else {
                // The connection is gone: what was acknowledged at the last look, here or by
                // the connection's own last sample when it ended.
                let upto = self.state().acked_upto;
                return acked.max(upto.saturating_sub(start).min(taken));
            };
            acked = acked.max(w.saturating_sub(start).min(taken));
            if !open || acked >= taken || Instant::now() >= deadline {
                return acked;
            }
            tokio::time::sleep(SETTLE_EVERY).await;
        }
    }

    /// The server is shutting its side of the connection down (after the client's FIN, or
    /// under TLS its close_notify, or on its own). A last look at what the client
    /// acknowledged while the socket surely still exists, if a body's progress still waits
    /// for it: the client's last acknowledgement often rides on its FIN, and once both sides
    /// have closed, the kernel forgets the connection before a settling task looks again.
    pub(crate) fn ending(&self) {
        let waiting = {
            let st = self.state();
            st.body.is_some() || st.settling > 0
        };
        if waiting {
            self.sample();
        }
    }

    /// Asks the kernel what is still unacknowledged and updates the body's acknowledged count.
    pub(crate) fn sample(&self) {
        let Some((local, peer)) = self.0.addrs else {
            return;
        };
        let Some(s) = tcp_sample(local, peer) else {
            return;
        };
        KERNEL_TELLS.store(true, Ordering::Relaxed);
        let mut st = self.state();
        st.kernel = true;
        let Some(w) = st.acked_offset(s) else {
            return;
        };
        let written = st.written;
        if let Some(body) = st.body.as_mut() {
            if let Some(at) = body.first_byte_at {
                let out = body.out(written);
                body.acked = body.acked.max(w.saturating_sub(at).min(out));
            }
        }
    }

    /// Whether a body is streaming whose progress is worth sampling.
    pub(crate) fn sampling(&self) -> bool {
        self.0.addrs.is_some()
            && self
                .state()
                .body
                .as_ref()
                .is_some_and(|b| b.first_byte_at.is_some())
    }

    /// `bytes` went out.
    pub(crate) fn wrote(&self, bytes: &[u8]) {
        let check = {
            let mut st = self.state();
            let start = st.written;
            st.written += bytes.len() as u64;
            match st.body.as_mut() {
                None => false,
                Some(body) if body.first_byte_at.is_some() => body.ended.is_some(),
                Some(body) => {
                    // The head of a response cannot hold "\r\n\r\n" before its end: the first
                    // one after the body started ends its head.
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
                            break;
                        }
                    }
                    body.ended.is_some()
                }
            }
        };
        if check {
            self.check_out();
        }
    }

    /// When the body in progress, whose writes have waited for the client since
    /// `blocked_since`, falls below `limits.min_rate`, if one is streaming. Only the time the
    /// server waited for the client counts: a body that pauses on its own (a slow disk, a
    /// `stall` fault) is not held against the client.
    pub(crate) fn rate_deadline(
        &self,
        limits: &SendLimits,
        blocked_since: Instant,
    ) -> Option<Instant> {
        if limits.min_rate == 0 {
            return None;
        }
        let st = self.state();
        let body = st.body.as_ref()?;
        let sent = st.written.saturating_sub(body.written_at_start);
        let allowed = limits.grace + Duration::from_secs_f64(sent as f64 / limits.min_rate as f64);
        Some(blocked_since + allowed.saturating_sub(body.waited))
    }

    /// Writes waited `d` for the client.
    pub(crate) fn waited(&self, d: Duration) {
        if let Some(body) = self.state().body.as_mut() {
            body.waited += d;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::conn_send::{PacedIo, SendLimits};

    /// A client that reads a reply to its end and closes at once: its last acknowledgement
    /// rides on its FIN, and the server closes its side as soon as it reads that FIN (as
    /// hyper does). Every byte counts, though the connection is gone before a settling task
    /// looks again (failed when only the settling task and the drop looked: the kernel then
    /// answered with the listening socket, or nothing).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reply_read_to_its_end_counts_when_the_client_closes_at_once() {
        const BODY: usize = 200 * 1024;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for round in 0..5 {
            // A receive window far smaller than the body: most of it waits in the server's
            // send queue, unacknowledged, when the body ends.
            let client = tokio::net::TcpSocket::new_v4().unwrap();
            client.set_recv_buffer_size(4096).unwrap();
            let client = client.connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            socket2::SockRef::from(&server)
                .set_send_buffer_size(4 << 20)
                .unwrap();
            let (mut io, conn) = PacedIo::new(server, SendLimits::default());
            if crate::tcp_unacked::sample(addr, client.local_addr().unwrap()).is_none() {
                eprintln!("skipped: sock_diag is not available here");
                return;
            }

            conn.body_started();
            const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 204800\r\n\r\n";
            io.write_all(HEAD).await.unwrap();
            io.write_all(&vec![7u8; BODY]).await.unwrap();
            io.flush().await.unwrap();
            let (tx, rx) = tokio::sync::oneshot::channel();
            conn.body_ended(
                BODY as u64,
                Box::new(move |n| {
                    let _ = tx.send(n);
                }),
            );

            // The client reads everything and closes; the server reads its FIN, shuts down
            // and drops the connection without delay.
            let reader = tokio::spawn(async move {
                let mut client = client;
                let mut got = 0;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = client.read(&mut buf).await.unwrap();
                    got += n;
                    if n == 0 || got >= HEAD.len() + BODY {
                        break;
                    }
                }
                drop(client);
                got
            });
            let mut buf = [0u8; 16];
            assert_eq!(
                io.read(&mut buf).await.unwrap(),
                0,
                "the client sends nothing"
            );
            io.shutdown().await.unwrap();
            drop(io);
            assert!(reader.await.unwrap() >= BODY);

            let counted = tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .expect("reported")
                .unwrap();
            assert_eq!(counted, BODY as u64, "round {round}");
        }
    }
}
