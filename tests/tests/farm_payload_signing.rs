//! `[object_store] sign_payloads`: what the node puts in `x-amz-content-sha256` of a write.
//! Over plain HTTP a write's body is signed by default (its SHA-256 in the signature);
//! `sign_payloads = false` sends `UNSIGNED-PAYLOAD` (the default over HTTPS), which saves the
//! node a pass over every byte it writes. The first test reads the headers the node's S3
//! client really sends, on a TCP listener standing in for the store; the second shows a real
//! Garage taking unsigned PUTs and multipart parts byte-exact. Skips without Garage.
#![allow(clippy::unwrap_used)]

use bitsd_storage::shared::objects::{ObjectStoreConfig, Objects};
use bitsd_tests::garage::Garage;
use bitsd_tests::shared_backend::read_object;
use bitsd_tests::{pattern, sha256_hex};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Answers every request on `listener` with 200 and an ETag, and sends each request's
/// (method, `x-amz-content-sha256`) on `seen`.
async fn capture(
    listener: tokio::net::TcpListener,
    seen: tokio::sync::mpsc::UnboundedSender<(String, String)>,
) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            return;
        };
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut conn = BufReader::new(socket);
            loop {
                let mut line = String::new();
                if conn.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let method = line.split(' ').next().unwrap_or("").to_string();
                let (mut sha, mut len) = (String::new(), 0usize);
                loop {
                    let mut h = String::new();
                    if conn.read_line(&mut h).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    let (name, value) = h.split_once(':').unwrap_or((h, ""));
                    match name.to_ascii_lowercase().as_str() {
                        "x-amz-content-sha256" => sha = value.trim().to_string(),
                        "content-length" => len = value.trim().parse().unwrap_or(0),
                        _ => {}
                    }
                }
                let mut body = vec![0; len];
                if conn.read_exact(&mut body).await.is_err() {
                    return;
                }
                let _ = seen.send((method, sha));
                let answer = "HTTP/1.1 200 OK\r\nETag: \"e\"\r\nContent-Length: 0\r\n\r\n";
                if conn.get_mut().write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

fn config(endpoint: String, sign_payloads: Option<bool>) -> ObjectStoreConfig {
    ObjectStoreConfig {
        bucket: "b".into(),
        prefix: "p".into(),
        endpoint: Some(endpoint),
        region: Some("garage".into()),
        access_key_id: Some("GK0123456789abcdef01234567".into()),
        secret_access_key: Some("secret".into()),
        sign_payloads,
        ..ObjectStoreConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_over_http_are_signed_unless_sign_payloads_is_false() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(capture(listener, tx));
    let body = pattern(3000, 7);
    let hash = sha256_hex(&body);
    for (setting, expected) in [
        (None, hash.as_str()),
        (Some(true), hash.as_str()),
        (Some(false), "UNSIGNED-PAYLOAD"),
    ] {
        let objects = Objects::new(&config(endpoint.clone(), setting)).unwrap();
        let mut writer = objects.writer(objects.file_key("x.bin"));
        writer.write(&body).await.unwrap();
        writer.finish().await.unwrap();
        let (method, sha) = rx.recv().await.unwrap();
        assert_eq!(method, "PUT", "sign_payloads = {setting:?}");
        assert_eq!(sha, expected, "sign_payloads = {setting:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_takes_unsigned_puts_and_parts_byte_exact() {
    let Some(garage) = Garage::start() else {
        return;
    };
    let config = ObjectStoreConfig {
        part_size: Some(5 << 20),
        sign_payloads: Some(false),
        ..garage.object_store_config("unsigned")
    };
    let objects = Objects::new(&config).unwrap();
    // One PUT, and a multipart upload of two 5 MiB parts and a last one of 1 MiB + 1.
    for (name, len) in [("small.bin", 40_000usize), ("large.bin", (11 << 20) + 1)] {
        let data = pattern(len, len as u64);
        let key = objects.file_key(name);
        let mut writer = objects.writer(key.clone());
        for chunk in data.chunks(700_000) {
            writer.write(chunk).await.unwrap();
        }
        let stored = writer.finish().await.unwrap();
        assert_eq!(stored.len, len as u64, "{name}");
        assert_eq!(read_object(&objects, &key).await, data, "{name}");
    }
}
