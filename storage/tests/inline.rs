//! Small fragments and small replies held in the meta store's log (sled), against a real sled
//! database and real files in a temp dir: no per-session file or directory for them, reads
//! and recovery that do not care where a byte lives, a session mixing small and large
//! fragments published byte-exact, and Close removing the held bytes.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bitsd_storage::{
    CommitOutcome, FragmentCommit, FragmentDurability, ReplyKind, ReplyRecord, SessionBackend,
    SessionState, SessionStore, UploadMode, INLINE_BELOW,
};
use bytes::Bytes;

mod common;
use common::{collect, fragment, open, record};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Small fragments committed durably leave no session directory behind, and after the store
/// is closed and opened again (recovery) the session resumes at the acknowledged offset with
/// every byte readable.
#[tokio::test]
async fn small_fragments_need_no_file_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let b: Arc<dyn SessionBackend> = Arc::new(store.clone());
    let mut rec = record(UploadMode::Upload);
    b.create(&rec).await.unwrap();
    let data = pattern(3 * 4096, 1);
    for part in data[..2 * 4096].chunks(4096) {
        let r = fragment(
            &*b,
            &mut rec,
            part,
            data.len() as u64,
            FragmentDurability::Durable,
        );
        assert_eq!(r.await, FragmentCommit::Committed);
    }
    assert!(
        !store.session_dir(&rec.id).exists(),
        "a small fragment created a session directory"
    );
    drop((b, store));
    let store = open(dir.path()).await;
    let b: Arc<dyn SessionBackend> = Arc::new(store.clone());
    let mut got = b.load(&rec.id).await.unwrap().unwrap();
    assert_eq!(got.received, 2 * 4096);
    assert_eq!(
        collect(b.read_upload(&rec.id).await.unwrap()).await,
        &data[..2 * 4096]
    );
    let r = fragment(
        &*b,
        &mut got,
        &data[2 * 4096..],
        data.len() as u64,
        FragmentDurability::BytesDurable,
    );
    assert_eq!(r.await, FragmentCommit::Committed);
    b.save(&got).await.unwrap();
    assert_eq!(collect(b.read_upload(&rec.id).await.unwrap()).await, data);
}

/// Bytes of a small fragment that reached the log without its record (a crash between the
/// two, or a fragment never acknowledged) are dropped at open: the session resumes at the
/// recorded offset and reads only acknowledged bytes.
#[tokio::test]
async fn unacknowledged_held_bytes_are_dropped_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let mut rec = record(UploadMode::Upload);
    store.create(&rec).await.unwrap();
    let b: &dyn SessionBackend = &store;
    let r = fragment(b, &mut rec, b"acked", 100, FragmentDurability::Durable).await;
    assert_eq!(r, FragmentCommit::Committed);
    // The bytes at 5 go in with a record that still says 5 (as if the record never made it).
    store
        .meta()
        .save_with_chunk(&rec, 5, b"never acked", true)
        .unwrap();
    drop(store);
    let store = open(dir.path()).await;
    let got = store.load(&rec.id).await.unwrap().unwrap();
    assert_eq!(got.received, 5);
    assert_eq!(store.meta().chunks(&rec.id).unwrap().len(), 1);
    let b: &dyn SessionBackend = &store;
    assert_eq!(
        collect(b.read_upload(&rec.id).await.unwrap()).await,
        b"acked"
    );
}

/// A plain upload of small, large and small fragments (in the log, the file, the log) is
/// read and published byte-exact, survives a reopen before publishing, and Close removes the
/// bytes held in the log.
#[tokio::test]
async fn mixed_small_and_large_fragments_publish_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let b: Arc<dyn SessionBackend> = Arc::new(store.clone());
    let mut rec = record(UploadMode::Upload);
    b.create(&rec).await.unwrap();
    let large = INLINE_BELOW as usize + 4096;
    let data = pattern(1000 + large + 3000 + 700, 9);
    let total = data.len() as u64;
    let cuts = [0, 1000, 1000 + large, 1000 + large + 3000, data.len()];
    for w in cuts.windows(2) {
        let durability = if w[1] == data.len() {
            FragmentDurability::BytesDurable
        } else {
            FragmentDurability::Durable
        };
        let r = fragment(&*b, &mut rec, &data[w[0]..w[1]], total, durability).await;
        assert_eq!(r, FragmentCommit::Committed);
    }
    b.save(&rec).await.unwrap();
    assert_eq!(store.meta().chunks(&rec.id).unwrap().len(), 3);
    // The file holds only the large fragment's bytes (and the hole before them).
    let file_len = std::fs::metadata(store.upload_path(&rec.id)).unwrap().len();
    assert_eq!(file_len, (1000 + large) as u64);
    drop((b, store));

    let store = open(dir.path()).await;
    let b: Arc<dyn SessionBackend> = Arc::new(store.clone());
    let mut rec = b.load(&rec.id).await.unwrap().unwrap();
    assert_eq!((rec.received, rec.state), (total, SessionState::Complete));
    assert_eq!(collect(b.read_upload(&rec.id).await.unwrap()).await, data);
    let range = collect(
        b.read_reply(
            &rec.id,
            &ReplyKind::Stored {
                len: total,
                crc32c: None,
                in_upload: true,
                object: None,
            },
            900,
            large as u64 + 200,
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(range, &data[900..1100 + large]);
    assert_eq!(
        b.publish_upload(&rec.id, "m/mixed.bin", false)
            .await
            .unwrap(),
        CommitOutcome::Committed
    );
    let published = store.files_dir().join("m/mixed.bin");
    assert!(std::fs::read(&published).unwrap() == data);
    rec.committed = true;
    b.save(&rec).await.unwrap();
    b.end_session(&mut rec, SessionState::Closed).await.unwrap();
    assert!(store.meta().chunks(&rec.id).unwrap().is_empty());
    assert!(std::fs::read(&published).unwrap() == data);
}

/// An echo-style reply (the reply is the upload itself) of an upload held in the log: the
/// handler's path holds the bytes, downloads are served from the log by range (no local
/// path), and the reply survives a reopen.
#[tokio::test]
async fn echo_reply_of_held_upload_is_served_by_range() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let b: Arc<dyn SessionBackend> = Arc::new(store.clone());
    let mut rec = record(UploadMode::UploadReply);
    b.create(&rec).await.unwrap();
    let data = pattern(4096, 3);
    let r = fragment(&*b, &mut rec, &data, 4096, FragmentDurability::BytesDurable).await;
    assert_eq!(r, FragmentCommit::Committed);
    let local = b.upload_file(&rec.id).await.unwrap();
    assert_eq!(std::fs::read(&local.path).unwrap(), data);
    let kind = b.store_reply_file(&rec.id, &local.path).await.unwrap();
    assert!(matches!(
        kind,
        ReplyKind::Stored {
            in_upload: true,
            len: 4096,
            ..
        }
    ));
    rec.reply = Some(ReplyRecord {
        url: "http://h/r".into(),
        kind: kind.clone(),
        created_ms: 1,
        delivered: Default::default(),
    });
    rec.state = SessionState::ReplyReady;
    b.save(&rec).await.unwrap();
    assert!(b.reply_local_path(&rec.id, &kind).is_none());
    // The written-out file is a page-cache copy only: lose it, as a crash may.
    std::fs::remove_file(&local.path).unwrap();
    drop((local, b, store));
    let store = open(dir.path()).await;
    let b: Arc<dyn SessionBackend> = Arc::new(store);
    let got = b.load(&rec.id).await.unwrap().unwrap();
    assert_eq!(got.state, SessionState::ReplyReady, "the reply was dropped");
    let range = collect(b.read_reply(&rec.id, &kind, 100, 50).await.unwrap()).await;
    assert_eq!(range, &data[100..150]);
}

/// A small reply is held in the log (no reply file), served by range, survives a reopen, and
/// goes with Close; a reply that outgrows the limit goes to a file.
#[tokio::test]
async fn small_reply_is_held_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let b: Arc<dyn SessionBackend> = Arc::new(store.clone());
    let mut rec = record(UploadMode::UploadReply);
    b.create(&rec).await.unwrap();
    let r = fragment(&*b, &mut rec, b"ping", 4, FragmentDurability::BytesDurable).await;
    assert_eq!(r, FragmentCommit::Committed);
    let mut sink = b.begin_reply(&rec.id).await.unwrap();
    sink.write(Bytes::from_static(b"0123456789")).await.unwrap();
    sink.write(Bytes::from_static(b"abcdef")).await.unwrap();
    let kind = sink.finish().await.unwrap();
    assert!(matches!(kind, ReplyKind::Stored { len: 16, .. }));
    assert!(!store.reply_path(&rec.id).exists());
    rec.reply = Some(ReplyRecord {
        url: "http://h/r".into(),
        kind: kind.clone(),
        created_ms: 1,
        delivered: Default::default(),
    });
    rec.state = SessionState::ReplyReady;
    b.save(&rec).await.unwrap();
    assert!(b.reply_local_path(&rec.id, &kind).is_none());
    drop((b, store));
    let store = open(dir.path()).await;
    let b: Arc<dyn SessionBackend> = Arc::new(store.clone());
    let mut got = b.load(&rec.id).await.unwrap().unwrap();
    assert_eq!(got.state, SessionState::ReplyReady, "the reply was dropped");
    let range = collect(b.read_reply(&rec.id, &kind, 8, 4).await.unwrap()).await;
    assert_eq!(range, b"89ab");

    // A large reply replaces it, in a file.
    let big = pattern(INLINE_BELOW as usize + 1, 5);
    let mut sink = b.begin_reply(&rec.id).await.unwrap();
    for part in big.chunks(1000) {
        sink.write(Bytes::copy_from_slice(part)).await.unwrap();
    }
    let kind = sink.finish().await.unwrap();
    assert!(store.reply_path(&rec.id).exists());
    assert!(store.meta().reply(&rec.id).unwrap().is_none());
    assert_eq!(
        collect(
            b.read_reply(&rec.id, &kind, 0, big.len() as u64)
                .await
                .unwrap()
        )
        .await,
        big
    );
    store.meta().put_reply(&rec.id, b"x").unwrap();
    b.end_session(&mut got, SessionState::Closed).await.unwrap();
    assert!(store.meta().reply(&rec.id).unwrap().is_none());
}

/// With the limit at 0 every fragment goes to the file, as before.
#[tokio::test]
async fn limit_zero_keeps_every_byte_in_files() {
    let dir = tempfile::tempdir().unwrap();
    let store: SessionStore = open(dir.path()).await.with_inline_below(0);
    let mut rec = record(UploadMode::Upload);
    store.create(&rec).await.unwrap();
    let b: &dyn SessionBackend = &store;
    let r = fragment(b, &mut rec, b"tiny", 8, FragmentDurability::Durable).await;
    assert_eq!(r, FragmentCommit::Committed);
    assert!(store.meta().chunks(&rec.id).unwrap().is_empty());
    assert_eq!(std::fs::read(store.upload_path(&rec.id)).unwrap(), b"tiny");
}

/// Only an upload's first MiB is held in the log: small fragments past it go to the file, so
/// a large upload sent in small fragments does not pile up in the meta store.
#[tokio::test]
async fn small_fragments_past_the_first_mib_go_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let b: &dyn SessionBackend = &store;
    let mut rec = record(UploadMode::Upload);
    b.create(&rec).await.unwrap();
    let fragment_len = 32 * 1024;
    let data = pattern(
        bitsd_storage::INLINE_UPLOAD_MAX as usize + 2 * fragment_len,
        7,
    );
    for part in data.chunks(fragment_len) {
        let r = fragment(
            b,
            &mut rec,
            part,
            data.len() as u64,
            FragmentDurability::Durable,
        );
        assert_eq!(r.await, FragmentCommit::Committed);
    }
    let held: usize = store
        .meta()
        .chunks(&rec.id)
        .unwrap()
        .iter()
        .map(|(_, c)| c.len())
        .sum();
    assert_eq!(held as u64, bitsd_storage::INLINE_UPLOAD_MAX);
    b.save(&rec).await.unwrap();
    assert!(collect(b.read_upload(&rec.id).await.unwrap()).await == data);
    assert_eq!(
        b.publish_upload(&rec.id, "big.bin", false).await.unwrap(),
        CommitOutcome::Committed
    );
    assert!(std::fs::read(store.files_dir().join("big.bin")).unwrap() == data);
}

/// A handler that never reads the upload (echo) gets its path without a file being made; the
/// path handed back is stored as "the upload itself", served from the log.
#[tokio::test]
async fn unread_upload_makes_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let b: &dyn SessionBackend = &store;
    let mut rec = record(UploadMode::UploadReply);
    b.create(&rec).await.unwrap();
    let data = pattern(5000, 11);
    let r = fragment(b, &mut rec, &data, 5000, FragmentDurability::BytesDurable).await;
    assert_eq!(r, FragmentCommit::Committed);
    let local = b.upload_unread(&rec.id).await.unwrap();
    let kind = b.store_reply_file(&rec.id, &local.path).await.unwrap();
    assert_eq!(
        kind,
        ReplyKind::Stored {
            len: 5000,
            crc32c: None,
            in_upload: true,
            object: None,
        }
    );
    assert!(!store.session_dir(&rec.id).exists());
    let range = collect(b.read_reply(&rec.id, &kind, 4990, 10).await.unwrap()).await;
    assert_eq!(range, &data[4990..]);
}

/// Close and purge of sessions whose bytes are all held in the log (no directory: the store
/// skips the blocking-pool trip) still remove everything, and the purge is durable: after a
/// reopen the purged record is gone, the closed one is a tombstone with no held bytes. A
/// session with a directory (a large fragment) still has it removed by both.
#[tokio::test]
async fn close_and_purge_of_inline_only_sessions_remove_everything_durably() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let b: Arc<dyn SessionBackend> = Arc::new(store.clone());
    let mut recs = Vec::new();
    for (i, len) in [
        4096usize,
        4096,
        2 * INLINE_BELOW as usize,
        2 * INLINE_BELOW as usize,
    ]
    .into_iter()
    .enumerate()
    {
        let mut rec = record(UploadMode::UploadReply);
        b.create(&rec).await.unwrap();
        let data = pattern(len, i as u8);
        let r = fragment(
            &*b,
            &mut rec,
            &data,
            len as u64 * 2,
            FragmentDurability::Durable,
        );
        assert_eq!(r.await, FragmentCommit::Committed);
        assert_eq!(store.session_dir(&rec.id).exists(), len > 4096);
        recs.push(rec);
    }
    let (closed, purged) = ([0usize, 2], [1usize, 3]);
    for i in closed {
        b.end_session(&mut recs[i], SessionState::Closed)
            .await
            .unwrap();
    }
    for i in purged {
        b.purge(&recs[i].id).await.unwrap();
    }
    for rec in &recs {
        assert!(!store.session_dir(&rec.id).exists());
        assert!(!store.meta().has_chunks(&rec.id).unwrap());
    }
    drop((b, store));
    let store = open(dir.path()).await;
    for i in closed {
        let got = store.load(&recs[i].id).await.unwrap().unwrap();
        assert_eq!(got.state, SessionState::Closed);
        assert!(!store.meta().has_chunks(&recs[i].id).unwrap());
    }
    for i in purged {
        assert!(store.load(&recs[i].id).await.unwrap().is_none());
        assert!(!store.meta().has_chunks(&recs[i].id).unwrap());
    }
}
