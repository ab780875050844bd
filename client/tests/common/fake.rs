//! The scripted server: plays behaviours bitsd never shows (farms, failing backends, bad reply
//! URLs, dropped connections, IIS reply URLs, authentication challenges).
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bitsd_protocol::ContentRange;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// How the reply URL is served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Serve {
    /// HEAD with Content-Length, ranged GETs answered 206.
    #[default]
    Ranges,
    /// No Content-Length anywhere (chunked).
    NoContentLength,
    /// `Range` ignored: every GET is 200 with the whole reply.
    IgnoreRange,
    /// 206 with a Content-Range that does not match the request.
    BadContentRange,
}

/// What the scripted server does.
#[derive(Clone, Debug, Default)]
pub struct Script {
    /// `BITS-Host-Id` on Create-Session.
    pub host_id: Option<String>,
    /// `BITS-Host-Id-Fallback-Timeout` with it.
    pub host_id_fallback: Option<String>,
    /// Only the first Create-Session carries the Host-Id.
    pub host_id_once: bool,
    /// Sessions redirected by Host-Id are unknown on listener 0 (the farm name).
    pub front_forgets_redirected: bool,
    /// Answer Create-Session with this BITS-Protocol instead of the offered one.
    pub protocol: Option<String>,
    /// Upload-reply: the reply is the upload (echo). Otherwise a plain upload.
    pub echo: bool,
    /// Final-fragment backend failures, in order (status; code 0x80190000+status, context 0x7).
    pub backend_failures: Vec<u16>,
    /// Error answers to Fragments before they are processed: (status, BITS-Error-Code), ctx 0x5.
    pub fragment_failures: Vec<(u16, Option<u32>)>,
    /// Error answers to Close-Session: (status, BITS-Error-Code).
    pub close_failures: Vec<(u16, Option<u32>)>,
    /// On this fragment (1-based), store the bytes and then drop the connection (lost Ack).
    pub lose_ack_on_fragment: Option<usize>,
    /// On this fragment (1-based), lose the previous 100 bytes and answer 416 (gap).
    pub gap_on_fragment: Option<usize>,
    /// How the reply is served.
    pub serve: Serve,
    /// Drop the reply GET after this many body bytes, this many times.
    pub drop_reply_after: Option<(usize, usize)>,
    /// Listener 0 answers every request without `Authorization` with 401 and a Basic challenge.
    pub require_auth: bool,
    /// Reply URLs name this authority (`host:port`) instead of the request's `Host`.
    pub reply_host: Option<String>,
    /// The final Ack carries the reply URL as IIS writes it: relative, with backslashes,
    /// `BITS-Sessions\Replies\{GUID}\responsefile.bin`.
    pub iis_relative_reply: bool,
    /// Wait this long before answering each Fragment.
    pub fragment_delay: Option<Duration>,
    /// After the first dropped reply GET the reply changes (new bytes, new Last-Modified).
    pub reply_changes_after_drop: bool,
    /// Answer Create-Session 403 E_ACCESSDENIED with this text as the body.
    pub forbid_create: Option<String>,
}

/// One request, as the scripted server saw it.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Which listener (0 = the first, the farm name).
    pub listener: usize,
    pub method: String,
    /// The request path.
    pub path: String,
    pub packet: String,
    pub session: String,
    /// Content-Range of a Fragment, Range of a GET.
    pub range: String,
    pub host: String,
    pub authorization: String,
    pub status: u16,
}

struct Sess {
    data: Vec<u8>,
    redirected: bool,
}

struct State {
    script: Script,
    sessions: HashMap<String, Sess>,
    replies: HashMap<String, Vec<u8>>,
    next_id: u32,
    creates: usize,
    fragments: usize,
    reply_drops: usize,
    reply_version: u32,
    log: Vec<Entry>,
}

/// The scripted server: one shared state, any number of listeners.
#[derive(Clone)]
pub struct Fake {
    state: Arc<Mutex<State>>,
}

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn ack(status: u16) -> http::response::Builder {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("BITS-Packet-Type", "Ack")
        .header("Content-Length", "0")
}

fn error_ack(status: u16, code: Option<u32>, ctx: u32, sid: &str) -> Response<Body> {
    let mut b = ack(status);
    if let Some(c) = code {
        b = b
            .header("BITS-Error-Code", format!("0x{c:x}"))
            .header("BITS-Error-Context", format!("0x{ctx:x}"));
    }
    if !sid.is_empty() {
        b = b.header("BITS-Session-Id", sid);
    }
    b.body(full(Bytes::new())).unwrap()
}

enum Outcome {
    Respond(Response<Body>),
    Drop,
}

impl Fake {
    pub fn new(script: Script) -> Fake {
        Fake {
            state: Arc::new(Mutex::new(State {
                script,
                sessions: HashMap::new(),
                replies: HashMap::new(),
                next_id: 1,
                creates: 0,
                fragments: 0,
                reply_drops: 0,
                reply_version: 0,
                log: Vec::new(),
            })),
        }
    }

    /// Starts a listener on `addr` (port 0 for any); returns its address.
    pub async fn listen(&self, addr: &str, index: usize) -> SocketAddr {
        let listener = TcpListener::bind(addr).await.unwrap();
        let local = listener.local_addr().unwrap();
        let fake = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let fake = fake.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let fake = fake.clone();
                        async move { fake.handle(index, req).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        local
    }

    /// Changes the script (e.g. once listener addresses are known).
    pub fn script(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.state.lock().unwrap().script);
    }

    /// Every request so far.
    pub fn log(&self) -> Vec<Entry> {
        self.state.lock().unwrap().log.clone()
    }

    /// Requests of one packet type.
    pub fn packets(&self, packet: &str) -> Vec<Entry> {
        self.log()
            .into_iter()
            .filter(|e| e.packet.eq_ignore_ascii_case(packet))
            .collect()
    }

    /// The upload of the single completed session.
    pub fn uploaded(&self, sid: &str) -> Option<Vec<u8>> {
        self.state
            .lock()
            .unwrap()
            .sessions
            .get(sid)
            .map(|s| s.data.clone())
    }

    async fn handle(
        &self,
        listener: usize,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, std::io::Error> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        let hdr = |n: &str| {
            parts
                .headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let packet = hdr("bits-packet-type");
        let sid = hdr("bits-session-id");
        let host = hdr("host");
        let delay = self.state.lock().unwrap().script.fragment_delay;
        if let Some(d) = delay.filter(|_| packet.eq_ignore_ascii_case("fragment")) {
            tokio::time::sleep(d).await;
        }
        let range = if parts.method == http::Method::GET {
            hdr("range")
        } else {
            hdr("content-range")
        };
        let mut st = self.state.lock().unwrap();
        let outcome = if listener == 0
            && st.script.require_auth
            && parts.headers.get("authorization").is_none()
        {
            Outcome::Respond(
                Response::builder()
                    .status(401)
                    .header("WWW-Authenticate", "Basic realm=\"fake\"")
                    .header("Content-Length", "12")
                    .body(full("unauthorized"))
                    .unwrap(),
            )
        } else if parts.method.as_str() == "BITS_POST" {
            st.bits_post(listener, &packet, &sid, &host, &range, &hdr, &body)
        } else {
            st.reply(&parts.method, parts.uri.path(), &hdr("range"))
        };
        let status = match &outcome {
            Outcome::Respond(r) => r.status().as_u16(),
            Outcome::Drop => 0,
        };
        st.log.push(Entry {
            listener,
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            packet,
            session: sid,
            range,
            host,
            authorization: hdr("authorization"),
            status,
        });
        match outcome {
            Outcome::Respond(r) => Ok(r),
            Outcome::Drop => Err(std::io::Error::other("scripted connection drop")),
        }
    }
}

impl State {
    #[allow(clippy::too_many_arguments)]
    fn bits_post(
        &mut self,
        listener: usize,
        packet: &str,
        sid: &str,
        host: &str,
        range: &str,
        hdr: &dyn Fn(&str) -> String,
        body: &Bytes,
    ) -> Outcome {
        let known = |st: &State| {
            st.sessions.get(sid).is_some_and(|s| {
                !(listener == 0 && s.redirected && st.script.front_forgets_redirected)
            })
        };
        let resp = match packet.to_ascii_lowercase().as_str() {
            "ping" => ack(200).body(full(Bytes::new())).unwrap(),
            "create-session" => {
                if let Some(why) = self.script.forbid_create.clone() {
                    let resp = Response::builder()
                        .status(403)
                        .header("BITS-Packet-Type", "Ack")
                        .header("BITS-Error-Code", "0x80070005")
                        .header("BITS-Error-Context", "0x5")
                        .header("Content-Type", "text/plain; charset=utf-8")
                        .header("Content-Length", why.len().to_string())
                        .body(full(why))
                        .unwrap();
                    return Outcome::Respond(resp);
                }
                let offered = hdr("bits-supported-protocols");
                self.creates += 1;
                let id = format!("{{fake-session-{}}}", self.next_id);
                self.next_id += 1;
                let protocol = self.script.protocol.clone().unwrap_or(offered);
                let mut b = ack(200)
                    .header("BITS-Protocol", protocol)
                    .header("BITS-Session-Id", &id)
                    .header("Accept-Encoding", "Identity");
                let mut redirected = false;
                if let Some(h) = &self.script.host_id {
                    if !self.script.host_id_once || self.creates == 1 {
                        b = b.header("BITS-Host-Id", h);
                        redirected = true;
                        if let Some(t) = &self.script.host_id_fallback {
                            b = b.header("BITS-Host-Id-Fallback-Timeout", t);
                        }
                    }
                }
                self.sessions.insert(
                    id,
                    Sess {
                        data: Vec::new(),
                        redirected,
                    },
                );
                b.body(full(Bytes::new())).unwrap()
            }
            "fragment" => {
                if !self.script.fragment_failures.is_empty() {
                    let (status, code) = self.script.fragment_failures.remove(0);
                    return Outcome::Respond(error_ack(status, code, 5, sid));
                }
                if !known(self) {
                    return Outcome::Respond(error_ack(500, Some(0x8020_001f), 5, sid));
                }
                self.fragments += 1;
                let n = self.fragments;
                let r: ContentRange = match range.parse() {
                    Ok(r) => r,
                    Err(_) => return Outcome::Respond(error_ack(400, Some(0x8007_0057), 5, sid)),
                };
                let script = self.script.clone();
                let sess = self.sessions.get_mut(sid).unwrap();
                if script.gap_on_fragment == Some(n) {
                    let keep = sess.data.len().saturating_sub(100);
                    sess.data.truncate(keep);
                }
                let received = sess.data.len() as u64;
                if r.first > received {
                    let resp = ack(416)
                        .header("BITS-Session-Id", sid)
                        .header("BITS-Received-Content-Range", received.to_string())
                        .header("BITS-Error-Code", "0x0")
                        .header("BITS-Error-Context", "0x5")
                        .body(full(Bytes::new()))
                        .unwrap();
                    return Outcome::Respond(resp);
                }
                let skip = (received - r.first) as usize;
                if skip < body.len() {
                    sess.data.extend_from_slice(&body[skip..]);
                }
                let received = sess.data.len() as u64;
                if script.lose_ack_on_fragment == Some(n) {
                    return Outcome::Drop;
                }
                let mut b = ack(200)
                    .header("BITS-Session-Id", sid)
                    .header("BITS-Received-Content-Range", received.to_string());
                if received == r.total && script.echo {
                    if !self.script.backend_failures.is_empty() {
                        let s = self.script.backend_failures.remove(0);
                        let resp = ack(s)
                            .header("BITS-Session-Id", sid)
                            .header("BITS-Received-Content-Range", received.to_string())
                            .header(
                                "BITS-Error-Code",
                                format!("0x{:08x}", 0x8019_0000u32 + u32::from(s)),
                            )
                            .header("BITS-Error-Context", "0x7")
                            .body(full(Bytes::new()))
                            .unwrap();
                        return Outcome::Respond(resp);
                    }
                    let data = sess.data.clone();
                    self.replies.insert(sid.to_owned(), data);
                    let key = sid.trim_matches(|c| c == '{' || c == '}').to_owned();
                    let url = if script.iis_relative_reply {
                        format!("BITS-Sessions\\Replies\\{{{key}}}\\responsefile.bin")
                    } else {
                        let authority =
                            script.reply_host.clone().unwrap_or_else(|| host.to_owned());
                        format!("http://{authority}/reply/{key}")
                    };
                    b = b.header("BITS-Reply-URL", url);
                }
                b.body(full(Bytes::new())).unwrap()
            }
            "close-session" | "cancel-session" => {
                if packet.eq_ignore_ascii_case("close-session")
                    && !self.script.close_failures.is_empty()
                {
                    let (status, code) = self.script.close_failures.remove(0);
                    return Outcome::Respond(error_ack(status, code, 5, sid));
                }
                if !known(self) {
                    return Outcome::Respond(error_ack(500, Some(0x8020_001f), 5, sid));
                }
                ack(200)
                    .header("BITS-Session-Id", sid)
                    .body(full(Bytes::new()))
                    .unwrap()
            }
            _ => error_ack(400, Some(0x8007_0057), 5, sid),
        };
        Outcome::Respond(resp)
    }

    fn reply(&mut self, method: &http::Method, path: &str, range: &str) -> Outcome {
        let key = match path.split_once("/BITS-Sessions/Replies/") {
            // The IIS form: /dir/BITS-Sessions/Replies/%7BGUID%7D/responsefile.bin.
            Some((_, rest)) => rest
                .strip_suffix("/responsefile.bin")
                .unwrap_or("")
                .replace("%7B", "")
                .replace("%7D", ""),
            None => path.trim_start_matches("/reply/").to_owned(),
        };
        let Some(mut data) = self.replies.get(&format!("{{{key}}}")).cloned() else {
            return Outcome::Respond(
                Response::builder()
                    .status(404)
                    .body(full(Bytes::new()))
                    .unwrap(),
            );
        };
        if self.reply_version > 0 {
            data.reverse();
        }
        let n = data.len();
        let head = *method == http::Method::HEAD;
        match self.script.serve {
            Serve::NoContentLength => {
                let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> =
                    vec![Ok(Frame::data(Bytes::from(data)))];
                let body = StreamBody::new(futures_util::stream::iter(chunks)).boxed_unsync();
                return Outcome::Respond(Response::builder().status(200).body(body).unwrap());
            }
            Serve::IgnoreRange if !head => {
                return Outcome::Respond(self.body_response(200, None, data, n));
            }
            _ => {}
        }
        if head {
            return Outcome::Respond(
                Response::builder()
                    .status(200)
                    .header("Content-Length", n.to_string())
                    .header("Accept-Ranges", "bytes")
                    .header("Last-Modified", self.last_modified())
                    .body(full(Bytes::new()))
                    .unwrap(),
            );
        }
        let Some((a, b)) = range
            .strip_prefix("bytes=")
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
        else {
            return Outcome::Respond(self.body_response(200, None, data, n));
        };
        let b = b.min(n - 1);
        if a > b {
            return Outcome::Respond(
                Response::builder()
                    .status(416)
                    .header("Content-Range", format!("bytes */{n}"))
                    .body(full(Bytes::new()))
                    .unwrap(),
            );
        }
        let cr = if self.script.serve == Serve::BadContentRange {
            format!("bytes {}-{}/{n}", a + 1, b)
        } else {
            format!("bytes {a}-{b}/{n}")
        };
        let part = data[a..=b].to_vec();
        let len = part.len();
        Outcome::Respond(self.body_response(206, Some(cr), part, len))
    }

    fn last_modified(&self) -> String {
        format!("Wed, 02 Dec 2026 10:00:{:02} GMT", self.reply_version % 60)
    }

    fn body_response(
        &mut self,
        status: u16,
        content_range: Option<String>,
        data: Vec<u8>,
        len: usize,
    ) -> Response<Body> {
        let mut b = Response::builder()
            .status(status)
            .header("Content-Length", len.to_string())
            .header("Accept-Ranges", "bytes")
            .header("Last-Modified", self.last_modified());
        if let Some(cr) = content_range {
            b = b.header("Content-Range", cr);
        }
        let body = match self.script.drop_reply_after {
            Some((after, times)) if self.reply_drops < times && after < data.len() => {
                self.reply_drops += 1;
                if self.script.reply_changes_after_drop {
                    self.reply_version += 1;
                }
                // Send the first bytes, give them time to reach the client, then break the
                // connection.
                let first = Bytes::copy_from_slice(&data[..after]);
                let stream = futures_util::stream::unfold(0u8, move |step| {
                    let first = first.clone();
                    async move {
                        match step {
                            0 => Some((Ok(Frame::data(first)), 1)),
                            1 => {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                Some((Err(std::io::Error::other("scripted drop mid-reply")), 2))
                            }
                            _ => None,
                        }
                    }
                });
                StreamBody::new(stream).boxed_unsync()
            }
            _ => full(data),
        };
        b.body(body).unwrap()
    }
}
