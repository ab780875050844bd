//! One BITS job driven with exact request bytes and an explicit `Host`, and the assertions on
//! its final Ack.

use bitsd_tests::{RawClient, RawResponse, PROTOCOL};

/// A `BITS_POST` with an explicit `Host` (the raw client's helpers always send [`HOST`]).
pub async fn post(
    c: &mut RawClient,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    c.send(&request(host, path, headers, body)).await
}

/// The bytes of a `BITS_POST`.
pub fn request(host: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "BITS_POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// One BITS job: a remote URL (path and query) addressed with a `Host`.
pub struct Job {
    pub host: String,
    pub path: String,
    pub data: Vec<u8>,
    pub fragment: usize,
    pub sid: String,
}

impl Job {
    /// Create-Session, then every fragment but the last (each must be Acked 200).
    pub async fn start(
        c: &mut RawClient,
        host: &str,
        path: &str,
        data: Vec<u8>,
        fragment: usize,
    ) -> Job {
        let res = post(
            c,
            host,
            path,
            &[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", PROTOCOL),
            ],
            b"",
        )
        .await;
        res.assert_ack();
        assert_eq!(res.status, 200, "{res:?}");
        let sid = res.header("bits-session-id").unwrap().to_owned();
        let job = Job {
            host: host.to_owned(),
            path: path.to_owned(),
            data,
            fragment,
            sid,
        };
        let mut at = 0;
        while at < job.last_start() {
            let len = fragment.min(job.data.len() - at);
            let res = job.send_fragment(c, at, len, None).await;
            res.assert_ack();
            assert_eq!(res.status, 200, "{res:?}");
            at += len;
            assert_eq!(
                res.header("bits-received-content-range"),
                Some(at.to_string().as_str())
            );
        }
        job
    }

    pub fn last_start(&self) -> usize {
        if self.data.is_empty() {
            0
        } else {
            (self.data.len() - 1) / self.fragment * self.fragment
        }
    }

    pub async fn send_fragment(
        &self,
        c: &mut RawClient,
        first: usize,
        len: usize,
        content_name: Option<&str>,
    ) -> RawResponse {
        c.send(&self.fragment_request(first, len, content_name))
            .await
    }

    /// The bytes of a Fragment carrying `data[first..first + len]`.
    pub fn fragment_request(
        &self,
        first: usize,
        len: usize,
        content_name: Option<&str>,
    ) -> Vec<u8> {
        let total = self.data.len();
        let range = if total == 0 {
            "bytes */0".to_owned()
        } else {
            format!("bytes {}-{}/{}", first, first + len - 1, total)
        };
        let mut headers = vec![
            ("BITS-Packet-Type", "Fragment"),
            ("BITS-Session-Id", self.sid.as_str()),
            ("Content-Range", range.as_str()),
        ];
        if let Some(name) = content_name {
            headers.push(("Content-Name", name));
        }
        request(
            &self.host,
            &self.path,
            &headers,
            &self.data[first..first + len],
        )
    }

    /// Sends (or re-sends) the final fragment and returns its Ack, whatever it is.
    pub async fn finish(&self, c: &mut RawClient) -> RawResponse {
        let first = self.last_start();
        self.send_fragment(c, first, self.data.len() - first, None)
            .await
    }

    pub async fn close(&self, c: &mut RawClient) -> RawResponse {
        post(
            c,
            &self.host,
            &self.path,
            &[
                ("BITS-Packet-Type", "Close-Session"),
                ("BITS-Session-Id", self.sid.as_str()),
            ],
            b"",
        )
        .await
    }

    /// The path of this session's reply on the server (whether or not one exists).
    pub fn reply_path(&self, prefix: &str) -> String {
        let id: bitsd::protocol::SessionId = self.sid.parse().unwrap();
        format!("{prefix}BITS-Sessions/{}/response", id.simple())
    }
}

/// Asserts a successful final Ack and returns its `BITS-Reply-URL`.
pub fn assert_final_ok(ack: &RawResponse, job: &Job) -> String {
    ack.assert_ack();
    assert_eq!(ack.status, 200, "{ack:?}");
    assert_eq!(ack.header("bits-error-code"), None, "{ack:?}");
    assert_eq!(ack.header("bits-error-context"), None, "{ack:?}");
    assert_eq!(ack.header("bits-session-id"), Some(job.sid.as_str()));
    assert_eq!(
        ack.header("bits-received-content-range"),
        Some(job.data.len().to_string().as_str()),
        "{ack:?}"
    );
    ack.header("bits-reply-url")
        .expect("the final Ack carries BITS-Reply-URL")
        .to_owned()
}

/// Asserts a server-application failure Ack (§9.5): the status, the code, context `0x7`, the
/// total in `BITS-Received-Content-Range`, and no reply URL.
pub fn assert_app_error(ack: &RawResponse, job: &Job, status: u16, code: &str) {
    ack.assert_ack();
    assert_eq!(ack.status, status, "{ack:?}");
    assert_eq!(ack.header("bits-error-code"), Some(code), "{ack:?}");
    assert_eq!(ack.header("bits-error-context"), Some("0x7"), "{ack:?}");
    assert_eq!(
        ack.header("bits-received-content-range"),
        Some(job.data.len().to_string().as_str()),
        "{ack:?}"
    );
    assert_eq!(ack.header("bits-reply-url"), None, "{ack:?}");
    assert_eq!(ack.header("bits-session-id"), Some(job.sid.as_str()));
}
