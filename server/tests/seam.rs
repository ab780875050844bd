//! Two services ("nodes") on one storage backend, each with its own session locks, as two
//! farm nodes share one: a fragment whose commit loses the race for the offset answers with
//! the winner's offset and never moves it backwards.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bitsd::protocol::SessionId;
use bitsd::storage::{
    ByteStream, CommitOutcome, FragmentPlan, FragmentSink, LocalUpload, ReplyKind, ReplySink,
    SessionRecord, SessionState, SweepLock,
};
use bitsd::{BitsService, Route, SessionBackend, SessionStore, StorageError};
use bytes::Bytes;
use http::Request;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
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
    // Bytes in files (the upload file shows when A has begun); the race of fragments held
    // in the meta store is in storage/tests/backend.rs.
    let store = SessionStore::open(dir.path())
        .await
        .unwrap()
        .with_inline_below(0);
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
    let id: SessionId = sid.parse().unwrap();

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

/// The local backend, but keeping its replies "remote": no local reply file is offered, so
/// the download path must stream ranges through `read_reply` as it will for object storage.
#[derive(Debug)]
struct NoLocalReplies(SessionStore);

#[async_trait::async_trait]
impl SessionBackend for NoLocalReplies {
    fn kind(&self) -> &'static str {
        "no-local-replies"
    }
    async fn create(&self, r: &SessionRecord) -> Result<(), StorageError> {
        SessionBackend::create(&self.0, r).await
    }
    async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>, StorageError> {
        SessionBackend::load(&self.0, id).await
    }
    async fn save(&self, r: &SessionRecord) -> Result<(), StorageError> {
        SessionBackend::save(&self.0, r).await
    }
    async fn save_lazy(&self, r: &SessionRecord) -> Result<(), StorageError> {
        SessionBackend::save_lazy(&self.0, r).await
    }
    async fn flush(&self) -> Result<(), StorageError> {
        SessionBackend::flush(&self.0).await
    }
    async fn begin_fragment(
        &self,
        id: &SessionId,
        plan: FragmentPlan,
    ) -> Result<Box<dyn FragmentSink>, StorageError> {
        self.0.begin_fragment(id, plan).await
    }
    async fn publish_upload(
        &self,
        id: &SessionId,
        dest: &str,
        overwrite: bool,
    ) -> Result<CommitOutcome, StorageError> {
        self.0.publish_upload(id, dest, overwrite).await
    }
    async fn destination_exists(&self, dest: &str) -> bool {
        SessionBackend::destination_exists(&self.0, dest).await
    }
    async fn read_upload(&self, id: &SessionId) -> Result<ByteStream, StorageError> {
        self.0.read_upload(id).await
    }
    async fn upload_file(&self, id: &SessionId) -> Result<LocalUpload, StorageError> {
        self.0.upload_file(id).await
    }
    async fn begin_reply(&self, id: &SessionId) -> Result<Box<dyn ReplySink>, StorageError> {
        self.0.begin_reply(id).await
    }
    async fn store_reply_file(
        &self,
        id: &SessionId,
        src: &std::path::Path,
    ) -> Result<ReplyKind, StorageError> {
        self.0.store_reply_file(id, src).await
    }
    async fn read_reply(
        &self,
        id: &SessionId,
        kind: &ReplyKind,
        start: u64,
        len: u64,
    ) -> Result<ByteStream, StorageError> {
        self.0.read_reply(id, kind, start, len).await
    }
    async fn record_reply_delivered(
        &self,
        id: &SessionId,
        created_ms: u64,
        start: u64,
        end: u64,
    ) -> Result<Option<SessionRecord>, StorageError> {
        self.0
            .record_reply_delivered(id, created_ms, start, end)
            .await
    }
    async fn end_session(
        &self,
        r: &mut SessionRecord,
        state: SessionState,
    ) -> Result<(), StorageError> {
        SessionBackend::end_session(&self.0, r, state).await
    }
    async fn purge(&self, id: &SessionId) -> Result<(), StorageError> {
        SessionBackend::purge(&self.0, id).await
    }
    async fn list(&self) -> Result<Vec<SessionRecord>, StorageError> {
        SessionBackend::list(&self.0).await
    }
    async fn list_page(
        &self,
        after: Option<SessionId>,
        limit: usize,
    ) -> Result<Vec<SessionRecord>, StorageError> {
        SessionBackend::list_page(&self.0, after, limit).await
    }
    async fn try_sweep_lock(&self) -> Result<Option<SweepLock>, StorageError> {
        self.0.try_sweep_lock().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_without_a_local_file_is_streamed_by_range_and_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SessionStore::open(dir.path()).await.unwrap();
    let backend: Arc<dyn SessionBackend> = Arc::new(NoLocalReplies(store));
    let svc = BitsService::builder_for(backend)
        .await
        .route(Route::upload_reply("/echo/", bitsd::EchoHandler))
        .build()
        .unwrap();
    let data: Vec<u8> = (0..600_000u32).map(|i| (i % 253) as u8).collect();
    let mut create = packet("create-session", None, None, 0, Full::new(Bytes::new()));
    *create.uri_mut() = "/echo/r".parse().unwrap();
    let res = svc.clone().oneshot(create).await.unwrap();
    let sid = res.headers()["bits-session-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let id: SessionId = sid.parse().unwrap();
    let range = format!("bytes 0-{}/{}", data.len() - 1, data.len());
    let mut frag = packet(
        "fragment",
        Some(&sid),
        Some(&range),
        data.len(),
        Full::new(Bytes::from(data.clone())),
    );
    *frag.uri_mut() = "/echo/r".parse().unwrap();
    let res = svc.clone().oneshot(frag).await.unwrap();
    assert_eq!(received(&res), data.len().to_string());
    let url = format!("/echo/BITS-Sessions/{}/response", id.simple());
    let get = |range: Option<&str>| {
        let mut req = Request::get(&url);
        if let Some(r) = range {
            req = req.header("range", r);
        }
        req.body(Full::new(Bytes::new())).unwrap()
    };
    let res = svc
        .clone()
        .oneshot(get(Some("bytes=1000-299999")))
        .await
        .unwrap();
    assert_eq!(res.status(), 206);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], &data[1000..300_000]);
    let res = svc.clone().oneshot(get(None)).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], &data[..]);
    // Delivery is recorded in the background: each byte once, although some went twice.
    let mut transferred = None;
    for _ in 0..200 {
        transferred = svc
            .progress(&id)
            .await
            .unwrap()
            .unwrap()
            .reply
            .bytes_transferred;
        if transferred == Some(data.len() as u64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(transferred, Some(data.len() as u64));
}
