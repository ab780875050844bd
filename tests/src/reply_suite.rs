//! The reply download (§10) and reply progress, as checks that run against any
//! [`Target`]: one local server (`tests/reply_download.rs`) or a farm behind a load balancer
//! (`tests/farm_examples.rs`).

use std::time::Duration;

use crate::examples::Target;
use crate::{url_path, RawClient};

/// Uploads `data` to the echo route in 4096-byte fragments; the session id and the reply
/// URL's path.
pub async fn finished_echo(t: &dyn Target, data: &[u8]) -> (String, String) {
    let mut c = RawClient::connect(t.addr()).await;
    let (sid, fin) = c.upload("/echo/report.bin", data, 4096).await;
    let url = fin
        .header("bits-reply-url")
        .expect("final Ack carries BITS-Reply-URL")
        .to_owned();
    (sid, url_path(&url))
}

/// `GET` on the target's admin listener; the status and the parsed JSON body.
pub async fn admin_get(t: &dyn Target, path: &str) -> (u16, serde_json::Value) {
    let mut c = RawClient::connect(t.admin_addr()).await;
    let res = c
        .send(&format!("GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").into_bytes())
        .await;
    let json = serde_json::from_slice(&res.body).unwrap_or(serde_json::Value::Null);
    (res.status, json)
}

/// The session's progress once its reply's `bytes_transferred` is `transferred` (delivery is
/// recorded when a response body or its connection ends, on whichever node served it), or
/// as it is after 5 s.
pub async fn progress(t: &dyn Target, sid: &str, transferred: u64) -> serde_json::Value {
    let mut json = serde_json::Value::Null;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (status, j) = admin_get(t, &format!("/sessions/{sid}")).await;
        assert_eq!(status, 200);
        json = j;
        if json["reply"]["bytes_transferred"] == transferred {
            break;
        }
    }
    json
}

/// The check of the same name in `reply_download.rs`.
pub async fn head_full_ranged_resumed_and_past_end(t: &dyn Target) {
    let data = crate::pattern(100_000, 7);
    let (sid, path) = finished_echo(t, &data).await;
    assert!(path.starts_with("/echo/BITS-Sessions/"), "{path}");
    assert!(path.ends_with("/response"));
    let mut c = RawClient::connect(t.addr()).await;

    let head = c.get("HEAD", &path, &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("100000"));
    assert_eq!(head.header("accept-ranges"), Some("bytes"));
    let etag = head.header("etag").unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'));
    assert!(head.header("last-modified").is_some());
    assert!(head.body.is_empty());

    let full = c.get("GET", &path, &[]).await;
    assert_eq!(full.status, 200);
    assert_eq!(full.header("content-length"), Some("100000"));
    assert_eq!(full.header("etag"), Some(etag.as_str()), "ETag is stable");
    assert_eq!(full.body, data);

    let part = c.get("GET", &path, &[("Range", "bytes=0-36")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.header("content-range"), Some("bytes 0-36/100000"));
    assert_eq!(part.header("content-length"), Some("37"));
    assert_eq!(part.body, &data[..37]);

    // A resumed download: the client had 60000 bytes and asks for the rest.
    let rest = c.get("GET", &path, &[("Range", "bytes=60000-")]).await;
    assert_eq!(rest.status, 206);
    assert_eq!(
        rest.header("content-range"),
        Some("bytes 60000-99999/100000")
    );
    assert_eq!(rest.body, &data[60000..]);

    let suffix = c.get("GET", &path, &[("Range", "bytes=-10")]).await;
    assert_eq!(suffix.status, 206);
    assert_eq!(suffix.body, &data[99990..]);

    let past = c
        .get("GET", &path, &[("Range", "bytes=100000-100010")])
        .await;
    assert_eq!(past.status, 416);
    assert_eq!(past.header("content-range"), Some("bytes */100000"));

    // A stale If-Range gets the whole reply.
    let stale = c
        .get(
            "GET",
            &path,
            &[("Range", "bytes=0-9"), ("If-Range", "\"other\"")],
        )
        .await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.body.len(), 100_000);

    // Close frees the reply; the URL is gone, a repeated Close still answers 200.
    let close = c.close_session("/echo/report.bin", &sid).await;
    close.assert_ack();
    assert_eq!(close.status, 200);
    assert_eq!(c.get("GET", &path, &[]).await.status, 404);
    assert_eq!(c.get("HEAD", &path, &[]).await.status, 404);
    let again = c.close_session("/echo/report.bin", &sid).await;
    again.assert_ack();
    assert_eq!(again.status, 200);
}

/// The check of the same name in `reply_download.rs`.
pub async fn reply_progress_counts_distinct_bytes(t: &dyn Target) -> String {
    let data = crate::pattern(50_000, 3);
    let (sid, path) = finished_echo(t, &data).await;
    let p = progress(t, &sid, 0).await;
    assert_eq!(p["state"], "reply-ready");
    assert_eq!(p["upload"]["bytes_received"], 50_000);
    assert_eq!(p["upload"]["bytes_total"], 50_000);
    assert_eq!(p["reply"]["bytes_total"], 50_000);
    assert_eq!(p["reply"]["bytes_transferred"], 0);

    let mut c = RawClient::connect(t.addr()).await;
    assert_eq!(
        c.get("GET", &path, &[("Range", "bytes=0-999")])
            .await
            .status,
        206
    );
    assert_eq!(
        progress(t, &sid, 1000).await["reply"]["bytes_transferred"],
        1000
    );
    // Overlapping range: only the new 500 bytes count.
    assert_eq!(
        c.get("GET", &path, &[("Range", "bytes=500-1499")])
            .await
            .status,
        206
    );
    assert_eq!(
        progress(t, &sid, 1500).await["reply"]["bytes_transferred"],
        1500
    );
    // HEAD transfers nothing.
    c.get("HEAD", &path, &[]).await;
    assert_eq!(
        progress(t, &sid, 1500).await["reply"]["bytes_transferred"],
        1500
    );
    // Two full downloads count once.
    assert_eq!(c.get("GET", &path, &[]).await.body, data);
    assert_eq!(c.get("GET", &path, &[]).await.body, data);
    assert_eq!(
        progress(t, &sid, 50_000).await["reply"]["bytes_transferred"],
        50_000
    );

    // The listing has the session; unknown ids are 404.
    let (status, all) = admin_get(t, "/sessions").await;
    assert_eq!(status, 200);
    assert!(all
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["id"] == sid.as_str()));
    let (status, _) = admin_get(t, "/sessions/{deadbeef-0000-0000-0000-000000000000}").await;
    assert_eq!(status, 404);
    sid
}

/// The check of the same name in `reply_download.rs`.
pub async fn empty_reply_is_served_with_zero_length(t: &dyn Target) {
    let mut c = RawClient::connect(t.addr()).await;
    let sid = c.create_session("/echo/empty.bin").await;
    let fin = c.fragment("/echo/empty.bin", &sid, &[], 0, 0).await;
    fin.assert_ack();
    assert_eq!(fin.status, 200);
    assert_eq!(fin.header("bits-received-content-range"), Some("0"));
    let path = url_path(fin.header("bits-reply-url").unwrap());
    let head = c.get("HEAD", &path, &[]).await;
    assert_eq!(
        (head.status, head.header("content-length")),
        (200, Some("0"))
    );
    let get = c.get("GET", &path, &[]).await;
    assert_eq!((get.status, get.header("content-length")), (200, Some("0")));
}

/// The check of the same name in `reply_download.rs`.
pub async fn reply_urls_are_not_guessable_across_routes_or_ids(t: &dyn Target) {
    let data = crate::pattern(1000, 9);
    let (_sid, path) = finished_echo(t, &data).await;
    let mut c = RawClient::connect(t.addr()).await;
    // The same id under another route, a bogus id, and a POST are refused.
    let other = path.replacen("/echo/", "/upload/", 1);
    assert_eq!(c.get("GET", &other, &[]).await.status, 404);
    assert_eq!(
        c.get("GET", "/echo/BITS-Sessions/not-an-id/response", &[])
            .await
            .status,
        404
    );
    assert_eq!(
        c.get(
            "GET",
            "/echo/BITS-Sessions/00000000-0000-4000-8000-000000000000/response",
            &[]
        )
        .await
        .status,
        404
    );
    let post = c.get("PUT", &path, &[("Content-Length", "0")]).await;
    assert_eq!(post.status, 405);
    assert!(post.header("allow").unwrap().contains("BITS_POST"));
}

/// The check of the same name in `reply_download.rs`.
pub async fn multi_range_serves_the_first_satisfiable_range_and_huge_ends_are_clamped(
    t: &dyn Target,
) {
    let data = crate::pattern(100_000, 11);
    let (_sid, path) = finished_echo(t, &data).await;
    let mut c = RawClient::connect(t.addr()).await;

    // The first range lies past the end, the second is satisfiable: 206 with the second.
    let later = c
        .get("GET", &path, &[("Range", "bytes=2000000-3000000,0-9")])
        .await;
    assert_eq!(later.status, 206);
    assert_eq!(later.header("content-range"), Some("bytes 0-9/100000"));
    assert_eq!(later.body, &data[..10]);

    // None satisfiable: 416.
    let none = c
        .get("GET", &path, &[("Range", "bytes=200000-,100000-100001")])
        .await;
    assert_eq!(none.status, 416);
    assert_eq!(none.header("content-range"), Some("bytes */100000"));

    // An end beyond u64 is clamped like any end past the length.
    let huge = c
        .get(
            "GET",
            &path,
            &[("Range", "bytes=99990-99999999999999999999999")],
        )
        .await;
    assert_eq!(huge.status, 206);
    assert_eq!(
        huge.header("content-range"),
        Some("bytes 99990-99999/100000")
    );
    assert_eq!(huge.body, &data[99990..]);
}

/// The check of the same name in `reply_download.rs`: an 8 MiB echo reply uploaded through
/// `upload` and downloaded from `download` (another node of a farm, or the same server) by a
/// client with a small receive buffer that reads about 1,000 bytes of the body, waits, and
/// resets the connection. What it read counts as transferred; the megabytes that sat in the
/// server's buffers and the socket's send queue do not, on whichever node reads progress.
pub async fn progress_of_an_aborted_download_counts_what_the_client_acknowledged_not_what_was_sent(
    upload: &dyn Target,
    download: &dyn Target,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let len = 8usize << 20;
    let data = crate::pattern(len, 13);
    let mut c = RawClient::connect(upload.addr()).await;
    let (sid, fin) = c.upload("/echo/big.bin", &data, 4 << 20).await;
    let path = url_path(
        fin.header("bits-reply-url")
            .expect("final Ack carries BITS-Reply-URL"),
    );

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8192).unwrap();
    let mut s = socket.connect(download.addr()).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    let body_read = loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let body = buf.len() - (end + 4);
            if body >= 1000 {
                assert_eq!(&buf[end + 4..], &data[..body]);
                break body;
            }
        }
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    // Delivery is recorded by a task spawned when the response body or its connection ends.
    tokio::time::sleep(Duration::from_millis(500)).await;

    for t in [upload, download] {
        let (status, p) = admin_get(t, &format!("/sessions/{sid}")).await;
        assert_eq!(status, 200, "{p}");
        let transferred = p["reply"]["bytes_transferred"].as_u64().unwrap();
        assert!(
            transferred >= body_read as u64,
            "what the client read was delivered: {transferred} < {body_read}"
        );
        assert!(
            transferred < 1 << 20,
            "{transferred} of {len} counted for a client that acknowledged a few KiB"
        );
        assert_ne!(p["state"], "complete");
    }
}
