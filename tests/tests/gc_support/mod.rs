//! Helpers of the garbage tests of the shared backend (farm_gc.rs, farm_orphans.rs,
//! farm_slow_writer.rs): two backends ("nodes") on one real PostgreSQL database and one real
//! Garage bucket, and fragments written and committed through them.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::sync::Arc;

use bitsd::storage::shared::objects::ObjectInfo;
use bitsd::storage::shared::SharedBackend;
use bitsd::storage::{
    FragmentCommit, FragmentDurability, FragmentPlan, SessionBackend, SessionRecord, SessionState,
};
use bitsd_protocol::SessionId;
use bitsd_tests::farm_servers::FarmServers;
use bitsd_tests::garage::Garage;
use bitsd_tests::pg::PgCluster;
use bitsd_tests::shared_backend::backend_on;
pub use bitsd_tests::shared_backend::read_all;
use bytes::Bytes;

/// Two "nodes": two backends on one database and bucket.
pub struct Two {
    pub a: SharedBackend,
    pub b: SharedBackend,
    pub _garage: Garage,
    pub _pg: Arc<PgCluster>,
    pub _scratch: tempfile::TempDir,
}

pub async fn two() -> Option<Two> {
    let FarmServers {
        pg,
        postgres_url: url,
        garage,
    } = FarmServers::start().await?;
    let store = garage.object_store_config("gc");
    let scratch = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        nodes.push(backend_on(&url, &store, scratch.path()).await);
    }
    let b = nodes.pop().unwrap();
    let a = nodes.pop().unwrap();
    Some(Two {
        a,
        b,
        _garage: garage,
        _pg: pg,
        _scratch: scratch,
    })
}

pub fn plan(write_at: u64, len: u64) -> FragmentPlan {
    FragmentPlan {
        write_at,
        len,
        durability: FragmentDurability::Durable,
    }
}

pub async fn objects_of(backend: &SharedBackend, id: &SessionId) -> Vec<ObjectInfo> {
    backend
        .objects()
        .list(&backend.objects().session_prefix(id))
        .await
        .unwrap()
}

/// `record` advanced to `received` (complete when it reaches `total`).
pub fn at(record: &SessionRecord, received: u64, total: u64) -> SessionRecord {
    let mut r = record.clone();
    r.received = received;
    r.total = Some(total);
    if received == total {
        r.state = SessionState::Complete;
    }
    r
}

/// Writes `bytes` at `offset` through `backend` and commits it.
pub async fn fragment(
    backend: &SharedBackend,
    record: &SessionRecord,
    offset: u64,
    bytes: &[u8],
    total: u64,
) -> FragmentCommit {
    let mut sink = backend
        .begin_fragment(&record.id, plan(offset, bytes.len() as u64))
        .await
        .unwrap();
    sink.write(Bytes::copy_from_slice(bytes)).await.unwrap();
    sink.commit(offset, &at(record, offset + bytes.len() as u64, total))
        .await
        .unwrap()
}
