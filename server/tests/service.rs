//! In-process tests of `BitsService` through `tower::ServiceExt::oneshot`, with a body type
//! other than hyper's `Incoming`.
#![allow(clippy::unwrap_used)]

use bitsd::protocol::SessionId;
use bitsd::{BitsService, EchoHandler, HandlerError, Reply, Route, SessionStore, Upload};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;

async fn service(dir: &std::path::Path) -> BitsService {
    let store = SessionStore::open(dir).await.unwrap();
    BitsService::builder(store)
        .route(Route::upload_reply("/echo/", EchoHandler))
        .route(Route::upload_reply("/size/", |u: Upload| async move {
            Ok::<_, HandlerError>(Reply::bytes(format!("{} bytes", u.len)))
        }))
        .route(Route::upload_reply("/fail/", |_u: Upload| async move {
            Err::<Reply, _>(HandlerError::status(409, "busy"))
        }))
        .public_base_url(Some("https://bits.example.com/base/".into()))
        .build()
        .unwrap()
}

fn bits(path: &str, headers: &[(&str, &str)], body: &'static [u8]) -> Request<Full<Bytes>> {
    let mut req = Request::builder().method("BITS_POST").uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.header("content-length", body.len())
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

async fn call(svc: &BitsService, req: Request<Full<Bytes>>) -> Response<bitsd::ResponseBody> {
    svc.clone().oneshot(req).await.unwrap()
}

async fn create(svc: &BitsService, path: &str) -> String {
    let res = call(
        svc,
        bits(
            path,
            &[
                ("BITS-Packet-Type", "create-session"),
                (
                    "BITS-Supported-Protocols",
                    "{7DF0354D-249B-430F-820D-3D2A9BEF4931}",
                ),
            ],
            b"",
        ),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["bits-protocol"],
        "{7df0354d-249b-430f-820d-3d2a9bef4931}"
    );
    res.headers()["bits-session-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn oneshot_upload_reply_with_public_base_url() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let sid = create(&svc, "/echo/a.txt").await;
    let res = call(
        &svc,
        bits(
            "/echo/a.txt",
            &[
                ("BITS-Packet-Type", "Fragment"),
                ("BITS-Session-Id", &sid),
                ("Content-Range", "bytes 0-4/5"),
            ],
            b"hello",
        ),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-length"], "0");
    let id: SessionId = sid.parse().unwrap();
    let url = res.headers()["bits-reply-url"].to_str().unwrap();
    assert_eq!(
        url,
        format!(
            "https://bits.example.com/base/echo/BITS-Sessions/{}/response",
            id.simple()
        )
    );

    let get = Request::get(format!("/echo/BITS-Sessions/{}/response", id.simple()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = svc.clone().oneshot(get).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        Bytes::from_static(b"hello")
    );
    let p = svc.progress(&id).await.unwrap().unwrap();
    assert_eq!(p.upload.bytes_received, 5);
}

#[tokio::test]
async fn closure_handlers_and_handler_errors() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    let sid = create(&svc, "/size/x").await;
    let res = call(
        &svc,
        bits(
            "/size/x",
            &[
                ("BITS-Packet-Type", "Fragment"),
                ("BITS-Session-Id", &sid),
                ("Content-Range", "bytes 0-2/3"),
            ],
            b"abc",
        ),
    )
    .await;
    assert_eq!(res.status(), 200);
    let id: SessionId = sid.parse().unwrap();
    let get = Request::get(format!("/size/BITS-Sessions/{}/response", id.simple()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let body = svc
        .clone()
        .oneshot(get)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, Bytes::from_static(b"3 bytes"));

    // A failing handler: status relayed, 0x80190000 + status, context 0x7, offset = total.
    let sid = create(&svc, "/fail/x").await;
    let frag = || {
        bits(
            "/fail/x",
            &[
                ("BITS-Packet-Type", "Fragment"),
                ("BITS-Session-Id", &sid),
                ("Content-Range", "bytes 0-2/3"),
            ],
            b"abc",
        )
    };
    for _ in 0..2 {
        let res = call(&svc, frag()).await;
        assert_eq!(res.status(), 409);
        assert_eq!(res.headers()["bits-error-code"], "0x80190199");
        assert_eq!(res.headers()["bits-error-context"], "0x7");
        assert_eq!(res.headers()["bits-received-content-range"], "3");
        assert!(res.headers().get("bits-reply-url").is_none());
    }
    let p = svc.progress(&sid.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(
        p.state, "complete",
        "the upload is kept for the next attempt"
    );
}

#[tokio::test]
async fn mount_path_and_forwarded_headers_shape_reply_urls() {
    let dir = tempfile::tempdir().unwrap();
    let store = SessionStore::open(dir.path()).await.unwrap();
    let svc = BitsService::builder(store)
        .route(Route::upload_reply("/echo/", EchoHandler))
        .mount_path("/bits/")
        .trust_forwarded_headers(true)
        .build()
        .unwrap();
    let create = bits(
        "/echo/a",
        &[
            ("BITS-Packet-Type", "Create-Session"),
            (
                "BITS-Supported-Protocols",
                "{7df0354d-249b-430f-820d-3d2a9bef4931}",
            ),
            ("Host", "internal:8080"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "bits.example.com"),
        ],
        b"",
    );
    let res = call(&svc, create).await;
    let sid = res.headers()["bits-session-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let res = call(
        &svc,
        bits(
            "/echo/a",
            &[
                ("BITS-Packet-Type", "Fragment"),
                ("BITS-Session-Id", &sid),
                ("Content-Range", "bytes 0-1/2"),
                ("Host", "internal:8080"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "bits.example.com"),
            ],
            b"hi",
        ),
    )
    .await;
    let id: SessionId = sid.parse().unwrap();
    assert_eq!(
        res.headers()["bits-reply-url"],
        format!(
            "https://bits.example.com/bits/echo/BITS-Sessions/{}/response",
            id.simple()
        )
        .as_str()
    );
    let p = svc.progress(&id).await.unwrap().unwrap();
    assert_eq!(p.url, "https://bits.example.com/bits/echo/a");
}

/// A reply of several read chunks comes back byte-exact, whole and by ranges that cross chunk
/// boundaries (the body reads ahead while the connection sends); a reply file cut short on
/// disk ends the body with an error instead of hanging or inventing bytes.
#[tokio::test]
async fn multi_chunk_replies_stream_exactly_and_a_short_file_fails_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().to_owned();
    let svc = service(&store_dir).await;
    let data: Vec<u8> = (0..700_000u32).map(|i| (i * 31 % 253) as u8).collect();
    let sid = create(&svc, "/echo/big.bin").await;
    let req = Request::builder()
        .method("BITS_POST")
        .uri("/echo/big.bin")
        .header("BITS-Packet-Type", "Fragment")
        .header("BITS-Session-Id", &sid)
        .header(
            "Content-Range",
            format!("bytes 0-{}/{}", data.len() - 1, data.len()),
        )
        .header("content-length", data.len())
        .body(Full::new(Bytes::from(data.clone())))
        .unwrap();
    let res = call(&svc, req).await;
    assert_eq!(res.status(), 200);
    let id: SessionId = sid.parse().unwrap();
    let path = format!("/echo/BITS-Sessions/{}/response", id.simple());
    let get = |range: Option<String>| {
        let mut req = Request::builder().method("GET").uri(&path);
        if let Some(r) = range {
            req = req.header("range", r);
        }
        req.body(Full::new(Bytes::new())).unwrap()
    };
    let whole = call(&svc, get(None)).await;
    assert_eq!(whole.status(), 200);
    let body = whole.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], &data[..]);
    for (start, end) in [
        (0, 262_143),
        (262_000, 524_400),
        (100, 699_999),
        (699_990, 699_999),
    ] {
        let res = call(&svc, get(Some(format!("bytes={start}-{end}")))).await;
        assert_eq!(res.status(), 206);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], &data[start..=end], "range {start}-{end}");
    }
    // The reply is the upload file itself (echo): cut it on disk.
    let upload = store_dir.join("sessions").join(id.simple()).join("upload");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&upload)
        .unwrap();
    f.set_len(300_000).unwrap();
    let res = call(&svc, get(None)).await;
    assert_eq!(res.status(), 200);
    let collected = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        res.into_body().collect(),
    )
    .await
    .expect("the body ends");
    assert!(collected.is_err(), "a short reply file fails the body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sweep_removes_more_idle_sessions_than_one_batch_and_keeps_the_fresh_ones() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service(dir.path()).await;
    // More than the sweeper's batch of 1,000 candidates, then two fresh ones.
    let mut idle = Vec::new();
    for _ in 0..1_010 {
        idle.push(create(&svc, "/echo/sweep").await);
    }
    // Idle for 2 s; the fresh ones must be created and the sweep run within the 1 s timeout
    // (with 0.3 s / 0.2 s, a loaded CI machine once took longer and swept a fresh one too).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let fresh = [
        create(&svc, "/echo/sweep").await,
        create(&svc, "/echo/sweep").await,
    ];
    let removed = svc
        .remove_expired(std::time::Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(removed, 1_010, "every idle session in one sweep");
    for sid in [&idle[0], &idle[999], &idle[1_009]] {
        let id: SessionId = sid.parse().unwrap();
        assert!(svc.progress(&id).await.unwrap().is_none(), "{sid} removed");
    }
    for sid in &fresh {
        let id: SessionId = sid.parse().unwrap();
        assert!(svc.progress(&id).await.unwrap().is_some(), "{sid} kept");
    }
}
