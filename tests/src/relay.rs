//! [`Relay`]: a TCP relay between a node and one of its upstreams (PostgreSQL, an S3 store)
//! that can stop forwarding in one direction on command, for all of its connections, so a
//! test can stop a node exactly between two of its steps: the upstream has done the work,
//! the node never hears of it (`freeze_answers`), or the node's request never arrives
//! (`freeze_requests`). `hold_answer_to` stops only the answers of the connection that
//! carries the next request whose bytes contain given strings (an S3 `PUT` of a key, say),
//! until `release_held`; `stop_request_to` stops that request itself, before the upstream
//! sees it. Bytes are held, never dropped: forwarding resumes where it stopped.
//! Dropping the relay closes every connection it carries.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What may pass, shared by every connection of a relay.
#[derive(Debug, Default)]
struct Gates {
    /// Node → upstream stopped.
    requests_frozen: bool,
    /// Upstream → node stopped.
    answers_frozen: bool,
    /// Strings the next request to hold must all contain (cleared when one matched).
    hold: Option<Vec<Vec<u8>>>,
    /// Connections whose answers are held.
    held: HashSet<u64>,
    /// Strings the next request to stop must all contain (cleared when one matched).
    stop: Option<Vec<Vec<u8>>>,
    /// Connections whose requests are stopped (the matching one included).
    stopped: HashSet<u64>,
    /// Matching requests the stop lets through before it stops one.
    stop_skip: usize,
    /// Strings a request must all contain to be counted, and how many were.
    count: Option<(Vec<Vec<u8>>, usize)>,
}

/// A relay on a loopback port to one upstream address.
pub struct Relay {
    addr: SocketAddr,
    gates: Arc<watch::Sender<Gates>>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Listens on an ephemeral loopback port; every connection is relayed to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gates = Arc::new(watch::channel(Gates::default()).0);
        let shared = Arc::clone(&gates);
        let accept = tokio::spawn(async move {
            // Owned here: aborting this task drops the set, which aborts every connection.
            let mut conns = JoinSet::new();
            let mut next = 0u64;
            while let Ok((down, _)) = listener.accept().await {
                next += 1;
                conns.spawn(relay_one(next, down, upstream, Arc::clone(&shared)));
                while conns.try_join_next().is_some() {}
            }
        });
        Relay {
            addr,
            gates,
            accept,
        }
    }

    /// The address nodes connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops forwarding node → upstream on every connection (new ones included).
    pub fn freeze_requests(&self) {
        self.gates.send_modify(|g| g.requests_frozen = true);
    }

    /// Stops forwarding upstream → node on every connection (new ones included).
    pub fn freeze_answers(&self) {
        self.gates.send_modify(|g| g.answers_frozen = true);
    }

    /// Holds the answers of the connection that carries the next request containing every one
    /// of `parts` (in one read: a request line and its headers arrive together), from before
    /// that request reaches the upstream until [`Relay::release_held`].
    pub fn hold_answer_to(&self, parts: &[&str]) {
        let parts = parts.iter().map(|p| p.as_bytes().to_vec()).collect();
        self.gates.send_modify(|g| g.hold = Some(parts));
    }

    /// Stops the next request containing every one of `parts` (in one read) before it
    /// reaches the upstream, and what follows it on its connection, until
    /// [`Relay::release_held`]: the node has sent it, the upstream never sees it.
    pub fn stop_request_to(&self, parts: &[&str]) {
        self.stop_request_to_nth(1, parts);
    }

    /// As [`Relay::stop_request_to`], for the `n`-th next request (1-based) containing every
    /// one of `parts`: the `n - 1` before it go through.
    pub fn stop_request_to_nth(&self, n: usize, parts: &[&str]) {
        let parts = parts.iter().map(|p| p.as_bytes().to_vec()).collect();
        self.gates.send_modify(|g| {
            g.stop = Some(parts);
            g.stop_skip = n.saturating_sub(1);
        });
    }

    /// Counts the requests from now on that contain every one of `parts` (in one read), for
    /// [`Relay::counted`].
    pub fn count_requests_to(&self, parts: &[&str]) {
        let parts = parts.iter().map(|p| p.as_bytes().to_vec()).collect();
        self.gates.send_modify(|g| g.count = Some((parts, 0)));
    }

    /// How many requests [`Relay::count_requests_to`] counted.
    pub fn counted(&self) -> usize {
        self.gates.borrow().count.as_ref().map_or(0, |(_, n)| *n)
    }

    /// Whether a stop asked for with [`Relay::stop_request_to`] still waits for its request
    /// (no request matched it yet).
    pub fn stop_armed(&self) -> bool {
        self.gates.borrow().stop.is_some()
    }

    /// Whether a connection's answers are held, or its requests stopped, now.
    pub fn holding(&self) -> bool {
        let g = self.gates.borrow();
        !g.held.is_empty() || !g.stopped.is_empty()
    }

    /// Lets the held answers and stopped requests through (and forgets a hold or stop that
    /// matched nothing yet).
    pub fn release_held(&self) {
        self.gates.send_modify(|g| {
            g.hold = None;
            g.held.clear();
            g.stop = None;
            g.stopped.clear();
        });
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// One connection: both directions until either ends (then both close).
async fn relay_one(
    id: u64,
    down: TcpStream,
    upstream: SocketAddr,
    gates: Arc<watch::Sender<Gates>>,
) {
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (down_r, down_w) = down.into_split();
    let (up_r, up_w) = up.into_split();
    tokio::select! {
        () = pump(id, down_r, up_w, Arc::clone(&gates), true) => {}
        () = pump(id, up_r, down_w, gates, false) => {}
    }
}

/// Copies `from` to `to` while the gates of this direction are open; a chunk read while they
/// were open but closed before it was written waits (bytes are held, never lost).
async fn pump(
    id: u64,
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    gates: Arc<watch::Sender<Gates>>,
    requests: bool,
) {
    let open = move |g: &Gates| {
        if requests {
            !g.requests_frozen && !g.stopped.contains(&id)
        } else {
            !g.answers_frozen && !g.held.contains(&id)
        }
    };
    let mut rx = gates.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if rx.wait_for(open).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if requests {
            let chunk = &buf[..n];
            gates.send_if_modified(|g| {
                let held = take_match(&mut g.hold, chunk);
                if held {
                    g.held.insert(id);
                }
                let mut stopped = false;
                if matches(&g.stop, chunk) {
                    if g.stop_skip > 0 {
                        g.stop_skip -= 1;
                    } else {
                        g.stop = None;
                        g.stopped.insert(id);
                        stopped = true;
                    }
                }
                if let Some((parts, n)) = &mut g.count {
                    if contains_all(chunk, parts) {
                        *n += 1;
                    }
                }
                held || stopped
            });
        }
        if rx.wait_for(open).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Whether `chunk` contains every one of the `wanted` strings; if so they are cleared (a
/// hold or a stop matches one request).
fn take_match(wanted: &mut Option<Vec<Vec<u8>>>, chunk: &[u8]) -> bool {
    let matched = matches(wanted, chunk);
    if matched {
        *wanted = None;
    }
    matched
}

/// Whether `chunk` contains every one of the `wanted` strings (there are some).
fn matches(wanted: &Option<Vec<Vec<u8>>>, chunk: &[u8]) -> bool {
    wanted
        .as_ref()
        .is_some_and(|parts| contains_all(chunk, parts))
}

/// Whether `chunk` contains every one of `parts`.
fn contains_all(chunk: &[u8], parts: &[Vec<u8>]) -> bool {
    parts.iter().all(|p| contains(chunk, p))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}
