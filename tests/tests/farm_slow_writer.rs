//! A fragment writer still sending when the collector of another node claims its pending row
//! (the row is older than `pending_object_grace_secs`): the commit is refused (the collector
//! and the commit exclude each other), and the object the writer completed after the claim
//! must not stay in the bucket named by nothing (no pending row, no index entry: neither the
//! collector nor Close would ever find it; only the purge of the session's tombstone lists
//! its prefix). Two in-process nodes on one real PostgreSQL and one real Garage; skips with a
//! printed reason when PostgreSQL or Garage is missing.
#![allow(clippy::unwrap_used)]

mod gc_support;

use std::time::Duration;

use bitsd::storage::shared::SharedBackend;
use bitsd::storage::{FragmentCommit, SessionBackend, SessionRecord};
use bitsd_tests::farm_servers::FarmServers;
use bitsd_tests::pattern;
use bitsd_tests::pg::session_record;
use bitsd_tests::shared_backend::{backend_on, listed_keys, pending_of};
use bytes::Bytes;
use gc_support::{at, plan};

/// Waits (10 s at most) until the session's prefix holds no object; fails naming what stays.
async fn no_object_left(node: &SharedBackend, record: &SessionRecord, how: &str) {
    let objects = node.objects();
    let prefix = objects.session_prefix(&record.id);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let keys = listed_keys(objects, &prefix).await;
        if keys.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{how}: an object no pending row and no index entry names stays in the bucket: \
             {keys:?} (pending rows: {:?})",
            pending_of(node, &record.id).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_whose_row_another_node_collected_leaves_no_unnamed_object() {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let store = servers.garage.object_store_config("slow");
    let writer = backend_on(&servers.postgres_url, &store, scratch.path()).await;
    let sweeper = backend_on(&servers.postgres_url, &store, scratch.path()).await;
    let data = pattern(5000, 21);

    for how in ["reserved with the load", "inserted while the body streams"] {
        let record = session_record(None);
        // Created on the sweeper's node: the writer has no memory of it and loads it.
        sweeper.create(&record).await.unwrap();
        let (_, slot) = writer.load_for_fragment(&record.id, 0).await.unwrap();
        let mut sink = if how == "reserved with the load" {
            writer
                .begin_reserved_fragment(&record.id, plan(0, 5000), slot.unwrap())
                .await
                .unwrap()
        } else {
            drop(slot);
            writer
                .begin_fragment(&record.id, plan(0, 5000))
                .await
                .unwrap()
        };
        sink.write(Bytes::from(data.clone())).await.unwrap();
        // The row is in (the body is still "streaming"); the other node's collector, with a
        // grace the writer has outlived, claims it and deletes the object (not there yet).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while pending_of(&writer, &record.id).await.len() != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{how}: no pending row"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        sweeper.collect_garbage(Duration::ZERO).await.unwrap();
        assert!(pending_of(&writer, &record.id).await.is_empty(), "{how}");
        // The body ends: the writer completes its object, and its commit is refused.
        match sink.commit(0, &at(&record, 5000, 5000)).await.unwrap() {
            FragmentCommit::Lost { current } => {
                assert_eq!(current.unwrap().received, 0, "{how}")
            }
            other => panic!("{how}: a commit whose row was collected went through: {other:?}"),
        }
        assert!(
            writer
                .state()
                .fragments(&record.id)
                .await
                .unwrap()
                .is_empty(),
            "{how}: nothing indexed"
        );
        no_object_left(&writer, &record, how).await;
        // The retry of the fragment commits as usual.
        let (_, slot) = writer.load_for_fragment(&record.id, 0).await.unwrap();
        let mut sink = writer
            .begin_reserved_fragment(&record.id, plan(0, 5000), slot.unwrap())
            .await
            .unwrap();
        sink.write(Bytes::from(data.clone())).await.unwrap();
        assert_eq!(
            sink.commit(0, &at(&record, 5000, 5000)).await.unwrap(),
            FragmentCommit::Committed,
            "{how}"
        );
    }
}
