//! A node that dies while it holds an assembly's lease: the next attempt takes the assembly
//! over as soon as PostgreSQL sees the node's liveness lock go (its connection closed), not
//! when the lease runs out (storage's `pg/liveness.rs`). The lease stays the rule for holders
//! that carry no liveness key. Real PostgreSQL (and, for the killed binary, real Garage and
//! two real `bitsd` processes). Skips with a printed reason when they are not installed.
#![allow(clippy::unwrap_used)]

mod assembly_support;

use std::time::Duration;

use assembly_support::{Setup, MIB, TOTAL};
use bitsd_storage::shared::objects::Objects;
use bitsd_storage::shared::pg::{AssemblyClaim, PgStateStore};
use bitsd_tests::pg::{cluster_or_skip, raw_client, session_record, state_store};
use bitsd_tests::relay::Relay;
use bitsd_tests::shared_backend::read_object;
use bitsd_tests::{bits_post_request, pattern, until, BitsdProcess, RawClient};
use uuid::Uuid;

/// The first key of a node's liveness lock (`NODE_LOCK_CLASS`, ASCII "bitt").
const NODE_LOCK_CLASS: i64 = 0x6269_7474;

/// PostgreSQL's clock in milliseconds, as the lease is kept.
const PG_NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

/// The key a holder id carries (its first 32 bits), if it is a version-8 id.
fn key_of(holder: &Uuid) -> Option<i64> {
    (holder.get_version_num() == 8).then(|| {
        let b = holder.as_bytes();
        i64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    })
}

/// Whether some connection holds the liveness lock `key` in the current database.
async fn lock_held(pg: &tokio_postgres::Client, key: i64) -> bool {
    pg.query_one(
        "SELECT count(*) FROM pg_locks
          WHERE locktype = 'advisory' AND granted AND objsubid = 2
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND classid::bigint = $1 AND objid::bigint = $2",
        &[&NODE_LOCK_CLASS, &key],
    )
    .await
    .unwrap()
    .get::<_, i64>(0)
        == 1
}

/// A claim by `store` for `holder` (a 60 s lease).
async fn claim(
    store: &PgStateStore,
    id: &bitsd_protocol::SessionId,
    slot: &str,
    holder: &Uuid,
) -> AssemblyClaim {
    store
        .claim_assembly(id, slot, holder, 60_000)
        .await
        .unwrap()
}

/// Leases of a minute, so only the liveness lock can end them within the test: a store
/// dropped (its node gone) and a liveness connection PostgreSQL ended (its node alive) let
/// the next claim take the assembly at once; a live node's lock and a holder without a key
/// keep it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_node_is_gone_loses_its_assembly_before_its_lease_ends() {
    let Some(cluster) = cluster_or_skip() else {
        return;
    };
    let url = cluster.fresh_database();
    let pg = raw_client(&url).await;
    let (a, b, c) = (
        state_store(&url).await,
        state_store(&url).await,
        state_store(&url).await,
    );
    let record = session_record(None);
    let id = record.id;
    assert!(a.create(&record).await.unwrap());

    // A holds the assembly with its lock: B waits.
    let ha = a.assembly_holder().await;
    let key_a = key_of(&ha).expect("a node holding its lock gives version-8 holder ids");
    assert!(lock_held(&pg, key_a).await);
    assert!(a
        .start_assembly(&id, "dest", ("k/dest", "upload-1"), &ha, 60_000)
        .await
        .unwrap());
    let hb = b.assembly_holder().await;
    let key_b = key_of(&hb).unwrap();
    assert_ne!(key_a, key_b, "two nodes drew one key");
    assert_eq!(claim(&b, &id, "dest", &hb).await, AssemblyClaim::Held);

    // A's node goes (the last clone of its store dropped: its connection closes).
    drop(a);
    until("A's lock is gone", Duration::from_secs(10), || async {
        !lock_held(&pg, key_a).await
    })
    .await;
    match claim(&b, &id, "dest", &hb).await {
        AssemblyClaim::Taken(recorded) => assert_eq!(recorded.upload_id, "upload-1"),
        other => panic!("B did not take over the assembly of a node that is gone: {other:?}"),
    }

    // B alive: C waits.
    let hc = c.assembly_holder().await;
    assert_eq!(claim(&c, &id, "dest", &hc).await, AssemblyClaim::Held);

    // PostgreSQL ends B's liveness connection (B itself alive): C takes over, B hears it
    // lost the assembly at its next renewal, and B's node takes its lock again.
    let ended: bool = pg
        .query_one(
            "SELECT bool_and(pg_terminate_backend(pid)) FROM pg_locks
              WHERE locktype = 'advisory' AND objsubid = 2
                AND classid::bigint = $1 AND objid::bigint = $2",
            &[&NODE_LOCK_CLASS, &key_b],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ended);
    until("B's lock is gone", Duration::from_secs(10), || async {
        !lock_held(&pg, key_b).await
    })
    .await;
    assert!(matches!(
        claim(&c, &id, "dest", &hc).await,
        AssemblyClaim::Taken(_)
    ));
    assert!(!b.renew_assembly(&id, "dest", &hb, 60_000).await.unwrap());
    until(
        "B's node holds its lock again",
        Duration::from_secs(15),
        || async { key_of(&b.assembly_holder().await).is_some() },
    )
    .await;

    // A holder without a key (a node without its lock, or of schema 6): its lease decides.
    let old_style = Uuid::new_v4();
    assert!(c
        .start_assembly(&id, "reply", ("k/reply", "upload-2"), &old_style, 60_000)
        .await
        .unwrap());
    assert_eq!(claim(&b, &id, "reply", &hb).await, AssemblyClaim::Held);
}

/// A node's config: the shared backend on `pg_url`, the store at `endpoint`, parts of 5 MiB
/// streamed from the fragments (nothing merged or copied, as in `assembly_support`).
fn config(setup: &Setup, endpoint: &str) -> String {
    let store = setup.garage().object_store_config("takeover");
    format!(
        "[storage]\nbackend = \"shared\"\npostgres_url = \"{}\"\npostgres_max_connections = 4\n\n\
         [object_store]\nbucket = \"{}\"\nprefix = \"{}\"\nendpoint = \"{endpoint}\"\n\
         region = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n\
         part_size = {}\ncoalesce_fragments = false\nserver_side_copy = false\n",
        setup.servers.postgres_url,
        store.bucket,
        store.prefix,
        store.region.as_deref().unwrap(),
        store.access_key_id.as_deref().unwrap(),
        store.secret_access_key.as_deref().unwrap(),
        5 * MIB,
    )
}

/// A `bitsd` SIGKILLed while it assembles a 21 MiB upload (its relay to Garage stops part 3,
/// parts 1, 2 and 4 are recorded): the client's final fragment sent again to a second `bitsd`
/// is taken over while the killed node's lease still runs (by PostgreSQL's clock), then
/// acknowledged, and the file is the upload. With the lease alone the takeover would come
/// 1.5 to 2 s after the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_assembly_is_taken_over_before_its_lease_ends() {
    let Some(setup) = Setup::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(setup.garage().s3_addr()).await;
    relay.stop_request_to(&["PUT ", "partNumber=3&"]);
    let node1 = BitsdProcess::start_configured(
        dir.path(),
        "n1",
        config(&setup, &format!("http://{}", relay.addr())),
    )
    .await;
    let node2 = BitsdProcess::start_configured(
        dir.path(),
        "n2",
        config(&setup, &setup.garage().endpoint()),
    )
    .await;
    let pg = raw_client(&setup.servers.postgres_url).await;

    let path = "/upload/takeover/killed.bin";
    let data = pattern(TOTAL, 21);
    let mut c1 = RawClient::connect(node1.addr).await;
    let sid = c1.create_session(path).await;
    for i in 0..TOTAL / MIB - 1 {
        let res = c1.fragment(path, &sid, &data, i * MIB, MIB).await;
        res.assert_ack();
        assert_eq!(res.status, 200, "{res:?}");
    }
    let last = TOTAL - MIB;
    let range = format!("bytes {last}-{}/{TOTAL}", TOTAL - 1);
    let final_fragment = bits_post_request(
        path,
        &[
            ("BITS-Packet-Type", "Fragment"),
            ("BITS-Session-Id", &sid),
            ("Content-Range", &range),
        ],
        &data[last..],
    );
    c1.write(&final_fragment).await;
    setup.until_parts_recorded(3).await;
    assert!(relay.holding(), "part 3 was not held");

    let row = pg
        .query_one("SELECT holder, held_until_ms FROM bitsd_assemblies", &[])
        .await
        .unwrap();
    let (holder, held_until): (Uuid, i64) = (row.get(0), row.get(1));
    assert!(
        key_of(&holder).is_some(),
        "the first node's attempt carries no liveness key: {holder}"
    );
    node1.kill();

    // The re-sent final fragment, and PostgreSQL watched meanwhile: when the holder changes,
    // the killed node's lease has not run out.
    let watch = async {
        loop {
            let row = pg
                .query_opt(
                    &format!("SELECT holder, {PG_NOW_MS} FROM bitsd_assemblies"),
                    &[],
                )
                .await
                .unwrap();
            match row {
                Some(r) if r.get::<_, Uuid>(0) == holder => {}
                Some(r) => return Some(r.get::<_, i64>(1)),
                None => return None,
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let resend = async {
        let mut c2 = RawClient::connect(node2.addr).await;
        tokio::time::timeout(Duration::from_secs(60), c2.send(&final_fragment))
            .await
            .expect("no answer to the re-sent final fragment within 60 s")
    };
    let (taken_at, res) = tokio::join!(watch, resend);
    res.assert_ack();
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        res.header("bits-received-content-range"),
        Some(TOTAL.to_string().as_str())
    );
    let taken_at = taken_at.expect("the journal went before another attempt held it");
    eprintln!(
        "taken over {} ms before the killed node's lease ran out",
        held_until - taken_at
    );
    assert!(
        taken_at < held_until,
        "taken over {} ms after the killed node's lease ran out",
        taken_at - held_until
    );

    let store = setup.garage().object_store_config("takeover");
    let objects = Objects::new(&store).unwrap();
    let file = read_object(&objects, &objects.file_key("takeover/killed.bin")).await;
    assert!(file == data, "the published file is not the upload");
    drop(relay);
    node2.kill();
}
