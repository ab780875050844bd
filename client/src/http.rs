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

/// TLS settings of a client: the web PKI roots plus any extra roots, or no verification.
pub(crate) fn tls_connector(
    extra_roots: &[rustls_pki_types::CertificateDer<'static>],
    insecure: bool,
) -> Option<tokio_rustls::TlsConnector> {
    use tokio_rustls::rustls;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .ok()?;
    let config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(NoVerification(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in extra_roots {
            if let Err(e) = roots.add(cert.clone()) {
                tracing::warn!(error = %e, "ignoring an unusable root certificate");
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Some(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        config,
    )))
}

/// `--insecure`: accept any certificate (signatures are still checked for the handshake).
#[derive(Debug)]
struct NoVerification(std::sync::Arc<tokio_rustls::rustls::crypto::CryptoProvider>);

impl tokio_rustls::rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<tokio_rustls::rustls::client::danger::ServerCertVerified, tokio_rustls::rustls::Error>
    {
        Ok(tokio_rustls::rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        tokio_rustls::rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        tokio_rustls::rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<tokio_rustls::rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
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
                    .map_err(|e| {
                        ClientError::transport(request, &url, format!("TLS handshake failed: {e}"))
                    })?;
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
