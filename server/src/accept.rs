//! Accepting connections: the TLS handshake, the per-listener connection limit, header and
//! send timeouts, and graceful shutdown of each connection.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::ClientAddr;
use crate::conn_send::{PacedIo, SendLimits, WithExtension};
use crate::server::{ServerError, TlsFiles};

pub(crate) fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, ServerError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ServerError::Tls(format!("{}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(ServerError::Tls(format!(
            "{}: no certificate",
            files.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| ServerError::Tls(format!("{}: {e}", files.key.display())))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// How one listener treats its connections.
#[derive(Clone)]
pub(crate) struct ListenerOptions {
    pub(crate) header_timeout: Duration,
    pub(crate) grace: Duration,
    pub(crate) max_connections: usize,
    pub(crate) send_limits: SendLimits,
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
}

pub(crate) async fn accept_loop<S, F, RB>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    options: ListenerOptions,
    make_service: F,
) where
    F: Fn() -> S,
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<RB>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    RB: http_body::Body + Send + 'static,
    RB::Data: Send,
    RB::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(options.max_connections));
    loop {
        // Wait for a free connection slot before accepting: a flood queues in the kernel
        // backlog instead of exhausting memory or file descriptors.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let mut http = http1::Builder::new();
                http.timer(TokioTimer::new())
                    .header_read_timeout(options.header_timeout)
                    .max_buf_size(64 * 1024);
                let service = WithExtension::new(make_service(), ClientAddr(peer));
                let send_limits = options.send_limits;
                let watcher = graceful.watcher();
                let tls = options.tls.clone();
                let handshake_timeout = options.header_timeout;
                tokio::spawn(async move {
                    let _permit = permit;
                    let result = match tls {
                        None => {
                            let (io, conn) = PacedIo::new(stream, send_limits);
                            let service = WithExtension::new(service, conn);
                            watcher.watch(http.serve_connection(TokioIo::new(io), service)).await
                        }
                        Some(acceptor) => {
                            use crate::tls_log::{log_tls_failure, looks_like_plain_http, TlsFailure};
                            let handshake = async {
                                // Peek at the first bytes: plain HTTP gets its own log line, and
                                // a connection closed before sending anything (a TCP probe) none.
                                let mut first = [0u8; 4];
                                let n = stream.peek(&mut first).await.unwrap_or(0);
                                if n == 0 {
                                    return Err((TlsFailure::Closed, None));
                                }
                                // Plain HTTP still goes to the TLS acceptor: its alert is
                                // what tells the client's HTTP parser this is no HTTP port.
                                let failure = if looks_like_plain_http(&first[..n]) {
                                    TlsFailure::PlainHttp
                                } else {
                                    TlsFailure::Handshake
                                };
                                acceptor
                                    .accept(stream)
                                    .await
                                    .map_err(|e| (failure, Some(e.to_string())))
                            };
                            match tokio::time::timeout(handshake_timeout, handshake).await {
                                Ok(Ok(tls_stream)) => {
                                    let (io, conn) = PacedIo::new(tls_stream, send_limits);
                                    let service = WithExtension::new(service, conn);
                                    watcher.watch(http.serve_connection(TokioIo::new(io), service)).await
                                }
                                Ok(Err((kind, error))) => {
                                    log_tls_failure(peer, kind, error.as_deref());
                                    return;
                                }
                                Err(_) => {
                                    log_tls_failure(peer, TlsFailure::Timeout, None);
                                    return;
                                }
                            }
                        }
                    };
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(options.grace) => tracing::warn!("shutdown deadline passed with requests in flight"),
    }
}
