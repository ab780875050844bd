//! Two attempts at one session's completion at once (the client's final fragment sent again
//! to another node while the first still assembles): one attempt at a time works on the
//! assembly, holding a lease on its journal; the other waits, and takes the assembly over
//! once the lease ends. Two shared backends on one real PostgreSQL and one real Garage, each
//! talking to Garage through a relay. Skips with a printed reason when PostgreSQL or Garage is
//! not installed.
#![allow(clippy::unwrap_used)]

mod assembly_support;

use std::time::Duration;

use assembly_support::{complete_upload, record_reply, stored_reply_key, Setup};
use bitsd_storage::shared::objects::Objects;
use bitsd_storage::shared::SharedBackend;
use bitsd_storage::{CommitOutcome, SessionBackend};
use bitsd_tests::pg::raw_client;
use bitsd_tests::shared_backend::read_object;
use bitsd_tests::until;

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
/// publish (the first records its commit before it lets go of the journal, so the second,
/// waiting, finds the session committed), the file is the upload, and neither a journal nor
/// an unfinished upload is left.
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
        let (a, relay_a) = setup.relayed_node("a").await;
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
                setup.until_parts_recorded(2).await;
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
        let (b, relay_b) = setup.relayed_node("b").await;
        let second_path = path.clone();
        let second = tokio::spawn(async move {
            let outcome = b.publish_upload(&id, &second_path, false).await;
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
        setup.assert_nothing_left(&format!("{when:?}")).await;
        drop(relay_a);
        drop(relay_b);
    }
}

/// The same for an echo reply (the upload stored as the session's reply): two nodes store it
/// at once, the second starting with the first or once the first recorded two parts, each
/// doing what the server does (store the reply, then record it in the session). The first
/// keeps its journal until its reply is recorded, so the second, waiting, finds the reply
/// recorded once the journal goes and answers with it: neither gets a transient answer (the
/// client's re-sent final fragment gets its Ack at once), both name the one reply object,
/// which is the upload, no other reply object is left, and neither a journal nor an
/// unfinished upload is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_storing_one_echo_reply_at_once_share_its_assembly() {
    let Some(setup) = Setup::start().await else {
        return;
    };
    for (round, when) in [SecondStarts::Together, SecondStarts::AfterTwoParts]
        .into_iter()
        .enumerate()
    {
        let (a, _relay_a) = setup.relayed_node("a").await;
        let (b, _relay_b) = setup.relayed_node("b").await;
        let (record, data) = complete_upload(&a, None, 20 + round as u64).await;
        let id = record.id;
        // What the server's completion does with an echo handler's answer.
        let store = |node: SharedBackend| async move {
            let upload = node.upload_unread(&id).await.unwrap();
            let kind = node.store_reply_file(&id, &upload.path).await;
            if let Ok(kind) = &kind {
                record_reply(&node, &id, kind).await;
            }
            (kind, node)
        };
        let first = tokio::spawn(store(a));
        if matches!(when, SecondStarts::AfterTwoParts) {
            setup.until_parts_recorded(2).await;
        }
        let second = tokio::spawn(store(b));
        let mut keys = Vec::new();
        for (which, task) in [("first", first), ("second", second)] {
            let (reply, node) = tokio::time::timeout(Duration::from_secs(90), task)
                .await
                .unwrap_or_else(|_| panic!("{when:?}: the {which} attempt never ended"))
                .unwrap();
            let reply = reply.unwrap_or_else(|e| panic!("{when:?}: the {which} attempt: {e:?}"));
            let key = stored_reply_key(&node, &id, reply);
            assert!(
                read_object(node.objects(), &key).await == data,
                "{when:?}: the {which} attempt's reply is not the upload"
            );
            keys.push((key, node));
        }
        let (node, ids) = (&keys[0].1, (&keys[0].0, &keys[1].0));
        assert_eq!(ids.0, ids.1, "{when:?}: two reply objects");
        let stored = node.load(&id).await.unwrap().unwrap();
        let recorded = stored_reply_key(node, &id, stored.reply.unwrap().kind);
        assert_eq!(&recorded, ids.0, "{when:?}: the record names another reply");
        let prefix = node.objects().session_prefix(&id);
        let replies = node
            .objects()
            .list(&prefix)
            .await
            .unwrap()
            .into_iter()
            .filter(|o| o.key.as_str().contains("/reply"))
            .count();
        assert_eq!(
            replies, 1,
            "{when:?}: reply objects in the session's prefix"
        );
        setup.assert_nothing_left(&format!("{when:?}")).await;
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
    let (a, relay_a) = setup.relayed_node("a").await;
    let path = "resume/taken-over.bin";
    let (record, data) = complete_upload(&a, Some(path), 30).await;
    let id = record.id;
    relay_a.hold_answer_to(&["PUT ", "partNumber=3&"]);
    let first = tokio::spawn(async move { a.publish_upload(&id, path, false).await });
    // Parts 1, 2 and 4; part 5 waits for part 3.
    setup.until_parts_recorded(3).await;
    assert!(relay_a.holding(), "part 3's answer is not held");
    let pg = raw_client(&setup.postgres_url).await;
    let holder: uuid::Uuid = pg
        .query_one("SELECT holder FROM bitsd_assemblies", &[])
        .await
        .unwrap()
        .get(0);

    // The second attempt waits for the lease; end it by hand until the second holds it.
    let (b, _relay_b) = setup.relayed_node("b").await;
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
    let objects = Objects::new(&setup.store.object_store_config("resume")).unwrap();
    let file = read_object(&objects, &objects.file_key(path)).await;
    assert!(file == data, "the published file is not the upload");
    setup.assert_nothing_left("taken over").await;
}
