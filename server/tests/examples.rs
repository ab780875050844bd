//! The examples run: `axum_nested` serves an axum app with BITS nested under `/bits`, driven
//! here by the BITS client over TCP.
#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::path::PathBuf;

fn example(name: &str) -> PathBuf {
    // target/<profile>/deps/<this test> → target/<profile>/examples/<name>
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples")
        .join(name)
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn axum_nested_example_serves_bits_under_a_prefix() {
    let bin = example("axum_nested");
    assert!(
        bin.exists(),
        "cargo test builds the examples: {}",
        bin.display()
    );
    let data = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(bin)
        .arg("127.0.0.1:0")
        .arg(data.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let _guard = Child(child);
    let addr: std::net::SocketAddr = stdout
        .lines()
        .map(Result::unwrap)
        .find_map(|l| {
            l.strip_prefix("listening on http://")
                .map(|r| r.trim_end_matches('/').parse().unwrap())
        })
        .unwrap();

    // The host app's own route.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    raw.read_to_string(&mut text).await.unwrap();
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("hello\n"),
        "{text}"
    );

    // BITS through the nested service, with the real client.
    let file = data.path().join("in.bin");
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&file, &payload).unwrap();
    let uploader = bitsd_client::BitsUploader::builder()
        .fragment_size(64 * 1024)
        .build();
    let outcome = uploader
        .upload_reply(
            &format!("http://{addr}/bits/echo/in.bin"),
            &file,
            bitsd_client::ReplyDestination::Memory,
        )
        .await
        .unwrap();
    let reply = outcome.reply.unwrap();
    assert!(
        reply.url.contains("/bits/echo/BITS-Sessions/"),
        "reply URL keeps the prefix: {}",
        reply.url
    );
    assert_eq!(reply.bytes.unwrap().as_ref(), payload.as_slice());
    uploader
        .upload(&format!("http://{addr}/bits/upload/dir/out.bin"), &file)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(data.path().join("files/dir/out.bin")).unwrap(),
        payload
    );
}
