//! `SharedBackend` itself on a real PostgreSQL and a real Garage: two writers racing on one
//! offset (one wins, the loser is told the winner's record and its bytes are never read),
//! publish (idempotent, a taken destination refused), end and purge, the first two again on
//! moto (a second S3 implementation). Skips with a printed reason when PostgreSQL or Garage
//! (moto) is not installed.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bitsd::storage::shared::objects::Objects;
use bitsd::storage::shared::pg::{PgOptions, PgStateStore};
use bitsd::storage::shared::SharedBackend;
use bitsd::storage::{
    CommitOutcome, FragmentCommit, FragmentDurability, FragmentPlan, SessionBackend, SessionState,
};
use bitsd_tests::farm_servers::FarmServers;
use bitsd_tests::pattern;
use bitsd_tests::pg::session_record;
use bitsd_tests::shared_backend::{
    farm, farm_on_azurite, farm_on_moto, read_all, read_object, Farm,
};
use bytes::Bytes;

fn plan(write_at: u64, len: u64) -> FragmentPlan {
    FragmentPlan {
        write_at,
        len,
        durability: FragmentDurability::Durable,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_one_wins_publish_is_idempotent_and_end_removes_the_bytes() {
    if let Some(farm) = farm("backend", |_| {}).await {
        racing_writers_one_wins_publish_is_idempotent_and_end_removes_the_bytes_on(farm).await;
    }
}

async fn racing_writers_one_wins_publish_is_idempotent_and_end_removes_the_bytes_on(farm: Farm) {
    let backend = farm.backend.clone();
    // Two "nodes" (one backend is as good: nothing is cached) write the same offset.
    let mut record = session_record(None);
    record.destination = Some("race/out.bin".into());
    backend.create(&record).await.unwrap();
    let id = record.id;
    let winner = pattern(10_000, 1);
    let loser: Vec<u8> = winner.iter().map(|b| !b).collect();
    let mut a = backend.begin_fragment(&id, plan(0, 10_000)).await.unwrap();
    let mut b = backend.begin_fragment(&id, plan(0, 10_000)).await.unwrap();
    a.write(Bytes::from(winner.clone())).await.unwrap();
    b.write(Bytes::from(loser)).await.unwrap();
    let mut next = record.clone();
    next.received = 10_000;
    next.total = Some(20_000);
    assert_eq!(a.commit(0, &next).await.unwrap(), FragmentCommit::Committed);
    match b.commit(0, &next).await.unwrap() {
        FragmentCommit::Lost { current: Some(r) } => assert_eq!(r.received, 10_000),
        other => panic!("the second commit of one offset must lose: {other:?}"),
    }
    // The rest, completing the upload.
    let tail = pattern(10_000, 2);
    let mut c = backend
        .begin_fragment(&id, plan(10_000, 10_000))
        .await
        .unwrap();
    c.write(Bytes::from(tail.clone())).await.unwrap();
    let mut done = next.clone();
    done.received = 20_000;
    done.state = SessionState::Complete;
    assert_eq!(
        c.commit(10_000, &done).await.unwrap(),
        FragmentCommit::Committed
    );
    let mut whole = winner.clone();
    whole.extend_from_slice(&tail);
    assert_eq!(
        read_all(&backend, &id).await,
        whole,
        "only the winner's bytes"
    );
    let local = backend.upload_file(&id).await.unwrap();
    assert_eq!(std::fs::read(&local.path).unwrap(), whole);
    let tmp = local.path.parent().unwrap().to_owned();
    drop(local);
    assert!(
        !tmp.exists(),
        "the temporary copy goes with the LocalUpload"
    );

    // Publish, twice: the second is a no-op success; another session is refused the name.
    assert!(!backend.destination_exists("race/out.bin").await);
    assert_eq!(
        backend
            .publish_upload(&id, "race/out.bin", false)
            .await
            .unwrap(),
        CommitOutcome::Committed
    );
    assert_eq!(
        backend
            .publish_upload(&id, "race/out.bin", false)
            .await
            .unwrap(),
        CommitOutcome::Committed
    );
    assert!(backend.destination_exists("race/out.bin").await);
    let key = backend.objects().file_key("race/out.bin");
    assert_eq!(read_object(backend.objects(), &key).await, whole);
    assert!(backend.load(&id).await.unwrap().unwrap().committed);
    let mut other = session_record(None);
    other.received = 0;
    other.state = SessionState::Complete;
    backend.create(&other).await.unwrap();
    assert_eq!(
        backend
            .publish_upload(&other.id, "race/out.bin", false)
            .await
            .unwrap(),
        CommitOutcome::DestinationExists
    );
    assert_eq!(
        backend
            .publish_upload(&other.id, "../escape", false)
            .await
            .unwrap(),
        CommitOutcome::DestinationInvalid
    );

    // Close: a tombstone; the session's objects go, the published file stays.
    let mut r = backend.load(&id).await.unwrap().unwrap();
    backend
        .end_session(&mut r, SessionState::Closed)
        .await
        .unwrap();
    assert_eq!(r.state, SessionState::Closed);
    // The objects go in the background, after the Ack.
    let mut left = Vec::new();
    for _ in 0..200 {
        left = backend
            .objects()
            .list(&backend.objects().session_prefix(&id))
            .await
            .unwrap();
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(left.is_empty(), "{left:?}");
    assert!(backend.destination_exists("race/out.bin").await);
    backend.purge(&id).await.unwrap();
    assert!(backend.load(&id).await.unwrap().is_none());
    assert!(backend.try_sweep_lock().await.unwrap().is_some());
}

/// A Close's objects go in the background after its tombstone is committed. A node that dies
/// in between (here: the tombstone written straight to PostgreSQL, no delete at all) leaves
/// them only until the sweeper expires the tombstone: `remove_expired` deletes them with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_a_dead_node_did_not_delete_after_close_go_with_the_expired_tombstone() {
    if let Some(farm) = farm("backend", |_| {}).await {
        objects_a_dead_node_did_not_delete_after_close_go_with_the_expired_tombstone_on(farm).await;
    }
}

async fn objects_a_dead_node_did_not_delete_after_close_go_with_the_expired_tombstone_on(
    farm: Farm,
) {
    let backend = farm.backend.clone();
    let record = session_record(None);
    backend.create(&record).await.unwrap();
    let data = pattern(20_000, 4);
    let mut sink = backend
        .begin_fragment(&record.id, plan(0, data.len() as u64))
        .await
        .unwrap();
    sink.write(Bytes::from(data.clone())).await.unwrap();
    let mut next = record.clone();
    next.received = data.len() as u64;
    next.total = Some(2 * data.len() as u64);
    assert_eq!(
        sink.commit(0, &next).await.unwrap(),
        FragmentCommit::Committed
    );
    backend
        .state()
        .close(&record.id, SessionState::Closed)
        .await
        .unwrap();
    let prefix = backend.objects().session_prefix(&record.id);
    assert_eq!(backend.objects().list(&prefix).await.unwrap().len(), 1);

    let backend: Arc<dyn SessionBackend> = Arc::new(backend);
    let service = bitsd::BitsService::builder_for(backend.clone())
        .await
        .route(bitsd::Route::upload("/up/"))
        .build()
        .unwrap();
    assert_eq!(
        service
            .remove_expired(std::time::Duration::ZERO)
            .await
            .unwrap(),
        1
    );
    assert!(backend.load(&record.id).await.unwrap().is_none());
    let shared = Objects::new(&farm.store.object_store_config("backend")).unwrap();
    assert!(shared.list(&prefix).await.unwrap().is_empty());
}

/// The two tests above on moto, a second S3 implementation: racing writers, an idempotent
/// publish, the bytes gone at the end, and the purge of an expired tombstone listing what a
/// dead node left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_publish_and_purge_on_a_second_s3_implementation() {
    let Some(farm) = farm_on_moto("backend", |_| {}).await else {
        return;
    };
    racing_writers_one_wins_publish_is_idempotent_and_end_removes_the_bytes_on(farm).await;
    let Some(farm) = farm_on_moto("backend", |_| {}).await else {
        return;
    };
    objects_a_dead_node_did_not_delete_after_close_go_with_the_expired_tombstone_on(farm).await;
}

/// The same on Azure Blob Storage (Azurite, `service = "azure"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_publish_and_purge_on_azure_blob_storage() {
    let Some(farm) = farm_on_azurite("backend", |_| {}).await else {
        return;
    };
    racing_writers_one_wins_publish_is_idempotent_and_end_removes_the_bytes_on(farm).await;
    let Some(farm) = farm_on_azurite("backend", |_| {}).await else {
        return;
    };
    objects_a_dead_node_did_not_delete_after_close_go_with_the_expired_tombstone_on(farm).await;
}

/// A Close deletes what PostgreSQL knows of the session (its fragment objects, a merge's or a
/// writer's pending object, its reply) with one request and no listing, and never a published
/// file, even one whose publish marker is still pending (a publish that crashed before its
/// `committed` record). An object PostgreSQL does not know goes with the purge, which lists.
/// Every S3 request is logged by an nginx in front of Garage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_deletes_the_known_objects_without_listing_and_never_a_published_file() {
    use bitsd_tests::nginx::Nginx;
    let FarmServers {
        pg: _pg,
        postgres_url: url,
        garage,
    } = match FarmServers::start().await {
        Some(s) => s,
        None => return,
    };
    let s3 = garage.s3_addr();
    let Some(proxy) = tokio::task::spawn_blocking(move || Nginx::start(&[s3]))
        .await
        .unwrap()
    else {
        return;
    };
    let direct = Objects::new(&garage.object_store_config("close")).unwrap();
    let mut via_proxy = garage.object_store_config("close");
    via_proxy.endpoint = Some(proxy.url());
    let scratch = tempfile::tempdir().unwrap();
    let state = PgStateStore::connect(&url, PgOptions::default())
        .await
        .unwrap();
    let backend = SharedBackend::from_parts(
        state.clone(),
        Objects::new(&via_proxy).unwrap(),
        scratch.path().to_owned(),
    );
    let mut record = session_record(None);
    record.destination = Some("kept/file.bin".into());
    backend.create(&record).await.unwrap();
    let id = record.id;
    // Two committed fragments, one pending object, a reply.
    let data = pattern(20_000, 5);
    let mut held = record.clone();
    held.total = Some(40_000);
    for (i, part) in data.chunks(10_000).enumerate() {
        let at = (i * 10_000) as u64;
        let mut sink = backend
            .begin_fragment(&id, plan(at, part.len() as u64))
            .await
            .unwrap();
        sink.write(Bytes::copy_from_slice(part)).await.unwrap();
        held.received = at + part.len() as u64;
        assert_eq!(
            sink.commit(at, &held).await.unwrap(),
            FragmentCommit::Committed
        );
    }
    let prefix = direct.session_prefix(&id);
    let pending = prefix.join("frag/00000000000000020000-pending");
    state
        .add_pending_object(&id, pending.as_str())
        .await
        .unwrap();
    let put = |key: bitsd::storage::shared::objects::ObjectKey| {
        let direct = direct.clone();
        async move {
            let body = futures_util::stream::iter([Ok::<_, bitsd::StorageError>(
                Bytes::from_static(b"x"),
            )]);
            direct.put_stream(key, body).await.unwrap();
        }
    };
    put(pending.clone()).await;
    let mut reply = backend.begin_reply(&id).await.unwrap();
    reply.write(Bytes::from_static(b"reply")).await.unwrap();
    let kind = reply.finish().await.unwrap();
    // The reply as the completion records it: Close deletes the object the record names.
    held.reply = Some(bitsd::storage::ReplyRecord {
        url: "http://farm/reply".into(),
        kind,
        created_ms: 1,
        delivered: Default::default(),
    });
    backend.save(&held).await.unwrap();
    // A publish that crashed after writing the file, its marker still pending.
    let file = direct.file_key("kept/file.bin");
    state.add_pending_object(&id, file.as_str()).await.unwrap();
    put(file.clone()).await;
    // An object no row names (as if its pending row was lost with PostgreSQL).
    let stray = prefix.join("frag/99999999999999999999-stray");
    put(stray.clone()).await;
    assert_eq!(direct.list(&prefix).await.unwrap().len(), 5);

    let mut ended = record.clone();
    backend
        .end_session(&mut ended, SessionState::Closed)
        .await
        .unwrap();
    let mut left = Vec::new();
    for _ in 0..50 {
        left = direct.list(&prefix).await.unwrap();
        if left.len() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let left: Vec<_> = left.into_iter().map(|o| o.key).collect();
    assert_eq!(left, vec![stray], "only the unknown object is left");
    assert!(direct.head(&file).await.is_ok(), "a published file went");
    let log = proxy.access_log();
    assert!(
        !log.contains("list-type"),
        "the Close listed the bucket:\n{log}"
    );

    // The purge lists the prefix and takes the rest; the file stays.
    backend.purge(&id).await.unwrap();
    assert!(direct.list(&prefix).await.unwrap().is_empty());
    assert!(direct.head(&file).await.is_ok(), "a published file went");
}
