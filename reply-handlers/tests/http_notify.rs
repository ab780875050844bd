//! The `http` handler against a real HTTP backend playing the IIS server application (§9).
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitsd_reply_handlers::{
    HandlerError, HttpNotifyConfig, HttpNotifyHandler, Notification, Reply, ReplyBody,
    ReplyHandler, NOTIFICATION_REPLY_FILE, RESPONSE_FILE,
};
use bytes::Bytes;
use common::{is_run_file, pattern, reply_bytes, reply_file, upload};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One notification as the backend received it.
#[derive(Clone, Debug)]
struct Seen {
    method: http::Method,
    /// Path and query.
    target: String,
    headers: HeaderMap,
    body: Vec<u8>,
    /// What the file named in `BITS-Request-DataFile-Name` held while the request was open.
    request_file: Option<Vec<u8>>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// How the backend answers.
#[derive(Clone, Debug)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// Wait this long (after reading the request) before answering.
    delay: Duration,
    /// By reference: write this to the file named in `BITS-Response-DataFile-Name`.
    response_file: Option<Vec<u8>>,
    /// Read the request body slowly (pause 25 ms after every 256 KiB, about 10 MB/s) through a
    /// small receive buffer.
    slow_read: bool,
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

fn status(status: u16) -> Answer {
    Answer {
        status,
        ..Answer::default()
    }
}

fn body(body: impl Into<Vec<u8>>) -> Answer {
    Answer {
        body: body.into(),
        ..Answer::default()
    }
}

/// A hyper HTTP/1.1 backend on 127.0.0.1:0 that records what it receives.
struct Backend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Backend {
    async fn start(answer: Answer) -> Backend {
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

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    fn only(&self) -> Seen {
        let seen = self.seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        seen[0].clone()
    }
}

async fn serve(
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

fn handler(url: &str, mode: Notification) -> HttpNotifyHandler {
    HttpNotifyHandler::new(HttpNotifyConfig::new(url, mode)).unwrap()
}

fn with_timeout(url: &str, mode: Notification, timeout: Duration) -> HttpNotifyHandler {
    HttpNotifyHandler::new(HttpNotifyConfig::new(url, mode).timeout(timeout)).unwrap()
}

const REMOTE: &str = "http://bits.example:8080/vdir/sub/file.bin";

/// The headers every notification carries, and none it must not.
fn assert_common_headers(seen: &Seen, host: &str, original_url: &str) {
    assert_eq!(seen.method, http::Method::POST);
    assert_eq!(seen.header("host"), Some(host));
    assert_eq!(seen.header("bits-original-request-url"), Some(original_url));
    assert_eq!(seen.header("bits-packet-type"), None);
    assert_eq!(seen.header("transfer-encoding"), None);
    for once in ["host", "content-length", "bits-original-request-url"] {
        assert_eq!(seen.headers.get_all(once).iter().count(), 1, "{once}");
    }
}

// ---------------------------------------------------------------- by value

#[tokio::test]
async fn by_value_posts_the_upload_and_the_response_body_is_the_reply() {
    let data = pattern(1024 * 1024 + 3);
    let answer = pattern(2 * 1024 * 1024 + 1);
    let backend = Backend::start(body(answer.clone())).await;
    let fx = upload(&data, REMOTE, Some("file.bin"));
    let reply = handler(&backend.url("/app/notify"), Notification::ByValue)
        .reply(fx.upload.clone())
        .await
        .unwrap();

    let seen = backend.only();
    assert_common_headers(&seen, &backend.host(), REMOTE);
    assert_eq!(seen.target, "/app/notify");
    assert_eq!(
        seen.header("content-length"),
        Some(&*data.len().to_string())
    );
    assert!(seen.body == data, "the backend got other bytes");
    assert_eq!(seen.header("bits-request-datafile-name"), None);
    assert_eq!(seen.header("bits-response-datafile-name"), None);

    assert!(is_run_file(
        &reply_file(&reply),
        fx.session_dir(),
        NOTIFICATION_REPLY_FILE
    ));
    assert!(reply_bytes(&reply) == answer, "the reply differs");
    assert!(!reply.commit_upload);
}

#[tokio::test]
async fn two_notifications_for_one_session_store_bodies_of_their_own() {
    let backend = Backend::start(Answer {
        body: pattern(200_000),
        delay: Duration::from_millis(200),
        ..Answer::default()
    })
    .await;
    let fx = upload(b"u", REMOTE, None);
    let h = handler(&backend.url("/n"), Notification::ByValue);
    let (a, b) = tokio::join!(h.reply(fx.upload.clone()), h.reply(fx.upload.clone()));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(reply_file(&a), reply_file(&b));
    for reply in [&a, &b] {
        assert!(is_run_file(
            &reply_file(reply),
            fx.session_dir(),
            NOTIFICATION_REPLY_FILE
        ));
        assert!(reply_bytes(reply) == pattern(200_000));
    }
}

#[tokio::test]
async fn by_value_empty_upload_and_empty_response() {
    let backend = Backend::start(Answer::default()).await;
    let fx = upload(b"", REMOTE, None);
    let reply = handler(&backend.url("/n"), Notification::ByValue)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    let seen = backend.only();
    assert_eq!(seen.header("content-length"), Some("0"));
    assert!(seen.body.is_empty());
    assert!(matches!(reply.body, ReplyBody::Empty), "{reply:?}");
}

#[tokio::test]
async fn slow_reading_backend_is_not_a_timeout_while_the_upload_moves() {
    // The backend takes well over the timeout to read the upload, but never stalls that long
    // (the client's send buffer, at most 4 MiB here, drains in about 0.4 s).
    let data = pattern(16 * 1024 * 1024);
    let backend = Backend::start(Answer {
        slow_read: true,
        body: b"ok".to_vec(),
        ..Answer::default()
    })
    .await;
    let fx = upload(&data, REMOTE, None);
    let started = Instant::now();
    let reply = with_timeout(
        &backend.url("/n"),
        Notification::ByValue,
        Duration::from_millis(1000),
    )
    .reply(fx.upload.clone())
    .await
    .unwrap();
    assert!(started.elapsed() > Duration::from_millis(1000));
    assert_eq!(reply_bytes(&reply), b"ok");
    assert!(backend.only().body == data);
}

// ---------------------------------------------------------------- URLs

#[tokio::test]
async fn query_string_is_appended_to_the_notification_url() {
    let backend = Backend::start(Answer::default()).await;
    let remote = "http://myserver/myvdir/subdir/file.asp?ACCOUNT=86433";
    let fx = upload(b"q", remote, None);
    handler(&backend.url("/myvdir2/bag.asp"), Notification::ByValue)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    let seen = backend.only();
    assert_eq!(seen.target, "/myvdir2/bag.asp?ACCOUNT=86433");
    assert_common_headers(&seen, &backend.host(), remote);
}

#[tokio::test]
async fn relative_notification_url_resolves_against_the_remote_directory() {
    let backend = Backend::start(Answer::default()).await;
    let remote = format!(
        "http://{}/myvdir/file.txt?ACCOUNT=86433&x=a%20b",
        backend.addr
    );
    let fx = upload(b"r", &remote, None);
    handler("myasp.asp", Notification::ByReference)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    let seen = backend.only();
    assert_eq!(seen.target, "/myvdir/myasp.asp?ACCOUNT=86433&x=a%20b");
    assert_common_headers(&seen, &backend.host(), &remote);
}

#[tokio::test]
async fn relative_notification_url_never_follows_the_clients_host() {
    // The remote URL names a backend (its host came from the client); the server's own URL
    // names another. The relative URL follows the server's.
    let clients_pick = Backend::start(Answer::default()).await;
    let servers_own = Backend::start(Answer::default()).await;
    let mut fx = upload(b"r", &clients_pick.url("/vdir/file.bin?x=1"), None);
    fx.upload.server_url = Some(servers_own.url("/vdir/file.bin?x=1"));
    handler("notify", Notification::ByValue)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    assert_eq!(servers_own.only().target, "/vdir/notify?x=1");
    assert!(clients_pick.seen.lock().unwrap().is_empty());

    // Without a server URL a relative notification URL fails (500), contacting nobody.
    fx.upload.server_url = None;
    let err = handler("notify", Notification::ByValue)
        .reply(fx.upload.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, HandlerError::Status { status: 500, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("public_url"), "{err}");
    assert!(clients_pick.seen.lock().unwrap().is_empty());
}

// ---------------------------------------------------------------- by reference

#[tokio::test]
async fn by_reference_names_the_files_and_the_backend_writes_the_reply() {
    let data = pattern(300_000);
    let backend = Backend::start(Answer {
        response_file: Some(b"written by the backend".to_vec()),
        ..Answer::default()
    })
    .await;
    let fx = upload(&data, REMOTE, None);
    let reply = handler(&backend.url("/app/byref"), Notification::ByReference)
        .reply(fx.upload.clone())
        .await
        .unwrap();

    let seen = backend.only();
    assert_common_headers(&seen, &backend.host(), REMOTE);
    assert_eq!(seen.header("content-length"), Some("0"));
    assert!(seen.body.is_empty());
    let request_file = PathBuf::from(seen.header("bits-request-datafile-name").unwrap());
    let response_file = PathBuf::from(seen.header("bits-response-datafile-name").unwrap());
    assert!(request_file.is_absolute() && response_file.is_absolute());
    assert_eq!(request_file, fx.upload.path);
    assert!(seen.request_file.as_deref() == Some(&data[..]));
    assert_eq!(response_file, fx.session_dir().join(RESPONSE_FILE));
    assert_eq!(seen.header("bits-request-dataentity-name"), None);
    assert_eq!(seen.header("bits-response-dataentity-name"), None);

    assert_eq!(reply_file(&reply), response_file);
    assert_eq!(reply_bytes(&reply), b"written by the backend");
}

#[tokio::test]
async fn by_reference_sends_the_data_entity_names_when_configured() {
    let backend = Backend::start(Answer::default()).await;
    let fx = upload(b"e", REMOTE, None);
    let handler = HttpNotifyHandler::new(
        HttpNotifyConfig::new(backend.url("/n"), Notification::ByReference)
            .also_send_data_entity_headers(true),
    )
    .unwrap();
    handler.reply(fx.upload.clone()).await.unwrap();
    let seen = backend.only();
    assert!(seen.header("bits-request-datafile-name").is_some());
    assert_eq!(
        seen.header("bits-request-dataentity-name"),
        seen.header("bits-request-datafile-name")
    );
    assert_eq!(
        seen.header("bits-response-dataentity-name"),
        seen.header("bits-response-datafile-name")
    );
}

#[tokio::test]
async fn by_reference_a_response_body_wins_over_the_file() {
    let backend = Backend::start(Answer {
        body: b"from the body".to_vec(),
        response_file: Some(b"from the file".to_vec()),
        ..Answer::default()
    })
    .await;
    let fx = upload(b"b", REMOTE, None);
    let reply = handler(&backend.url("/n"), Notification::ByReference)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    assert!(is_run_file(
        &reply_file(&reply),
        fx.session_dir(),
        NOTIFICATION_REPLY_FILE
    ));
    assert_eq!(reply_bytes(&reply), b"from the body");
}

#[tokio::test]
async fn by_reference_no_body_and_no_file_is_an_empty_reply_even_with_a_stale_file() {
    let backend = Backend::start(Answer::default()).await;
    let fx = upload(b"s", REMOTE, None);
    // Left by an earlier attempt: must not become this reply.
    std::fs::write(fx.session_dir().join(RESPONSE_FILE), b"stale").unwrap();
    let reply = handler(&backend.url("/n"), Notification::ByReference)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    assert!(matches!(reply.body, ReplyBody::Empty), "{reply:?}");
}

// ---------------------------------------------------------------- response headers

#[tokio::test]
async fn static_response_url_is_the_reply() {
    for mode in [Notification::ByValue, Notification::ByReference] {
        let backend = Backend::start(Answer {
            headers: vec![(
                "BITS-Static-Response-URL",
                "http://cdn.example/replies/shared.bin".into(),
            )],
            body: b"ignored".to_vec(),
            ..Answer::default()
        })
        .await;
        let fx = upload(b"u", REMOTE, None);
        let reply = handler(&backend.url("/n"), mode)
            .reply(fx.upload.clone())
            .await
            .unwrap();
        match &reply.body {
            ReplyBody::StaticUrl(u) => assert_eq!(u, "http://cdn.example/replies/shared.bin"),
            other => panic!("{mode:?}: {other:?}"),
        }
        assert!(!reply.commit_upload);
    }
}

#[tokio::test]
async fn relative_static_response_url_is_a_500() {
    for bad in ["/replies/shared.bin", "shared.bin", "ftp://cdn.example/x"] {
        let backend = Backend::start(Answer {
            headers: vec![("BITS-Static-Response-URL", bad.into())],
            ..Answer::default()
        })
        .await;
        let fx = upload(b"u", REMOTE, None);
        let err = handler(&backend.url("/n"), Notification::ByReference)
            .reply(fx.upload.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(err, HandlerError::Status { status: 500, .. }),
            "{bad}: {err:?}"
        );
    }
}

#[tokio::test]
async fn copy_file_to_destination_commits_the_upload() {
    let backend = Backend::start(Answer {
        headers: vec![("BITS-Copy-File-To-Destination", "1".into())],
        body: b"reply".to_vec(),
        ..Answer::default()
    })
    .await;
    let fx = upload(b"c", REMOTE, None);
    let reply: Reply = handler(&backend.url("/n"), Notification::ByValue)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    assert!(reply.commit_upload);
    assert_eq!(reply_bytes(&reply), b"reply");

    // With a static URL too, and an empty value ("any value").
    let backend = Backend::start(Answer {
        headers: vec![
            ("BITS-Copy-File-To-Destination", String::new()),
            ("BITS-Static-Response-URL", "https://cdn.example/r".into()),
        ],
        ..Answer::default()
    })
    .await;
    let reply = handler(&backend.url("/n"), Notification::ByReference)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    assert!(reply.commit_upload);
    assert!(matches!(reply.body, ReplyBody::StaticUrl(ref u) if u == "https://cdn.example/r"));
}

// ---------------------------------------------------------------- failures

#[tokio::test]
async fn backend_statuses_other_than_200_are_relayed() {
    for code in [403, 409, 500, 503, 413, 201, 404] {
        let backend = Backend::start(Answer {
            body: b"no".to_vec(),
            ..status(code)
        })
        .await;
        let fx = upload(b"f", REMOTE, None);
        let err = handler(&backend.url("/n"), Notification::ByValue)
            .reply(fx.upload.clone())
            .await
            .unwrap_err();
        match err {
            HandlerError::Status { status, .. } => assert_eq!(status, code),
            other => panic!("{code}: {other:?}"),
        }
        assert_eq!(backend.seen.lock().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn a_slow_answer_past_the_timeout_is_unreachable() {
    let backend = Backend::start(Answer {
        delay: Duration::from_secs(5),
        ..Answer::default()
    })
    .await;
    let fx = upload(b"slow", REMOTE, None);
    let started = Instant::now();
    let err = with_timeout(
        &backend.url("/n"),
        Notification::ByValue,
        Duration::from_millis(300),
    )
    .reply(fx.upload.clone())
    .await
    .unwrap_err();
    assert!(matches!(err, HandlerError::Unreachable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(backend.only().body, b"slow");
}

#[tokio::test]
async fn connection_refused_is_unreachable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let fx = upload(b"r", REMOTE, None);
    let err = handler(&format!("http://{addr}/n"), Notification::ByValue)
        .reply(fx.upload.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, HandlerError::Unreachable(_)), "{err:?}");
}

/// A raw TCP "backend" for one connection: reads the request head, writes `answer`, then
/// waits `hold` and closes the connection.
async fn raw_backend(answer: &'static [u8], hold: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = stream.write_all(answer).await;
        tokio::time::sleep(hold).await;
    });
    addr
}

#[tokio::test]
async fn a_dropped_connection_is_unreachable() {
    let addr = raw_backend(b"", Duration::ZERO).await;
    let fx = upload(b"d", REMOTE, None);
    let err = handler(&format!("http://{addr}/n"), Notification::ByReference)
        .reply(fx.upload.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, HandlerError::Unreachable(_)), "{err:?}");
}

#[tokio::test]
async fn a_response_body_cut_short_is_unreachable() {
    let addr = raw_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this",
        Duration::ZERO,
    )
    .await;
    let fx = upload(b"d", REMOTE, None);
    let err = handler(&format!("http://{addr}/n"), Notification::ByReference)
        .reply(fx.upload.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, HandlerError::Unreachable(_)), "{err:?}");
}

#[tokio::test]
async fn a_stalled_response_body_is_unreachable() {
    let addr = raw_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome",
        Duration::from_secs(5),
    )
    .await;
    let fx = upload(b"d", REMOTE, None);
    let started = Instant::now();
    let err = with_timeout(
        &format!("http://{addr}/n"),
        Notification::ByReference,
        Duration::from_millis(300),
    )
    .reply(fx.upload.clone())
    .await
    .unwrap_err();
    assert!(matches!(err, HandlerError::Unreachable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_chunked_response_body_is_the_reply() {
    let addr = raw_backend(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        Duration::ZERO,
    )
    .await;
    let fx = upload(b"d", REMOTE, None);
    let reply = handler(&format!("http://{addr}/n"), Notification::ByReference)
        .reply(fx.upload.clone())
        .await
        .unwrap();
    assert_eq!(reply_bytes(&reply), b"hello world");
}

#[tokio::test]
async fn https_notification_urls_are_refused_at_construction() {
    let err = HttpNotifyHandler::new(HttpNotifyConfig::new(
        "https://backend/app",
        Notification::ByValue,
    ))
    .unwrap_err();
    assert!(
        matches!(
            err,
            bitsd_reply_handlers::HandlerConfigError::HttpsNotification(_)
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_upload_file_shorter_than_its_length_is_a_500_not_unreachable() {
    let backend = Backend::start(Answer::default()).await;
    let fx = upload(&pattern(100_000), REMOTE, None);
    let mut short = fx.upload.clone();
    short.len += 10;
    let err = handler(&backend.url("/n"), Notification::ByValue)
        .reply(short)
        .await
        .unwrap_err();
    assert!(
        matches!(err, HandlerError::Status { status: 500, .. }),
        "{err:?}"
    );
}
