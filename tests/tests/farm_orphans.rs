//! Orphaned session prefixes of the shared backend on a real PostgreSQL and a real Garage:
//! objects of sessions that have no row (removed by hand, a straggler written after a purge)
//! are deleted once older than the grace, and nothing else is (live sessions, tombstones,
//! published files, sessions created during the scan); a farm on another database sharing
//! the bucket prefix deletes nothing. Skips with a printed reason when PostgreSQL or Garage
//! is not installed.
#![allow(clippy::unwrap_used)]

mod gc_support;

use std::sync::Arc;
use std::time::Duration;

use bitsd::storage::shared::pg::{PgOptions, PgStateStore};
use bitsd::storage::shared::SharedBackend;
use bitsd::storage::{CommitOutcome, FragmentCommit, SessionBackend, SessionState};
use bitsd_tests::pattern;
use bitsd_tests::pg::session_record;
use bitsd_tests::shared_backend::listed_keys;
use bytes::Bytes;
use gc_support::{at, fragment, objects_of, plan, read_all, two};

/// Every object key under the bucket's prefix (sessions and files).
async fn all_keys(backend: &SharedBackend) -> Vec<String> {
    listed_keys(backend.objects(), backend.objects().prefix()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_without_a_row_lose_their_objects_after_the_grace_and_nothing_else_does() {
    let Some(n) = two().await else { return };
    // An orphan: its row deleted by hand (fragments and a reply in the bucket stay).
    let orphan = session_record(None);
    n.a.create(&orphan).await.unwrap();
    for (i, offset) in [0u64, 10_000].into_iter().enumerate() {
        let bytes = pattern(10_000, 20 + i as u64);
        let r = at(&orphan, offset, 20_000);
        assert_eq!(
            fragment(&n.a, &r, offset, &bytes, 20_000).await,
            FragmentCommit::Committed
        );
    }
    let reply = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(reply.path(), pattern(3_000, 29)).unwrap();
    n.a.store_reply_file(&orphan.id, reply.path())
        .await
        .unwrap();
    assert_eq!(objects_of(&n.a, &orphan.id).await.len(), 3);
    assert!(n.a.state().remove(&orphan.id).await.unwrap());

    // A straggler: a writer recorded its pending row, another node purged the session (its
    // objects, then its row and pending rows), then the writer's object landed. Its commit
    // loses; if the writer dies before it can delete its object, nothing but the bucket
    // knows of it.
    let purged = session_record(None);
    n.a.create(&purged).await.unwrap();
    let mut late =
        n.a.begin_fragment(&purged.id, plan(0, 5_000))
            .await
            .unwrap();
    // The pending row goes in while the body streams (a task of its own): the purge comes
    // after it, as the straggler's story has it.
    let recorded = tokio::time::Instant::now();
    while n
        .a
        .state()
        .session_objects(&purged.id)
        .await
        .unwrap()
        .is_empty()
    {
        assert!(
            recorded.elapsed() < std::time::Duration::from_secs(10),
            "the writer's pending row never went in"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    n.b.purge(&purged.id).await.unwrap();
    late.write(Bytes::from(pattern(5_000, 30))).await.unwrap();
    assert!(matches!(
        late.commit(0, &at(&purged, 5_000, 5_000)).await.unwrap(),
        FragmentCommit::Lost { .. }
    ));
    // A live writer deletes such an object itself once its commit lost and its pending row
    // is gone (tests/tests/farm_slow_writer.rs) ...
    let lost = tokio::time::Instant::now();
    while !objects_of(&n.a, &purged.id).await.is_empty() {
        assert!(
            lost.elapsed() < std::time::Duration::from_secs(10),
            "the straggler's object outlived its writer's lost commit"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // ... a writer that died first does not: its object stays for the orphan collector.
    n.a.objects()
        .put_stream(
            n.a.objects().fragment_key(&purged.id, 0),
            futures_util::stream::iter([Ok::<_, bitsd::storage::StorageError>(Bytes::from(
                pattern(5_000, 30),
            ))]),
        )
        .await
        .unwrap();
    assert_eq!(objects_of(&n.a, &purged.id).await.len(), 1);

    // Kept: a live session, a tombstone with an object left behind, and a published file
    // whose session row is gone too.
    let live = session_record(None);
    n.a.create(&live).await.unwrap();
    let live_bytes = pattern(7_000, 31);
    assert_eq!(
        fragment(&n.a, &live, 0, &live_bytes, 70_000).await,
        FragmentCommit::Committed
    );
    let ended = session_record(None);
    n.a.create(&ended).await.unwrap();
    // The tombstone alone (a Close's own delete runs in the background and could take the
    // object put below).
    n.a.state()
        .close(&ended.id, SessionState::Cancelled)
        .await
        .unwrap();
    let leftover = n.a.objects().fragment_key(&ended.id, 0);
    n.a.objects()
        .put_stream(
            leftover.clone(),
            futures_util::stream::iter([Ok::<_, bitsd::storage::StorageError>(Bytes::from(
                pattern(100, 32),
            ))]),
        )
        .await
        .unwrap();
    let mut published = session_record(None);
    published.destination = Some("orphans/out.bin".into());
    n.a.create(&published).await.unwrap();
    let file = pattern(9_000, 33);
    assert_eq!(
        fragment(&n.a, &published, 0, &file, 9_000).await,
        FragmentCommit::Committed
    );
    assert_eq!(
        n.a.publish_upload(&published.id, "orphans/out.bin", false)
            .await
            .unwrap(),
        CommitOutcome::Committed
    );
    assert!(n.a.state().remove(&published.id).await.unwrap());

    let mut found = n.b.orphan_sessions().await.unwrap();
    found.sort();
    let mut want = vec![orphan.id, purged.id];
    want.sort();
    assert_eq!(found, want, "the sessions with objects and no row");

    // Within the grace nothing goes.
    let before = all_keys(&n.a).await;
    assert_eq!(
        n.b.collect_orphan_sessions(Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(all_keys(&n.a).await, before);

    // Past it, exactly the orphans' objects go, while new sessions are being created and
    // written on the other node (a session's row precedes its objects: never touched).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let writer = async {
        let mut made = Vec::new();
        for i in 0..6u64 {
            let r = session_record(None);
            n.a.create(&r).await.unwrap();
            let bytes = pattern(4_000, 40 + i);
            assert_eq!(
                fragment(&n.a, &r, 0, &bytes, 4_000).await,
                FragmentCommit::Committed
            );
            made.push((r, bytes));
        }
        made
    };
    let (deleted, made) = tokio::join!(n.b.collect_orphan_sessions(Duration::ZERO), writer);
    assert_eq!(
        deleted.unwrap(),
        4,
        "3 objects of the orphan, 1 of the straggler"
    );
    assert!(objects_of(&n.a, &orphan.id).await.is_empty());
    assert!(objects_of(&n.a, &purged.id).await.is_empty());
    for (r, bytes) in &made {
        assert_eq!(&read_all(&n.b, &r.id).await, bytes, "a new session's bytes");
    }
    let after = all_keys(&n.a).await;
    let gone: Vec<_> = before.iter().filter(|k| !after.contains(k)).collect();
    assert_eq!(gone.len(), 4, "{gone:?}");
    let prefixes = [
        n.a.objects().session_prefix(&orphan.id).as_str().to_owned(),
        n.a.objects().session_prefix(&purged.id).as_str().to_owned(),
    ];
    assert!(
        gone.iter()
            .all(|k| prefixes.iter().any(|p| k.starts_with(&format!("{p}/")))),
        "{gone:?}"
    );
    assert_eq!(read_all(&n.a, &live.id).await, live_bytes);
    assert!(
        after.contains(&leftover.as_str().to_owned()),
        "a tombstone's object"
    );
    let file_key = n.a.objects().file_key("orphans/out.bin");
    assert_eq!(
        n.b.objects()
            .read(&file_key, None)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        file,
        "a published file"
    );
    // Nothing left to find; the sweeper's own call finds nothing more either.
    assert!(n.b.orphan_sessions().await.unwrap().is_empty());
    let collected = n.a.collect_garbage(Duration::ZERO).await.unwrap();
    assert_eq!(collected, 0, "{:?}", all_keys(&n.a).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_farm_on_another_database_sharing_the_prefix_deletes_nothing() {
    let Some(n) = two().await else { return };
    let record = session_record(None);
    n.a.create(&record).await.unwrap();
    let data = pattern(6_000, 50);
    assert_eq!(
        fragment(&n.a, &record, 0, &data, 6_000).await,
        FragmentCommit::Committed
    );
    // This farm's first scan claims the prefix for its database.
    assert!(n.a.orphan_sessions().await.unwrap().is_empty());
    // A second farm: its own database, the same bucket and prefix (a misconfiguration). To
    // it every session of the first farm has no row; it must delete none of them.
    let pg = Arc::clone(&n._pg);
    let other_url = tokio::task::spawn_blocking(move || pg.fresh_database())
        .await
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let other = SharedBackend::from_parts(
        PgStateStore::connect(&other_url, PgOptions::default())
            .await
            .unwrap(),
        n.a.objects().clone(),
        scratch.path().to_owned(),
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let refused = other.collect_orphan_sessions(Duration::ZERO).await;
    assert!(
        matches!(refused, Err(bitsd::storage::StorageError::Corrupt { .. })),
        "{refused:?}"
    );
    assert!(other.collect_garbage(Duration::ZERO).await.is_err());
    assert_eq!(
        read_all(&n.b, &record.id).await,
        data,
        "the first farm's bytes"
    );
    // The owner's own scans go on.
    assert_eq!(
        n.b.collect_orphan_sessions(Duration::ZERO).await.unwrap(),
        0
    );
    assert_eq!(objects_of(&n.a, &record.id).await.len(), 1);
}
