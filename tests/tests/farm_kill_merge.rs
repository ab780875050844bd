//! Kill points of a merge (docs/farm-internals.md, "Merging small fragments"): a real `bitsd`
//! node merges an upload's first MiB of 20,000-byte fragments into one object in the
//! background, and a relay to Garage (`bitsd_tests::relay`) stops it between two steps of
//! the merge's order, where the bucket and PostgreSQL are looked at; then it is SIGKILLed
//! and the client goes on with a second node:
//!
//! - `Stored`: the merged object is in the bucket with its pending row, the index still
//!   names the small fragments (the PUT's answer never reaches the node);
//! - `Swapped`: the index names the merged object, the small fragments' objects are not
//!   deleted (their DeleteObjects never reaches the store).
//!
//! Either way the upload is published byte-exact from the second node; the merged object
//! left pending, and the small objects a swapped merge left (pending since the swap), are
//! collected by the second node's sweeper. Skips with a printed reason when PostgreSQL or
//! Garage is not installed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bitsd::storage::shared::objects::Objects;
use bitsd::storage::SessionBackend;
use bitsd_protocol::SessionId;
use bitsd_tests::farm_servers::FarmServers;
use bitsd_tests::relay::Relay;
use bitsd_tests::shared_backend::{backend_on, listed_keys};
use bitsd_tests::{pattern, until, BitsdProcess, RawClient};

const PREFIX: &str = "killmerge";
const SMALL: usize = 20_000;
/// Fragments of the upload; the 53rd reaches 1 MiB and starts the merge of the first 53.
const FRAGMENTS: usize = 60;
const MERGED: usize = 53;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    Stored,
    Swapped,
}

/// A node's config: `[storage]` on `url` (the collector's grace 3 s, sweeping every
/// `sweep` s) and `[object_store]` on `endpoint`.
fn config(servers: &FarmServers, endpoint: &str, sweep: u64) -> String {
    let store = servers.garage.object_store_config(PREFIX);
    format!(
        "cleanup_interval_secs = {sweep}\n[storage]\nbackend = \"shared\"\n\
         postgres_url = \"{}\"\npending_object_grace_secs = 3\n\n\
         [object_store]\nbucket = \"{}\"\nprefix = \"{}\"\nendpoint = \"{endpoint}\"\n\
         region = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
        servers.postgres_url,
        store.bucket,
        store.prefix,
        store.region.as_deref().unwrap(),
        store.access_key_id.as_deref().unwrap(),
        store.secret_access_key.as_deref().unwrap(),
    )
}

/// Fragment objects of the session.
async fn fragment_objects(objects: &Objects, id: &SessionId) -> Vec<String> {
    listed_keys(objects, &objects.session_prefix(id))
        .await
        .into_iter()
        .filter(|k| k.contains("/frag/"))
        .collect()
}

/// The index of the session as (offset, length) pairs.
async fn index(pg: &tokio_postgres::Client, id: &SessionId) -> Vec<(i64, i64)> {
    pg.query(
        "SELECT start_offset, len FROM bitsd_fragments WHERE session_id = $1 \
         ORDER BY start_offset",
        &[id.as_uuid()],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

async fn pending_rows(pg: &tokio_postgres::Client) -> i64 {
    pg.query_one("SELECT count(*) FROM bitsd_pending_objects", &[])
        .await
        .unwrap()
        .get(0)
}

async fn kill_at(point: Point) {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = servers.garage.object_store_config(PREFIX);
    let objects = Objects::new(&store).unwrap();
    let pg = bitsd_tests::pg::raw_client(&servers.postgres_url).await;
    let node2 = BitsdProcess::start_configured(
        dir.path(),
        "n2",
        config(&servers, &servers.garage.endpoint(), 1),
    )
    .await;
    let s3 = Relay::start(servers.garage.s3_addr()).await;
    let node1 = BitsdProcess::start_configured(
        dir.path(),
        "n1",
        config(&servers, &format!("http://{}", s3.addr()), 3600),
    )
    .await;

    let path = format!("/upload/{PREFIX}/{point:?}.bin");
    let data = pattern(FRAGMENTS * SMALL, 5);
    let mut c1 = RawClient::connect(node1.addr).await;
    let sid = c1.create_session(&path).await;
    let id: SessionId = sid.trim_matches(['{', '}']).parse().unwrap();
    for i in 0..MERGED - 1 {
        c1.fragment(&path, &sid, &data, i * SMALL, SMALL)
            .await
            .assert_ack();
    }
    match point {
        // The merged object's PUT (its key starts at offset 0, as the first fragment's did).
        Point::Stored => s3.hold_answer_to(&["PUT ", "/frag/00000000000000000000-"]),
        // The small fragments' deletion after the swap, before the store sees it.
        Point::Swapped => s3.stop_request_to(&["POST ", "delete"]),
    }
    c1.fragment(&path, &sid, &data, (MERGED - 1) * SMALL, SMALL)
        .await
        .assert_ack();
    let at = format!("{point:?}");
    until(
        &format!("{at}: the merge stops at its point"),
        Duration::from_secs(20),
        || async {
            s3.holding()
                && match point {
                    Point::Stored => fragment_objects(&objects, &id).await.len() == MERGED + 1,
                    Point::Swapped => index(&pg, &id).await.len() == 1,
                }
        },
    )
    .await;
    match point {
        Point::Stored => {
            assert_eq!(index(&pg, &id).await.len(), MERGED, "{at}: not swapped");
            assert_eq!(
                pending_rows(&pg).await,
                1,
                "{at}: the merged object is pending"
            );
        }
        Point::Swapped => {
            assert_eq!(
                index(&pg, &id).await,
                vec![(0, (MERGED * SMALL) as i64)],
                "{at}"
            );
            let listed = fragment_objects(&objects, &id).await;
            assert_eq!(
                listed.len(),
                MERGED + 1,
                "{at}: the small objects are still there: {listed:#?}"
            );
            assert_eq!(
                pending_rows(&pg).await,
                MERGED as i64,
                "{at}: the small objects are pending"
            );
        }
    }
    tokio::task::spawn_blocking(move || node1.kill())
        .await
        .unwrap();
    drop(s3);

    // The client goes on with the second node.
    let mut c2 = RawClient::connect(node2.addr).await;
    for i in MERGED..FRAGMENTS {
        c2.fragment(&path, &sid, &data, i * SMALL, SMALL)
            .await
            .assert_ack();
    }
    let dest = objects.file_key(&format!("{PREFIX}/{point:?}.bin"));
    let published = objects.read(&dest, None).await.unwrap();
    assert!(
        published.bytes().await.unwrap() == data,
        "{at}: published byte-exact"
    );
    c2.close_session(&path, &sid).await.assert_ack();
    // A pending merged object, or the small objects a swapped merge left pending, are
    // collected by the second node's sweeper (before, a swapped merge's small objects were
    // named by nothing and waited for the session's purge, its tombstone's expiry).
    until(
        &format!("{at}: no pending row"),
        Duration::from_secs(20),
        || async { pending_rows(&pg).await == 0 },
    )
    .await;
    let left = fragment_objects(&objects, &id).await;
    assert!(left.is_empty(), "{at}: left {left:?}");
    drop(node2);
    let scratch = tempfile::tempdir().unwrap();
    let backend = backend_on(&servers.postgres_url, &store, scratch.path()).await;
    backend.purge(&id).await.unwrap();
    assert_eq!(
        listed_keys(&objects, &objects.session_prefix(&id)).await,
        Vec::<String>::new(),
        "{at}: the purge leaves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_after_storing_a_merged_object_loses_nothing() {
    kill_at(Point::Stored).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_after_a_merge_swapped_the_index_loses_nothing() {
    kill_at(Point::Swapped).await;
}
