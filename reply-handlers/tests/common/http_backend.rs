//! A hyper HTTP/1.1 backend playing the IIS server application for the `http` handler
//! tests (http_notify_*.rs), and the handler and header checks they share.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bitsd_reply_handlers::{HttpNotifyConfig, HttpNotifyHandler, Notification};
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// One notification as the backend received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: http::Method,
    /// Path and query.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// What the file named in `BITS-Request-DataFile-Name` held while the request was open.
    pub request_file: Option<Vec<u8>>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// How the backend answers.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    /// Wait this long (after reading the request) before answering.
    pub delay: Duration,
    /// By reference: write this to the file named in `BITS-Response-DataFile-Name`.
    pub response_file: Option<Vec<u8>>,
    /// Read the request body slowly (pause 25 ms after every 256 KiB, about 10 MB/s) through a
    /// small receive buffer.
    pub slow_read: bool,
}

impl Default for Answer {
    fn default() -> Self {
        Answer {
            status: 200,
            headers: Vec::new(),
            body: Vec::new(),
            delay: Duration::ZERO,
            response_file: None,
            slow_read: false,
        }
    }
}

pub fn status(status: u16) -> Answer {
    Answer {
        status,
        ..Answer::default()
    }
}

pub fn body(body: impl Into<Vec<u8>>) -> Answer {
    Answer {
        body: body.into(),
        ..Answer::default()
    }
}

/// A hyper HTTP/1.1 backend on 127.0.0.1:0 that records what it receives.
pub struct Backend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Backend {
    pub async fn start(answer: Answer) -> Backend {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if answer.slow_read {
            // A small, fixed receive buffer (no autotuning to many MB on loopback), so that
            // the client's progress follows what this backend actually reads.
            socket.set_recv_buffer_size(64 * 1024).unwrap();
        }
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(16).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let record = Arc::clone(&record);
                let answer = answer.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let record = Arc::clone(&record);
                    let answer = answer.clone();
                    async move { Ok::<_, Infallible>(serve(req, answer, record).await) }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend { addr, seen }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn only(&self) -> Seen {
        let seen = self.seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        seen[0].clone()
    }
}

pub async fn serve(
    req: Request<Incoming>,
    answer: Answer,
    record: Arc<Mutex<Vec<Seen>>>,
) -> Response<Full<Bytes>> {
    let (parts, mut incoming) = req.into_parts();
    let mut body = Vec::new();
    let mut since_pause = 0;
    while let Some(frame) = incoming.frame().await {
        let frame = frame.unwrap();
        if let Ok(data) = frame.into_data() {
            body.extend_from_slice(&data);
            since_pause += data.len();
            if answer.slow_read && since_pause >= 256 * 1024 {
                since_pause = 0;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }
    let request_file = parts
        .headers
        .get("BITS-Request-DataFile-Name")
        .map(|p| std::fs::read(p.to_str().unwrap()).unwrap());
    if let (Some(content), Some(path)) = (
        &answer.response_file,
        parts.headers.get("BITS-Response-DataFile-Name"),
    ) {
        std::fs::write(path.to_str().unwrap(), content).unwrap();
    }
    record.lock().unwrap().push(Seen {
        method: parts.method,
        target: parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
        request_file,
    });
    tokio::time::sleep(answer.delay).await;
    let mut response = Response::builder().status(answer.status);
    for (name, value) in &answer.headers {
        response = response.header(*name, value);
    }
    response.body(Full::new(Bytes::from(answer.body))).unwrap()
}

pub fn handler(url: &str, mode: Notification) -> HttpNotifyHandler {
    HttpNotifyHandler::new(HttpNotifyConfig::new(url, mode)).unwrap()
}

pub fn with_timeout(url: &str, mode: Notification, timeout: Duration) -> HttpNotifyHandler {
    HttpNotifyHandler::new(HttpNotifyConfig::new(url, mode).timeout(timeout)).unwrap()
}

pub const REMOTE: &str = "http://bits.example:8080/vdir/sub/file.bin";

/// The headers every notification carries, and none it must not.
pub fn assert_common_headers(seen: &Seen, host: &str, original_url: &str) {
    assert_eq!(seen.method, http::Method::POST);
    assert_eq!(seen.header("host"), Some(host));
    assert_eq!(seen.header("bits-original-request-url"), Some(original_url));
    assert_eq!(seen.header("bits-packet-type"), None);
    assert_eq!(seen.header("transfer-encoding"), None);
    for once in ["host", "content-length", "bits-original-request-url"] {
        assert_eq!(seen.headers.get_all(once).iter().count(), 1, "{once}");
    }
}
