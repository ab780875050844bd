//! A fragment's commit whose statement runs while the store completes the object
//! (`PgStateStore::commit_pending_fragment_during`), against a real PostgreSQL 15: the new
//! offset is seen by no one before the store's answer, a store that fails leaves nothing
//! committed and nothing locked, a commit abandoned mid-way closes its connection so the
//! session's row is free at once, a racing commit waits and then loses (or wins first), and
//! past half the pool the commit waits for the store instead; one left open past its limit is
//! ended by PostgreSQL. The "store" here is a future the
//! test completes when it likes. Skips with a printed reason when PostgreSQL is not installed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bitsd_storage::shared::pg::{CasOutcome, PgOptions, PgStateStore};
use bitsd_storage::StorageError;
use bitsd_tests::pg::{
    cluster_or_skip as cluster, fragment, open_transactions, raw_client, session_record,
    single_connection_store, state_store as node,
};
use tokio::sync::oneshot;

/// A store's answer, given by the test.
type Answer = Result<&'static str, StorageError>;

/// A commit under way in a task of its own.
type Commit = tokio::task::JoinHandle<Result<(&'static str, CasOutcome), StorageError>>;

/// Waits (up to 10 s) until `open_transactions` is `n`.
async fn until_open(pg: &tokio_postgres::Client, n: i64) {
    for _ in 0..500 {
        if open_transactions(pg).await == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "open transactions: {} (expected {n})",
        open_transactions(pg).await
    );
}

/// Commits `len` bytes at 0 of session `id` in `key` on `store`, which must not wait for a
/// lock (it answers within 2 s) and must win.
async fn commits_at_once(store: &PgStateStore, id: bitsd_protocol::SessionId, len: u64, key: &str) {
    let won = tokio::time::timeout(
        Duration::from_secs(2),
        store.commit_pending_fragment(&fragment(id, 0, len, key)),
    )
    .await
    .expect("the row is not locked any more")
    .unwrap();
    assert!(
        matches!(won, CasOutcome::Committed(r) if r.received == len),
        "{key}"
    );
}

/// A session on `store` with the pending rows of `keys`.
async fn session(store: &PgStateStore, keys: &[&str]) -> bitsd_protocol::SessionId {
    let rec = session_record(None);
    assert!(store.create(&rec).await.unwrap());
    for key in keys {
        assert!(store
            .add_fragment_pending_object(&rec.id, key)
            .await
            .unwrap());
    }
    rec.id
}

/// Starts an overlapped commit of 100 bytes at 0 in `key` on `store`, whose store answers
/// what is sent on the returned channel.
fn overlapped(
    store: &PgStateStore,
    id: bitsd_protocol::SessionId,
    key: &str,
) -> (oneshot::Sender<Answer>, Commit) {
    let (tx, rx) = oneshot::channel::<Answer>();
    let store = store.clone();
    let c = fragment(id, 0, 100, key);
    let task = tokio::spawn(async move {
        store
            .commit_pending_fragment_during(&c, async move { rx.await.unwrap() })
            .await
    });
    (tx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offset_shows_only_after_the_store_answers_and_a_racing_commit_waits_then_loses() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let (a, b, raw) = (node(&url).await, node(&url).await, raw_client(&url).await);
    let id = session(&a, &["s/a", "s/b"]).await;
    let (answer, task) = overlapped(&a, id, "s/a");
    until_open(&raw, 1).await;
    // The statement has run; another node still reads the old offset.
    assert_eq!(b.load(&id).await.unwrap().unwrap().received, 0);
    // Another node's commit of the same offset waits for this transaction's end.
    let racer = {
        let b = b.clone();
        tokio::spawn(async move { b.commit_pending_fragment(&fragment(id, 0, 50, "s/b")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!racer.is_finished(), "the racing commit did not wait");
    assert_eq!(b.load(&id).await.unwrap().unwrap().received, 0);
    answer.send(Ok("stored")).unwrap();
    let (stored, outcome) = task.await.unwrap().unwrap();
    assert_eq!(stored, "stored");
    assert!(
        matches!(&outcome, CasOutcome::Committed(r) if r.received == 100),
        "{outcome:?}"
    );
    match racer.await.unwrap().unwrap() {
        CasOutcome::Raced(r) => assert_eq!(r.received, 100),
        other => panic!("the racer: {other:?}"),
    }
    let index = b.fragments(&id).await.unwrap();
    assert_eq!(index.len(), 1);
    assert_eq!(index[0].object_key, "s/a");
    assert!(!b.is_pending("s/a").await.unwrap(), "the winner's row went");
    assert!(b.is_pending("s/b").await.unwrap(), "the loser's row stays");
    until_open(&raw, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_fails_after_the_statement_leaves_nothing_committed_nor_locked() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let (a, b, raw) = (node(&url).await, node(&url).await, raw_client(&url).await);
    let id = session(&a, &["f/a"]).await;
    let (answer, task) = overlapped(&a, id, "f/a");
    until_open(&raw, 1).await;
    answer
        .send(Err(StorageError::Busy("the store failed".into())))
        .unwrap();
    let err = task.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("the store failed"), "{err}");
    let r = b.load(&id).await.unwrap().unwrap();
    assert_eq!(r.received, 0, "rolled back");
    assert!(b.fragments(&id).await.unwrap().is_empty());
    assert!(
        b.is_pending("f/a").await.unwrap(),
        "the row stays for the collector"
    );
    until_open(&raw, 0).await;
    // Nothing stays locked: another node's commit of the offset goes through at once, and
    // the first node's pool works on.
    commits_at_once(&b, id, 100, "f/a").await;
    assert_eq!(a.load(&id).await.unwrap().unwrap().received, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_dropped_while_it_waits_for_the_store_frees_the_session_at_once() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let (a, b, raw) = (node(&url).await, node(&url).await, raw_client(&url).await);
    let id = session(&a, &["d/a", "d/b"]).await;
    let (answer, task) = overlapped(&a, id, "d/a");
    until_open(&raw, 1).await;
    // The packet's future goes away (its client hung up, its call timed out).
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    drop(answer);
    // Its connection is closed, not put back in the pool mid-transaction: PostgreSQL rolls
    // the transaction back and the row is free.
    commits_at_once(&b, id, 100, "d/b").await;
    until_open(&raw, 0).await;
    // The first node goes on: its next commit (overlapped again) runs in a transaction of
    // its own, not inside the abandoned one.
    let c = fragment(id, 100, 10, "d/c");
    assert!(a.add_fragment_pending_object(&id, "d/c").await.unwrap());
    let (_, outcome) = a
        .commit_pending_fragment_during(&c, async { Ok::<_, StorageError>(()) })
        .await
        .unwrap();
    assert!(matches!(outcome, CasOutcome::Committed(r) if r.received == 110));
    let keys: Vec<String> = b
        .fragments(&id)
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.object_key)
        .collect();
    assert_eq!(keys, ["d/b", "d/c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlapped_commit_after_another_node_won_loses_with_the_winners_offset() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let (a, b, raw) = (node(&url).await, node(&url).await, raw_client(&url).await);
    let id = session(&a, &["w/a", "w/b"]).await;
    let first = b
        .commit_pending_fragment(&fragment(id, 0, 70, "w/b"))
        .await
        .unwrap();
    assert!(matches!(first, CasOutcome::Committed(_)));
    let (stored, outcome) = a
        .commit_pending_fragment_during(&fragment(id, 0, 100, "w/a"), async {
            Ok::<_, StorageError>("stored")
        })
        .await
        .unwrap();
    assert_eq!(
        stored, "stored",
        "the store's answer comes back with the outcome"
    );
    assert!(
        matches!(outcome, CasOutcome::Raced(r) if r.received == 70),
        "lost"
    );
    assert!(a.is_pending("w/a").await.unwrap());
    until_open(&raw, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_half_the_pool_the_commit_waits_for_its_store() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let raw = raw_client(&url).await;
    // A pool of one: no commit may hold its only connection across the store's work, so the
    // store runs first, with no transaction open and the offset unchanged.
    let one = single_connection_store(&url).await;
    let id = session(&one, &["h/a", "h/b"]).await;
    let (stored, outcome) = one
        .commit_pending_fragment_during(&fragment(id, 0, 100, "h/a"), async {
            let open = open_transactions(&raw).await;
            let received = one.load(&id).await.map(|r| r.unwrap().received);
            Ok::<_, StorageError>((open, received.unwrap()))
        })
        .await
        .unwrap();
    assert_eq!(
        stored,
        (0, 0),
        "the store ran before the commit's statement"
    );
    assert!(matches!(outcome, CasOutcome::Committed(r) if r.received == 100));
    // A pool of 16: 8 commits may wait in open transactions at once, the 9th waits for its
    // store first.
    let sixteen = node(&url).await;
    let ids: Vec<_> = {
        let mut v = Vec::new();
        for i in 0..9 {
            v.push(session(&sixteen, &[&format!("p/{i}")]).await);
        }
        v
    };
    let mut held = Vec::new();
    for (i, id) in ids.iter().take(8).enumerate() {
        held.push(overlapped(&sixteen, *id, &format!("p/{i}")));
    }
    until_open(&raw, 8).await;
    let ninth = sixteen
        .commit_pending_fragment_during(&fragment(ids[8], 0, 100, "p/8"), async {
            // Time for a statement run alongside to show (were it run).
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, StorageError>(open_transactions(&raw).await)
        })
        .await
        .unwrap();
    assert_eq!(ninth.0, 8, "the ninth's store ran before its statement");
    assert!(matches!(ninth.1, CasOutcome::Committed(_)));
    for (answer, task) in held {
        answer.send(Ok("stored")).unwrap();
        let (_, outcome) = task.await.unwrap().unwrap();
        assert!(matches!(outcome, CasOutcome::Committed(r) if r.received == 100));
    }
    until_open(&raw, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_left_open_past_its_limit_is_ended_and_its_answer_is_transient() {
    let Some(pg) = cluster() else { return };
    let url = pg.fresh_database();
    let a = PgStateStore::connect(
        &url,
        PgOptions {
            open_commit_limit: Duration::from_millis(500),
            ..PgOptions::default()
        },
    )
    .await
    .unwrap();
    let (b, raw) = (node(&url).await, raw_client(&url).await);
    let id = session(&a, &["l/a", "l/b"]).await;
    // A store that answers long after the limit (as a node cut off from PostgreSQL would
    // leave its transaction open): PostgreSQL ends the transaction and frees the row.
    let (answer, task) = overlapped(&a, id, "l/a");
    until_open(&raw, 1).await;
    until_open(&raw, 0).await;
    commits_at_once(&b, id, 50, "l/b").await;
    answer.send(Ok("stored")).unwrap();
    let err = task.await.unwrap().unwrap_err();
    assert!(
        matches!(err, StorageError::CommitOutlived(_)) && err.is_transient(),
        "the COMMIT of an ended transaction is a transient failure: {err:?}"
    );
    assert!(
        err.to_string()
            .contains("longer than postgres_open_commit_secs"),
        "it says why: {err}"
    );
    assert_eq!(b.load(&id).await.unwrap().unwrap().received, 50);
    assert!(a.is_pending("l/a").await.unwrap(), "left for the collector");
    // The node's pool goes on without the ended connection.
    assert_eq!(a.load(&id).await.unwrap().unwrap().received, 50);
}
