//! A completion whose node dies while it assembles the upload (its multipart upload half
//! sent): the next attempt, on another node, goes on with the parts the store answered
//! instead of starting over. Two shared backends on one real PostgreSQL and one real Garage;
//! the first talks to Garage through a relay that stops the request of one part, so it dies
//! exactly there (its task aborted, its connections closed); the second's relay stops the
//! request of a part the first finished, so an attempt that sends it again never finishes.
//! Three of them run again on moto, a second S3 implementation. Skips with a printed reason
//! when PostgreSQL or Garage (moto) is not installed.
#![allow(clippy::unwrap_used)]

mod assembly_support;

use std::time::Duration;

use assembly_support::{complete_upload, record_reply, stored_reply_key, Setup};
use bitsd_protocol::SessionId;
use bitsd_storage::shared::objects::Objects;
use bitsd_storage::shared::SharedBackend;
use bitsd_storage::{CommitOutcome, SessionBackend, SessionState};
use bitsd_tests::pg::raw_client;
use bitsd_tests::relay::Relay;
use bitsd_tests::shared_backend::read_object;
use bitsd_tests::until;

/// Runs `work` on a node whose relay stops the request of part 3; once the parts sent before
/// and beside it (1, 2 and 4: two are in flight at once, part 5 waits for part 3) are
/// recorded in PostgreSQL, the node dies: its task is aborted and its connections closed,
/// the store never saw part 3.
async fn die_at_part_three<F>(setup: &Setup, relay: Relay, work: F)
where
    F: std::future::Future + Send + 'static,
    F::Output: Send,
{
    setup.stop_part(&relay, 3);
    let task = tokio::spawn(work);
    // Parts 1, 2 and 4; part 5 waits for part 3.
    setup.until_parts_recorded(3).await;
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
    let (node, relay) = setup.relayed_node("b").await;
    setup.watch_parts(&relay);
    (node, relay)
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
    // Parts 1, 2 and 4 of five were recorded.
    setup.assert_only_unrecorded_parts_sent(&relay_b, 2);
    let file = read_object(b.objects(), &b.objects().file_key(path)).await;
    assert!(file == data, "the published file is not the upload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_whose_node_died_midway_goes_on_with_its_parts_on_another_node() {
    if let Some(setup) = Setup::start().await {
        a_publish_whose_node_died_midway_goes_on_with_its_parts_on_another_node_on(setup).await;
    }
}

async fn a_publish_whose_node_died_midway_goes_on_with_its_parts_on_another_node_on(setup: Setup) {
    let (a, relay_a) = setup.relayed_node("a").await;
    let (record, data) = complete_upload(&a, Some("resume/plain.bin"), 1).await;
    let id = record.id;
    die_at_part_three(&setup, relay_a, async move {
        a.publish_upload(&id, "resume/plain.bin", false).await
    })
    .await;

    publish_on_second_node(&setup, &id, "resume/plain.bin", &data).await;
    assert_eq!(
        setup
            .count("SELECT count(*) FROM bitsd_assembly_parts")
            .await,
        0
    );
    // The first node's multipart upload is the one completed: none is left unfinished.
    setup.assert_nothing_left("published").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_reply_whose_node_died_midway_is_finished_at_the_key_it_started() {
    let Some(setup) = Setup::start().await else {
        return;
    };
    let (a, relay_a) = setup.relayed_node("a").await;
    let (record, data) = complete_upload(&a, None, 2).await;
    let id = record.id;
    die_at_part_three(&setup, relay_a, async move {
        let upload = a.upload_unread(&id).await.unwrap();
        a.store_reply_file(&id, &upload.path).await
    })
    .await;
    let started: String = raw_client(&setup.postgres_url)
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
    setup.assert_only_unrecorded_parts_sent(&relay_b, 2);
    let reply_kind = reply.clone();
    let key = stored_reply_key(&b, &id, reply);
    assert_eq!(
        key.as_str(),
        started,
        "the reply is not where the first attempt started it"
    );
    assert!(
        read_object(b.objects(), &key).await == data,
        "the reply is not the upload"
    );
    // The journal stays until the reply is recorded in the session (a third attempt,
    // waiting on it, then answers with the recorded reply), and goes then.
    assert_eq!(
        setup.count("SELECT count(*) FROM bitsd_assemblies").await,
        1,
        "the journal went before the reply was recorded"
    );
    record_reply(&b, &id, &reply_kind).await;
    assert_eq!(
        setup.count("SELECT count(*) FROM bitsd_assemblies").await,
        0,
        "the journal outlived the reply's record"
    );
}

/// A node that died after the store completed the upload and before it forgot the journal:
/// the next attempt finds every part recorded and an upload the store no longer has, and
/// assembles the file afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_whose_upload_was_completed_is_assembled_afresh() {
    if let Some(setup) = Setup::start().await {
        a_journal_whose_upload_was_completed_is_assembled_afresh_on(setup).await;
    }
}

async fn a_journal_whose_upload_was_completed_is_assembled_afresh_on(setup: Setup) {
    let (a, relay_a) = setup.relayed_node("a").await;
    let (record, data) = complete_upload(&a, Some("resume/completed.bin"), 3).await;
    let id = record.id;
    relay_a.hold_answer_to(setup.completion_request());
    let task =
        tokio::spawn(async move { a.publish_upload(&id, "resume/completed.bin", false).await });
    until(
        "the completion is held",
        Duration::from_secs(60),
        || async { relay_a.holding() },
    )
    .await;
    // The store has the completed object; the node never hears of it.
    let direct = Objects::new(&setup.store.object_store_config("resume")).unwrap();
    let dest = direct.file_key("resume/completed.bin");
    until(
        "the store completed it",
        Duration::from_secs(20),
        || async { setup.store.unfinished_uploads() == 0 && direct.head(&dest).await.is_ok() },
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

    let (b, _relay_b) = setup.relayed_node("b").await;
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
        setup.store.unfinished_uploads() == 0
    })
    .await;
}

/// A session cancelled after its node died mid-assembly: its end aborts the multipart upload
/// the journal names (its parts would stay in the bucket, named by nothing, until a lifecycle
/// rule removed them) and the journal goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_session_aborts_the_assembly_its_dead_node_left() {
    if let Some(setup) = Setup::start().await {
        a_cancelled_session_aborts_the_assembly_its_dead_node_left_on(setup).await;
    }
}

async fn a_cancelled_session_aborts_the_assembly_its_dead_node_left_on(setup: Setup) {
    let (a, relay_a) = setup.relayed_node("a").await;
    let (mut record, _) = complete_upload(&a, Some("resume/cancelled.bin"), 4).await;
    let id = record.id;
    die_at_part_three(&setup, relay_a, async move {
        a.publish_upload(&id, "resume/cancelled.bin", false).await
    })
    .await;
    until(
        "the unfinished upload is counted",
        Duration::from_secs(20),
        || async { setup.store.unfinished_uploads() == 1 },
    )
    .await;

    let (b, _relay_b) = setup.relayed_node("b").await;
    b.end_session(&mut record, SessionState::Cancelled)
        .await
        .unwrap();
    until("the upload is aborted", Duration::from_secs(20), || async {
        setup.store.unfinished_uploads() == 0
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
    let relay_a = Relay::start(setup.store.s3_addr()).await;
    let a = setup
        .node_with(&relay_a, "a", |s| {
            s.request_timeout_secs = Some(2);
            s.max_retries = Some(0);
        })
        .await;
    let (record, data) = complete_upload(&a, Some("resume/timeout.bin"), 5).await;
    let id = record.id;
    setup.stop_part(&relay_a, 3);
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
        || async { setup.store.unfinished_uploads() == 1 },
    )
    .await;

    publish_on_second_node(&setup, &id, "resume/timeout.bin", &data).await;
    setup.assert_nothing_left("resumed after a timeout").await;
}

/// The resumed publish, the journal of an upload the store completed, and the abort at a
/// cancel, on moto, a second S3 implementation: the resumption keeps to what S3 promises (a
/// part's ETag, `NoSuchUpload` for an upload that is gone), not to what Garage does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_assemblies_on_a_second_s3_implementation() {
    let Some(setup) = Setup::start_moto().await else {
        return;
    };
    a_publish_whose_node_died_midway_goes_on_with_its_parts_on_another_node_on(setup).await;
    let Some(setup) = Setup::start_moto().await else {
        return;
    };
    a_journal_whose_upload_was_completed_is_assembled_afresh_on(setup).await;
    let Some(setup) = Setup::start_moto().await else {
        return;
    };
    a_cancelled_session_aborts_the_assembly_its_dead_node_left_on(setup).await;
}

/// The resumed publish and the journal of an upload the store completed on Azure Blob
/// Storage (Azurite), where a multipart upload is a blob's block list: the blocks recorded
/// are committed by the next attempt, without one sent again, and a list the store no longer
/// takes (its blocks committed already) is assembled afresh. (Not the abort at a cancel:
/// Azure has no call that drops uncommitted blocks; the blob's next commit does, or Azure
/// after 7 days.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_assemblies_on_azure_blob_storage() {
    let Some(setup) = Setup::start_azurite().await else {
        return;
    };
    a_publish_whose_node_died_midway_goes_on_with_its_parts_on_another_node_on(setup).await;
    let Some(setup) = Setup::start_azurite().await else {
        return;
    };
    a_journal_whose_upload_was_completed_is_assembled_afresh_on(setup).await;
}
