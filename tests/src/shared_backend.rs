//! A shared backend on a real PostgreSQL and a real Garage (or moto), driven directly (no server), and
//! what the tests that do so share: fragments committed one by one, the fragment index and
//! the bucket looked at side by side, an upload or a published file read back.

use std::sync::Arc;

use bitsd_protocol::SessionId;
use bitsd_storage::shared::objects::{ObjectKey, ObjectStoreConfig, Objects};
use bitsd_storage::shared::pg::{PgOptions, PgStateStore};
use bitsd_storage::shared::SharedBackend;
use bitsd_storage::{
    FragmentCommit, FragmentDurability, FragmentPlan, FragmentSink, SessionBackend, SessionRecord,
    SessionState,
};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::farm_servers::{StoreServer, StoreServers};
use crate::pattern;
use crate::pg::{raw_client, PgCluster};

/// A shared backend and the servers behind it (stopped when dropped).
pub struct Farm {
    /// The backend, as a node builds it.
    pub backend: SharedBackend,
    /// Its PostgreSQL URL.
    pub url: String,
    /// The store behind it: Garage, or moto ([`farm_on_moto`]).
    pub store: StoreServer,
    _pg: Arc<PgCluster>,
    _scratch: tempfile::TempDir,
}

/// A shared backend as a node builds it: its own pool on `url` (default options), the bucket
/// of `store`, temporary copies under `scratch`.
pub async fn backend_on(
    url: &str,
    store: &ObjectStoreConfig,
    scratch: &std::path::Path,
) -> SharedBackend {
    let state = PgStateStore::connect(url, PgOptions::default())
        .await
        .unwrap();
    SharedBackend::from_parts(state, Objects::new(store).unwrap(), scratch.to_owned())
}

/// A farm whose `[object_store]` table is Garage's under `prefix`, changed by `configure`;
/// `None` (with a printed reason) when PostgreSQL or Garage is not installed.
pub async fn farm(prefix: &str, configure: impl FnOnce(&mut ObjectStoreConfig)) -> Option<Farm> {
    Some(farm_with(StoreServers::garage().await?, prefix, configure).await)
}

/// As [`farm`], on moto (a second S3 implementation, see [`crate::moto`]); `None` (with a
/// printed reason) when PostgreSQL or moto is not installed.
pub async fn farm_on_moto(
    prefix: &str,
    configure: impl FnOnce(&mut ObjectStoreConfig),
) -> Option<Farm> {
    Some(farm_with(StoreServers::moto().await?, prefix, configure).await)
}

/// As [`farm`], on Azurite (`service = "azure"`, see [`crate::azurite`]); `None` (with a
/// printed reason) when PostgreSQL or Azurite is not installed.
pub async fn farm_on_azurite(
    prefix: &str,
    configure: impl FnOnce(&mut ObjectStoreConfig),
) -> Option<Farm> {
    Some(farm_with(StoreServers::azurite().await?, prefix, configure).await)
}

async fn farm_with(
    servers: StoreServers,
    prefix: &str,
    configure: impl FnOnce(&mut ObjectStoreConfig),
) -> Farm {
    let StoreServers {
        pg,
        postgres_url: url,
        store: server,
    } = servers;
    let mut store = server.object_store_config(prefix);
    configure(&mut store);
    let scratch = tempfile::tempdir().unwrap();
    let backend = backend_on(&url, &store, scratch.path()).await;
    Farm {
        backend,
        url,
        store: server,
        _pg: pg,
        _scratch: scratch,
    }
}

/// A fragment of `len` bytes of a session of its own, begun and never written: one that
/// holds its bytes (not streamed, or `part_size` long or more) keeps its reservation in the
/// node's `fragment_memory` until the sink is dropped.
pub async fn hold_fragment_memory(backend: &SharedBackend, len: u64) -> Box<dyn FragmentSink> {
    let other = crate::pg::session_record(None);
    backend.create(&other).await.unwrap();
    let plan = FragmentPlan {
        write_at: 0,
        len,
        durability: FragmentDurability::Durable,
    };
    backend.begin_fragment(&other.id, plan).await.unwrap()
}

/// Commits `data[at..at + len]` (`at` = the bytes received so far) as one fragment; the last
/// byte of the upload makes it Complete.
pub async fn send(backend: &SharedBackend, record: &mut SessionRecord, data: &[u8], len: usize) {
    let at = record.received as usize;
    let plan = FragmentPlan {
        write_at: at as u64,
        len: len as u64,
        durability: FragmentDurability::Durable,
    };
    let mut sink = backend.begin_fragment(&record.id, plan).await.unwrap();
    sink.write(Bytes::copy_from_slice(&data[at..at + len]))
        .await
        .unwrap();
    let mut next = record.clone();
    next.received = (at + len) as u64;
    next.total = Some(data.len() as u64);
    if next.received == data.len() as u64 {
        next.state = SessionState::Complete;
    }
    assert_eq!(
        sink.commit(at as u64, &next).await.unwrap(),
        FragmentCommit::Committed
    );
    *record = next;
}

/// The fragment index as (offset, length) pairs.
pub async fn index(backend: &SharedBackend, id: &SessionId) -> Vec<(u64, u64)> {
    let rows = backend.state().fragments(id).await.unwrap();
    rows.iter().map(|f| (f.entry.offset, f.entry.len)).collect()
}

/// Polls the index (every 50 ms, up to 20 s) until it is `expected`; returns what it saw last.
pub async fn index_becomes(
    backend: &SharedBackend,
    id: &SessionId,
    expected: &[(u64, u64)],
) -> Vec<(u64, u64)> {
    let mut now = Vec::new();
    for _ in 0..400 {
        now = index(backend, id).await;
        if now == expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    now
}

/// Every object key under `prefix` in the bucket, sorted.
pub async fn listed_keys(objects: &Objects, prefix: &ObjectKey) -> Vec<String> {
    let mut keys: Vec<String> = objects
        .list(prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key.as_str().to_owned())
        .collect();
    keys.sort();
    keys
}

/// The keys of the session's fragment objects in the bucket, and in the index.
pub async fn objects_and_index(
    backend: &SharedBackend,
    id: &SessionId,
) -> (Vec<String>, Vec<String>) {
    let prefix = backend.objects().session_prefix(id).join("frag");
    let listed = listed_keys(backend.objects(), &prefix).await;
    let mut indexed: Vec<String> = backend
        .state()
        .fragments(id)
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.object_key)
        .collect();
    indexed.sort();
    (listed, indexed)
}

/// Polls (every 50 ms, up to 10 s) until the bucket holds exactly the index's fragment
/// objects; returns what it saw last.
pub async fn bucket_matches_index(
    backend: &SharedBackend,
    id: &SessionId,
) -> (Vec<String>, Vec<String>) {
    let mut seen = (Vec::new(), Vec::new());
    for _ in 0..200 {
        seen = objects_and_index(backend, id).await;
        if seen.0 == seen.1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    seen
}

/// The finished upload read back through the backend.
pub async fn read_all(backend: &SharedBackend, id: &SessionId) -> Vec<u8> {
    let mut out = Vec::new();
    let mut s = backend.read_upload(id).await.unwrap();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

/// The whole object at `key`.
pub async fn read_object(objects: &Objects, key: &ObjectKey) -> Vec<u8> {
    objects
        .read(key, None)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
}

/// Publishes the finished upload at `path` and reads the published object back.
pub async fn publish_and_read(backend: &SharedBackend, id: &SessionId, path: &str) -> Vec<u8> {
    backend.publish_upload(id, path, false).await.unwrap();
    read_object(backend.objects(), &backend.objects().file_key(path)).await
}

/// The object keys recorded as pending for session `id` (written, or about to be, and
/// referenced by no commit), whatever their age.
pub async fn pending_of(backend: &SharedBackend, id: &SessionId) -> Vec<String> {
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 60_000;
    backend
        .state()
        .stale_pending_objects(later, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.session == *id)
        .map(|p| p.object_key)
        .collect()
}

/// Rows in `bitsd_pending_objects`.
pub async fn pending_rows(url: &str) -> i64 {
    raw_client(url)
        .await
        .query_one("SELECT count(*) FROM bitsd_pending_objects", &[])
        .await
        .unwrap()
        .get(0)
}

/// Two sessions uploading `count` fragments of `frag` bytes each to the same destination, on
/// `nodes[0]` and `nodes[1]`, whose final fragments arrive together (three rounds): exactly
/// one publishes (the other gets 403 `E_ACCESSDENIED`, as when the file existed), and the
/// file in `objects` holds the winner's bytes.
pub async fn two_sessions_race_for_one_destination(
    nodes: &[crate::TestServer],
    objects: &Objects,
    frag: usize,
    count: usize,
) {
    for round in 0..3 {
        let path = format!("/upload/race-{round}.bin");
        let data = [
            pattern(count * frag, 2 * round as u64),
            pattern(count * frag, 2 * round as u64 + 1),
        ];
        let mut clients = Vec::new();
        let mut sids = Vec::new();
        for (i, node) in nodes.iter().take(2).enumerate() {
            let mut c = node.connect().await;
            let sid = c.create_session(&path).await;
            // Everything but the last fragment.
            for at in (0..data[i].len() - frag).step_by(frag) {
                let res = c.fragment(&path, &sid, &data[i], at, frag).await;
                assert_eq!(res.status, 200, "{res:?}");
            }
            clients.push(c);
            sids.push(sid);
        }
        let last = data[0].len() - frag;
        let finals = clients
            .into_iter()
            .zip(sids)
            .zip(data.clone())
            .map(|((mut c, sid), d)| {
                let path = path.clone();
                tokio::spawn(async move { c.fragment(&path, &sid, &d, last, frag).await })
            })
            .collect::<Vec<_>>();
        let mut answers = Vec::new();
        for f in finals {
            answers.push(f.await.unwrap());
        }
        let won: Vec<usize> = (0..2).filter(|&i| answers[i].status == 200).collect();
        assert_eq!(won.len(), 1, "round {round}: {answers:?}");
        let lost = 1 - won[0];
        answers[lost].assert_error(403, "0x80070005");
        let key = objects.file_key(&format!("race-{round}.bin"));
        assert!(
            read_object(objects, &key).await == data[won[0]],
            "round {round}: the published file is not the winner's upload"
        );
    }
}
