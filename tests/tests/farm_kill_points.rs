//! Deterministic kill points of a real farm node: a `bitsd` binary talks to PostgreSQL and
//! Garage through relays (`bitsd_tests::relay`) that stop it exactly between two steps of a
//! fragment's crash-safe order (docs/farm-internals.md, "Object layout, and what is durable
//! when"), where PostgreSQL and the bucket are looked at to prove the node is there; then it
//! is SIGKILLed, and the client re-sends the same fragment to a second node, as BITS does
//! after a timeout. The points, for a fragment in the middle of an upload and for the final
//! fragment of a plain upload and of an upload-reply (echo) job:
//!
//! - `Pending`: the pending-object row is committed, the object is not stored (the PUT never
//!   reaches the store);
//! - `Stored`: the object is in the bucket, `received` is not advanced (the PUT's 200 never
//!   reaches the node); with a pool of two connections or more the node's commit statement
//!   has run meanwhile in a transaction left open until the store's answer (shown by
//!   PostgreSQL's `pg_stat_activity`), with a pool of one the commit waits for the answer;
//! - `Offset`: `received` is advanced in PostgreSQL, no Ack went out (PostgreSQL's answer
//!   never reaches the node); the second node answers with the committed offset and writes
//!   nothing;
//! - final fragment only, `Completed`: the published file (plain) or the reply object
//!   (upload-reply) is in the bucket, the session is not recorded complete;
//! - final fragment only, `Recorded`: the session is recorded committed (plain) or its reply
//!   recorded (upload-reply) in PostgreSQL, no Ack went out.
//!
//! The first node's pool is of two connections (the commit's statement runs while the store
//! completes the object, as with the default pool) or of one (it waits for the store, as
//! when half a pool is busy that way already): each test says which. Fragments are of
//! 10,000 bytes (one PUT each), or of 6 MiB with a part size of 5 MiB: a multipart upload
//! whose completion (`CompleteMultipartUpload`) is the store's last step, held at `Stored`.
//!
//! Every retry must be answered without BG_E_SESSION_NOT_FOUND, with an offset never behind
//! one the client had, and the job must end byte-exact; the killed node's leftovers are
//! collected by the second node's sweeper (a short grace), so no fragment object and no
//! pending row is left at the end; a reply object a killed node stored and never recorded
//! goes with the session's expired tombstone (the sweeper's purge, run by the test). Skips with a printed reason when PostgreSQL or Garage is
//! not installed.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bitsd::storage::shared::objects::{ObjectStoreConfig, Objects};
use bitsd::storage::SessionState;
use bitsd_protocol::SessionId;
use bitsd_tests::farm_servers::FarmServers;
use bitsd_tests::relay::Relay;
use bitsd_tests::shared_backend::listed_keys;
use bitsd_tests::{bits_post_request, pattern, url_path, BitsdProcess, RawClient};

/// The end of a run: what the killed nodes left is collected.
mod kill_support;

/// The upload of a job: three fragments of `fragment` bytes.
#[derive(Clone, Copy, Debug)]
struct Shape {
    fragment: usize,
}

impl Shape {
    fn total(self) -> usize {
        3 * self.fragment
    }

    /// What the store answers last for a fragment's object: the PUT of a single object, or
    /// the completion of a multipart upload (a fragment of `PART_SIZE` or more).
    fn object_done(self) -> &'static [&'static str] {
        if self.fragment >= PART_SIZE {
            &["POST ", "/frag/", "uploadId="]
        } else {
            &["PUT ", "/frag/"]
        }
    }
}

/// Fragments of 10,000 bytes: each one object of one PUT.
const SMALL: Shape = Shape { fragment: 10_000 };
/// The nodes' `[object_store] part_size` (S3's minimum).
const PART_SIZE: usize = 5 << 20;
/// Fragments of 6 MiB: each a multipart upload of two parts.
const MULTIPART: Shape = Shape { fragment: 6 << 20 };
/// The object store prefix of these tests.
const PREFIX: &str = "kill";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    Pending,
    Stored,
    Offset,
    Completed,
    Recorded,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Job {
    Plain,
    Reply,
}

/// The servers, the second node (which lives through a test) and a view of both stores.
struct Bench {
    /// First: dropped (killed) before the servers stop.
    node2: Option<BitsdProcess>,
    servers: FarmServers,
    dir: tempfile::TempDir,
    objects: Objects,
    pg: tokio_postgres::Client,
    state: bitsd::storage::shared::pg::PgStateStore,
    runs: usize,
    /// The first node's PostgreSQL pool: 1 or 2 (see the module docs).
    pool: usize,
    /// The jobs' upload.
    shape: Shape,
}

/// A node's config file: top-level keys, then `[storage]` on `url` (pool of `pool`, the
/// collector's grace 3 s) and `[object_store]` on `endpoint`.
fn config(top: &str, url: &str, pool: usize, store: &ObjectStoreConfig, endpoint: &str) -> String {
    format!(
        "{top}\n[storage]\nbackend = \"shared\"\npostgres_url = \"{url}\"\n\
         postgres_max_connections = {pool}\npending_object_grace_secs = 3\n\n\
         [object_store]\nbucket = \"{}\"\nprefix = \"{}\"\nendpoint = \"{endpoint}\"\n\
         region = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n\
         part_size = {PART_SIZE}\n",
        store.bucket,
        store.prefix,
        store.region.as_deref().unwrap(),
        store.access_key_id.as_deref().unwrap(),
        store.secret_access_key.as_deref().unwrap(),
    )
}

/// Polls `check` until it holds; panics with `what` after 10 s.
async fn until<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    bitsd_tests::until(what, Duration::from_secs(10), check).await
}

/// The offset an Ack gives, after checking it is one (never session-not-found).
fn acked(res: &bitsd_tests::RawResponse, at: &str) -> usize {
    assert_ne!(
        res.header("bits-error-code"),
        Some("0x8020001f"),
        "{at}: BG_E_SESSION_NOT_FOUND: {res:?}"
    );
    assert_eq!(res.status, 200, "{at}: {res:?}");
    res.assert_ack();
    res.header("bits-received-content-range")
        .unwrap()
        .parse()
        .unwrap()
}

impl Bench {
    async fn start(pool: usize, shape: Shape) -> Option<Bench> {
        let servers = FarmServers::start().await?;
        let store = servers.garage.object_store_config(PREFIX);
        let dir = tempfile::tempdir().unwrap();
        let objects = Objects::new(&store).unwrap();
        let pg = bitsd_tests::pg::raw_client(&servers.postgres_url).await;
        let state = bitsd_tests::pg::state_store(&servers.postgres_url).await;
        // The second node: direct, and it sweeps every second (the collector's path).
        let cfg = config(
            "cleanup_interval_secs = 1",
            &servers.postgres_url,
            4,
            &store,
            &servers.garage.endpoint(),
        );
        let node2 = Some(BitsdProcess::start_configured(dir.path(), "n2", cfg).await);
        Some(Bench {
            node2,
            servers,
            dir,
            objects,
            pg,
            state,
            runs: 0,
            pool,
            shape,
        })
    }

    fn node2(&self) -> SocketAddr {
        self.node2.as_ref().unwrap().addr
    }

    /// The first node, through a relay to PostgreSQL and one to Garage, with `self.pool`
    /// pooled PostgreSQL connections; a plain and an echo job through it first, so with a
    /// pool of one every statement the points below stop after is prepared on that
    /// connection already (a statement prepared there first would be two round trips, the
    /// second never sent while answers are frozen). With two, only the `COMMIT` of a fragment
    /// runs while answers are frozen (`Offset`): a simple query, never prepared.
    async fn node1(&mut self) -> (BitsdProcess, Relay, Relay) {
        self.runs += 1;
        let url = &self.servers.postgres_url;
        let (host, rest) = url.rsplit_once(':').unwrap();
        let (port, db) = rest.split_once('/').unwrap();
        let pg_relay = Relay::start(format!("127.0.0.1:{port}").parse().unwrap()).await;
        let s3_relay = Relay::start(self.servers.garage.s3_addr()).await;
        let relayed_url = format!("{host}:{}/{db}", pg_relay.addr().port());
        let store = self.servers.garage.object_store_config(PREFIX);
        let cfg = config(
            "cleanup_interval_secs = 3600",
            &relayed_url,
            self.pool,
            &store,
            &format!("http://{}", s3_relay.addr()),
        );
        let node =
            BitsdProcess::start_configured(self.dir.path(), &format!("n1-{}", self.runs), cfg)
                .await;
        let mut c = RawClient::connect(node.addr).await;
        let fragment = self.shape.fragment;
        let data = pattern(2 * fragment, 1);
        c.upload(
            &format!("/upload/{PREFIX}/warm-{}.bin", self.runs),
            &data,
            fragment,
        )
        .await;
        let (sid, _) = c.upload("/echo/warm", &data, fragment).await;
        c.close_session("/echo/warm", &sid).await.assert_ack();
        (node, pg_relay, s3_relay)
    }

    /// Keys of the session's fragment objects whose bytes start at `at`.
    async fn objects_at(&self, id: &SessionId, at: usize) -> Vec<String> {
        let mark = format!("/frag/{at:020}-");
        listed_keys(&self.objects, &self.objects.session_prefix(id))
            .await
            .into_iter()
            .filter(|k| k.contains(&mark))
            .collect()
    }

    /// Keys of the session's reply objects.
    async fn reply_objects(&self, id: &SessionId) -> Vec<String> {
        listed_keys(&self.objects, &self.objects.session_prefix(id))
            .await
            .into_iter()
            .filter(|k| k.contains("/reply-"))
            .collect()
    }

    /// Pending rows of the session's fragment objects starting at `at`.
    async fn pending_at(&self, id: &SessionId, at: usize) -> Vec<String> {
        let like = format!(
            "{}/frag/{at:020}-%",
            self.objects.session_prefix(id).as_str()
        );
        self.pg
            .query(
                "SELECT object_key FROM bitsd_pending_objects WHERE object_key LIKE $1",
                &[&like],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Backends of the first node's PostgreSQL connections inside an open transaction.
    async fn open_transactions(&self) -> i64 {
        bitsd_tests::pg::open_transactions(&self.pg).await
    }

    async fn record(&self, id: &SessionId) -> bitsd::storage::SessionRecord {
        self.state.load(id).await.unwrap().unwrap()
    }
}

/// One job whose fragment `k` (0-based) the first node is SIGKILLed in at `point`; then the
/// client re-sends that fragment to the second node and finishes the job there.
async fn run(bench: &mut Bench, job: Job, k: usize, point: Point) {
    let (node1, pg_relay, s3_relay) = bench.node1().await;
    let (fragment, total) = (bench.shape.fragment, bench.shape.total());
    let at = format!("{job:?} job, fragment {k}, {point:?}");
    let path = match job {
        Job::Plain => format!("/upload/{PREFIX}/{k}-{point:?}.bin"),
        Job::Reply => "/echo/kill".to_owned(),
    };
    let data = pattern(total, bench.runs as u64);
    let mut c1 = RawClient::connect(node1.addr).await;
    let sid = c1.create_session(&path).await;
    let id: SessionId = sid.trim_matches(['{', '}']).parse().unwrap();
    // What the client holds: the last offset acknowledged.
    let mut have = 0;
    for i in 0..k {
        let res = c1
            .fragment(&path, &sid, &data, i * fragment, fragment)
            .await;
        have = acked(&res, &at);
    }
    let (start, end) = (k * fragment, (k + 1) * fragment);
    assert_eq!(have, start, "{at}");
    let written = match job {
        Job::Plain => "/files/",
        Job::Reply => "/reply-",
    };
    match point {
        Point::Pending => s3_relay.freeze_requests(),
        Point::Stored | Point::Offset => s3_relay.hold_answer_to(bench.shape.object_done()),
        Point::Completed | Point::Recorded => s3_relay.hold_answer_to(&["PUT ", written]),
    }
    let range = format!("bytes {start}-{}/{total}", end - 1);
    let request = bits_post_request(
        &path,
        &[
            ("BITS-Packet-Type", "Fragment"),
            ("BITS-Session-Id", &sid),
            ("Content-Range", &range),
        ],
        &data[start..end],
    );
    let inflight = tokio::spawn(async move { c1.try_send(&request).await });
    let dest = bench
        .objects
        .file_key(&format!("{PREFIX}/{k}-{point:?}.bin"));
    // Drive the node to the point, and prove it is there.
    match point {
        Point::Pending => {
            until(&format!("{at}: the pending row is committed"), || async {
                !bench.pending_at(&id, start).await.is_empty()
            })
            .await;
            // The PUT is on its way (held by the relay): give it time to show up, were it to.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(bench.objects_at(&id, start).await.is_empty(), "{at}");
            assert_eq!(bench.record(&id).await.received, start as u64, "{at}");
        }
        Point::Stored | Point::Offset => {
            until(
                &format!("{at}: the fragment's object is stored"),
                || async { s3_relay.holding() && !bench.objects_at(&id, start).await.is_empty() },
            )
            .await;
            if bench.pool >= 2 {
                // The commit's statement has run, uncommitted, while the store's answer is
                // held: no one sees the new offset.
                until(
                    &format!("{at}: the commit waits in an open transaction"),
                    || async { bench.open_transactions().await == 1 },
                )
                .await;
            } else {
                tokio::time::sleep(Duration::from_millis(300)).await;
                assert_eq!(bench.open_transactions().await, 0, "{at}: pool of one");
            }
            let stored = bench.objects_at(&id, start).await;
            assert_eq!(bench.pending_at(&id, start).await, stored, "{at}");
            assert_eq!(bench.record(&id).await.received, start as u64, "{at}");
            if point == Point::Offset {
                // The store's 200 now reaches the node, PostgreSQL's answer to its commit
                // never does.
                pg_relay.freeze_answers();
                s3_relay.release_held();
                until(&format!("{at}: received is advanced"), || async {
                    bench.record(&id).await.received == end as u64
                })
                .await;
                assert!(bench.pending_at(&id, start).await.is_empty(), "{at}");
                let indexed: i64 = bench
                    .pg
                    .query_one(
                        "SELECT count(*) FROM bitsd_fragments WHERE object_key = $1",
                        &[&stored[0]],
                    )
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(indexed, 1, "{at}: the object is in the fragment index");
            }
        }
        Point::Completed | Point::Recorded => {
            until(
                &format!("{at}: the completion's object is stored"),
                || async {
                    s3_relay.holding()
                        && match job {
                            Job::Plain => bench.objects.head(&dest).await.is_ok(),
                            Job::Reply => !bench.reply_objects(&id).await.is_empty(),
                        }
                },
            )
            .await;
            let r = bench.record(&id).await;
            assert_eq!(r.received, total as u64, "{at}");
            assert!(!r.committed && r.reply.is_none(), "{at}: {r:?}");
            if point == Point::Recorded {
                pg_relay.freeze_answers();
                s3_relay.release_held();
                until(&format!("{at}: the completion is recorded"), || async {
                    let r = bench.record(&id).await;
                    match job {
                        Job::Plain => r.committed,
                        Job::Reply => r.state == SessionState::ReplyReady && r.reply.is_some(),
                    }
                })
                .await;
            }
        }
    }
    assert!(!inflight.is_finished(), "{at}: the client got an answer");
    let kept = bench.objects_at(&id, start).await;
    tokio::task::spawn_blocking(move || node1.kill())
        .await
        .unwrap();
    drop((pg_relay, s3_relay));
    let lost = inflight.await.unwrap();
    assert!(
        lost.is_err(),
        "{at}: an answer from the killed node: {lost:?}"
    );

    // The client's retry: the same fragment, to the second node.
    let mut c2 = RawClient::connect(bench.node2()).await;
    let mut res = c2.fragment(&path, &sid, &data, start, fragment).await;
    let got = acked(&res, &format!("{at}, the retry"));
    assert_eq!(got, end, "{at}: the retry's Ack");
    if point == Point::Offset {
        // The committed offset answered: the fragment's bytes are the killed node's object,
        // no other (the objects of a final fragment go with the publish, the index stays).
        let like = format!("{}/frag/%", bench.objects.session_prefix(&id).as_str());
        let indexed: Vec<String> = bench
            .pg
            .query(
                "SELECT object_key FROM bitsd_fragments WHERE object_key LIKE $1 \
                 AND start_offset = $2",
                &[&like, &(start as i64)],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(indexed, kept, "{at}: the fragment index after the retry");
        if end < total {
            assert_eq!(
                bench.objects_at(&id, start).await,
                kept,
                "{at}: no new object"
            );
        }
    }
    have = got;
    while have < total {
        res = c2.fragment(&path, &sid, &data, have, fragment).await;
        let got = acked(&res, &at);
        assert!(got > have, "{at}: Ack {got} after {have}");
        have = got;
    }
    match job {
        Job::Plain => {
            let stored = bench.objects.read(&dest, None).await.unwrap();
            assert!(
                stored.bytes().await.unwrap() == data,
                "{at}: published file"
            );
            assert!(bench.record(&id).await.committed, "{at}");
        }
        Job::Reply => {
            let url = res.header("bits-reply-url").unwrap().to_owned();
            let reply = c2.get("GET", &url_path(&url), &[]).await;
            assert_eq!(reply.status, 200, "{at}: {reply:?}");
            assert!(reply.body == data, "{at}: the echoed reply");
        }
    }
    // As BITS does after the final Ack (and the reply).
    c2.close_session(&path, &sid).await.assert_ack();
    if job == Job::Plain {
        // The destination is free again once its file is gone: the session's publish marker
        // went with the Close (a killed node's marker too), and another upload publishes there.
        until(&format!("{at}: the publish marker is dropped"), || async {
            bench
                .pg
                .query_one(
                    "SELECT count(*) FROM bitsd_pending_objects WHERE object_key = $1",
                    &[&dest.as_str()],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 0
        })
        .await;
        bench
            .objects
            .delete(std::slice::from_ref(&dest))
            .await
            .unwrap();
        let (again, fin) = c2.upload(&path, &data, total).await;
        assert_eq!(acked(&fin, &format!("{at}, the next upload")), total);
        c2.close_session(&path, &again).await.assert_ack();
    }
}

/// Every point of a final fragment: the fragment's steps, then its completion's.
const FINAL_POINTS: [Point; 5] = [
    Point::Pending,
    Point::Stored,
    Point::Offset,
    Point::Completed,
    Point::Recorded,
];

/// Runs `job`, killing node 1 (a pool of `pool` connections) at each of `points` of fragment
/// `k` in turn.
async fn kill_at(pool: usize, shape: Shape, job: Job, k: usize, points: &[Point]) {
    let Some(mut bench) = Bench::start(pool, shape).await else {
        return;
    };
    for &point in points {
        run(&mut bench, job, k, point).await;
    }
    bench.end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_between_the_steps_of_a_middle_fragment_loses_nothing() {
    kill_at(
        2,
        SMALL,
        Job::Plain,
        1,
        &[Point::Pending, Point::Stored, Point::Offset],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_between_the_steps_of_a_final_fragment_and_its_publish_loses_nothing() {
    kill_at(1, SMALL, Job::Plain, 2, &FINAL_POINTS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_its_final_commit_waits_for_the_store_loses_nothing() {
    kill_at(2, SMALL, Job::Plain, 2, &[Point::Stored, Point::Offset]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_around_a_middle_commit_made_after_the_store_loses_nothing() {
    kill_at(1, SMALL, Job::Plain, 1, &[Point::Stored, Point::Offset]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_between_the_steps_of_a_final_fragment_and_its_reply_loses_nothing() {
    kill_at(1, SMALL, Job::Reply, 2, &FINAL_POINTS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_between_the_steps_of_a_multipart_middle_fragment_loses_nothing() {
    kill_at(
        2,
        MULTIPART,
        Job::Plain,
        1,
        &[Point::Pending, Point::Stored, Point::Offset],
    )
    .await;
}
