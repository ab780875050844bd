//! [`RawClient`] and [`RawResponse`]: a keep-alive HTTP/1.1 connection that writes exact
//! request bytes and parses exact responses, with the BITS request helpers on top.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::PROTOCOL;

/// One parsed HTTP/1.1 response.
#[derive(Clone, Debug)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Header names (lower case) and values, in wire order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The value of a header (case-insensitive name), if present exactly once or first.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts the BITS Ack invariants: `BITS-Packet-Type: Ack`, `Content-Length: 0`, no body.
    pub fn assert_ack(&self) {
        assert_eq!(
            self.header("bits-packet-type"),
            Some("Ack"),
            "not an Ack: {self:?}"
        );
        assert_eq!(
            self.header("content-length"),
            Some("0"),
            "Ack without Content-Length: 0: {self:?}"
        );
        assert!(self.body.is_empty());
        assert!(self.header("transfer-encoding").is_none());
    }

    /// Asserts an error Ack with this status, `BITS-Error-Code` and context `0x5`.
    pub fn assert_error(&self, status: u16, code: &str) {
        self.assert_ack();
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("bits-error-code"), Some(code), "{self:?}");
        assert_eq!(self.header("bits-error-context"), Some("0x5"), "{self:?}");
    }
}

/// A keep-alive HTTP/1.1 connection that writes exact request bytes.
pub struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    /// Connects.
    pub async fn connect(addr: SocketAddr) -> Self {
        RawClient {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// Connects, or says why not.
    pub async fn try_connect(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(RawClient {
            stream: TcpStream::connect(addr).await?,
            buf: Vec::new(),
        })
    }

    /// Writes `request` and reads one response (no body expected for HEAD requests).
    pub async fn send(&mut self, request: &[u8]) -> RawResponse {
        self.stream.write_all(request).await.unwrap();
        let head_only = request.starts_with(b"HEAD ");
        self.read_response(head_only).await
    }

    /// Like [`RawClient::send`], but a dropped connection is an error, not a panic.
    pub async fn try_send(&mut self, request: &[u8]) -> std::io::Result<RawResponse> {
        self.stream.write_all(request).await?;
        let head_only = request.starts_with(b"HEAD ");
        let read = self.try_read_response(head_only);
        match tokio::time::timeout(Duration::from_secs(30), read).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "response timed out",
            )),
        }
    }

    async fn try_read_response(&mut self, head_only: bool) -> std::io::Result<RawResponse> {
        use std::io::{Error, ErrorKind};
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut res = httparse::Response::new(&mut headers);
            let parsed = res
                .parse(&self.buf)
                .map_err(|e| Error::new(ErrorKind::InvalidData, e))?;
            if let httparse::Status::Complete(head_len) = parsed {
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
                let len: usize = if head_only {
                    0
                } else {
                    headers
                        .iter()
                        .find(|(n, _)| n == "content-length")
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(0)
                };
                while self.buf.len() < head_len + len {
                    self.try_fill().await?;
                }
                let body = self.buf[head_len..head_len + len].to_vec();
                self.buf.drain(..head_len + len);
                return Ok(RawResponse {
                    status,
                    headers,
                    body,
                });
            }
            self.try_fill().await?;
        }
    }

    async fn try_fill(&mut self) -> std::io::Result<()> {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Writes bytes without reading (for partial requests).
    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads one response.
    pub async fn read_response(&mut self, head_only: bool) -> RawResponse {
        let deadline = Duration::from_secs(30);
        tokio::time::timeout(deadline, self.read_response_inner(head_only))
            .await
            .expect("response timed out")
    }

    async fn read_response_inner(&mut self, head_only: bool) -> RawResponse {
        self.try_read_response(head_only)
            .await
            .expect("connection closed before a full response")
    }

    /// Whether the server closes the connection within 3 s (whatever it writes before).
    pub async fn is_closed(&mut self) -> bool {
        let mut b = vec![0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Sends a `BITS_POST` with the given headers and body to `path`.
    pub async fn bits_post(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> RawResponse {
        self.send(&bits_post_request(path, headers, body)).await
    }

    /// Create-Session on `path`, whatever the answer (a refusal included).
    pub async fn try_create_session(&mut self, path: &str) -> RawResponse {
        self.bits_post(
            path,
            &[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", PROTOCOL),
            ],
            b"",
        )
        .await
    }

    /// Create-Session on `path`; returns the new session id.
    pub async fn create_session(&mut self, path: &str) -> String {
        let res = self.try_create_session(path).await;
        res.assert_ack();
        assert_eq!(res.status, 200, "{res:?}");
        res.header("bits-session-id").unwrap().to_owned()
    }

    /// A Fragment carrying `data[first..first+len]` of an upload of `data.len()` bytes.
    pub async fn fragment(
        &mut self,
        path: &str,
        sid: &str,
        data: &[u8],
        first: usize,
        len: usize,
    ) -> RawResponse {
        let total = data.len();
        let range = if total == 0 {
            "bytes */0".to_owned()
        } else {
            format!("bytes {}-{}/{}", first, first + len - 1, total)
        };
        self.bits_post(
            path,
            &[
                ("BITS-Packet-Type", "Fragment"),
                ("BITS-Session-Id", sid),
                ("Content-Range", &range),
            ],
            &data[first..first + len],
        )
        .await
    }

    /// Close-Session.
    pub async fn close_session(&mut self, path: &str, sid: &str) -> RawResponse {
        self.bits_post(
            path,
            &[
                ("BITS-Packet-Type", "Close-Session"),
                ("BITS-Session-Id", sid),
            ],
            b"",
        )
        .await
    }

    /// Cancel-Session.
    pub async fn cancel_session(&mut self, path: &str, sid: &str) -> RawResponse {
        self.bits_post(
            path,
            &[
                ("BITS-Packet-Type", "Cancel-Session"),
                ("BITS-Session-Id", sid),
            ],
            b"",
        )
        .await
    }

    /// `GET` (or `HEAD`) of a path with extra headers.
    pub async fn get(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> RawResponse {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: bits.example.test\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.send(req.as_bytes()).await
    }

    /// Uploads `data` in fragments of `fragment` bytes to a new session; returns the session id
    /// and the final Ack.
    pub async fn upload(
        &mut self,
        path: &str,
        data: &[u8],
        fragment: usize,
    ) -> (String, RawResponse) {
        let sid = self.create_session(path).await;
        let res = self.upload_from(path, &sid, data, 0, fragment).await;
        (sid, res)
    }

    /// Sends `data[from..]` of session `sid` in fragments of `fragment` bytes, each
    /// acknowledged up to its end; returns the final Ack.
    pub async fn upload_from(
        &mut self,
        path: &str,
        sid: &str,
        data: &[u8],
        from: usize,
        fragment: usize,
    ) -> RawResponse {
        let mut at = from;
        loop {
            let len = fragment.min(data.len() - at);
            let res = self.fragment(path, sid, data, at, len).await;
            res.assert_ack();
            assert_eq!(res.status, 200, "{res:?}");
            at += len;
            assert_eq!(
                res.header("bits-received-content-range"),
                Some(at.to_string().as_str())
            );
            if at == data.len() {
                return res;
            }
        }
    }
}

/// The bytes of a `BITS_POST` to `path` with these headers (plus `Content-Length` unless one
/// of them frames the body) and body.
pub fn bits_post_request(path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!("BITS_POST {path} HTTP/1.1\r\nHost: bits.example.test\r\n");
    let mut has_len = false;
    for (k, v) in headers {
        has_len |=
            k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding");
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_len {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}
