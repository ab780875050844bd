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

/// How much of an error response's body may serve as its explanation.
const MAX_ERROR_TEXT: usize = 512;

/// The explanation a server gave with an error response (a short text body), kept in the
/// response's extensions by [`Http::send_ack`].
#[derive(Clone, Debug)]
pub(crate) struct ErrorText(pub(crate) String);

/// A short, printable explanation from an error response: bitsd's `X-Bitsd-Error-Message`
/// header when there is one, else a `text/plain` body (or one without a type) that is valid
/// UTF-8; on one line, at most 300 characters.
fn error_text(headers: &HeaderMap, body: &[u8]) -> Option<String> {
    if let Some(text) = headers
        .get(&bitsd_protocol::header::BITSD_ERROR_MESSAGE)
        .and_then(|v| v.to_str().ok())
        .map(one_line)
        .filter(|t| !t.is_empty())
    {
        return Some(text);
    }
    let ty = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/plain")
        .to_ascii_lowercase();
    if !ty.starts_with("text/plain") {
        return None;
    }
    let text = one_line(std::str::from_utf8(body).ok()?);
    (!text.is_empty()).then_some(text)
}

/// `text` on one line without control characters, at most 300 characters.
fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .take(300)
        .collect()
}

struct Conn {
    key: String,
    sender: SendRequest<Full<Bytes>>,
}

/// The transport of one job: at most one open connection, one request at a time.
pub(crate) struct Http {
    conn: Option<Conn>,
    tls: Option<tokio_rustls::TlsConnector>,
    connect_timeout: Duration,
    request_timeout: Duration,
    auth: Auth,
    user_agent: HeaderValue,
}

/// When `Authorization` is sent (§ Windows BITS behaviour: never pre-emptively).
///
/// The credentials belong to the origin (scheme, host, port) the user named, plus any `https`
/// Host-Id node that origin redirected the job to. They are sent only after that origin has
/// answered a request with 401, and never to another origin (a reply URL on a CDN, a plain
/// `http` Host-Id node, a redirect target).
#[derive(Default)]
struct Auth {
    /// `Basic ...`.
    value: Option<HeaderValue>,
    /// Authority keys ([`Target::authority_key`]) that may receive the credentials.
    origins: Vec<String>,
    /// Authority keys that have challenged with 401: from then on the credentials go with
    /// every request to them.
    challenged: Vec<String>,
}

impl Auth {
    fn may_send(&self, target: &Target) -> bool {
        self.value.is_some() && self.origins.contains(&target.authority_key())
    }

    fn header_for(&self, target: &Target) -> Option<&HeaderValue> {
        let key = target.authority_key();
        if self.may_send(target) && self.challenged.contains(&key) {
            self.value.as_ref()
        } else {
            None
        }
    }
}

/// HTTP/1.1 over any connection; the connection task runs on its own.
async fn handshake<T>(io: T) -> Result<SendRequest<Full<Bytes>>, hyper::Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "client connection ended with an error");
        }
    });
    Ok(sender)
}

impl Http {
    pub(crate) fn new(
        tls: Option<tokio_rustls::TlsConnector>,
        connect_timeout: Duration,
        request_timeout: Duration,
        authorization: Option<HeaderValue>,
        user_agent: HeaderValue,
    ) -> Self {
        Http {
            conn: None,
            tls,
            connect_timeout,
            request_timeout,
            auth: Auth {
                value: authorization,
                ..Auth::default()
            },
            user_agent,
        }
    }

    /// The origin the user named: the only one that receives the credentials (after a 401).
    pub(crate) fn set_origin(&mut self, target: &Target) {
        self.auth.origins = vec![target.authority_key()];
        self.auth.challenged.clear();
    }

    /// A Host-Id node the origin redirected the job to: it may receive the credentials too, if
    /// the connection to it is `https` (never in clear text to a host the user did not name).
    pub(crate) fn trust_redirect(&mut self, target: &Target) {
        if target.is_tls() {
            let key = target.authority_key();
            if !self.auth.origins.contains(&key) {
                self.auth.origins.push(key);
            }
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
        let connect = async {
            let addrs: Vec<_> = tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| unresolved(request, host, &e))?
                .collect();
            TcpStream::connect(&addrs[..])
                .await
                .map_err(|e| format!("connect failed: {e}"))
        };
        let stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| {
                ClientError::transport(
                    request,
                    &url,
                    format!("connect timed out after {:?}", self.connect_timeout),
                )
            })?
            .map_err(|message| ClientError::transport(request, &url, message))?;
        let _ = stream.set_nodelay(true);
        let sender = if target.is_tls() {
            let connector = self
                .tls
                .as_ref()
                .ok_or_else(|| ClientError::transport(request, &url, "TLS is unavailable"))?;
            let name = rustls_pki_types::ServerName::try_from(target.tls_name().to_owned())
                .map_err(|e| ClientError::transport(request, &url, format!("TLS name: {e}")))?;
            let stream =
                tokio::time::timeout(self.connect_timeout, connector.connect(name, stream))
                    .await
                    .map_err(|_| ClientError::transport(request, &url, "TLS handshake timed out"))?
                    .map_err(
                        |e| match crate::tls::fatal_tls_failure(&e, target.tls_name()) {
                            Some(why) => ClientError::connection(
                                request,
                                &url,
                                format!("TLS handshake failed: {why}"),
                            ),
                            None => ClientError::transport(
                                request,
                                &url,
                                format!("TLS handshake failed: {e}"),
                            ),
                        },
                    )?;
            handshake(TokioIo::new(stream)).await
        } else {
            handshake(TokioIo::new(stream)).await
        }
        .map_err(|e| ClientError::transport(request, &url, e))?;
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
        let sent_auth = self.auth.header_for(target).is_some();
        let resp = self
            .send_once(
                request,
                method.clone(),
                target,
                headers.clone(),
                body.clone(),
            )
            .await?;
        if resp.status() != http::StatusCode::UNAUTHORIZED
            || sent_auth
            || !self.auth.may_send(target)
        {
            return Ok(resp);
        }
        // The origin asks for credentials: send them, this time and from now on.
        self.auth.challenged.push(target.authority_key());
        self.discard(resp).await;
        self.send_once(request, method, target, headers, body).await
    }

    /// Reads and drops a response body (up to [`MAX_DISCARD`]) so the connection can be reused.
    async fn discard(&mut self, resp: Response<Incoming>) {
        let mut body = resp.into_body();
        let drained = tokio::time::timeout(self.request_timeout, async {
            let mut seen = 0usize;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        seen += f.data_ref().map_or(0, |d| d.len());
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
        if !matches!(drained, Ok(true)) {
            self.conn = None;
        }
    }

    async fn send_once(
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
            if let Some(auth) = self.auth.header_for(target) {
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
                        let e = e.into_error();
                        if e.is_parse() {
                            let hint = if target.is_tls() {
                                "the server's answer is not HTTP"
                            } else {
                                "the server's answer is not HTTP; if it is a TLS port, use an \
                                 https:// URL"
                            };
                            return Err(ClientError::connection(
                                request,
                                &url,
                                format!("{hint} ({e})"),
                            ));
                        }
                        return Err(ClientError::transport(request, &url, e));
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
        let keep_text = !parts.status.is_success();
        let mut text = Vec::new();
        let drained = tokio::time::timeout(timeout, async {
            let mut seen = 0usize;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            seen += d.len();
                            if keep_text && text.len() < MAX_ERROR_TEXT {
                                let room = MAX_ERROR_TEXT - text.len();
                                text.extend_from_slice(&d[..d.len().min(room)]);
                            }
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
        let mut parts = parts;
        if let Some(t) = error_text(&parts.headers, &text) {
            parts.extensions.insert(ErrorText(t));
        }
        Ok(parts)
    }
}

/// What to say when `host` does not resolve. Still transient, as for Windows (a resolver can
/// fail for a while); for a reply URL, which the server made, it also says where a wrong
/// host usually comes from.
fn unresolved(request: Request, host: &str, e: &std::io::Error) -> String {
    let mut message = format!("cannot resolve the host name {host:?} ({e})");
    if matches!(request, Request::ReplyHead | Request::ReplyGet) {
        message.push_str(
            "; the server gave this reply URL: a server behind a load balancer must be passed \
             the client's Host header (nginx: proxy_set_header Host $http_host) or be told its \
             public URL (bitsd: public_url)",
        );
    } else {
        message.push_str("; check the host name in the URL");
    }
    message
}
