//! TLS on the BITS listener, with a self-signed certificate made in the test.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bitsd_tests::{pattern, TestServer, PROTOCOL};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

#[tokio::test]
async fn upload_reply_over_tls() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let server = TestServer::start_with(|cfg| {
        cfg.tls = Some(bitsd::TlsFiles {
            cert: cert_path.clone(),
            key: key_path.clone(),
        });
    })
    .await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();

    let data = pattern(3000, 8);
    let req = format!(
        "BITS_POST /echo/t.bin HTTP/1.1\r\nHost: localhost\r\nBITS-Packet-Type: Create-Session\r\n\
         BITS-Supported-Protocols: {PROTOCOL}\r\nContent-Length: 0\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let sid = header(&head, "bits-session-id");
    let req = format!(
        "BITS_POST /echo/t.bin HTTP/1.1\r\nHost: localhost\r\nBITS-Packet-Type: Fragment\r\nBITS-Session-Id: {sid}\r\n\
         Content-Range: bytes 0-2999/3000\r\nContent-Length: 3000\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    tls.write_all(&data).await.unwrap();
    let head = read_head(&mut tls).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let url = header(&head, "bits-reply-url");
    assert!(
        url.starts_with("https://localhost/echo/BITS-Sessions/"),
        "reply URL keeps the scheme: {url}"
    );

    // A plain-text client gets nowhere.
    let mut plain = bitsd_tests::RawClient::connect(server.addr()).await;
    plain.write(b"BITS_POST /echo/t.bin HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Ping\r\nContent-Length: 0\r\n\r\n").await;
    assert!(plain.is_closed().await);
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        buf.push(byte[0]);
    }
    String::from_utf8(buf).unwrap()
}

fn header(head: &str, name: &str) -> String {
    head.lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap()
}
