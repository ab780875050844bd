//! A completion whose node dies while it assembles the upload (its multipart upload half
//! sent): the next attempt, on another node, goes on with the parts the store answered
//! instead of starting over. Two shared backends on one real PostgreSQL and one real Garage;
//! the first talks to Garage through a relay that stops the request of one part, so it dies
//! exactly there (its task aborted, its connections closed); the second's relay stops the
//! request of a part the first finished, so an attempt that sends it again never finishes.
//! Skips with a printed reason when PostgreSQL or Garage is not installed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bitsd_protocol::SessionId;
use bitsd_storage::shared::objects::{ObjectStoreConfig, Objects};
use bitsd_storage::shared::SharedBackend;
use bitsd_storage::{CommitOutcome, ReplyKind, SessionBackend, SessionState};
use bitsd_tests::farm_servers::FarmServers;
use bitsd_tests::garage::Garage;
use bitsd_tests::pg::{raw_client, session_record};
use bitsd_tests::relay::Relay;
use bitsd_tests::shared_backend::{backend_on, read_object, send};
use bitsd_tests::{pattern, until};

const MIB: usize = 1024 * 1024;

/// 21 MiB in 1 MiB fragments with 5 MiB parts: nothing to copy, five streamed parts
/// (5, 5, 5, 5, 1 MiB), two sent at once.
const TOTAL: usize = 21 * MIB;

struct Setup {
    servers: FarmServers,
    scratch: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Option<Setup> {
        Some(Setup {
            servers: FarmServers::start().await?,
            scratch: tempfile::tempdir().unwrap(),
        })
    }

    fn garage(&self) -> &Garage {
        &self.servers.garage
    }

    /// A node whose store requests go through `relay`.
    async fn node(&self, relay: &Relay, name: &str) -> SharedBackend {
        self.node_with(relay, name, |_| {}).await
    }

    /// As [`Setup::node`], its store settings changed by `configure`.
    async fn node_with(
        &self,
        relay: &Relay,
        name: &str,
        configure: impl FnOnce(&mut ObjectStoreConfig),
    ) -> SharedBackend {
        let mut store: ObjectStoreConfig = self.garage().object_store_config("resume");
        store.endpoint = Some(format!("http://{}", relay.addr()));
        store.part_size = Some(5 * MIB as u64);
        store.coalesce_fragments = Some(false);
        store.server_side_copy = Some(false);
        configure(&mut store);
        let scratch = self.scratch.path().join(name);
        std::fs::create_dir_all(&scratch).unwrap();
        backend_on(&self.servers.postgres_url, &store, &scratch).await
    }

    async fn count(&self, sql: &str) -> i64 {
        raw_client(&self.servers.postgres_url)
            .await
            .query_one(sql, &[])
            .await
            .unwrap()
            .get(0)
    }
}

/// A complete upload of [`TOTAL`] bytes (plain, to `destination`, or upload-reply) on `node`.
async fn complete_upload(
    node: &SharedBackend,
    destination: Option<&str>,
    seed: u64,
) -> (bitsd_storage::SessionRecord, Vec<u8>) {
    let data = pattern(TOTAL, seed);
    let mut record = session_record(None);
    record.destination = destination.map(str::to_owned);
    node.create(&record).await.unwrap();
    for _ in 0..TOTAL / MIB {
        send(node, &mut record, &data, MIB).await;
    }
    assert_eq!(record.state, SessionState::Complete);
    (record, data)
}

/// Runs `work` on a node whose relay stops the request of part 3; once the parts sent before
/// and beside it (1, 2 and 4: two are in flight at once, part 5 waits for part 3) are
/// recorded in PostgreSQL, the node dies: its task is aborted and its connections closed,
/// the store never saw part 3.
async fn die_at_part_three<F>(setup: &Setup, relay: Relay, work: F)
where
    F: std::future::Future + Send + 'static,
    F::Output: Send,
{
    relay.stop_request_to(&["PUT ", "partNumber=3&"]);
    let task = tokio::spawn(work);
    until(
        "three parts are recorded",
        Duration::from_secs(60),
        || async {
            setup
                .count("SELECT count(*) FROM bitsd_assembly_parts")
                .await
                == 3
        },
    )
    .await;
    assert!(relay.holding(), "part 3 was not held");
    task.abort();
    let _ = task.await;
    drop(relay);
    assert_eq!(
        setup.count("SELECT count(*) FROM bitsd_assemblies").await,
        1
    );
}

/// A node that must not send part 1 again: its relay stops that request (the attempt then
/// waits for the client's timeout and retry, and the stop is no longer armed).
async fn second_node(setup: &Setup) -> (SharedBackend, Relay) {
    let relay = Relay::start(setup.garage().s3_addr()).await;
    relay.stop_request_to(&["PUT ", "partNumber=1&"]);
    (setup.node(&relay, "b").await, relay)
}

/// Publishes the upload of `id` at `path` on a [`second_node`] within 60 s, without part 1
/// sent again, and checks that the file is `data`.
async fn publish_on_second_node(setup: &Setup, id: &SessionId, path: &str, data: &[u8]) {
    let (b, relay_b) = second_node(setup).await;
    let published =
        tokio::time::timeout(Duration::from_secs(60), b.publish_upload(id, path, false))
            .await
            .expect("the second attempt sent a part the first had finished")
            .unwrap();
    assert_eq!(published, CommitOutcome::Committed);
    assert!(relay_b.stop_armed(), "part 1 was sent again");
    let file = read_object(b.objects(), &b.objects().file_key(path)).await;
    assert!(file == data, "the published file is not the upload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_whose_node_died_midway_goes_on_with_its_parts_on_another_node() {
    let Some(setup) = Setup::start().await else {
        return;
    };
    let relay_a = Relay::start(setup.garage().s3_addr()).await;
    let a = setup.node(&relay_a, "a").await;
    let (record, data) = complete_upload(&a, Some("resume/plain.bin"), 1).await;
    let id = record.id;
    die_at_part_three(&setup, relay_a, async move {
        a.publish_upload(&id, "resume/plain.bin", false).await
    })
    .await;

    publish_on_second_node(&setup, &id, "resume/plain.bin", &data).await;
    assert_eq!(
        setup.count("SELECT count(*) FROM bitsd_assemblies").await,
        0
    );
    assert_eq!(
        setup
            .count("SELECT count(*) FROM bitsd_assembly_parts")
            .await,
        0
    );
    // The first node's multipart upload is the one completed: none is left unfinished.
    until("no unfinished upload", Duration::from_secs(20), || async {
        setup.garage().unfinished_uploads() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_reply_whose_node_died_midway_is_finished_at_the_key_it_started() {
    let Some(setup) = Setup::start().await else {
        return;
    };
    let relay_a = Relay::start(setup.garage().s3_addr()).await;
    let a = setup.node(&relay_a, "a").await;
    let (record, data) = complete_upload(&a, None, 2).await;
    let id = record.id;
    die_at_part_three(&setup, relay_a, async move {
        let upload = a.upload_unread(&id).await.unwrap();
        a.store_reply_file(&id, &upload.path).await
    })
    .await;
    let started: String = raw_client(&setup.servers.postgres_url)
        .await
        .query_one("SELECT object_key FROM bitsd_assemblies", &[])
        .await
        .unwrap()
        .get(0);

    let (b, relay_b) = second_node(&setup).await;
    let upload = b.upload_unread(&id).await.unwrap();
    let reply = tokio::time::timeout(
        Duration::from_secs(60),
        b.store_reply_file(&id, &upload.path),
    )
    .await
    .expect("the second attempt sent a part the first had finished")
    .unwrap();
    assert!(relay_b.stop_armed(), "part 1 was sent again");
    let ReplyKind::Stored {
        len,
        object: Some(name),
        ..
    } = reply
    else {
        panic!("not a stored reply: {reply:?}");
    };
    assert_eq!(len, TOTAL as u64);
    let key = b.objects().session_prefix(&id).join(&name);
    assert_eq!(
        key.as_str(),
        started,
        "the reply is not where the first attempt started it"
    );
    assert!(
        read_object(b.objects(), &key).await == data,
        "the reply is not the upload"
    );
    assert_eq!(
        setup.count("SELECT count(*) FROM bitsd_assemblies").await,
        0
    );
}

/// A node that died after the store completed the upload and before it forgot the journal:
/// the next attempt finds every part recorded and an upload the store no longer has, and
/// assembles the file afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_whose_upload_was_completed_is_assembled_afresh() {
    let Some(setup) = Setup::start().await else {
        return;
    };
    let relay_a = Relay::start(setup.garage().s3_addr()).await;
    let a = setup.node(&relay_a, "a").await;
    let (record, data) = complete_upload(&a, Some("resume/completed.bin"), 3).await;
    let id = record.id;
    relay_a.hold_answer_to(&["POST ", "uploadId="]);
    let task =
        tokio::spawn(async move { a.publish_upload(&id, "resume/completed.bin", false).await });
    until(
        "the completion is held",
        Duration::from_secs(60),
        || async { relay_a.holding() },
    )
    .await;
    // The store has the completed object; the node never hears of it.
    until(
        "the store completed it",
        Duration::from_secs(20),
        || async { setup.garage().unfinished_uploads() == 0 },
    )
    .await;
    task.abort();
    let _ = task.await;
    drop(relay_a);
    assert_eq!(
        setup
            .count("SELECT count(*) FROM bitsd_assembly_parts")
            .await,
        5
    );

    let relay_b = Relay::start(setup.garage().s3_addr()).await;
    let b = setup.node(&relay_b, "b").await;
    let published = b
        .publish_upload(&id, "resume/completed.bin", false)
        .await
        .unwrap();
    assert_eq!(published, CommitOutcome::Committed);
    let file = read_object(b.objects(), &b.objects().file_key("resume/completed.bin")).await;
    assert!(file == data, "the published file is not the upload");
    assert_eq!(
        setup.count("SELECT count(*) FROM bitsd_assemblies").await,
        0
    );
    until("no unfinished upload", Duration::from_secs(20), || async {
        setup.garage().unfinished_uploads() == 0
    })
    .await;
}

/// A session cancelled after its node died mid-assembly: its end aborts the multipart upload
/// the journal names (its parts would stay in the bucket, named by nothing, until a lifecycle
/// rule removed them) and the journal goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_session_aborts_the_assembly_its_dead_node_left() {
    let Some(setup) = Setup::start().await else {
        return;
    };
    let relay_a = Relay::start(setup.garage().s3_addr()).await;
    let a = setup.node(&relay_a, "a").await;
    let (mut record, _) = complete_upload(&a, Some("resume/cancelled.bin"), 4).await;
    let id = record.id;
    die_at_part_three(&setup, relay_a, async move {
        a.publish_upload(&id, "resume/cancelled.bin", false).await
    })
    .await;
    until(
        "the unfinished upload is counted",
        Duration::from_secs(20),
        || async { setup.garage().unfinished_uploads() == 1 },
    )
    .await;

    let relay_b = Relay::start(setup.garage().s3_addr()).await;
    let b = setup.node(&relay_b, "b").await;
    b.end_session(&mut record, SessionState::Cancelled)
        .await
        .unwrap();
    until("the upload is aborted", Duration::from_secs(20), || async {
        setup.garage().unfinished_uploads() == 0
    })
    .await;
    until("the journal is gone", Duration::from_secs(20), || async {
        setup.count("SELECT count(*) FROM bitsd_assemblies").await == 0
    })
    .await;
    assert!(
        !b.destination_exists("resume/cancelled.bin").await,
        "a cancelled upload was published"
    );
}

/// The store stops answering mid-assembly (part 3's request never gets through, the node's
/// request times out, no retry): the attempt fails with a transient error and leaves the
/// journal and the store's upload as they are, and the next attempt goes on with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_stops_answering_mid_assembly_leaves_the_journal_to_the_retry() {
    let Some(setup) = Setup::start().await else {
        return;
    };
    let relay_a = Relay::start(setup.garage().s3_addr()).await;
    let a = setup
        .node_with(&relay_a, "a", |s| {
            s.request_timeout_secs = Some(2);
            s.max_retries = Some(0);
        })
        .await;
    let (record, data) = complete_upload(&a, Some("resume/timeout.bin"), 5).await;
    let id = record.id;
    relay_a.stop_request_to(&["PUT ", "partNumber=3&"]);
    let failed = tokio::time::timeout(
        Duration::from_secs(60),
        a.publish_upload(&id, "resume/timeout.bin", false),
    )
    .await
    .expect("the node's request did not time out")
    .unwrap_err();
    assert!(failed.is_transient(), "{failed:?}");
    // Kept: the upload (not aborted) and the parts that got through.
    assert_eq!(
        setup.count("SELECT count(*) FROM bitsd_assemblies").await,
        1
    );
    assert_eq!(
        setup
            .count("SELECT count(*) FROM bitsd_assembly_parts")
            .await,
        3
    );
    until(
        "the unfinished upload is counted",
        Duration::from_secs(20),
        || async { setup.garage().unfinished_uploads() == 1 },
    )
    .await;

    publish_on_second_node(&setup, &id, "resume/timeout.bin", &data).await;
    until("no unfinished upload", Duration::from_secs(20), || async {
        setup.garage().unfinished_uploads() == 0
    })
    .await;
}

/// When the second attempt at one session's completion starts (see
/// [`two_nodes_completing_one_session_share_its_assembly`]).
#[derive(Clone, Copy, Debug)]
enum SecondStarts {
    /// With the first.
    Together,
    /// Once the first has recorded two parts: it adopts the journal while the first still
    /// sends parts.
    AfterTwoParts,
    /// While the store's answer to the first's completion is held: the store has completed
    /// the upload both share, the first has not heard so.
    WhileFirstCompletes,
}

/// A client that re-sends its final fragment to another node while the first still
/// assembles: two nodes publish one session at once. The second waits while the first holds
/// the assembly, so neither sends a part the other is completing (Garage then refuses the
/// completion with `InvalidPart`, and both failed: the first aborted the upload). Both
/// publish (the second possibly after one transient answer, as the client sends the fragment
/// again), the file is the upload, and neither a journal nor an unfinished upload is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_completing_one_session_share_its_assembly() {
    let Some(setup) = Setup::start().await else {
        return;
    };
    let starts = [
        SecondStarts::Together,
        SecondStarts::AfterTwoParts,
        SecondStarts::WhileFirstCompletes,
    ];
    for (round, when) in starts.into_iter().enumerate() {
        let relay_a = Relay::start(setup.garage().s3_addr()).await;
        let a = setup.node(&relay_a, "a").await;
        let path = format!("resume/race-{round}.bin");
        let (record, data) = complete_upload(&a, Some(&path), 10 + round as u64).await;
        let id = record.id;
        if matches!(when, SecondStarts::WhileFirstCompletes) {
            relay_a.hold_answer_to(&["POST ", "uploadId="]);
        }
        let first_path = path.clone();
        let first = tokio::spawn(async move { a.publish_upload(&id, &first_path, false).await });
        match when {
            SecondStarts::Together => {}
            SecondStarts::AfterTwoParts => {
                until(
                    "two parts are recorded",
                    Duration::from_secs(60),
                    || async {
                        setup
                            .count("SELECT count(*) FROM bitsd_assembly_parts")
                            .await
                            >= 2
                    },
                )
                .await;
            }
            SecondStarts::WhileFirstCompletes => {
                until(
                    "the first's completion is held",
                    Duration::from_secs(60),
                    || async { relay_a.holding() },
                )
                .await;
            }
        }
        let relay_b = Relay::start(setup.garage().s3_addr()).await;
        let b = setup.node(&relay_b, "b").await;
        let second_path = path.clone();
        let second = tokio::spawn(async move {
            let mut outcome = b.publish_upload(&id, &second_path, false).await;
            // A transient answer (it waited for the first, which ended meanwhile) makes the
            // client send the fragment again.
            if outcome.as_ref().is_err_and(|e| e.is_transient()) {
                outcome = b.publish_upload(&id, &second_path, false).await;
            }
            (outcome, b)
        });
        if matches!(when, SecondStarts::WhileFirstCompletes) {
            // The second goes as far as it can while the first waits for the store's answer.
            tokio::time::sleep(Duration::from_secs(2)).await;
            relay_a.release_held();
        }
        let first = tokio::time::timeout(Duration::from_secs(60), first)
            .await
            .unwrap_or_else(|_| panic!("{when:?}: the first attempt never ended"))
            .unwrap();
        let (second, b) = tokio::time::timeout(Duration::from_secs(60), second)
            .await
            .unwrap_or_else(|_| panic!("{when:?}: the second attempt never ended"))
            .unwrap();
        assert_eq!(first.unwrap(), CommitOutcome::Committed, "{when:?}: first");
        assert_eq!(
            second.unwrap(),
            CommitOutcome::Committed,
            "{when:?}: second"
        );
        let file = read_object(b.objects(), &b.objects().file_key(&path)).await;
        assert!(
            file == data,
            "{when:?}: the published file is not the upload"
        );
        assert_eq!(
            setup.count("SELECT count(*) FROM bitsd_assemblies").await,
            0,
            "{when:?}: a journal is left"
        );
        until("no unfinished upload", Duration::from_secs(20), || async {
            setup.garage().unfinished_uploads() == 0
        })
        .await;
        drop(relay_a);
        drop(relay_b);
    }
}

/// The same for an echo reply (the upload stored as the session's reply): two nodes store it
/// at once, the second starting with the first or once the first recorded two parts. Each
/// stores the reply (the second possibly after one transient answer), every reply object it
/// names is the upload, and neither a journal nor an unfinished upload is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_storing_one_echo_reply_at_once_share_its_assembly() {
    let Some(setup) = Setup::start().await else {
        return;
    };
    for (round, when) in [SecondStarts::Together, SecondStarts::AfterTwoParts]
        .into_iter()
        .enumerate()
    {
        let relay_a = Relay::start(setup.garage().s3_addr()).await;
        let relay_b = Relay::start(setup.garage().s3_addr()).await;
        let a = setup.node(&relay_a, "a").await;
        let b = setup.node(&relay_b, "b").await;
        let (record, data) = complete_upload(&a, None, 20 + round as u64).await;
        let id = record.id;
        let store = |node: SharedBackend| async move {
            let mut reply = Err(bitsd_storage::StorageError::Busy(String::new()));
            for _ in 0..2 {
                let upload = node.upload_unread(&id).await.unwrap();
                reply = node.store_reply_file(&id, &upload.path).await;
                // A transient answer makes the client send the fragment again.
                if !reply.as_ref().is_err_and(|e| e.is_transient()) {
                    break;
                }
            }
            (reply, node)
        };
        let first = tokio::spawn(store(a));
        if matches!(when, SecondStarts::AfterTwoParts) {
            until(
                "two parts are recorded",
                Duration::from_secs(60),
                || async {
                    setup
                        .count("SELECT count(*) FROM bitsd_assembly_parts")
                        .await
                        >= 2
                },
            )
            .await;
        }
        let second = tokio::spawn(store(b));
        for (which, task) in [("first", first), ("second", second)] {
            let (reply, node) = tokio::time::timeout(Duration::from_secs(90), task)
                .await
                .unwrap_or_else(|_| panic!("{when:?}: the {which} attempt never ended"))
                .unwrap();
            let reply = reply.unwrap_or_else(|e| panic!("{when:?}: the {which} attempt: {e:?}"));
            let ReplyKind::Stored {
                len,
                object: Some(name),
                ..
            } = reply
            else {
                panic!("{when:?}: not a stored reply: {reply:?}");
            };
            assert_eq!(len, TOTAL as u64);
            let key = node.objects().session_prefix(&id).join(&name);
            assert!(
                read_object(node.objects(), &key).await == data,
                "{when:?}: the {which} attempt's reply is not the upload"
            );
        }
        assert_eq!(
            setup.count("SELECT count(*) FROM bitsd_assemblies").await,
            0,
            "{when:?}: a journal is left"
        );
        until("no unfinished upload", Duration::from_secs(20), || async {
            setup.garage().unfinished_uploads() == 0
        })
        .await;
    }
}

/// An attempt whose lease another attempt took over (it could not renew it in time: here the
/// test ends it by hand while the first waits for the store's answer to part 3) stops: once
/// the second has published, the first ends within a few seconds, its answer still held,
/// with the commit the second made or a transient error, and sends nothing more. The file
/// is the upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_whose_lease_was_taken_over_stops() {
    let Some(setup) = Setup::start().await else {
        return;
    };
    let relay_a = Relay::start(setup.garage().s3_addr()).await;
    let a = setup.node(&relay_a, "a").await;
    let path = "resume/taken-over.bin";
    let (record, data) = complete_upload(&a, Some(path), 30).await;
    let id = record.id;
    relay_a.hold_answer_to(&["PUT ", "partNumber=3&"]);
    let first = tokio::spawn(async move { a.publish_upload(&id, path, false).await });
    until(
        "three parts are recorded",
        Duration::from_secs(60),
        || async {
            setup
                .count("SELECT count(*) FROM bitsd_assembly_parts")
                .await
                == 3
        },
    )
    .await;
    assert!(relay_a.holding(), "part 3's answer is not held");
    let pg = raw_client(&setup.servers.postgres_url).await;
    let holder: uuid::Uuid = pg
        .query_one("SELECT holder FROM bitsd_assemblies", &[])
        .await
        .unwrap()
        .get(0);

    // The second attempt waits for the lease; end it by hand until the second holds it.
    let relay_b = Relay::start(setup.garage().s3_addr()).await;
    let b = setup.node(&relay_b, "b").await;
    let second = tokio::spawn(async move { b.publish_upload(&id, path, false).await });
    until(
        "the second holds the assembly",
        Duration::from_secs(20),
        || async {
            pg.execute(
                "UPDATE bitsd_assemblies SET held_until_ms = 0 WHERE holder = $1",
                &[&holder],
            )
            .await
            .unwrap();
            let now: Option<uuid::Uuid> = pg
                .query_opt("SELECT holder FROM bitsd_assemblies", &[])
                .await
                .unwrap()
                .and_then(|r| r.get(0));
            now != Some(holder)
        },
    )
    .await;
    let second = tokio::time::timeout(Duration::from_secs(60), second)
        .await
        .expect("the second attempt never ended")
        .unwrap();
    assert_eq!(second.unwrap(), CommitOutcome::Committed);

    // The first notices at its next renewal, with part 3's answer still held.
    let first = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("the first attempt went on with an assembly another attempt had taken over")
        .unwrap();
    match first {
        Ok(outcome) => assert_eq!(outcome, CommitOutcome::Committed),
        Err(e) => assert!(e.is_transient(), "{e:?}"),
    }
    relay_a.release_held();
    let objects = Objects::new(&setup.garage().object_store_config("resume")).unwrap();
    let file = read_object(&objects, &objects.file_key(path)).await;
    assert!(file == data, "the published file is not the upload");
    assert_eq!(
        setup.count("SELECT count(*) FROM bitsd_assemblies").await,
        0
    );
    until("no unfinished upload", Duration::from_secs(20), || async {
        setup.garage().unfinished_uploads() == 0
    })
    .await;
}
