//! One HTTP/1.1 connection at a time, reused while it stays open (hyper 1 `client::conn`).

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, HOST, USER_AGENT};
use http::{Method, Request as HttpRequest, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::{ClientError, Request};
use crate::target::Target;

/// How much of an Ack's (or error page's) body is read before the connection is dropped instead.
const MAX_DISCARD: usize = 1024 * 1024;

struct Conn {
    key: String,
    sender: SendRequest<Full<Bytes>>,
}

/// The transport of one job: at most one open connection, one request at a time.
pub(crate) struct Http {
    conn: Option<Conn>,
    connect_timeout: Duration,
    request_timeout: Duration,
    authorization: Option<HeaderValue>,
    user_agent: HeaderValue,
}

impl Http {
    pub(crate) fn new(
        connect_timeout: Duration,
        request_timeout: Duration,
        authorization: Option<HeaderValue>,
        user_agent: HeaderValue,
    ) -> Self {
        Http {
            conn: None,
            connect_timeout,
            request_timeout,
            authorization,
            user_agent,
        }
    }

    /// How long a response (or one frame of a body) may take.
    pub(crate) fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Forgets the open connection (after an error, or when a body was not read to its end).
    pub(crate) fn reset(&mut self) {
        self.conn = None;
    }

    async fn connect(&self, target: &Target, request: Request) -> Result<Conn, ClientError> {
        let url = target.to_string();
        let (host, port) = target.connect_addr();
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect((host, port)))
            .await
            .map_err(|_| {
                ClientError::transport(
                    request,
                    &url,
                    format!("connect timed out after {:?}", self.connect_timeout),
                )
            })?
            .map_err(|e| ClientError::transport(request, &url, format!("connect failed: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::transport(request, &url, e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        });
        Ok(Conn {
            key: target.authority_key(),
            sender,
        })
    }

    /// Sends one request and returns the response head with its body unread. The connection is
    /// kept for reuse; the caller reads the body to its end or calls [`Http::reset`].
    pub(crate) async fn send(
        &mut self,
        request: Request,
        method: Method,
        target: &Target,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response<Incoming>, ClientError> {
        let url = target.to_string();
        let timeout = self.request_timeout;
        match tokio::time::timeout(
            timeout,
            self.send_inner(request, method, target, headers, body),
        )
        .await
        {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                Err(ClientError::timeout(request, &url, timeout))
            }
        }
    }

    async fn send_inner(
        &mut self,
        request: Request,
        method: Method,
        target: &Target,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response<Incoming>, ClientError> {
        let url = target.to_string();
        let mut req = HttpRequest::builder()
            .method(method)
            .uri(target.path())
            .body(Full::new(body.clone()))
            .map_err(|e| ClientError::InvalidUrl {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        {
            let h = req.headers_mut();
            h.insert(
                HOST,
                HeaderValue::from_str(&target.host_header()).map_err(|e| {
                    ClientError::InvalidUrl {
                        url: url.clone(),
                        reason: e.to_string(),
                    }
                })?,
            );
            h.insert(USER_AGENT, self.user_agent.clone());
            if let Some(auth) = &self.authorization {
                h.insert(http::header::AUTHORIZATION, auth.clone());
            }
            h.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
            for (name, value) in headers.iter() {
                h.insert(name.clone(), value.clone());
            }
        }
        let key = target.authority_key();
        // A kept connection may have been closed by the server meanwhile: if the request could
        // not even be handed to it, it was never sent, so try once more on a fresh connection.
        for fresh in [false, true] {
            let mut conn = match self.conn.take() {
                Some(c) if !fresh && c.key == key && !c.sender.is_closed() => c,
                _ => self.connect(target, request).await?,
            };
            if conn.sender.ready().await.is_err() {
                if fresh {
                    return Err(ClientError::transport(
                        request,
                        &url,
                        "connection closed before the request was sent",
                    ));
                }
                continue;
            }
            match conn.sender.try_send_request(req).await {
                Ok(resp) => {
                    self.conn = Some(conn);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => {
                        req = unsent;
                        continue;
                    }
                    _ => {
                        return Err(ClientError::transport(request, &url, e.into_error()));
                    }
                },
            }
        }
        Err(ClientError::transport(
            request,
            &url,
            "connection closed before the request was sent",
        ))
    }

    /// Sends a request whose response body does not matter (Acks): reads and drops the body,
    /// returning the head.
    pub(crate) async fn send_ack(
        &mut self,
        request: Request,
        method: Method,
        target: &Target,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<http::response::Parts, ClientError> {
        let resp = self.send(request, method, target, headers, body).await?;
        let (parts, mut body) = resp.into_parts();
        let url = target.to_string();
        let timeout = self.request_timeout;
        let drained = tokio::time::timeout(timeout, async {
            let mut seen = 0usize;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            seen += d.len();
                        }
                        if seen > MAX_DISCARD {
                            return false;
                        }
                    }
                    Err(_) => return false,
                }
            }
            true
        })
        .await;
        match drained {
            Ok(true) => {}
            Ok(false) => self.conn = None,
            Err(_) => {
                self.conn = None;
                return Err(ClientError::timeout(request, &url, timeout));
            }
        }
        Ok(parts)
    }
}
