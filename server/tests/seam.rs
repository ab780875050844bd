//! Two services ("nodes") on one storage backend, each with its own session locks, as two
//! farm nodes share one: a fragment whose commit loses the race for the offset answers with
//! the winner's offset and never moves it backwards.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bitsd::{BitsService, Route, SessionBackend, SessionStore};
use bytes::Bytes;
use http::Request;
use http_body::Frame;
use http_body_util::{Full, StreamBody};
use tower::ServiceExt;

async fn node(backend: Arc<dyn SessionBackend>) -> BitsService {
    BitsService::builder_for(backend)
        .await
        .route(Route::upload("/up/"))
        .build()
        .unwrap()
}

fn packet<B>(
    kind: &str,
    sid: Option<&str>,
    range: Option<&str>,
    len: usize,
    body: B,
) -> Request<B> {
    let mut req = Request::builder()
        .method("BITS_POST")
        .uri("/up/race.bin")
        .header("BITS-Packet-Type", kind)
        .header("content-length", len);
    if let Some(sid) = sid {
        req = req.header("BITS-Session-Id", sid);
    }
    if let Some(range) = range {
        req = req.header("Content-Range", range);
    }
    if kind == "create-session" {
        req = req.header(
            "BITS-Supported-Protocols",
            "{7DF0354D-249B-430F-820D-3D2A9BEF4931}",
        );
    }
    req.body(body).unwrap()
}

fn received(res: &http::Response<bitsd::ResponseBody>) -> String {
    assert_eq!(res.status(), 200, "{:?}", res.headers());
    res.headers()["bits-received-content-range"]
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragment_that_loses_the_offset_race_answers_with_the_winner() {
    let dir = tempfile::tempdir().unwrap();
    let store = SessionStore::open(dir.path()).await.unwrap();
    let backend: Arc<dyn SessionBackend> = Arc::new(store.clone());
    let (a, b) = (node(backend.clone()).await, node(backend).await);
    let data: Vec<u8> = (0..20u8).map(|i| b'a' + i).collect();

    let res = a
        .clone()
        .oneshot(packet(
            "create-session",
            None,
            None,
            0,
            Full::new(Bytes::new()),
        ))
        .await
        .unwrap();
    let sid = res.headers()["bits-session-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let id: bitsd::protocol::SessionId = sid.parse().unwrap();

    // Node A reads offset 0 and starts receiving bytes 0-9, slowly.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let slow = packet(
        "fragment",
        Some(&sid),
        Some("bytes 0-9/20"),
        10,
        StreamBody::new(frames),
    );
    let a_task = tokio::spawn(a.clone().oneshot(slow));
    tx.send(Bytes::copy_from_slice(&data[..5])).await.unwrap();
    // A has begun its fragment once the upload file exists.
    let upload = store.upload_path(&id);
    for _ in 0..500 {
        if upload.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(upload.exists(), "node A never began its fragment");

    // Meanwhile node B takes bytes 0-14 (the client reconnected elsewhere) and commits.
    let res = b
        .clone()
        .oneshot(packet(
            "fragment",
            Some(&sid),
            Some("bytes 0-14/20"),
            15,
            Full::new(Bytes::copy_from_slice(&data[..15])),
        ))
        .await
        .unwrap();
    assert_eq!(received(&res), "15");

    // A's body ends: its commit expected offset 0, finds 15, and answers 15, not 10.
    tx.send(Bytes::copy_from_slice(&data[5..10])).await.unwrap();
    drop(tx);
    let res = a_task.await.unwrap().unwrap();
    assert_eq!(received(&res), "15");
    let rec = store.load(&id).await.unwrap().unwrap();
    assert_eq!(rec.received, 15, "the offset must never go backwards");

    // The client goes on from the winner's offset on node A and the upload is byte-exact.
    let res = a
        .clone()
        .oneshot(packet(
            "fragment",
            Some(&sid),
            Some("bytes 15-19/20"),
            5,
            Full::new(Bytes::copy_from_slice(&data[15..])),
        ))
        .await
        .unwrap();
    assert_eq!(received(&res), "20");
    let published = std::fs::read(store.files_dir().join("race.bin")).unwrap();
    assert_eq!(published, data);
}
