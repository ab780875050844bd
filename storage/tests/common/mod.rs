//! Helpers shared by the storage tests.
#![allow(dead_code, clippy::unwrap_used)]

use bitsd_protocol::SessionId;
use bitsd_storage::{SessionRecord, SessionStore, UploadMode};

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
