//! [`BitsJob`]: one upload (or upload-reply) job driven over raw HTTP like a BITS client that
//! survives failures: a transient answer (a 5xx other than 501/505, 408, 409, a refused or
//! reset connection, a timeout) makes it retry the same packet after a short pause on a new
//! connection, and every fragment starts at the offset the server last acknowledged (the
//! Ack's `BITS-Received-Content-Range`). It records every Ack, and fails (instead of
//! restarting from zero as BITS would) on `BG_E_SESSION_NOT_FOUND` or on an acknowledged
//! offset that goes backwards.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::raw_client::{bits_post_request, RawResponse};
use crate::{url_path, RawClient, PROTOCOL};

/// BG_E_SESSION_NOT_FOUND: the answer that makes a BITS client restart the upload from zero.
pub const SESSION_NOT_FOUND: &str = "0x8020001f";

/// How a job retries.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// The pause before a packet is sent again after a transient answer.
    pub pause: Duration,
    /// One request's limit (writing it and reading the answer); over it counts as transient.
    pub request_timeout: Duration,
    /// The job fails when one packet has had nothing but transient answers for this long.
    pub stall_limit: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            pause: Duration::from_millis(150),
            request_timeout: Duration::from_secs(30),
            stall_limit: Duration::from_secs(60),
        }
    }
}

/// What a finished job saw.
#[derive(Clone, Debug, Default)]
pub struct JobOutcome {
    /// The session id (with braces, as the server sent it).
    pub session_id: String,
    /// Every acknowledged offset, in the order the Acks (and 416 answers) arrived.
    pub acks: Vec<u64>,
    /// Every transient answer, as `PACKET: STATUS CODE` (`reply GET: ...` for the reply
    /// download) or `PACKET: ` and the I/O error.
    pub transient: Vec<String>,
    /// The reply body (upload-reply jobs), downloaded through the same address.
    pub reply: Option<Vec<u8>>,
    /// Packets sent, retries included.
    pub packets: u32,
}

/// One job: the bytes, where they go and how they are cut into fragments.
pub struct BitsJob<'a> {
    /// Where every request goes (a balancer or a node).
    pub addr: SocketAddr,
    /// The upload URL path (`/upload/...` or `/echo/...`).
    pub path: String,
    /// The whole upload.
    pub data: &'a [u8],
    /// The length of the next fragment (clamped to what is left).
    pub next_fragment: Box<dyn FnMut() -> usize + Send + Sync + 'a>,
    /// Download the reply (`BITS-Reply-URL` of the final Ack) and Close the session.
    pub reply: bool,
    /// Retry behaviour.
    pub policy: RetryPolicy,
}

/// Whether a BITS client treats this status as transient (it retries later).
pub fn is_transient_status(status: u16) -> bool {
    matches!(status, 408 | 409) || (500..600).contains(&status) && status != 501 && status != 505
}

impl BitsJob<'_> {
    /// Runs the job to the end: Create-Session, the fragments, the reply (if any), Close.
    /// `Err` says what broke: a session-not-found answer, an offset that went back, a fatal
    /// status, or no progress within the stall limit.
    pub async fn run(mut self) -> Result<JobOutcome, String> {
        let mut out = JobOutcome::default();
        let mut conn = None;
        let create = self
            .packet(
                &mut conn,
                &mut out,
                &[
                    ("BITS-Packet-Type", "Create-Session"),
                    ("BITS-Supported-Protocols", PROTOCOL),
                ],
                None,
            )
            .await?;
        if create.status != 200 {
            return Err(format!("Create-Session refused: {}", brief(&create)));
        }
        out.session_id = create
            .header("bits-session-id")
            .ok_or_else(|| format!("Create-Session without a session id: {}", brief(&create)))?
            .to_owned();
        let total = self.data.len() as u64;
        let mut at = 0u64;
        let final_ack = loop {
            let len = if total == 0 {
                0
            } else {
                ((self.next_fragment)() as u64).clamp(1, total - at)
            };
            let range = if total == 0 {
                "bytes */0".to_owned()
            } else {
                format!("bytes {}-{}/{}", at, at + len - 1, total)
            };
            let sid = out.session_id.clone();
            let res = self
                .packet(
                    &mut conn,
                    &mut out,
                    &[
                        ("BITS-Packet-Type", "Fragment"),
                        ("BITS-Session-Id", &sid),
                        ("Content-Range", &range),
                    ],
                    Some((at, len)),
                )
                .await?;
            if res.status != 200 && res.status != 416 {
                return Err(format!("fragment {range} failed: {}", brief(&res)));
            }
            let received: u64 = res
                .header("bits-received-content-range")
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| format!("no received range for {range}: {}", brief(&res)))?;
            if let Some(&last) = out.acks.last() {
                if received < last {
                    return Err(format!(
                        "session {sid}: the acknowledged offset went back from {last} to \
                         {received} (answer to {range}: {})",
                        brief(&res)
                    ));
                }
            }
            out.acks.push(received);
            at = received;
            if at == total && res.status == 200 {
                break res;
            }
        };
        if self.reply {
            let url = final_ack
                .header("bits-reply-url")
                .ok_or_else(|| format!("final Ack without BITS-Reply-URL: {}", brief(&final_ack)))?
                .to_owned();
            out.reply = Some(self.download(&url_path(&url), &mut out).await?);
            let sid = out.session_id.clone();
            let close = self
                .packet(
                    &mut conn,
                    &mut out,
                    &[
                        ("BITS-Packet-Type", "Close-Session"),
                        ("BITS-Session-Id", &sid),
                    ],
                    None,
                )
                .await?;
            if close.status != 200 {
                return Err(format!("Close-Session failed: {}", brief(&close)));
            }
        }
        Ok(out)
    }

    /// Sends one BITS_POST (body `data[first..first+len]` when given) until it gets an answer
    /// that is not transient; session-not-found is an error.
    async fn packet(
        &self,
        conn: &mut Option<RawClient>,
        out: &mut JobOutcome,
        headers: &[(&str, &str)],
        body: Option<(u64, u64)>,
    ) -> Result<RawResponse, String> {
        let body = body.map_or(&[][..], |(first, len)| {
            &self.data[first as usize..(first + len) as usize]
        });
        let kind = headers
            .iter()
            .find(|(k, _)| *k == "BITS-Packet-Type")
            .map_or("BITS_POST", |(_, v)| v);
        let started = Instant::now();
        loop {
            out.packets += 1;
            let res = self
                .attempt(conn, &bits_post_request(&self.path, headers, body))
                .await;
            match res {
                Ok(res) if res.header("bits-error-code") == Some(SESSION_NOT_FOUND) => {
                    return Err(format!(
                        "session not found (a BITS client would restart from zero): {headers:?} \
                         got {}",
                        brief(&res)
                    ));
                }
                Ok(res) if !is_transient_status(res.status) => return Ok(res),
                Ok(res) => out.transient.push(format!("{kind}: {}", brief(&res))),
                Err(e) => out.transient.push(format!("{kind}: {e}")),
            }
            *conn = None;
            if started.elapsed() > self.policy.stall_limit {
                return Err(format!(
                    "no answer but transient ones for {:?} to {headers:?}; last: {:?}",
                    self.policy.stall_limit,
                    out.transient.last()
                ));
            }
            tokio::time::sleep(self.policy.pause).await;
        }
    }

    /// One request on the kept connection (opened when there is none), within the request
    /// timeout; I/O errors and the timeout as text.
    async fn attempt(
        &self,
        conn: &mut Option<RawClient>,
        request: &[u8],
    ) -> Result<RawResponse, String> {
        let work = async {
            if conn.is_none() {
                *conn = Some(
                    RawClient::try_connect(self.addr)
                        .await
                        .map_err(|e| format!("connect: {e}"))?,
                );
            }
            let c = conn.as_mut().expect("connected above");
            c.try_send(request).await.map_err(|e| format!("io: {e}"))
        };
        match tokio::time::timeout(self.policy.request_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err("request timed out".to_owned()),
        }
    }

    /// GETs the reply, retrying transient answers; the body of the 200.
    async fn download(&self, path: &str, out: &mut JobOutcome) -> Result<Vec<u8>, String> {
        let started = Instant::now();
        let request = format!("GET {path} HTTP/1.1\r\nHost: bits.example.test\r\n\r\n");
        loop {
            let mut conn = None;
            let res = self.attempt(&mut conn, request.as_bytes()).await;
            match res {
                Ok(res) if res.status == 200 => return Ok(res.body),
                Ok(res) if !is_transient_status(res.status) => {
                    return Err(format!("reply download failed: {}", brief(&res)));
                }
                Ok(res) => out.transient.push(format!("reply GET: {}", brief(&res))),
                Err(e) => out.transient.push(format!("reply GET: {e}")),
            }
            if started.elapsed() > self.policy.stall_limit {
                return Err(format!(
                    "reply never downloaded: {:?}",
                    out.transient.last()
                ));
            }
            tokio::time::sleep(self.policy.pause).await;
        }
    }
}

/// `STATUS CODE` of an answer (the BITS error code, if any), for logs and messages.
pub fn brief(res: &RawResponse) -> String {
    format!(
        "{} {}",
        res.status,
        res.header("bits-error-code").unwrap_or("-")
    )
}
