//! What the store promises across crashes, against real sled and real files: holes left by
//! unsynced fragments are found, published files are never cut, a missing upload is never
//! published as empty, the index holds only what recovery needs, short body frames do not pin
//! their read buffers, and everything is private to the server's user.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bitsd_storage::{FragmentDurability, SessionState, UploadMode, COPY_BELOW, GATHER_BYTES};

mod common;
use common::{open, record, write_fragment};

/// `fsync = "on-close"`: four fragments are committed without a sync, then the operating
/// system loses the second one's pages (they read back as zeros). Reopening must resume at the
/// start of that fragment, not trust the later ones, and cut the file there.
#[tokio::test]
async fn on_close_recovery_resumes_before_the_first_hole() {
    let dir = tempfile::tempdir().unwrap();
    let mut rec = record(UploadMode::Upload);
    let data: Vec<u8> = (0..16 * 1024u32).map(|i| (i % 251) as u8 + 1).collect();
    {
        let store = open(dir.path()).await;
        store.create(&rec).await.unwrap();
        for at in (0..data.len()).step_by(4096) {
            let mut w = store.fragment_writer(&rec.id, at as u64).await.unwrap();
            w.write(&data[at..at + 4096]).await.unwrap();
            rec.received = at as u64 + 4096;
            rec.total = Some(20 * 1024);
            store
                .commit_fragment(w, &rec, FragmentDurability::Deferred)
                .await
                .unwrap();
        }
        assert_eq!(store.meta().fragments(&rec.id).unwrap().len(), 4);
        // The second fragment never reached the disk.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(store.upload_path(&rec.id))
            .unwrap();
        f.write_all_at(&[0u8; 4096], 4096).unwrap();
        store.flush().await.unwrap();
    }
    let store = open(dir.path()).await;
    let loaded = store.load(&rec.id).await.unwrap().unwrap();
    assert_eq!(loaded.received, 4096, "resumes before the hole");
    assert_eq!(
        std::fs::read(store.upload_path(&rec.id)).unwrap(),
        &data[..4096]
    );
    // Checked and synced: nothing left to check on the next open.
    assert!(store.meta().fragments(&rec.id).unwrap().is_empty());
}

/// A crash between publishing a plain upload and recording its completion (the order before
/// this was fixed) left a durable offset short of the file. The file is published (a second
/// link): recovery must not cut it, and finds the session complete.
#[tokio::test]
async fn recovery_never_cuts_a_published_upload() {
    let dir = tempfile::tempdir().unwrap();
    let mut rec = record(UploadMode::Upload);
    {
        let store = open(dir.path()).await;
        store.create(&rec).await.unwrap();
        write_fragment(&store, &mut rec, 0, b"0123", 8).await;
        // The completing fragment's bytes are synced and linked, its offset is not durable.
        let mut w = store.fragment_writer(&rec.id, 4).await.unwrap();
        w.write(b"4567").await.unwrap();
        w.flush().await.unwrap();
        drop(w);
        std::fs::hard_link(
            store.upload_path(&rec.id),
            store.files_dir().join("published.bin"),
        )
        .unwrap();
        store.flush().await.unwrap();
    }
    let store = open(dir.path()).await;
    assert_eq!(
        std::fs::read(store.files_dir().join("published.bin")).unwrap(),
        b"01234567"
    );
    let loaded = store.load(&rec.id).await.unwrap().unwrap();
    assert_eq!((loaded.received, loaded.state), (8, SessionState::Complete));
}

/// An upload whose file is gone is not a zero-byte upload: nothing is published.
#[tokio::test]
async fn a_missing_upload_file_is_never_published_as_empty() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let mut rec = record(UploadMode::Upload);
    store.create(&rec).await.unwrap();
    write_fragment(&store, &mut rec, 0, b"12345", 5).await;
    rec.state = SessionState::Complete;
    store.save(&rec).await.unwrap();
    std::fs::remove_file(store.upload_path(&rec.id)).unwrap();
    let err = store.commit_upload(&rec.id, "gone.bin", false).await;
    assert!(err.is_err(), "{err:?}");
    assert!(!store.files_dir().join("gone.bin").exists());

    // A true zero-byte upload is published empty.
    let mut empty = record(UploadMode::Upload);
    empty.total = Some(0);
    empty.state = SessionState::Complete;
    store.create(&empty).await.unwrap();
    assert_eq!(
        store
            .commit_upload(&empty.id, "empty.bin", false)
            .await
            .unwrap(),
        bitsd_storage::CommitOutcome::Committed
    );
    assert_eq!(
        std::fs::read(store.files_dir().join("empty.bin")).unwrap(),
        b""
    );
}

/// Synced fragments need no index entry; unsynced ones keep theirs until a sync covers them.
#[tokio::test]
async fn the_index_keeps_only_unsynced_fragments() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let mut rec = record(UploadMode::Upload);
    store.create(&rec).await.unwrap();
    for at in 0..10u64 {
        write_fragment(&store, &mut rec, at * 10, &[at as u8; 10], 130).await;
    }
    assert!(store.meta().fragments(&rec.id).unwrap().is_empty());
    for at in 10..12u64 {
        let mut w = store.fragment_writer(&rec.id, at * 10).await.unwrap();
        w.write(&[at as u8; 10]).await.unwrap();
        rec.received = at * 10 + 10;
        store
            .commit_fragment(w, &rec, FragmentDurability::Deferred)
            .await
            .unwrap();
    }
    assert_eq!(store.meta().fragments(&rec.id).unwrap().len(), 2);
    let mut w = store.fragment_writer(&rec.id, 120).await.unwrap();
    w.write(&[12; 10]).await.unwrap();
    rec.received = 130;
    store
        .commit_fragment(w, &rec, FragmentDurability::BytesDurable)
        .await
        .unwrap();
    // Removed after the completing fragment's commit returns (its Ack does not wait).
    for _ in 0..200 {
        if store.meta().fragments(&rec.id).unwrap().is_empty() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the entries of synced fragments stay");
}

/// Counts drops of the allocations body frames are cut from.
struct Owner(Vec<u8>, Arc<AtomicUsize>);

impl AsRef<[u8]> for Owner {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.1.fetch_add(1, Ordering::SeqCst);
    }
}

/// A body sent one byte at a time: each frame is cut from its own 8 KiB read buffer. The
/// writer must not keep those buffers alive (it copies short frames); long frames are held
/// without a copy, but never more than `GATHER_BYTES / COPY_BELOW` of them.
#[tokio::test]
async fn short_frames_do_not_pin_their_read_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let mut rec = record(UploadMode::Upload);
    store.create(&rec).await.unwrap();
    let dropped = Arc::new(AtomicUsize::new(0));
    let mut w = store.fragment_writer(&rec.id, 0).await.unwrap();
    let mut expect = Vec::new();
    for i in 0..200u32 {
        let buf = Owner(vec![(i % 256) as u8; 8192], dropped.clone());
        w.write_bytes(bytes::Bytes::from_owner(buf).slice(0..1))
            .await
            .unwrap();
        expect.push((i % 256) as u8);
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            i as usize + 1,
            "a one-byte frame keeps its 8 KiB read buffer alive"
        );
    }
    let max_held = GATHER_BYTES / COPY_BELOW;
    for i in 0..(3 * max_held) {
        let buf = Owner(vec![i as u8; COPY_BELOW], dropped.clone());
        w.write_bytes(bytes::Bytes::from_owner(buf)).await.unwrap();
        expect.extend(std::iter::repeat_n(i as u8, COPY_BELOW));
        let alive = 200 + i + 1 - dropped.load(Ordering::SeqCst);
        assert!(alive <= max_held, "{alive} read buffers held");
    }
    rec.received = expect.len() as u64;
    rec.total = Some(rec.received + 1);
    store
        .commit_fragment(w, &rec, FragmentDurability::Durable)
        .await
        .unwrap();
    assert_eq!(std::fs::read(store.upload_path(&rec.id)).unwrap(), expect);
}

fn assert_private(path: &std::path::Path) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    let mode = meta.permissions().mode() & 0o777;
    assert_eq!(mode & 0o077, 0, "{} is {mode:o}", path.display());
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            assert_private(&entry.unwrap().path());
        }
    }
}

/// The data directory the store creates and everything in it (sled's files, uploads, replies,
/// published files and their new parents) are private to the server's user, whatever the
/// umask.
#[tokio::test]
async fn everything_the_store_creates_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = open(&data).await;
    let mut rec = record(UploadMode::Upload);
    store.create(&rec).await.unwrap();
    write_fragment(&store, &mut rec, 0, b"bytes", 5).await;
    store
        .commit_upload(&rec.id, "new/parent/file.bin", false)
        .await
        .unwrap();
    let mut echo = record(UploadMode::UploadReply);
    store.create(&echo).await.unwrap();
    write_fragment(&store, &mut echo, 0, b"reply", 5).await;
    let mut w = store.reply_writer(&echo.id).await.unwrap();
    w.write(b"reply").await.unwrap();
    w.finish().await.unwrap();
    let handler_file = dir.path().join("made-by-handler");
    std::fs::write(&handler_file, b"x").unwrap();
    std::fs::set_permissions(&handler_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut other = record(UploadMode::UploadReply);
    store.create(&other).await.unwrap();
    write_fragment(&store, &mut other, 0, b"other", 5).await;
    store
        .reply_from_file(&other.id, &handler_file)
        .await
        .unwrap();
    store.flush().await.unwrap();
    assert_private(&data);
}

/// Closing a session with a large fragment index (an on-close upload of 10,000 fragments)
/// removes the entries off the runtime: a timer on the same single-threaded runtime keeps
/// ticking meanwhile.
#[tokio::test(flavor = "current_thread")]
async fn close_removes_a_large_index_off_the_runtime() {
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let mut rec = record(UploadMode::Upload);
    store.create(&rec).await.unwrap();
    for i in 0..10_000u64 {
        let entry = bitsd_storage::FragmentEntry {
            offset: i,
            len: 1,
            crc32c: 0,
        };
        rec.received = i + 1;
        store
            .meta()
            .save_with_fragment(&rec, &entry, false)
            .unwrap();
    }
    let done = AtomicBool::new(false);
    let ticker = async {
        let mut worst = Duration::ZERO;
        let mut last = Instant::now();
        while !done.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
            worst = worst.max(last.elapsed());
            last = Instant::now();
        }
        worst
    };
    let close = async {
        let started = Instant::now();
        store
            .end_session(&mut rec, SessionState::Closed)
            .await
            .unwrap();
        done.store(true, Ordering::SeqCst);
        started.elapsed()
    };
    let (worst, took) = tokio::join!(ticker, close);
    println!("close took {took:?}, the runtime stalled at most {worst:?}");
    assert!(store.meta().fragments(&rec.id).unwrap().is_empty());
    assert!(
        worst < took / 3,
        "the runtime stalled {worst:?} while Close took {took:?}"
    );
}

/// Half-written replies (the store's and a reply handler's, whatever their attempt's name) are
/// dropped when the store opens; the upload stays.
#[tokio::test]
async fn temporary_files_of_a_crashed_run_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let mut rec = record(UploadMode::UploadReply);
    let session_dir;
    {
        let store = open(dir.path()).await;
        store.create(&rec).await.unwrap();
        write_fragment(&store, &mut rec, 0, b"upload", 6).await;
        session_dir = store.session_dir(&rec.id);
        for name in ["reply.tmp", "command-reply.3.tmp", "notification-reply.tmp"] {
            std::fs::write(session_dir.join(name), b"half").unwrap();
        }
    }
    let store = open(dir.path()).await;
    let left: Vec<String> = std::fs::read_dir(&session_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["upload"]);
    assert_eq!(
        std::fs::read(store.upload_path(&rec.id)).unwrap(),
        b"upload"
    );
}
