//! Helpers shared by the storage tests.
#![allow(dead_code, clippy::unwrap_used)]

use bitsd_protocol::SessionId;
use bitsd_storage::{
    ByteStream, FragmentCommit, FragmentDurability, FragmentPlan, SessionBackend, SessionRecord,
    SessionState, SessionStore, UploadMode,
};
use bytes::Bytes;
use futures_util::StreamExt;

/// Opens the store, waiting for a previous instance in this process to release sled's lock
/// (sled lets go of it from a background thread after the last handle is dropped).
pub async fn open(dir: &std::path::Path) -> SessionStore {
    for _ in 0..100 {
        match SessionStore::open(dir).await {
            Ok(store) => return store,
            Err(e) if e.to_string().contains("lock") => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("sled lock never released");
}

pub fn record(mode: UploadMode) -> SessionRecord {
    SessionRecord::new(
        SessionId::random(),
        "/r/".into(),
        mode,
        "http://h/r/x".into(),
    )
}

pub async fn write_fragment(
    store: &SessionStore,
    rec: &mut SessionRecord,
    at: u64,
    bytes: &[u8],
    total: u64,
) {
    let mut w = store.fragment_writer(&rec.id, at).await.unwrap();
    w.write(bytes).await.unwrap();
    rec.received = at + bytes.len() as u64;
    rec.total = Some(total);
    store
        .commit_fragment(w, rec, bitsd_storage::FragmentDurability::Durable)
        .await
        .unwrap();
}

/// Every byte of a stream, in order.
pub async fn collect(mut s: ByteStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

/// Sends `bytes` as one fragment at `rec.received` (frames of 7 bytes) and commits it
/// from the offset the caller read.
pub async fn fragment(
    b: &dyn SessionBackend,
    rec: &mut SessionRecord,
    bytes: &[u8],
    total: u64,
    durability: FragmentDurability,
) -> FragmentCommit {
    let expected = rec.received;
    let plan = FragmentPlan {
        write_at: expected,
        len: bytes.len() as u64,
        durability,
    };
    let mut sink = b.begin_fragment(&rec.id, plan).await.unwrap();
    for frame in bytes.chunks(7) {
        sink.write(Bytes::copy_from_slice(frame)).await.unwrap();
    }
    assert_eq!(sink.written(), bytes.len() as u64);
    rec.received = expected + bytes.len() as u64;
    rec.total = Some(total);
    if rec.received == total {
        rec.state = SessionState::Complete;
    }
    sink.commit(expected, rec).await.unwrap()
}
