//! Small fragments merged behind the upload on a real PostgreSQL and a real Garage: the index
//! after a node's own background merges is exactly the expected runs; a merge racing another,
//! racing the upload's completion, dying before its swap, or finding a fragment object that
//! does not match its index entry leaves the index and the bytes as they were and no stray
//! object (or one the collector takes). Skips with a printed reason when PostgreSQL or Garage
//! is not installed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bitsd::storage::shared::objects::ObjectKey;
use bitsd::storage::shared::{Coalesced, SharedBackend};
use bitsd::storage::{SessionBackend, SessionRecord};
use bitsd_tests::pattern;
use bitsd_tests::pg::{raw_client, session_record};
use bitsd_tests::shared_backend::{
    bucket_matches_index, farm, index, index_becomes, objects_and_index, pending_rows,
    publish_and_read, read_all, send, Farm,
};
use bytes::Bytes;

/// A farm with merging on or off, under `coalesce/`.
async fn coalescing(on: bool) -> Option<Farm> {
    farm("coalesce", |store| store.coalesce_fragments = Some(on)).await
}

const F: usize = 20_000;

/// The index rows of `n` fragments of `F` bytes from `at`.
fn small(at: u64, n: u64) -> Vec<(u64, u64)> {
    (0..n).map(|i| (at + i * F as u64, F as u64)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_fragments_are_merged_behind_the_upload_which_completes_byte_exact() {
    let Some(farm) = coalescing(true).await else {
        return;
    };
    let backend = &farm.backend;
    // 184 fragments of 20,000 bytes (crossing 1, 2 and 3 MiB at the 53rd, 105th and 158th),
    // one of 1,500,000 (crossing 4 MiB: long, not merged), then 60 of 20,000.
    let total = 184 * F + 1_500_000 + 60 * F;
    let data = pattern(total, 7);
    let mut record = session_record(None);
    record.destination = Some("coalesce/whole.bin".into());
    backend.create(&record).await.unwrap();
    let id = record.id;
    for _ in 0..184 {
        send(backend, &mut record, &data, F).await;
    }
    send(backend, &mut record, &data, 1_500_000).await;
    for _ in 0..59 {
        send(backend, &mut record, &data, F).await;
    }
    let mut expected = vec![
        (0, 1_060_000),
        (1_060_000, 1_040_000),
        (2_100_000, 1_060_000),
    ];
    // Before the long fragment a run of 26 (fewer than MIN_RUN): left as it is.
    expected.extend(small(3_160_000, 26));
    expected.push((3_680_000, 1_500_000));
    // After it, 4 up to 5 MiB (left), then a run of 52 up to 6 MiB, then the tail.
    expected.extend(small(5_180_000, 4));
    expected.push((5_260_000, 1_040_000));
    expected.extend(small(6_300_000, 3));
    let now = index_becomes(backend, &id, &expected).await;
    assert_eq!(now, expected, "the merges a node starts by itself");
    // The merged runs' objects are gone from the bucket (deleted after each swap).
    let seen = bucket_matches_index(backend, &id).await;
    assert_eq!(
        seen.0, seen.1,
        "the bucket holds exactly the index's objects"
    );
    assert_eq!(pending_rows(&farm.url).await, 0);

    // The last fragment: completion reads 39 objects instead of 245.
    send(backend, &mut record, &data, F).await;
    assert_eq!(index(backend, &id).await.len(), 39);
    assert!(read_all(backend, &id).await == data, "read back byte-exact");
    let published = publish_and_read(backend, &id, "coalesce/whole.bin").await;
    assert!(published == data, "published byte-exact");
}

/// Fragments in [`one_run`]: the last of 53 fragments of 20,000 bytes crosses 1 MiB.
const RUN: usize = 53;
const RUN_START: u64 = (RUN as u64 - 1) * F as u64;
const RUN_END: u64 = RUN as u64 * F as u64;

/// An upload with one run to merge (all its fragments so far), nothing merged yet.
async fn one_run(backend: &SharedBackend) -> (SessionRecord, Vec<u8>) {
    let data = pattern((RUN + 1) * F, 11);
    let mut record = session_record(None);
    backend.create(&record).await.unwrap();
    for _ in 0..RUN {
        send(backend, &mut record, &data, F).await;
    }
    assert_eq!(
        index(backend, &record.id).await.len(),
        RUN,
        "nothing merged"
    );
    (record, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_merges_of_one_run_one_wins_and_the_loser_leaves_nothing() {
    let Some(farm) = coalescing(false).await else {
        return;
    };
    let backend = &farm.backend;
    let (mut record, data) = one_run(backend).await;
    let id = record.id;
    let (start, end) = (RUN_START, RUN_END);
    let (a, b) = tokio::join!(
        backend.coalesce(&id, start, end),
        backend.coalesce(&id, start, end)
    );
    let outcomes = [a.unwrap(), b.unwrap()];
    let merged = Coalesced::Merged {
        fragments: RUN,
        bytes: RUN_END,
    };
    assert_eq!(
        outcomes.iter().filter(|o| **o == merged).count(),
        1,
        "{outcomes:?}"
    );
    assert!(outcomes
        .iter()
        .all(|o| *o == merged || matches!(o, Coalesced::Lost | Coalesced::Nothing)));
    assert_eq!(index(backend, &id).await, vec![(0, RUN_END)]);
    let (listed, indexed) = objects_and_index(backend, &id).await;
    assert_eq!(listed, indexed);
    assert_eq!(pending_rows(&farm.url).await, 0);
    // Again: nothing left to merge.
    assert_eq!(
        backend.coalesce(&id, start, end).await.unwrap(),
        Coalesced::Nothing
    );
    send(backend, &mut record, &data, F).await;
    assert!(read_all(backend, &id).await == data);
}

/// Holds the session's row locked from another connection, so a merge stops before its swap.
async fn lock_row(url: &str, id: &bitsd_protocol::SessionId) -> tokio_postgres::Client {
    let db = raw_client(url).await;
    db.batch_execute("BEGIN").await.unwrap();
    db.execute(
        "SELECT 1 FROM bitsd_sessions WHERE id = $1 FOR UPDATE",
        &[id.as_uuid()],
    )
    .await
    .unwrap();
    db
}

/// Waits until the bucket holds one fragment object more than the index (the merged one).
async fn merged_object_written(backend: &SharedBackend, id: &bitsd_protocol::SessionId) {
    for _ in 0..400 {
        let (listed, indexed) = objects_and_index(backend, id).await;
        if listed.len() == indexed.len() + 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the merged object never appeared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_that_finds_the_upload_completed_changes_nothing_and_deletes_its_object() {
    let Some(farm) = coalescing(false).await else {
        return;
    };
    let backend = farm.backend.clone();
    let (record, _data) = one_run(&backend).await;
    let id = record.id;
    let before = index(&backend, &id).await;
    let db = lock_row(&farm.url, &id).await;
    let merge = {
        let backend = backend.clone();
        tokio::spawn(async move { backend.coalesce(&id, RUN_START, RUN_END).await })
    };
    merged_object_written(&backend, &id).await;
    // The upload completes (as a last fragment's commit would) while the merge waits.
    db.batch_execute(&format!(
        "UPDATE bitsd_sessions SET state = 'complete' WHERE id = '{}'; COMMIT;",
        id.as_uuid()
    ))
    .await
    .unwrap();
    assert_eq!(merge.await.unwrap().unwrap(), Coalesced::Lost);
    assert_eq!(index(&backend, &id).await, before);
    let (listed, indexed) = objects_and_index(&backend, &id).await;
    assert_eq!(listed, indexed, "the merged object is deleted");
    assert_eq!(pending_rows(&farm.url).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dying_before_the_swap_leaves_its_object_to_the_collector() {
    let Some(farm) = coalescing(false).await else {
        return;
    };
    let backend = farm.backend.clone();
    let (mut record, data) = one_run(&backend).await;
    let id = record.id;
    let before = index(&backend, &id).await;
    let db = lock_row(&farm.url, &id).await;
    let merge = {
        let backend = backend.clone();
        tokio::spawn(async move { backend.coalesce(&id, RUN_START, RUN_END).await })
    };
    merged_object_written(&backend, &id).await;
    merge.abort(); // the node is gone between the write and the swap
    let _ = merge.await;
    db.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(index(&backend, &id).await, before);
    assert_eq!(
        pending_rows(&farm.url).await,
        1,
        "the merged object is pending"
    );
    assert_eq!(
        backend
            .collect_pending_objects(Duration::ZERO)
            .await
            .unwrap(),
        1
    );
    let (listed, indexed) = objects_and_index(&backend, &id).await;
    assert_eq!(listed, indexed);
    send(&backend, &mut record, &data, F).await;
    assert!(read_all(&backend, &id).await == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragment_object_unlike_its_index_entry_is_not_merged() {
    let Some(farm) = coalescing(false).await else {
        return;
    };
    let backend = &farm.backend;
    let (record, _data) = one_run(backend).await;
    let id = record.id;
    let before = index(backend, &id).await;
    // The 6th fragment's object rewritten with other bytes of the same length.
    let victim = backend.state().fragments(&id).await.unwrap()[5]
        .object_key
        .clone();
    let other = Bytes::from(pattern(F, 99));
    backend
        .objects()
        .put_stream(
            ObjectKey::parse(&victim).unwrap(),
            futures_util::stream::iter([Ok::<_, bitsd::storage::StorageError>(other)]),
        )
        .await
        .unwrap();
    let err = backend.coalesce(&id, RUN_START, RUN_END).await.unwrap_err();
    assert!(err.to_string().contains("CRC-32C"), "{err}");
    assert_eq!(index(backend, &id).await, before);
    let (listed, indexed) = objects_and_index(backend, &id).await;
    assert_eq!(listed, indexed, "no merged object left");
    assert_eq!(pending_rows(&farm.url).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_that_starts_after_the_upload_completed_reads_nothing() {
    let Some(farm) = coalescing(false).await else {
        return;
    };
    let backend = &farm.backend;
    let (record, _data) = one_run(backend).await;
    let id = record.id;
    // The upload completed (as a last fragment's commit would), and one fragment object is
    // gone: a merge that read the run would fail on it.
    raw_client(&farm.url)
        .await
        .execute(
            "UPDATE bitsd_sessions SET state = 'complete' WHERE id = $1",
            &[id.as_uuid()],
        )
        .await
        .unwrap();
    let victim = backend.state().fragments(&id).await.unwrap()[7]
        .object_key
        .clone();
    backend
        .objects()
        .delete(&[ObjectKey::parse(&victim).unwrap()])
        .await
        .unwrap();
    assert_eq!(
        backend.coalesce(&id, RUN_START, RUN_END).await.unwrap(),
        Coalesced::Lost,
        "refused before reading anything"
    );
    assert_eq!(pending_rows(&farm.url).await, 0);
}
