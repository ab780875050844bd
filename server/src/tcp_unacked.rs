//! How much of what the server wrote to a TCP connection the client's TCP stack has not yet
//! acknowledged: the socket's send queue (what `SIOCOUTQ` reports), read through the kernel's
//! sock_diag netlink interface (Linux; safe, unlike the `ioctl`). Reply progress subtracts it
//! from the bytes written, so a byte counts as delivered only once the client acknowledged it.

use std::net::SocketAddr;

/// Bytes of the body the peer has not acknowledged, from a socket's TCP state and its send
/// queue (`write_seq - snd_una`, what sock_diag reports); `None` when the queue tells nothing.
/// - ESTABLISHED, FIN_WAIT2, CLOSE_WAIT: the queue is data.
/// - FIN_WAIT1, CLOSING, LAST_ACK: the server's FIN is sent and not acknowledged, and takes
///   one sequence number of the queue: not a byte of the body.
/// - TIME_WAIT: reached only once the peer acknowledged the FIN, so everything before it.
/// - CLOSE (reset), LISTEN and the rest: the queue was purged, or is not a connection's.
#[cfg(any(target_os = "linux", test))]
fn unacked_of(state: u8, send_queue: u32) -> Option<u64> {
    let queue = u64::from(send_queue);
    match state {
        1 | 5 | 8 => Some(queue),
        4 | 9 | 11 => Some(queue.saturating_sub(1)),
        6 => Some(0),
        _ => None,
    }
}

/// What the kernel says of a connection's sending side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TcpSample {
    /// Bytes written to the socket that the peer has not acknowledged; `None` once the
    /// connection was reset or closed (its queue is discarded then).
    pub(crate) unacked: Option<u64>,
    /// Bytes the peer acknowledged over the connection's life (`tcpi_bytes_acked`), which
    /// stays readable after a reset.
    pub(crate) bytes_acked: Option<u64>,
}

/// Byte offset of `tcpi_bytes_acked` in the kernel's `struct tcp_info` (Linux 4.2 and later;
/// the struct only grows at its end).
#[cfg(target_os = "linux")]
const BYTES_ACKED_AT: usize = 120;

/// Bytes written to the connection `local` ↔ `peer` that the peer has not acknowledged;
/// `None` when the kernel cannot tell (the connection is gone, or not on Linux).
#[cfg(test)]
pub(crate) fn unacked(local: SocketAddr, peer: SocketAddr) -> Option<u64> {
    sample(local, peer)?.unacked
}

/// A thread's sock_diag socket, opened at its first sample and kept: a sample is then one
/// `sendto` and one `recvfrom` (opening, binding and connecting a netlink socket per sample
/// cost three more system calls and a file descriptor each time, ~2.8 times per small job).
/// A socket that failed is dropped and the next sample opens a new one.
#[cfg(target_os = "linux")]
struct DiagSocket {
    socket: netlink_sys::Socket,
    /// The last request's sequence number: an answer carrying another one is a stale answer
    /// to an earlier request (whose reader gave up) and is skipped.
    sequence: u32,
}

#[cfg(target_os = "linux")]
thread_local! {
    static DIAG_SOCKET: std::cell::RefCell<Option<DiagSocket>> =
        const { std::cell::RefCell::new(None) };
}

/// Stale answers skipped before a socket is given up (there is at most one per failed look).
#[cfg(target_os = "linux")]
const STALE_ANSWERS_MAX: usize = 4;

/// Asks the kernel about the connection `local` ↔ `peer`; `None` when it cannot tell (the
/// socket is gone, sock_diag is not permitted, or not on Linux).
#[cfg(target_os = "linux")]
pub(crate) fn sample(local: SocketAddr, peer: SocketAddr) -> Option<TcpSample> {
    DIAG_SOCKET.with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        if slot.is_none() {
            let socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_SOCK_DIAG)
                .and_then(|mut s| {
                    s.bind_auto()?;
                    s.connect(&netlink_sys::SocketAddr::new(0, 0))?;
                    Ok(s)
                })
                .ok()?;
            *slot = Some(DiagSocket {
                socket,
                sequence: 0,
            });
        }
        let diag = slot.as_mut()?;
        diag.sequence = diag.sequence.wrapping_add(1);
        match ask(&diag.socket, diag.sequence, local, peer) {
            Ok(answer) => answer,
            Err(()) => {
                // Whatever state the socket is in, a fresh one starts clean.
                *slot = None;
                None
            }
        }
    })
}

/// One request and its answer over `socket`: `Ok(None)` when the kernel answered but not
/// with the connection (it is gone); `Err` when the socket itself failed.
#[cfg(target_os = "linux")]
fn ask(
    socket: &netlink_sys::Socket,
    sequence: u32,
    local: SocketAddr,
    peer: SocketAddr,
) -> Result<Option<TcpSample>, ()> {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
    use netlink_packet_sock_diag::inet::nlas::Nla;
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
    use netlink_packet_sock_diag::SockDiagMessage;

    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = sequence;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: if local.is_ipv4() { AF_INET } else { AF_INET6 },
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::INFO,
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: local.port(),
                destination_port: peer.port(),
                source_address: local.ip(),
                destination_address: peer.ip(),
                interface_id: 0,
                // No cookie: the addresses and ports name the socket.
                cookie: [0xff; 8],
            },
        })
        .into(),
    );
    request.finalize();
    let mut out = vec![0; request.buffer_len()];
    request.serialize(&mut out[..]);
    socket.send(&out, 0).map_err(drop)?;
    let mut answer = vec![0; 4096];
    for _ in 0..=STALE_ANSWERS_MAX {
        let n = socket.recv(&mut &mut answer[..], 0).map_err(drop)?;
        let message = NetlinkMessage::<SockDiagMessage>::deserialize(answer.get(..n).ok_or(())?)
            .map_err(drop)?;
        if message.header.sequence_number != sequence {
            continue;
        }
        return Ok(match message.payload {
            // The kernel answers a lookup whose connection is gone with the listening socket
            // of the same local port, if any: that is not the connection.
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r))
                if r.header.socket_id.destination_port != peer.port()
                    || r.header.socket_id.source_port != local.port() =>
            {
                None
            }
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                let bytes_acked = r.nlas.iter().find_map(|n| match n {
                    Nla::TcpInfo(info) => info
                        .get(BYTES_ACKED_AT..BYTES_ACKED_AT + 8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_ne_bytes),
                    _ => None,
                });
                // A reset connection (CLOSE) has had its queue purged: the count no longer
                // says anything about what the peer acknowledged.
                let unacked = unacked_of(r.header.state, r.header.send_queue);
                Some(TcpSample {
                    unacked,
                    bytes_acked,
                })
            }
            _ => None,
        });
    }
    Err(())
}

/// Not on Linux: the kernel is not asked.
#[cfg(not(target_os = "linux"))]
pub(crate) fn sample(_local: SocketAddr, _peer: SocketAddr) -> Option<TcpSample> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn the_send_queue_shrinks_as_the_peer_reads() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let (local, peer) = (server.local_addr().unwrap(), server.peer_addr().unwrap());
        if unacked(local, peer).is_none() {
            eprintln!("skipped: sock_diag is not available here");
            return;
        }
        assert_eq!(unacked(local, peer), Some(0));
        server.set_nonblocking(true).unwrap();
        let mut written = 0usize;
        let chunk = vec![7u8; 64 * 1024];
        while let Ok(n) = server.write(&chunk) {
            written += n;
            if written > (64 << 20) {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        let queued = unacked(local, peer).unwrap();
        assert!(
            queued > 0 && queued <= written as u64,
            "{queued} of {written}"
        );
        // The peer reads everything: nothing stays unacknowledged.
        let mut client = client;
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut read = 0usize;
        while read < written {
            read += client.read(&mut buf).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(unacked(local, peer), Some(0));
        // A reset connection's queue is gone: it tells nothing any more.
        socket2::SockRef::from(&client)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(client);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let _ = server.write(&chunk);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(unacked(local, peer), None);
        // What one look costs (it is taken every few milliseconds of a download).
        let started = std::time::Instant::now();
        for _ in 0..200 {
            let _ = sample(local, peer);
        }
        eprintln!("one sock_diag sample: {:?}", started.elapsed() / 200);
    }

    /// What the send queue means in each TCP state.
    #[test]
    fn the_send_queue_counts_body_bytes_by_state() {
        // Open: the queue is data.
        assert_eq!(unacked_of(1, 500), Some(500));
        assert_eq!(unacked_of(5, 0), Some(0));
        assert_eq!(unacked_of(8, 7), Some(7));
        // The server's FIN sent, not yet acknowledged: one less.
        assert_eq!(unacked_of(4, 1), Some(0));
        assert_eq!(unacked_of(9, 1809), Some(1808));
        assert_eq!(unacked_of(11, 0), Some(0));
        // TIME_WAIT: everything was acknowledged.
        assert_eq!(unacked_of(6, 0), Some(0));
        // Reset, listening, anything else: nothing to say.
        assert_eq!(unacked_of(7, 300), None);
        assert_eq!(unacked_of(10, 128), None);
        assert_eq!(unacked_of(2, 0), None);
    }

    /// The server closes first (a `Connection: close` answer), the client reads all and
    /// closes at once: the server's side ends in TIME_WAIT, which counts as everything
    /// acknowledged (before, it told nothing and the last look before the close counted).
    #[test]
    fn a_connection_the_server_closed_first_ends_fully_acknowledged() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let (local, peer) = (server.local_addr().unwrap(), server.peer_addr().unwrap());
        if unacked(local, peer).is_none() {
            eprintln!("skipped: sock_diag is not available here");
            return;
        }
        server.write_all(&[5u8; 100_000]).unwrap();
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 100_000);
        drop(client);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(unacked(local, peer), Some(0));
    }

    /// A connection closed on both sides is gone, though its server's listener still has the
    /// same local port (the kernel answered the lookup with the listener, and its zero count
    /// of acknowledged bytes was taken for the connection's).
    #[test]
    fn a_closed_connection_is_not_its_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let (local, peer) = (server.local_addr().unwrap(), server.peer_addr().unwrap());
        if unacked(local, peer).is_none() {
            eprintln!("skipped: sock_diag is not available here");
            return;
        }
        // The client closes first (its side waits in TIME_WAIT), then the server.
        drop(client);
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(server);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(sample(local, peer), None);
        drop(listener);
    }

    /// One kept socket answers looks at different connections in turn, each with its own
    /// count (an answer meant for one is never taken for the other's).
    #[test]
    fn a_kept_socket_tells_connections_apart() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _idle_client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (idle, _) = listener.accept().unwrap();
        // The busy connection's client never reads: its server side keeps a send queue.
        let _busy_client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut busy, _) = listener.accept().unwrap();
        let idle_addrs = (idle.local_addr().unwrap(), idle.peer_addr().unwrap());
        let busy_addrs = (busy.local_addr().unwrap(), busy.peer_addr().unwrap());
        if unacked(idle_addrs.0, idle_addrs.1).is_none() {
            eprintln!("skipped: sock_diag is not available here");
            return;
        }
        busy.set_nonblocking(true).unwrap();
        let chunk = vec![1u8; 64 * 1024];
        let mut written = 0u64;
        while let Ok(n) = busy.write(&chunk) {
            written += n as u64;
            if written > (64 << 20) {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        // No socket has these ports (a local port that matches a listener would find it).
        let (nowhere, gone): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:9".parse().unwrap(),
        );
        for _ in 0..100 {
            assert_eq!(unacked(idle_addrs.0, idle_addrs.1), Some(0));
            let queued = unacked(busy_addrs.0, busy_addrs.1).unwrap();
            assert!(queued > 0 && queued <= written, "{queued} of {written}");
            // A connection that does not exist: an error answer, and the socket goes on.
            assert_eq!(sample(nowhere, gone), None);
        }
    }
}
