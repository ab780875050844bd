//! The storage seam (`SessionBackend`) against the local backend: a real sled database and
//! real files in a temp dir, used only through `Arc<dyn SessionBackend>`.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bitsd_protocol::SessionId;
use bitsd_storage::{
    CommitOutcome, FragmentCommit, FragmentDurability, FragmentPlan, ReplyKind, SessionBackend,
    SessionState, UploadMode,
};
use bytes::Bytes;

mod common;
use common::{collect, fragment, open, record};

async fn backend(dir: &std::path::Path) -> Arc<dyn SessionBackend> {
    Arc::new(open(dir).await)
}

/// Two commits from the same expected offset (two nodes or two requests racing on one
/// session): exactly one advances the offset, the other learns the winning record, for every
/// durability and when both run at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_is_a_compare_and_set_exactly_one_racer_wins() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path()).await;
    for durability in [
        FragmentDurability::Durable,
        FragmentDurability::BytesDurable,
        FragmentDurability::Deferred,
        FragmentDurability::Unsynced,
    ] {
        for _ in 0..8 {
            let rec = record(UploadMode::Upload);
            b.create(&rec).await.unwrap();
            // Both read offset 0; one sends 5 bytes, the other 9 (a longer re-send).
            let (mut a, mut c) = (rec.clone(), rec.clone());
            let (b1, b2) = (b.clone(), b.clone());
            let (ra, rc) = tokio::join!(
                tokio::spawn(async move {
                    let r = fragment(&*b1, &mut a, b"hello", 20, durability).await;
                    (r, a)
                }),
                tokio::spawn(async move {
                    let r = fragment(&*b2, &mut c, b"hello wor", 20, durability).await;
                    (r, c)
                }),
            );
            let ((ra, a), (rc, c)) = (ra.unwrap(), rc.unwrap());
            let stored = b.load(&rec.id).await.unwrap().unwrap();
            match (&ra, &rc) {
                (FragmentCommit::Committed, FragmentCommit::Lost { current }) => {
                    assert_eq!(stored.received, a.received);
                    assert_eq!(current.as_ref().unwrap().received, a.received);
                }
                (FragmentCommit::Lost { current }, FragmentCommit::Committed) => {
                    assert_eq!(stored.received, c.received);
                    assert_eq!(current.as_ref().unwrap().received, c.received);
                }
                other => panic!("{durability:?}: exactly one must win, got {other:?}"),
            }
            // The loser's retry from the winning offset goes on.
            let mut next = stored.clone();
            let tail = &b"hello world, hello!!"[next.received as usize..];
            assert_eq!(
                fragment(&*b, &mut next, tail, 20, durability).await,
                FragmentCommit::Committed
            );
            b.flush().await.unwrap();
            assert_eq!(
                collect(b.read_upload(&rec.id).await.unwrap()).await.len(),
                20
            );
        }
    }
}

/// A commit whose session ended meanwhile (Close on another node) loses and sees the
/// tombstone; a purged session's commit sees nothing.
#[tokio::test]
async fn commit_after_end_or_purge_loses() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path()).await;
    let mut rec = record(UploadMode::Upload);
    b.create(&rec).await.unwrap();
    let expected = rec.received;
    let plan = FragmentPlan {
        write_at: 0,
        len: 3,
        durability: FragmentDurability::Durable,
    };
    let mut sink = b.begin_fragment(&rec.id, plan).await.unwrap();
    sink.write(Bytes::from_static(b"abc")).await.unwrap();
    let mut ended = rec.clone();
    b.end_session(&mut ended, SessionState::Closed)
        .await
        .unwrap();
    rec.received = 3;
    rec.total = Some(10);
    match sink.commit(expected, &rec).await.unwrap() {
        FragmentCommit::Lost { current: Some(c) } => assert_eq!(c.state, SessionState::Closed),
        other => panic!("{other:?}"),
    }
    assert_eq!(b.load(&rec.id).await.unwrap().unwrap().received, 0);

    let mut gone = record(UploadMode::Upload);
    b.create(&gone).await.unwrap();
    let mut sink = b.begin_fragment(&gone.id, plan).await.unwrap();
    sink.write(Bytes::from_static(b"abc")).await.unwrap();
    b.purge(&gone.id).await.unwrap();
    gone.received = 3;
    assert_eq!(
        sink.commit(0, &gone).await.unwrap(),
        FragmentCommit::Lost { current: None }
    );
    assert!(b.load(&gone.id).await.unwrap().is_none());
}

/// A whole plain upload through the seam: created durably, fragments committed, still there
/// after a reopen, read back as a stream and as a file, published, ended, purged.
#[tokio::test]
async fn plain_upload_round_trip_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut rec = record(UploadMode::Upload);
    rec.destination = Some("a/b.bin".into());
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    {
        let b = backend(dir.path()).await;
        b.create(&rec).await.unwrap();
        let r = fragment(
            &*b,
            &mut rec,
            &body[..100_000],
            300_000,
            FragmentDurability::Durable,
        );
        assert_eq!(r.await, FragmentCommit::Committed);
    }
    let b = backend(dir.path()).await;
    let mut stored = b.load(&rec.id).await.unwrap().unwrap();
    assert_eq!(stored.received, 100_000);
    let r = fragment(
        &*b,
        &mut stored,
        &body[100_000..],
        300_000,
        FragmentDurability::BytesDurable,
    );
    assert_eq!(r.await, FragmentCommit::Committed);
    b.save(&stored).await.unwrap();
    assert_eq!(collect(b.read_upload(&rec.id).await.unwrap()).await, body);
    let file = b.upload_file(&rec.id).await.unwrap();
    assert_eq!(std::fs::read(&file.path).unwrap(), body);
    assert!(!b.destination_exists("a/b.bin").await);
    assert_eq!(
        b.publish_upload(&rec.id, "a/b.bin", false).await.unwrap(),
        CommitOutcome::Committed
    );
    // Idempotent: a retry after a crash counts the published file as done.
    assert_eq!(
        b.publish_upload(&rec.id, "a/b.bin", false).await.unwrap(),
        CommitOutcome::Committed
    );
    assert!(b.destination_exists("a/b.bin").await);
    let root = b.files_root().unwrap().to_owned();
    assert_eq!(std::fs::read(root.join("a/b.bin")).unwrap(), body);
    b.end_session(&mut stored, SessionState::Closed)
        .await
        .unwrap();
    assert_eq!(
        b.load(&rec.id).await.unwrap().unwrap().state,
        SessionState::Closed
    );
    // The published file outlives the session.
    assert_eq!(std::fs::read(root.join("a/b.bin")).unwrap(), body);
    b.purge(&rec.id).await.unwrap();
    assert!(b.load(&rec.id).await.unwrap().is_none());
}

/// A reply stored through a sink and from a file, read back by range; delivered ranges count
/// each byte once, and a reply produced again is counted afresh.
#[tokio::test]
async fn reply_store_read_range_and_count_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path()).await;
    let mut rec = record(UploadMode::UploadReply);
    b.create(&rec).await.unwrap();
    let r = fragment(&*b, &mut rec, b"ping", 4, FragmentDurability::Durable).await;
    assert_eq!(r, FragmentCommit::Committed);
    let mut sink = b.begin_reply(&rec.id).await.unwrap();
    sink.write(Bytes::from_static(b"0123456789")).await.unwrap();
    sink.write(Bytes::from_static(b"abcdef")).await.unwrap();
    assert_eq!(sink.len(), 16);
    let kind = sink.finish().await.unwrap();
    assert!(matches!(kind, ReplyKind::Stored { len: 16, .. }));
    rec.reply = Some(bitsd_storage::ReplyRecord {
        url: "http://h/reply".into(),
        kind: kind.clone(),
        created_ms: 7,
        delivered: Default::default(),
    });
    rec.state = SessionState::ReplyReady;
    b.save(&rec).await.unwrap();
    let range = collect(b.read_reply(&rec.id, &kind, 8, 4).await.unwrap()).await;
    assert_eq!(range, b"89ab");
    for (s, e) in [(0, 10), (5, 16), (0, 16)] {
        b.record_reply_delivered(&rec.id, 7, s, e)
            .await
            .unwrap()
            .unwrap();
    }
    let got = b.load(&rec.id).await.unwrap().unwrap();
    assert_eq!(got.reply.unwrap().delivered.covered(), 16);
    // Another reply (created at another time) is not counted into by an old download.
    assert!(b
        .record_reply_delivered(&rec.id, 8, 0, 4)
        .await
        .unwrap()
        .is_none());

    // From a file the handler made in its work directory.
    let work = b.upload_file(&rec.id).await.unwrap().work_dir.clone();
    let src = work.join("made-by-handler.tmp.out");
    std::fs::write(&src, b"from a file").unwrap();
    let kind = b.store_reply_file(&rec.id, &src).await.unwrap();
    let all = collect(b.read_reply(&rec.id, &kind, 0, 11).await.unwrap()).await;
    assert_eq!(all, b"from a file");
}

/// Paged listing, live counts per user, and a sweeper lock only one holder gets.
#[tokio::test]
async fn list_count_and_sweep_lock() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path()).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut rec = record(UploadMode::Upload);
        rec.owner = (i % 2 == 0).then(|| "alice".to_owned());
        b.create(&rec).await.unwrap();
        ids.push(rec);
    }
    let mut closed = ids[0].clone();
    b.end_session(&mut closed, SessionState::Cancelled)
        .await
        .unwrap();
    let counts = b.count_live().await.unwrap();
    assert_eq!(counts.total, 4);
    assert_eq!(counts.per_user.get("alice"), Some(&2));
    let mut seen: Vec<SessionId> = Vec::new();
    let mut after = None;
    loop {
        let page = b.list_page(after, 2).await.unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|r| r.id);
        seen.extend(page.iter().map(|r| r.id));
    }
    assert_eq!(seen.len(), 5);
    assert!(seen
        .windows(2)
        .all(|w| w[0].as_uuid().as_bytes() < w[1].as_uuid().as_bytes()));
    assert_eq!(b.list().await.unwrap().len(), 5);
    let lock = b.try_sweep_lock().await.unwrap().expect("free lock");
    assert!(b.try_sweep_lock().await.unwrap().is_none());
    drop(lock);
    assert!(b.try_sweep_lock().await.unwrap().is_some());
    assert_eq!(b.kind(), "local");
}

/// The losing writer of a race never cuts bytes the winner committed (its own fragment is
/// shorter than the winner's): the upload still holds every acknowledged byte.
#[tokio::test]
async fn a_losing_commit_keeps_the_winners_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend(dir.path()).await;
    for durability in [
        FragmentDurability::Durable,
        FragmentDurability::Deferred,
        FragmentDurability::Unsynced,
    ] {
        let rec = record(UploadMode::Upload);
        b.create(&rec).await.unwrap();
        let plan = |len| FragmentPlan {
            write_at: 0,
            len,
            durability,
        };
        let mut short = b.begin_fragment(&rec.id, plan(5)).await.unwrap();
        short.write(Bytes::from_static(b"hello")).await.unwrap();
        let mut long = rec.clone();
        let won = fragment(&*b, &mut long, b"hello world", 20, durability).await;
        assert_eq!(won, FragmentCommit::Committed);
        let mut lost = rec.clone();
        lost.received = 5;
        lost.total = Some(20);
        match short.commit(0, &lost).await.unwrap() {
            FragmentCommit::Lost { current: Some(c) } => assert_eq!(c.received, 11),
            other => panic!("{durability:?}: {other:?}"),
        }
        let held = collect(b.read_upload(&rec.id).await.unwrap()).await;
        assert_eq!(held, b"hello world", "{durability:?}");
    }
}
