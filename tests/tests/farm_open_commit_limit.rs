//! `[storage] postgres_open_commit_secs` in a real `bitsd` binary: a fragment's commit runs its
//! statement in a transaction left open while the store completes the object; when the
//! store's answer takes longer than the limit, PostgreSQL ends that transaction, nothing is
//! committed, the client gets a transient 503 and its re-sent fragment is taken. The store's
//! answer is held by a relay (`bitsd_tests::relay`); PostgreSQL's `pg_stat_activity` shows the
//! transaction open, then ended within the limit (with the default of 60 s it would still be
//! open). Skips with a printed reason when PostgreSQL or Garage is not installed.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bitsd_protocol::SessionId;
use bitsd_tests::farm_servers::FarmServers;
use bitsd_tests::pg::open_transactions;
use bitsd_tests::relay::Relay;
use bitsd_tests::{bits_post_request, pattern, until, BitsdProcess, RawClient};

const FRAGMENT: usize = 10_000;
const TOTAL: usize = 3 * FRAGMENT;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_open_longer_than_postgres_open_commit_secs_is_ended_and_the_retry_is_taken() {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let store = servers.garage.object_store_config("open-commit");
    let s3 = Relay::start(servers.garage.s3_addr()).await;
    let dir = tempfile::tempdir().unwrap();
    // A pool of two: the commit's statement runs while the store completes the object.
    let config = format!(
        "[storage]\nbackend = \"shared\"\npostgres_url = \"{}\"\n\
         postgres_max_connections = 2\npostgres_open_commit_secs = 1\n\n\
         [object_store]\nbucket = \"{}\"\nprefix = \"{}\"\nendpoint = \"http://{}\"\n\
         region = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
        servers.postgres_url,
        store.bucket,
        store.prefix,
        s3.addr(),
        store.region.as_deref().unwrap(),
        store.access_key_id.as_deref().unwrap(),
        store.secret_access_key.as_deref().unwrap(),
    );
    let node = BitsdProcess::start_configured(dir.path(), "node", config).await;
    let pg = bitsd_tests::pg::raw_client(&servers.postgres_url).await;
    let state = bitsd_tests::pg::state_store(&servers.postgres_url).await;

    let path = "/upload/open-commit/a.bin";
    let data = pattern(TOTAL, 7);
    let mut c = RawClient::connect(node.addr).await;
    let sid = c.create_session(path).await;
    let id: SessionId = sid.trim_matches(['{', '}']).parse().unwrap();
    c.fragment(path, &sid, &data, 0, FRAGMENT)
        .await
        .assert_ack();

    // The store's answer to the next fragment's PUT is held past the limit.
    s3.hold_answer_to(&["PUT ", "/frag/"]);
    let range = format!("bytes {FRAGMENT}-{}/{TOTAL}", 2 * FRAGMENT - 1);
    let request = bits_post_request(
        path,
        &[
            ("BITS-Packet-Type", "Fragment"),
            ("BITS-Session-Id", &sid),
            ("Content-Range", &range),
        ],
        &data[FRAGMENT..2 * FRAGMENT],
    );
    let inflight = tokio::spawn(async move {
        let res = c.try_send(&request).await.unwrap();
        (c, res)
    });
    until(
        "the commit waits in an open transaction",
        Duration::from_secs(10),
        || async { s3.holding() && open_transactions(&pg).await == 1 },
    )
    .await;
    let opened = Instant::now();
    // PostgreSQL ends it after 1 s (60 s without the key).
    until(
        "PostgreSQL ends the open transaction",
        Duration::from_secs(5),
        || async { open_transactions(&pg).await == 0 },
    )
    .await;
    assert!(
        opened.elapsed() >= Duration::from_millis(500),
        "ended early"
    );
    s3.release_held();
    let (mut c, res) = inflight.await.unwrap();
    assert_eq!(res.status, 503, "a transient answer: {res:?}");
    assert_eq!(res.header("bits-packet-type"), Some("Ack"), "{res:?}");
    assert_eq!(res.header("bits-error-code"), Some("0x801901f7"), "{res:?}");
    assert_eq!(
        state.load(&id).await.unwrap().unwrap().received,
        FRAGMENT as u64,
        "nothing committed"
    );

    // The client re-sends the fragment, then the rest: the file is byte-exact.
    let mut have = FRAGMENT;
    while have < TOTAL {
        let res = c.fragment(path, &sid, &data, have, FRAGMENT).await;
        res.assert_ack();
        assert_eq!(res.status, 200, "{res:?}");
        have += FRAGMENT;
        assert_eq!(
            res.header("bits-received-content-range"),
            Some(have.to_string().as_str())
        );
    }
    let objects = bitsd::storage::shared::objects::Objects::new(&store).unwrap();
    let published = objects
        .read(&objects.file_key("open-commit/a.bin"), None)
        .await
        .unwrap();
    assert!(published.bytes().await.unwrap() == data, "published file");
    c.close_session(path, &sid).await.assert_ack();
}
