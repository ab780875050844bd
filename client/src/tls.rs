//! TLS settings of the client: the web PKI roots plus `--ca-file` certificates (a server's own
//! self-signed certificate pinned as it is), `--insecure`, and handshake failures explained.

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
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider.clone(),
        )
        .build()
        .ok()?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(PinnedOrWebPki {
                webpki,
                pinned: extra_roots.to_vec(),
            }))
            .with_no_client_auth()
    };
    Some(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        config,
    )))
}

/// The web PKI check, except that a server certificate given as a trusted certificate itself
/// (`--ca-file` holding the server's self-signed certificate) is accepted as it is: the user
/// pinned exactly these bytes. The handshake signatures are still checked.
#[derive(Debug)]
struct PinnedOrWebPki {
    webpki: std::sync::Arc<tokio_rustls::rustls::client::WebPkiServerVerifier>,
    pinned: Vec<rustls_pki_types::CertificateDer<'static>>,
}

impl tokio_rustls::rustls::client::danger::ServerCertVerifier for PinnedOrWebPki {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<tokio_rustls::rustls::client::danger::ServerCertVerified, tokio_rustls::rustls::Error>
    {
        if self
            .pinned
            .iter()
            .any(|p| p.as_ref() == end_entity.as_ref())
        {
            return Ok(tokio_rustls::rustls::client::danger::ServerCertVerified::assertion());
        }
        self.webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
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
        self.webpki.verify_tls12_signature(message, cert, dss)
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
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<tokio_rustls::rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// A TLS handshake failure that no retry can fix, as a message that says what to do; `None`
/// for failures that may be transient (a reset connection).
pub(crate) fn fatal_tls_failure(e: &std::io::Error, host: &str) -> Option<String> {
    use tokio_rustls::rustls::{CertificateError, Error};
    let inner = e.get_ref()?.downcast_ref::<Error>()?;
    Some(match inner {
        Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "the server's certificate is not signed by a CA \
                this client trusts; pass --ca-file <PEM file> with the CA certificate (or the \
                server's own certificate if it is self-signed), or --insecure for a test server"
                .to_owned(),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "the server's certificate is not valid for the host name {host:?}; use the \
                     name the certificate was issued for"
                )
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server's certificate has expired".to_owned()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet (check the clocks)".to_owned()
            }
            other if format!("{other:?}").contains("CaUsedAsEndEntity") => {
                "the server's certificate is self-signed (a CA certificate used as the server's \
                 certificate); to trust it, pass --ca-file <that certificate as PEM>, or \
                 --insecure for a test server"
                    .to_owned()
            }
            other => format!("the server's certificate was rejected ({other:?})"),
        },
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => {
            "the server does not speak TLS on this port; if it is a plain HTTP server, use an \
             http:// URL"
                .to_owned()
        }
        Error::AlertReceived(alert) => format!("the server refused the TLS handshake ({alert:?})"),
        Error::PeerIncompatible(why) => format!("no TLS version or cipher in common ({why:?})"),
        _ => return None,
    })
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
