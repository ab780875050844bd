//! The backend: a hyper 1 server playing the IIS server application.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// One notification as the backend received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// Path and query of the request target.
    pub target: String,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// What the backend does with a notification.
pub enum Answer {
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
    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        Answer::Reply {
            status: 200,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn status(status: u16) -> Self {
        Answer::Reply {
            status,
            headers: Vec::new(),
            body: format!("backend says {status}\n").into_bytes(),
        }
    }

    pub fn with_header(self, name: &'static str, value: impl Into<String>) -> Self {
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
pub struct Backend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub accept: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(script: impl Fn(&Seen) -> Answer + Send + Sync + 'static) -> Self {
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
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    /// How many notifications arrived.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The notifications, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
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
