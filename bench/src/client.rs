//! The one client every target is driven with: raw HTTP/1.1 over a keep-alive tokio
//! `TcpStream` (`TCP_NODELAY`), with the BITS packets built by hand. The sink and bitsd see
//! exactly the same request bytes.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Any error of the benchmark.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Result with [`BoxError`].
pub type Result<T, E = BoxError> = std::result::Result<T, E>;

/// The BITS 1.5 upload protocol GUID.
pub const PROTOCOL: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";

/// `Host` sent with every request.
const HOST: &str = "127.0.0.1";

/// Bodies up to this size are sent in the same `write` as the head.
const COALESCE: usize = 64 * 1024;

/// One response: status, headers, and the length of the body (read and discarded).
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    /// Length of the body read.
    pub body_len: u64,
}

impl Response {
    /// The first value of a header (name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `Ok` for a 200, otherwise an error naming `what`, the status and the BITS error code.
    pub fn expect_ok(self, what: &str) -> Result<Self> {
        if self.status == 200 {
            Ok(self)
        } else {
            Err(format!(
                "{what}: HTTP {} (BITS-Error-Code {}, context {})",
                self.status,
                self.header("bits-error-code").unwrap_or("-"),
                self.header("bits-error-context").unwrap_or("-"),
            )
            .into())
        }
    }
}

/// A keep-alive HTTP/1.1 connection; when a response says `Connection: close` (nginx does
/// after `keepalive_requests`, 1000 by default), the next request opens a new one, as a
/// client does.
pub struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    closing: bool,
    buf: Vec<u8>,
    scratch: Vec<u8>,
}

impl Conn {
    /// Connects with `TCP_NODELAY`.
    pub async fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            peer: addr,
            closing: false,
            buf: Vec::with_capacity(16 * 1024),
            scratch: vec![0u8; 256 * 1024],
        })
    }

    /// Connects `n` connections.
    pub async fn connect_many(addr: SocketAddr, n: usize) -> Result<Vec<Self>> {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            conns.push(Conn::connect(addr).await?);
        }
        Ok(conns)
    }

    /// Sends a request (head and body) and reads its response (the response body is read
    /// and discarded).
    pub async fn request(&mut self, head: &[u8], body: &[u8]) -> Result<Response> {
        if self.closing {
            *self = Conn::connect(self.peer).await?;
        }
        if body.len() <= COALESCE {
            let mut all = Vec::with_capacity(head.len() + body.len());
            all.extend_from_slice(head);
            all.extend_from_slice(body);
            self.stream.write_all(&all).await?;
        } else {
            self.stream.write_all(head).await?;
            self.stream.write_all(body).await?;
        }
        self.read_response().await
    }

    async fn fill(&mut self) -> Result<()> {
        self.buf.reserve(16 * 1024);
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err("connection closed before a full response".into());
        }
        Ok(())
    }

    async fn read_response(&mut self) -> Result<Response> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 48];
            let mut res = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head_len) = res.parse(&self.buf)? {
                let status = res.code.unwrap_or(0);
                let headers: Vec<(String, String)> = res
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let len: u64 = match headers.iter().find(|(n, _)| n == "content-length") {
                    Some((_, v)) => v.trim().parse()?,
                    None if headers.iter().any(|(n, _)| n == "transfer-encoding") => {
                        return Err("chunked responses are not supported".into())
                    }
                    None => 0,
                };
                self.buf.drain(..head_len);
                self.closing = headers
                    .iter()
                    .any(|(n, v)| n == "connection" && v.eq_ignore_ascii_case("close"));
                self.skip_body(len).await?;
                return Ok(Response {
                    status,
                    headers,
                    body_len: len,
                });
            }
            self.fill().await?;
        }
    }

    async fn skip_body(&mut self, len: u64) -> Result<()> {
        let buffered = (self.buf.len() as u64).min(len) as usize;
        self.buf.drain(..buffered);
        let mut remaining = len - buffered as u64;
        while remaining > 0 {
            let want = (self.scratch.len() as u64).min(remaining) as usize;
            let n = self.stream.read(&mut self.scratch[..want]).await?;
            if n == 0 {
                return Err(
                    format!("connection closed with {remaining} body bytes missing").into(),
                );
            }
            remaining -= n as u64;
        }
        Ok(())
    }

    /// `BITS_POST` of one packet.
    pub async fn bits_post(
        &mut self,
        path: &str,
        packet: &str,
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response> {
        let head = bits_post_head(path, packet, extra, body.len());
        self.request(head.as_bytes(), body).await
    }

    /// One Fragment that is the whole upload (`body`), its body sent `chunk` bytes at a time
    /// with `pause` after each (a client on a slow link); its response, whatever the status.
    pub async fn paced_fragment(
        &mut self,
        path: &str,
        sid: &str,
        body: &[u8],
        chunk: usize,
        pause: std::time::Duration,
    ) -> Result<Response> {
        let range = format!("bytes 0-{}/{}", body.len() - 1, body.len());
        let extra = [("BITS-Session-Id", sid), ("Content-Range", range.as_str())];
        let head = bits_post_head(path, "Fragment", &extra, body.len());
        self.stream.write_all(head.as_bytes()).await?;
        for part in body.chunks(chunk.max(1)) {
            self.stream.write_all(part).await?;
            tokio::time::sleep(pause).await;
        }
        self.read_response().await
    }

    /// Create-Session; returns the session id.
    pub async fn create_session(&mut self, path: &str) -> Result<String> {
        let res = self
            .bits_post(
                path,
                "Create-Session",
                &[("BITS-Supported-Protocols", PROTOCOL)],
                b"",
            )
            .await?
            .expect_ok("Create-Session")?;
        res.header("bits-session-id")
            .map(str::to_owned)
            .ok_or_else(|| "Create-Session Ack without BITS-Session-Id".into())
    }

    /// One Fragment: `body` at offset `first` of an upload of `total` bytes.
    pub async fn fragment(
        &mut self,
        path: &str,
        sid: &str,
        first: u64,
        body: &[u8],
        total: u64,
    ) -> Result<Response> {
        let range = format!(
            "bytes {}-{}/{}",
            first,
            first + body.len() as u64 - 1,
            total
        );
        self.bits_post(
            path,
            "Fragment",
            &[("BITS-Session-Id", sid), ("Content-Range", &range)],
            body,
        )
        .await?
        .expect_ok("Fragment")
    }

    /// Close-Session.
    pub async fn close_session(&mut self, path: &str, sid: &str) -> Result<()> {
        self.bits_post(path, "Close-Session", &[("BITS-Session-Id", sid)], b"")
            .await?
            .expect_ok("Close-Session")?;
        Ok(())
    }

    /// Cancel-Session.
    pub async fn cancel_session(&mut self, path: &str, sid: &str) -> Result<()> {
        self.bits_post(path, "Cancel-Session", &[("BITS-Session-Id", sid)], b"")
            .await?
            .expect_ok("Cancel-Session")?;
        Ok(())
    }

    /// Sends the fragments of an upload of `total` bytes (each `payload[..len]`) to session
    /// `sid`, starting at `from`, stopping before `until`; returns the last Ack.
    pub async fn send_fragments(
        &mut self,
        path: &str,
        sid: &str,
        range: std::ops::Range<u64>,
        total: u64,
        fragment: usize,
        payload: &[u8],
    ) -> Result<Option<Response>> {
        let mut at = range.start;
        let mut last = None;
        while at < range.end {
            let len = (fragment as u64).min(range.end - at) as usize;
            last = Some(self.fragment(path, sid, at, &payload[..len], total).await?);
            at += len as u64;
        }
        Ok(last)
    }

    /// Create-Session and every fragment of an upload of `total` bytes; returns the session id
    /// and the final Ack.
    pub async fn upload(
        &mut self,
        path: &str,
        total: u64,
        fragment: usize,
        payload: &[u8],
    ) -> Result<(String, Response)> {
        let sid = self.create_session(path).await?;
        let last = self
            .send_fragments(path, &sid, 0..total, total, fragment, payload)
            .await?
            .ok_or("empty uploads are not benchmarked")?;
        Ok((sid, last))
    }

    /// `GET path` (the body is read and counted).
    pub async fn get(&mut self, path: &str) -> Result<Response> {
        let head = format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
        self.request(head.as_bytes(), b"").await
    }
}

/// The head of a `BITS_POST` of `packet` to `path` with the `extra` headers and a body of
/// `len` bytes.
fn bits_post_head(path: &str, packet: &str, extra: &[(&str, &str)], len: usize) -> String {
    let mut head =
        format!("BITS_POST {path} HTTP/1.1\r\nHost: {HOST}\r\nBITS-Packet-Type: {packet}\r\n");
    for (k, v) in extra {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str(&format!("Content-Length: {len}\r\n\r\n"));
    head
}

/// The path of an absolute URL (`http://host/p` → `/p`).
pub fn url_path(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.find('/')
        .map_or_else(|| "/".to_owned(), |i| rest[i..].to_owned())
}
