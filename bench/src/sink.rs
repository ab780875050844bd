//! The HTTP baseline: a minimal hyper 1.x server on the same runtime as bitsd.
//!
//! Every `BITS_POST` body is drained and discarded and answered with a bare BITS Ack (a fixed
//! session id; the final fragment of an upload gets a `BITS-Reply-URL` pointing at
//! `/reply/<len>`), so the same client code drives it as drives bitsd. `GET /file` streams the
//! configured file from disk (256 KiB reads); `GET /reply/<n>` answers `n` bytes from memory.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The sink's response body.
type SinkBody = BoxBody<Bytes, std::io::Error>;

/// Read size when the sink streams a file.
const FILE_CHUNK: usize = 256 * 1024;

/// The session id the sink hands out.
const SINK_SESSION: &str = "{00000000-0000-4000-8000-000000000000}";

struct State {
    file: Option<PathBuf>,
    reply: Bytes,
}

/// A running sink.
pub struct Sink {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Sink {
    /// Starts a sink on `127.0.0.1:0`; `file` is what `GET /file` serves.
    pub async fn start(file: Option<PathBuf>) -> std::io::Result<Sink> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            file,
            reply: Bytes::from(vec![0x5a; 64 * 1024]),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(req, state.clone()));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Sink { addr, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting (open connections end when the client closes them).
    pub fn stop(self) {
        self.task.abort();
    }
}

fn empty() -> SinkBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn full(b: Bytes) -> SinkBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

fn status(code: StatusCode) -> Response<SinkBody> {
    let mut res = Response::new(empty());
    *res.status_mut() = code;
    res
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<SinkBody>, Infallible> {
    if req.method() == Method::GET {
        return Ok(get(req.uri().path(), &state).await);
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let packet = header("bits-packet-type").unwrap_or_default();
    // "bytes a-b/total": the end and the total, for the final Ack.
    let range = header("content-range").and_then(|r| {
        let (span, total) = r.strip_prefix("bytes ")?.split_once('/')?;
        let (_, end) = span.split_once('-')?;
        Some((end.parse::<u64>().ok()?, total.parse::<u64>().ok()?))
    });
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return Ok(status(StatusCode::BAD_REQUEST));
        }
    }
    let mut res = Response::builder()
        .status(StatusCode::OK)
        .header("BITS-Packet-Type", "Ack")
        .header("BITS-Session-Id", SINK_SESSION)
        .header("Content-Length", "0");
    if packet.eq_ignore_ascii_case("create-session") {
        res = res.header("BITS-Protocol", crate::client::PROTOCOL);
    }
    if let Some((end, total)) = range {
        res = res.header("BITS-Received-Content-Range", (end + 1).to_string());
        if end + 1 == total {
            res = res.header("BITS-Reply-URL", format!("http://127.0.0.1/reply/{total}"));
        }
    }
    Ok(res
        .body(empty())
        .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR)))
}

async fn get(path: &str, state: &State) -> Response<SinkBody> {
    let chunk = match path {
        "/file" => Some(FILE_CHUNK),
        "/file-64k" => Some(64 * 1024),
        _ => None,
    };
    if let Some(chunk) = chunk {
        let Some(p) = &state.file else {
            return status(StatusCode::NOT_FOUND);
        };
        let Ok(file) = tokio::fs::File::open(p).await else {
            return status(StatusCode::NOT_FOUND);
        };
        let Ok(meta) = file.metadata().await else {
            return status(StatusCode::INTERNAL_SERVER_ERROR);
        };
        let stream = tokio_util::io::ReaderStream::with_capacity(file, chunk)
            .map(|chunk| chunk.map(Frame::data));
        return Response::builder()
            .header("Content-Length", meta.len().to_string())
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR));
    }
    if let Some(n) = path
        .strip_prefix("/reply/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        if n <= state.reply.len() {
            return Response::builder()
                .header("Content-Length", n.to_string())
                .body(full(state.reply.slice(..n)))
                .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR));
        }
    }
    status(StatusCode::NOT_FOUND)
}
