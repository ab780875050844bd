//! The reply handlers end to end through the server (§6.2, §9, §10, §12): a real hyper
//! backend playing the IIS server application, real programs for the command handler, the
//! digest and static handlers, closure handlers that panic, and reply progress after every
//! download pattern.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitsd::config::{build_handler, HandlerSpec, NotificationMode};
use bitsd::{HandlerError, Reply, Route, Upload};
use bitsd_tests::{pattern, url_path, RawClient, RawResponse, TestServer, PROTOCOL};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The `Host` the raw client sends, so the host of every remote URL and reply URL.
const HOST: &str = "bits.example.test";

// ---------------------------------------------------------------------------------------------
// The backend: a hyper 1 server playing the IIS server application.
// ---------------------------------------------------------------------------------------------

/// One notification as the backend received it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    /// Path and query of the request target.
    target: String,
    headers: http::HeaderMap,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// What the backend does with a notification.
enum Answer {
    /// Answers with this status, headers and body.
    Reply {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    },
    /// Waits, then does the inner answer.
    Slow(Duration, Box<Answer>),
    /// Closes the connection without answering.
    Drop,
}

impl Answer {
    fn ok(body: impl Into<Vec<u8>>) -> Self {
        Answer::Reply {
            status: 200,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    fn status(status: u16) -> Self {
        Answer::Reply {
            status,
            headers: Vec::new(),
            body: format!("backend says {status}\n").into_bytes(),
        }
    }

    fn with_header(self, name: &'static str, value: impl Into<String>) -> Self {
        match self {
            Answer::Reply {
                status,
                mut headers,
                body,
            } => {
                headers.push((name, value.into()));
                Answer::Reply {
                    status,
                    headers,
                    body,
                }
            }
            other => other,
        }
    }
}

type Script = Arc<dyn Fn(&Seen) -> Answer + Send + Sync>;

/// The backend on `127.0.0.1:0`; every notification is recorded before it is answered.
struct Backend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Backend {
    async fn start(script: impl Fn(&Seen) -> Answer + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script: Script = Arc::new(script);
        let accept = {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let seen = Arc::clone(&seen);
                    let script = Arc::clone(&script);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            serve(req, Arc::clone(&seen), Arc::clone(&script))
                        });
                        // A dropped connection ends with an error here; that is the point.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            })
        };
        Backend { addr, seen, accept }
    }

    /// An absolute notification URL on this backend.
    fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    /// How many notifications arrived.
    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The notifications, in arrival order.
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn serve(
    req: hyper::Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Script,
) -> Result<hyper::Response<Full<Bytes>>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes()
        .to_vec();
    let request = Seen {
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
    };
    seen.lock().unwrap().push(request.clone());
    let mut answer = script(&request);
    loop {
        match answer {
            Answer::Slow(delay, inner) => {
                tokio::time::sleep(delay).await;
                answer = *inner;
            }
            Answer::Drop => {
                // hyper closes the connection without writing a response.
                return Err(std::io::Error::other("backend drops the connection"));
            }
            Answer::Reply {
                status,
                headers,
                body,
            } => {
                let mut res = hyper::Response::new(Full::new(Bytes::from(body)));
                *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
                for (name, value) in headers {
                    res.headers_mut()
                        .append(name, http::HeaderValue::from_str(&value).unwrap());
                }
                return Ok(res);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Routes and BITS client helpers.
// ---------------------------------------------------------------------------------------------

/// An upload-reply route with the handler a config-file spec describes (the same path the
/// `bitsd --config` routes take).
fn spec_route(prefix: &str, spec: HandlerSpec) -> Route {
    Route::upload_reply_shared(prefix, build_handler(&spec).unwrap())
}

fn http_route(prefix: &str, url: String, mode: NotificationMode, timeout_secs: u64) -> Route {
    spec_route(
        prefix,
        HandlerSpec::Http {
            url,
            notification: Some(mode),
            timeout_secs: Some(timeout_secs),
            data_entity_headers: false,
        },
    )
}

fn command_route(prefix: &str, program: &str, args: &[&str], failure_status: Option<u16>) -> Route {
    spec_route(
        prefix,
        HandlerSpec::Command {
            program: program.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            timeout_secs: Some(10),
            failure_status,
            env: BTreeMap::new(),
            pass_env: Vec::new(),
        },
    )
}

async fn start(routes: Vec<Route>) -> TestServer {
    TestServer::start_with(move |cfg| cfg.routes = routes).await
}

/// A `BITS_POST` with an explicit `Host` (the raw client's helpers always send [`HOST`]).
async fn post(
    c: &mut RawClient,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    c.send(&request(host, path, headers, body)).await
}

/// The bytes of a `BITS_POST`.
fn request(host: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
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
struct Job {
    host: String,
    path: String,
    data: Vec<u8>,
    fragment: usize,
    sid: String,
}

impl Job {
    /// Create-Session, then every fragment but the last (each must be Acked 200).
    async fn start(
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

    fn last_start(&self) -> usize {
        if self.data.is_empty() {
            0
        } else {
            (self.data.len() - 1) / self.fragment * self.fragment
        }
    }

    async fn send_fragment(
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
    fn fragment_request(&self, first: usize, len: usize, content_name: Option<&str>) -> Vec<u8> {
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
    async fn finish(&self, c: &mut RawClient) -> RawResponse {
        let first = self.last_start();
        self.send_fragment(c, first, self.data.len() - first, None)
            .await
    }

    async fn close(&self, c: &mut RawClient) -> RawResponse {
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
    fn reply_path(&self, prefix: &str) -> String {
        let id: bitsd::protocol::SessionId = self.sid.parse().unwrap();
        format!("{prefix}BITS-Sessions/{}/response", id.simple())
    }
}

/// Asserts a successful final Ack and returns its `BITS-Reply-URL`.
fn assert_final_ok(ack: &RawResponse, job: &Job) -> String {
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
fn assert_app_error(ack: &RawResponse, job: &Job, status: u16, code: &str) {
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

/// GETs a reply by its absolute URL from the server; asserts 200 and returns the body.
async fn fetch_reply(c: &mut RawClient, url: &str) -> Vec<u8> {
    let res = c.get("GET", &url_path(url), &[]).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        res.header("content-length"),
        Some(res.body.len().to_string().as_str())
    );
    res.body
}

async fn progress(server: &TestServer, sid: &str) -> serde_json::Value {
    // Delivery is recorded by a task spawned when the response body ends.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, json) = server.admin_get(&format!("/sessions/{sid}")).await;
    assert_eq!(status, 200, "{json}");
    json
}

fn reply_url_prefix(prefix: &str) -> String {
    format!("http://{HOST}{prefix}BITS-Sessions/")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// HTTP notification, by value.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn by_value_notification_carries_the_upload_and_its_body_is_the_reply() {
    let backend = Backend::start(|seen| {
        let mut reply = b"reply to ".to_vec();
        reply.extend(seen.body.iter().rev());
        Answer::ok(reply)
    })
    .await;
    let server = start(vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByValue,
        10,
    )])
    .await;
    let mut c = server.connect().await;
    let data = pattern(200_000, 11);
    let path = "/app/reports/q.bin?ACCOUNT=873112";
    let job = Job::start(&mut c, HOST, path, data.clone(), 65_536).await;
    assert_eq!(backend.count(), 0, "no notification before the last byte");
    let p = progress(&server, &job.sid).await;
    assert_eq!(p["state"], "receiving");
    assert_eq!(p["reply"]["bytes_total"], serde_json::Value::Null);

    let fin = job.finish(&mut c).await;
    let url = assert_final_ok(&fin, &job);
    assert!(url.starts_with(&reply_url_prefix("/app/")), "{url}");
    assert_eq!(url_path(&url), job.reply_path("/app/"));

    // Exactly one notification, exactly as §9.1 describes it.
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    let n = &seen[0];
    assert_eq!(n.method, "POST");
    assert_eq!(n.target, "/handle?ACCOUNT=873112", "query string appended");
    assert_eq!(n.header("host"), Some(backend.addr.to_string().as_str()));
    assert_eq!(
        n.header("bits-original-request-url"),
        Some(format!("http://{HOST}{path}").as_str())
    );
    assert_eq!(n.header("content-length"), Some("200000"));
    assert_eq!(n.header("bits-packet-type"), None);
    assert_eq!(n.header("bits-request-datafile-name"), None);
    assert_eq!(n.header("bits-response-datafile-name"), None);
    assert_eq!(n.header("transfer-encoding"), None);
    assert!(n.body == data, "the notification body is the upload");

    let mut expected = b"reply to ".to_vec();
    expected.extend(data.iter().rev());
    let head = c.get("HEAD", &url_path(&url), &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(expected.len().to_string().as_str())
    );
    assert!(fetch_reply(&mut c, &url).await == expected);

    // No BITS-Copy-File-To-Destination: the upload is not committed.
    assert!(!server.data_dir().join("files/reports/q.bin").exists());

    let close = job.close(&mut c).await;
    close.assert_ack();
    assert_eq!(close.status, 200);
    assert_eq!(c.get("GET", &url_path(&url), &[]).await.status, 404);
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn empty_upload_and_empty_backend_body_give_an_empty_reply() {
    let backend = Backend::start(|_| Answer::ok(Vec::new())).await;
    let server = start(vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByValue,
        10,
    )])
    .await;
    let mut c = server.connect().await;
    let job = Job::start(&mut c, HOST, "/app/empty.bin", Vec::new(), 4096).await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("content-length"), Some("0"));
    assert!(seen[0].body.is_empty());
    let head = c.get("HEAD", &url_path(&url), &[]).await;
    assert_eq!(
        (head.status, head.header("content-length")),
        (200, Some("0"))
    );
    assert!(fetch_reply(&mut c, &url).await.is_empty());
    let p = progress(&server, &job.sid).await;
    assert_eq!(p["reply"]["bytes_total"], 0);
}

// ---------------------------------------------------------------------------------------------
// HTTP notification, by reference.
// ---------------------------------------------------------------------------------------------

/// The backend of the by-reference tests: reads the request file, and answers per the remote
/// URL's file name: `file.bin` writes the reversed upload to the response file, `both.bin`
/// writes the file and answers with a body too, `none.bin` writes nothing.
fn by_reference_script(seen: &Seen) -> Answer {
    let request = PathBuf::from(seen.header("bits-request-datafile-name").unwrap());
    let response = PathBuf::from(seen.header("bits-response-datafile-name").unwrap());
    let upload = std::fs::read(&request).unwrap();
    let original = seen.header("bits-original-request-url").unwrap();
    let mut reversed = upload.clone();
    reversed.reverse();
    if original.contains("/file.bin") {
        std::fs::write(&response, &reversed).unwrap();
        Answer::ok(Vec::new())
    } else if original.contains("/both.bin") {
        std::fs::write(&response, &reversed).unwrap();
        Answer::ok(b"the body wins".to_vec())
    } else {
        Answer::ok(Vec::new())
    }
}

#[tokio::test]
async fn by_reference_backend_reads_the_request_file_and_writes_the_response_file() {
    let backend = Backend::start(by_reference_script).await;
    let server = start(vec![http_route(
        "/ref/",
        backend.url("/handle.asp?from=bits"),
        NotificationMode::ByReference,
        10,
    )])
    .await;
    let data_dir = std::path::absolute(server.data_dir()).unwrap();
    let mut c = server.connect().await;
    let data = pattern(150_000, 12);

    let job = Job::start(
        &mut c,
        HOST,
        "/ref/file.bin?ACCOUNT=873112",
        data.clone(),
        50_000,
    )
    .await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    let n = &seen[0];
    assert_eq!(n.method, "POST");
    assert_eq!(n.target, "/handle.asp?from=bits&ACCOUNT=873112");
    assert_eq!(n.header("content-length"), Some("0"));
    assert!(n.body.is_empty());
    assert_eq!(n.header("bits-packet-type"), None);
    assert_eq!(
        n.header("bits-original-request-url"),
        Some(format!("http://{HOST}/ref/file.bin?ACCOUNT=873112").as_str())
    );
    for name in ["bits-request-datafile-name", "bits-response-datafile-name"] {
        let p = Path::new(n.header(name).unwrap());
        assert!(p.is_absolute(), "{name}: {}", p.display());
        assert!(
            p.starts_with(&data_dir),
            "{name}: {} not under {}",
            p.display(),
            data_dir.display()
        );
    }
    assert_eq!(n.header("bits-request-dataentity-name"), None);
    let mut reversed = data.clone();
    reversed.reverse();
    assert!(
        fetch_reply(&mut c, &url).await == reversed,
        "the response file is the reply"
    );
    assert_eq!(job.close(&mut c).await.status, 200);

    // A non-empty response body wins over the response file (the REC of §9.2).
    let job = Job::start(&mut c, HOST, "/ref/both.bin", data.clone(), 50_000).await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    assert_eq!(fetch_reply(&mut c, &url).await, b"the body wins");

    // Neither a body nor a file: an empty reply, still with a reply URL (§10).
    let job = Job::start(&mut c, HOST, "/ref/none.bin", data.clone(), 50_000).await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    assert!(fetch_reply(&mut c, &url).await.is_empty());
    assert_eq!(backend.count(), 3);
}

// ---------------------------------------------------------------------------------------------
// Relative notification URL, static response URL, copy to destination.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn relative_notification_url_resolves_against_the_servers_own_url() {
    // `handle.asp` resolves against the directory of the remote URL as the server names it
    // (its public URL, here the backend's address), never against the client's `Host`
    // (tests/tests/security_urls.rs has the hostile case).
    let backend = Backend::start(|seen| Answer::ok(format!("{} bytes", seen.body.len()))).await;
    let public = format!("http://{}", backend.addr);
    let server = {
        let public = public.clone();
        TestServer::start_with(move |cfg| {
            cfg.routes = vec![http_route(
                "/app/",
                "handle.asp".to_owned(),
                NotificationMode::ByValue,
                10,
            )];
            cfg.public_base_url = Some(public);
        })
        .await
    };
    let host = "client-chosen.example.test";
    let mut c = server.connect().await;
    let data = pattern(5000, 13);
    let job = Job::start(&mut c, host, "/app/sub/q.bin?ACCOUNT=873112", data, 4096).await;
    let fin = job.finish(&mut c).await;
    let url = assert_final_ok(&fin, &job);
    assert!(
        url.starts_with(&format!("{public}/app/BITS-Sessions/")),
        "{url}"
    );
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/app/sub/handle.asp?ACCOUNT=873112");
    // The backend is still told the remote URL the client used.
    assert_eq!(
        seen[0].header("bits-original-request-url"),
        Some(format!("http://{host}/app/sub/q.bin?ACCOUNT=873112").as_str())
    );
    assert_eq!(fetch_reply(&mut c, &url).await, b"5000 bytes");
}

#[tokio::test]
async fn static_response_url_becomes_the_reply_url_and_nothing_is_stored() {
    const STATIC: &str = "http://cdn.example.test/replies/common.bin";
    let backend = Backend::start(|_| {
        Answer::ok(b"ignored".to_vec()).with_header("BITS-Static-Response-URL", STATIC)
    })
    .await;
    let server = start(vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByReference,
        10,
    )])
    .await;
    let mut c = server.connect().await;
    let job = Job::start(&mut c, HOST, "/app/q.bin", pattern(3000, 14), 1000).await;
    let fin = job.finish(&mut c).await;
    assert_eq!(assert_final_ok(&fin, &job), STATIC);

    let p = progress(&server, &job.sid).await;
    assert_eq!(p["state"], "reply-ready");
    assert_eq!(p["reply"]["bytes_total"], serde_json::Value::Null, "{p}");
    assert_eq!(
        p["reply"]["bytes_transferred"],
        serde_json::Value::Null,
        "{p}"
    );
    // The server serves no reply of its own for this session.
    assert_eq!(
        c.get("GET", &job.reply_path("/app/"), &[]).await.status,
        404
    );

    // A re-sent final fragment: the same URL, no second notification.
    assert_eq!(assert_final_ok(&job.finish(&mut c).await, &job), STATIC);
    assert_eq!(backend.count(), 1);
    assert_eq!(job.close(&mut c).await.status, 200);
}

#[tokio::test]
async fn copy_file_to_destination_also_commits_the_upload() {
    let backend = Backend::start(|_| {
        Answer::ok(b"stored".to_vec()).with_header("BITS-Copy-File-To-Destination", "1")
    })
    .await;
    let server = start(vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByValue,
        10,
    )])
    .await;
    let mut c = server.connect().await;
    let data = pattern(70_000, 15);
    let job = Job::start(&mut c, HOST, "/app/in/q.bin", data.clone(), 30_000).await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    assert_eq!(fetch_reply(&mut c, &url).await, b"stored");
    let committed = server.data_dir().join("files").join("in").join("q.bin");
    assert!(std::fs::read(&committed).unwrap() == data);
    // Idempotent: a re-sent final fragment neither notifies nor fails on the existing file.
    assert_eq!(assert_final_ok(&job.finish(&mut c).await, &job), url);
    assert_eq!(backend.count(), 1);
    assert_eq!(job.close(&mut c).await.status, 200);
    assert!(
        std::fs::read(&committed).unwrap() == data,
        "Close keeps the committed file"
    );
}

// ---------------------------------------------------------------------------------------------
// Backend failures (§9.5).
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn backend_error_statuses_are_relayed_with_context_7() {
    let answer = Arc::new(AtomicU16::new(200));
    let backend = {
        let answer = Arc::clone(&answer);
        Backend::start(move |_| Answer::status(answer.load(Ordering::SeqCst))).await
    };
    let server = start(vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByValue,
        10,
    )])
    .await;
    let mut c = server.connect().await;
    let cases = [
        (403, 403, "0x80190193"),
        (409, 409, "0x80190199"),
        (500, 500, "0x801901f4"),
        (503, 503, "0x801901f7"),
        (404, 404, "0x80190194"),
        // Never 413: the client would shrink its fragments forever (§2.1).
        (413, 500, "0x801901f4"),
        // Never 401/407 (a challenge to the client's own credentials, without
        // WWW-Authenticate) nor 416 (a resync): a transient backend failure instead (§9.5).
        (401, 500, "0x801901f4"),
        (407, 500, "0x801901f4"),
        (416, 500, "0x801901f4"),
    ];
    for (i, (backend_status, status, code)) in cases.into_iter().enumerate() {
        answer.store(backend_status, Ordering::SeqCst);
        let job = Job::start(
            &mut c,
            HOST,
            "/app/q.bin",
            pattern(10_000, 20 + i as u64),
            4096,
        )
        .await;
        let fin = job.finish(&mut c).await;
        assert_app_error(&fin, &job, status, code);
        assert_eq!(backend.count(), i + 1, "backend {backend_status}");
        let p = progress(&server, &job.sid).await;
        assert_eq!(p["state"], "complete", "{p}");
        assert_eq!(p["upload"]["bytes_received"], 10_000);
        assert_eq!(p["reply"]["bytes_total"], serde_json::Value::Null, "{p}");
        assert_eq!(
            c.get("GET", &job.reply_path("/app/"), &[]).await.status,
            404
        );
    }
}

#[tokio::test]
async fn slow_backend_past_the_timeout_is_504() {
    let backend =
        Backend::start(|_| Answer::Slow(Duration::from_secs(5), Box::new(Answer::ok("late"))))
            .await;
    let server = start(vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByValue,
        1,
    )])
    .await;
    let mut c = server.connect().await;
    let job = Job::start(&mut c, HOST, "/app/q.bin", pattern(10_000, 30), 4096).await;
    let started = Instant::now();
    let fin = job.finish(&mut c).await;
    let elapsed = started.elapsed();
    assert_app_error(&fin, &job, 504, "0x801901f8");
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(4),
        "timed out after {elapsed:?}"
    );
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn dropped_connection_and_unreachable_backend_are_504() {
    let backend = Backend::start(|_| Answer::Drop).await;
    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let server = start(vec![
        http_route(
            "/app/",
            backend.url("/handle"),
            NotificationMode::ByValue,
            5,
        ),
        http_route(
            "/gone/",
            format!("http://{closed}/handle"),
            NotificationMode::ByValue,
            5,
        ),
    ])
    .await;
    let mut c = server.connect().await;
    let job = Job::start(&mut c, HOST, "/app/q.bin", pattern(10_000, 31), 4096).await;
    assert_app_error(&job.finish(&mut c).await, &job, 504, "0x801901f8");
    assert_eq!(backend.count(), 1);

    let job = Job::start(&mut c, HOST, "/gone/q.bin", pattern(10_000, 32), 4096).await;
    let started = Instant::now();
    assert_app_error(&job.finish(&mut c).await, &job, 504, "0x801901f8");
    assert!(started.elapsed() < Duration::from_secs(4));
}

// ---------------------------------------------------------------------------------------------
// Re-sent final fragments (§6.2): retry after failure, no repeat after success.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn resent_final_fragment_after_a_failure_notifies_again() {
    let calls = Arc::new(AtomicUsize::new(0));
    let backend = {
        let calls = Arc::clone(&calls);
        Backend::start(move |seen| match calls.fetch_add(1, Ordering::SeqCst) {
            0 => Answer::status(503),
            1 => Answer::Drop,
            _ => Answer::ok(Sha256::digest(&seen.body).to_vec()),
        })
        .await
    };
    let server = start(vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByValue,
        5,
    )])
    .await;
    let mut c = server.connect().await;
    let data = pattern(100_000, 40);
    let job = Job::start(
        &mut c,
        HOST,
        "/app/q.bin?ACCOUNT=873112",
        data.clone(),
        32_768,
    )
    .await;
    assert_app_error(&job.finish(&mut c).await, &job, 503, "0x801901f7");
    assert_eq!(backend.count(), 1);
    assert_app_error(&job.finish(&mut c).await, &job, 504, "0x801901f8");
    assert_eq!(backend.count(), 2);
    let p = progress(&server, &job.sid).await;
    assert_eq!(p["state"], "complete");
    assert_eq!(p["reply"]["bytes_total"], serde_json::Value::Null);

    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    assert_eq!(backend.count(), 3);
    // Every attempt carried the whole upload: it was kept across the failures.
    for n in backend.seen() {
        assert!(n.body == data);
        assert_eq!(n.target, "/handle?ACCOUNT=873112");
    }
    assert_eq!(
        fetch_reply(&mut c, &url).await,
        Sha256::digest(&data).to_vec()
    );
    assert_eq!(assert_final_ok(&job.finish(&mut c).await, &job), url);
    assert_eq!(backend.count(), 3);
}

#[tokio::test]
async fn successful_notification_is_not_repeated_even_across_a_restart() {
    let backend =
        Backend::start(|seen| Answer::ok(format!("receipt for {} bytes", seen.body.len()))).await;
    let routes = vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByValue,
        10,
    )];
    let server = start(routes.clone()).await;
    let mut c = server.connect().await;
    let data = pattern(60_000, 41);
    let job = Job::start(&mut c, HOST, "/app/q.bin?ACCOUNT=873112", data, 16_384).await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    assert_eq!(backend.count(), 1);
    // The Ack was "lost": the client re-sends the final fragment.
    assert_eq!(assert_final_ok(&job.finish(&mut c).await, &job), url);
    assert_eq!(backend.count(), 1);

    drop(c);
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, move |cfg| cfg.routes = routes).await;
    let mut c = server.connect().await;
    assert_eq!(assert_final_ok(&job.finish(&mut c).await, &job), url);
    assert_eq!(
        backend.count(),
        1,
        "no second notification after the restart"
    );
    assert_eq!(fetch_reply(&mut c, &url).await, b"receipt for 60000 bytes");
    let close = job.close(&mut c).await;
    close.assert_ack();
    assert_eq!(close.status, 200);
    assert_eq!(c.get("GET", &url_path(&url), &[]).await.status, 404);
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn hangup_during_a_notification_does_not_notify_again() {
    let backend = Backend::start(|seen| {
        Answer::Slow(
            Duration::from_millis(1500),
            Box::new(Answer::ok(Sha256::digest(&seen.body).to_vec())),
        )
    })
    .await;
    let server = start(vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByValue,
        10,
    )])
    .await;
    let mut c = server.connect().await;
    let data = pattern(50_000, 42);
    let job = Job::start(&mut c, HOST, "/app/q.bin", data.clone(), 32_768).await;
    let last = job.fragment_request(job.last_start(), data.len() - job.last_start(), None);
    // The final fragment, then a hang-up while the backend works on the notification.
    c.write(&last).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend.count() == 0 {
        assert!(Instant::now() < deadline, "no notification");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The client re-sends: it gets the answer of the notification in flight.
    let mut c = server.connect().await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    assert_eq!(backend.count(), 1, "exactly one notification");
    assert_eq!(
        fetch_reply(&mut c, &url).await,
        Sha256::digest(&data).to_vec()
    );
    assert_eq!(assert_final_ok(&job.finish(&mut c).await, &job), url);
    assert_eq!(backend.count(), 1);
}

// ---------------------------------------------------------------------------------------------
// The command handler with real programs.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn command_handler_reply_is_the_programs_stdout() {
    let server = start(vec![
        command_route(
            "/size/",
            "sh",
            &["-c", r#"printf "%s:" "$BITS_UPLOAD_SIZE"; cat"#],
            None,
        ),
        command_route(
            "/env/",
            "sh",
            &[
                "-c",
                concat!(
                    r#"printf "%s\n%s\n%s\n%s\n" "$BITS_SESSION_ID" "$BITS_ORIGINAL_URL" "#,
                    r#""$BITS_CONTENT_NAME" "$BITS_UPLOAD_SIZE"; "#,
                    r#"cmp -s - "$BITS_UPLOAD_PATH" && echo stdin-is-the-upload-file"#,
                ),
            ],
            None,
        ),
    ])
    .await;
    let mut c = server.connect().await;
    let data = pattern(100_000, 50);
    let job = Job::start(&mut c, HOST, "/size/q.bin", data.clone(), 40_000).await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    let mut expected = b"100000:".to_vec();
    expected.extend_from_slice(&data);
    assert!(fetch_reply(&mut c, &url).await == expected);

    // The session facts in the environment; Content-Name comes with the first fragment.
    let job = Job::start(&mut c, HOST, "/env/q.bin?x=1", data.clone(), 100_000).await;
    let fin = job
        .send_fragment(&mut c, 0, data.len(), Some("report.bin"))
        .await;
    let url = assert_final_ok(&fin, &job);
    let reply = String::from_utf8(fetch_reply(&mut c, &url).await).unwrap();
    assert_eq!(
        reply,
        format!(
            "{}\nhttp://{HOST}/env/q.bin?x=1\nreport.bin\n100000\nstdin-is-the-upload-file\n",
            job.sid
        )
    );
}

#[tokio::test]
async fn command_handler_failures_and_timeouts() {
    let pid_dir = tempfile::tempdir().unwrap();
    let pid_file = pid_dir.path().join("sleep.pid");
    let sleeper = spec_route(
        "/sleep/",
        HandlerSpec::Command {
            program: "sh".into(),
            args: vec![
                "-c".into(),
                format!("sleep 30 & echo $! > {}; wait", pid_file.display()),
            ],
            timeout_secs: Some(1),
            failure_status: None,
            env: BTreeMap::new(),
            pass_env: Vec::new(),
        },
    );
    let server = start(vec![
        command_route("/false/", "false", &[], None),
        command_route("/busy/", "false", &[], Some(503)),
        sleeper,
    ])
    .await;
    let mut c = server.connect().await;
    let data = pattern(5000, 51);

    let job = Job::start(&mut c, HOST, "/false/q.bin", data.clone(), 4096).await;
    assert_app_error(&job.finish(&mut c).await, &job, 500, "0x801901f4");
    // Still failing on the retry: the program runs again, the upload is kept.
    assert_app_error(&job.finish(&mut c).await, &job, 500, "0x801901f4");

    let job = Job::start(&mut c, HOST, "/busy/q.bin", data.clone(), 4096).await;
    assert_app_error(&job.finish(&mut c).await, &job, 503, "0x801901f7");

    let job = Job::start(&mut c, HOST, "/sleep/q.bin", data.clone(), 4096).await;
    let started = Instant::now();
    assert_app_error(&job.finish(&mut c).await, &job, 504, "0x801901f8");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The whole process group is gone, the backgrounded `sleep` included.
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for its new parent to reap it.
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .chars()
            .next();
        if stat.is_empty() || state == Some('Z') {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sleep {pid} still running: {stat}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The digest and static handlers.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn digest_handler_replies_with_a_json_receipt() {
    let server = start(vec![spec_route("/sum/", HandlerSpec::Digest)]).await;
    let mut c = server.connect().await;
    let data = pattern(123_457, 60);
    let job = Job::start(&mut c, HOST, "/sum/q.bin", data.clone(), 50_000).await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    let reply = fetch_reply(&mut c, &url).await;
    let receipt: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(receipt["session_id"], job.sid.as_str(), "{receipt}");
    assert_eq!(receipt["size"], 123_457);
    assert_eq!(receipt["sha256"], hex(&Sha256::digest(&data)));
    assert!(
        receipt["received"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{receipt}"
    );
    let p = progress(&server, &job.sid).await;
    assert_eq!(p["reply"]["bytes_total"], reply.len());
}

#[tokio::test]
async fn static_handler_gives_every_client_the_same_reply() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("common.bin");
    let common = pattern(40_000, 61);
    std::fs::write(&file, &common).unwrap();
    const STATIC: &str = "http://cdn.example.test/common.bin";
    let server = start(vec![
        spec_route(
            "/same/",
            HandlerSpec::Static {
                file: Some(file),
                url: None,
            },
        ),
        spec_route(
            "/elsewhere/",
            HandlerSpec::Static {
                file: None,
                url: Some(STATIC.into()),
            },
        ),
    ])
    .await;
    let mut urls = Vec::new();
    for seed in 0..3 {
        let mut c = server.connect().await;
        let job = Job::start(
            &mut c,
            HOST,
            "/same/q.bin",
            pattern(1000 + seed * 10, seed as u64),
            512,
        )
        .await;
        let url = assert_final_ok(&job.finish(&mut c).await, &job);
        assert!(fetch_reply(&mut c, &url).await == common);
        urls.push(url);
    }
    urls.sort();
    urls.dedup();
    assert_eq!(urls.len(), 3, "each session has its own reply URL");

    let mut c = server.connect().await;
    let job = Job::start(&mut c, HOST, "/elsewhere/q.bin", pattern(1000, 62), 512).await;
    assert_eq!(assert_final_ok(&job.finish(&mut c).await, &job), STATIC);
    let p = progress(&server, &job.sid).await;
    assert_eq!(p["reply"]["bytes_total"], serde_json::Value::Null);
}

// ---------------------------------------------------------------------------------------------
// Closure handlers that panic.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn panicking_handler_fails_the_attempt_not_the_server() {
    let calls = Arc::new(AtomicUsize::new(0));
    let flaky = {
        let calls = Arc::clone(&calls);
        move |upload: Upload| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    panic!("handler bug (test)");
                }
                Ok::<_, HandlerError>(Reply::bytes(format!("{} bytes", upload.len)))
            }
        }
    };
    let server = start(vec![
        Route::upload_reply("/flaky/", flaky),
        Route::upload_reply("/ok/", |upload: Upload| async move {
            Ok::<_, HandlerError>(Reply::bytes(format!("ok {}", upload.len)))
        }),
    ])
    .await;
    let mut c = server.connect().await;
    let job = Job::start(&mut c, HOST, "/flaky/q.bin", pattern(3000, 70), 1024).await;
    let fin = job.finish(&mut c).await;
    assert!((500..600).contains(&fin.status), "{fin:?}");
    assert_app_error(&fin, &job, 500, "0x801901f4");

    // The server keeps serving: another upload on the same connection, and on another route.
    let other = Job::start(&mut c, HOST, "/ok/q.bin", pattern(2000, 71), 1024).await;
    let url = assert_final_ok(&other.finish(&mut c).await, &other);
    assert_eq!(fetch_reply(&mut c, &url).await, b"ok 2000");
    // The client's retry of the panicked session runs the handler again and succeeds.
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    assert_eq!(fetch_reply(&mut c, &url).await, b"3000 bytes");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn handler_panicking_before_it_returns_its_future_is_a_context_7_error() {
    // A closure whose body panics before building its future: the panic happens when the
    // server calls `ReplyHandler::reply`, not inside the spawned future.
    let server = start(vec![
        Route::upload_reply(
            "/eager/",
            |_upload: Upload| -> std::future::Ready<Result<Reply, HandlerError>> {
                panic!("handler bug before the future (test)")
            },
        ),
        Route::upload_reply("/ok/", |upload: Upload| async move {
            Ok::<_, HandlerError>(Reply::bytes(format!("ok {}", upload.len)))
        }),
    ])
    .await;
    let mut c = server.connect().await;
    let job = Job::start(&mut c, HOST, "/eager/q.bin", pattern(3000, 72), 1024).await;
    let raw = job.fragment_request(job.last_start(), job.data.len() - job.last_start(), None);
    let fin = c.try_send(&raw).await;
    let mut c2 = server.connect().await;
    let other = Job::start(&mut c2, HOST, "/ok/q.bin", pattern(2000, 73), 1024).await;
    let url = assert_final_ok(&other.finish(&mut c2).await, &other);
    assert_eq!(fetch_reply(&mut c2, &url).await, b"ok 2000");
    let fin = fin.expect("the client gets an Ack, not a dropped connection");
    assert_app_error(&fin, &job, 500, "0x801901f4");
}

// ---------------------------------------------------------------------------------------------
// Reply progress through the admin JSON, for a by-value backend reply.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn reply_progress_after_each_download_pattern() {
    const REPLY_LEN: usize = 12 * 1024 * 1024;
    let reply = Arc::new(pattern(REPLY_LEN, 80));
    let backend = {
        let reply = Arc::clone(&reply);
        Backend::start(move |_| Answer::ok(reply.as_ref().clone())).await
    };
    let server = start(vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByValue,
        10,
    )])
    .await;
    let mut c = server.connect().await;
    let data = pattern(20_000, 81);
    let job = Job::start(&mut c, HOST, "/app/q.bin", data, 8192).await;

    // Before the reply exists: unknown.
    let p = progress(&server, &job.sid).await;
    assert_eq!(p["state"], "receiving");
    assert_eq!(p["upload"]["bytes_received"], 16_384);
    assert_eq!(p["upload"]["bytes_total"], 20_000);
    assert_eq!(p["reply"]["bytes_total"], serde_json::Value::Null);
    assert_eq!(p["reply"]["bytes_transferred"], serde_json::Value::Null);

    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    let path = url_path(&url);
    let transferred = |p: &serde_json::Value| p["reply"]["bytes_transferred"].as_u64().unwrap();
    let p = progress(&server, &job.sid).await;
    assert_eq!(p["state"], "reply-ready");
    assert_eq!(p["reply"]["bytes_total"], REPLY_LEN);
    assert_eq!(transferred(&p), 0);

    // HEAD transfers nothing.
    let head = c.get("HEAD", &path, &[]).await;
    assert_eq!(
        head.header("content-length"),
        Some(REPLY_LEN.to_string().as_str())
    );
    assert_eq!(transferred(&progress(&server, &job.sid).await), 0);

    // A ranged GET, then an overlapping one: distinct bytes only.
    let part = c.get("GET", &path, &[("Range", "bytes=0-999")]).await;
    assert_eq!(part.status, 206);
    assert!(part.body == reply[..1000]);
    assert_eq!(transferred(&progress(&server, &job.sid).await), 1000);
    let part = c.get("GET", &path, &[("Range", "bytes=500-1499")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 500-1499/{REPLY_LEN}").as_str())
    );
    assert!(part.body == reply[500..1500]);
    assert_eq!(transferred(&progress(&server, &job.sid).await), 1500);

    // An interrupted download: the client reads part of the body and drops the connection.
    // A small receive buffer keeps the kernel from taking the whole reply on its behalf.
    let read = {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        let mut stream = socket.connect(server.addr()).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        while got.len() < 300_000 {
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(got.starts_with(b"HTTP/1.1 200"));
        let body = &got[head_end..];
        assert!(body == &reply[..body.len()]);
        body.len()
    };
    // The server learns of the drop when its writes fail; wait until the attempt is counted.
    let deadline = Instant::now() + Duration::from_secs(5);
    let after_drop = loop {
        let t = transferred(&progress(&server, &job.sid).await);
        if t > 1500 || Instant::now() > deadline {
            break t;
        }
    };
    assert!(
        after_drop > 1500,
        "an interrupted download counts what the connection took ({after_drop})"
    );
    assert!(
        after_drop < REPLY_LEN as u64,
        "an interrupted download of {read} bytes counted {after_drop} of {REPLY_LEN}"
    );

    // Two full downloads: everything, counted once.
    for _ in 0..2 {
        let full = c.get("GET", &path, &[]).await;
        assert_eq!(full.status, 200);
        assert!(full.body == *reply);
        let p = progress(&server, &job.sid).await;
        assert_eq!(transferred(&p), REPLY_LEN as u64);
        assert_eq!(p["reply"]["bytes_total"], REPLY_LEN);
    }
    assert_eq!(backend.count(), 1);
}
