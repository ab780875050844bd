//! SessionStore and SledMetaStore against a real sled database and real files in a temp dir.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bitsd_protocol::SessionId;
use bitsd_storage::{CommitOutcome, MetaStore, SessionState, SledMetaStore, UploadMode};

mod common;
use common::{open, record, write_fragment};

#[tokio::test]
async fn reopen_cuts_unacknowledged_bytes_and_their_index_entries() {
    let dir = tempfile::tempdir().unwrap();
    let mut rec = record(UploadMode::Upload);
    {
        let store = open(dir.path()).await;
        store.create(&rec).await.unwrap();
        write_fragment(&store, &mut rec, 0, b"hello ", 11).await;
        // Bytes that reached the file but whose commit never happened.
        let mut w = store.fragment_writer(&rec.id, 6).await.unwrap();
        w.write(b"wor").await.unwrap();
        w.flush().await.unwrap();
        drop(w);
        // A crash between the index entry and the record update (two ordered inserts): the
        // entry of the unacknowledged bytes is there, the record still says 6.
        store
            .meta()
            .save_with_fragment(
                &rec,
                &bitsd_storage::FragmentEntry {
                    offset: 6,
                    len: 3,
                    crc32c: crc32c::crc32c(b"wor"),
                },
                false,
            )
            .unwrap();
        // The synced fragment needs no entry; the unacknowledged one has its leftover.
        assert_eq!(store.meta().fragments(&rec.id).unwrap().len(), 1);
        store.flush().await.unwrap();
    }
    let store = open(dir.path()).await;
    let upload = store.upload_path(&rec.id);
    assert_eq!(std::fs::read(&upload).unwrap(), b"hello ");
    let loaded = store.load(&rec.id).await.unwrap().unwrap();
    assert_eq!(loaded.received, 6);
    assert!(store.meta().fragments(&rec.id).unwrap().is_empty());
}

/// A fragment written without a sync (`fsync = "on-close"`) can have a durable offset whose
/// bytes never reached the disk: reopening checks it against its CRC-32C and resumes before
/// it; a fragment whose bytes are there is kept, and the entries go once the bytes are synced.
#[tokio::test]
async fn reopen_drops_a_last_fragment_whose_bytes_are_not_on_disk() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let mut lost = record(UploadMode::Upload);
    let mut torn = record(UploadMode::Upload);
    let mut kept = record(UploadMode::Upload);
    {
        let store = open(dir.path()).await;
        for (rec, tail) in [
            (&mut lost, None),
            (&mut torn, Some(&b"wXrld"[..])),
            (&mut kept, Some(&b"world"[..])),
        ] {
            store.create(rec).await.unwrap();
            write_fragment(&store, rec, 0, b"hello ", 11).await;
            // The offset and index entry of "world" are durable; its bytes are missing,
            // damaged, or there.
            if let Some(tail) = tail {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(store.upload_path(&rec.id))
                    .unwrap();
                f.write_all_at(tail, 6).unwrap();
            }
            rec.received = 11;
            let entry = bitsd_storage::FragmentEntry {
                offset: 6,
                len: 5,
                crc32c: crc32c::crc32c(b"world"),
            };
            store.meta().save_with_fragment(rec, &entry, true).unwrap();
        }
    }
    let store = open(dir.path()).await;
    for (rec, received, bytes) in [
        (&lost, 6, &b"hello "[..]),
        (&torn, 6, &b"hello "[..]),
        (&kept, 11, &b"hello world"[..]),
    ] {
        let loaded = store.load(&rec.id).await.unwrap().unwrap();
        assert_eq!(loaded.received, received);
        assert_eq!(std::fs::read(store.upload_path(&rec.id)).unwrap(), bytes);
        assert!(store.meta().fragments(&rec.id).unwrap().is_empty());
    }
}

#[tokio::test]
async fn files_without_a_record_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()).await);
    let stray = dir
        .path()
        .join("sessions")
        .join(SessionId::random().simple());
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("upload"), b"junk").unwrap();
    drop(open(dir.path()).await);
    assert!(!stray.exists());
}

#[tokio::test]
async fn commit_never_replaces_without_overwrites_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let mut a = record(UploadMode::Upload);
    store.create(&a).await.unwrap();
    write_fragment(&store, &mut a, 0, b"first", 5).await;
    assert_eq!(
        store.commit_upload(&a.id, "d/x.bin", false).await.unwrap(),
        CommitOutcome::Committed
    );
    // A retry after a crash between link and record: same inode, still committed.
    assert_eq!(
        store.commit_upload(&a.id, "d/x.bin", false).await.unwrap(),
        CommitOutcome::Committed
    );
    let mut b = record(UploadMode::Upload);
    store.create(&b).await.unwrap();
    write_fragment(&store, &mut b, 0, b"second", 6).await;
    assert_eq!(
        store.commit_upload(&b.id, "d/x.bin", false).await.unwrap(),
        CommitOutcome::DestinationExists
    );
    assert_eq!(
        std::fs::read(store.files_dir().join("d/x.bin")).unwrap(),
        b"first"
    );
    assert_eq!(
        store.commit_upload(&b.id, "d/x.bin", true).await.unwrap(),
        CommitOutcome::Committed
    );
    assert_eq!(
        std::fs::read(store.files_dir().join("d/x.bin")).unwrap(),
        b"second"
    );
    assert_eq!(
        store.commit_upload(&b.id, "d", false).await.unwrap(),
        CommitOutcome::DestinationInvalid
    );
    assert_eq!(
        store
            .commit_upload(&b.id, "../escape", false)
            .await
            .unwrap(),
        CommitOutcome::DestinationInvalid
    );
}

#[tokio::test]
async fn end_keeps_a_tombstone_and_purge_removes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let mut rec = record(UploadMode::UploadReply);
    store.create(&rec).await.unwrap();
    write_fragment(&store, &mut rec, 0, b"abc", 3).await;
    let kind = store
        .reply_from_file(&rec.id, &store.upload_path(&rec.id))
        .await
        .unwrap();
    assert_eq!(
        kind,
        bitsd_storage::ReplyKind::Stored {
            len: 3,
            crc32c: None,
            in_upload: true,
            object: None,
        }
    );
    assert_eq!(
        std::fs::read(store.reply_file(&rec.id, &kind)).unwrap(),
        b"abc"
    );
    // Any other file is copied into the session's reply file.
    let elsewhere = dir.path().join("made-by-handler");
    std::fs::write(&elsewhere, b"reply bytes").unwrap();
    let kind = store.reply_from_file(&rec.id, &elsewhere).await.unwrap();
    assert_eq!(
        kind,
        bitsd_storage::ReplyKind::Stored {
            len: 11,
            crc32c: None,
            in_upload: false,
            object: None,
        }
    );
    assert_eq!(
        std::fs::read(store.reply_path(&rec.id)).unwrap(),
        b"reply bytes"
    );
    store
        .end_session(&mut rec, SessionState::Closed)
        .await
        .unwrap();
    assert!(!store.session_dir(&rec.id).exists());
    assert_eq!(
        store.load(&rec.id).await.unwrap().unwrap().state,
        SessionState::Closed
    );
    assert!(store.meta().fragments(&rec.id).unwrap().is_empty());
    store.purge(&rec.id).await.unwrap();
    assert!(store.load(&rec.id).await.unwrap().is_none());
}

#[test]
fn concurrent_durable_saves_share_flushes_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<SessionId> = {
        let meta = Arc::new(SledMetaStore::open(&dir.path().join("meta")).unwrap());
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let meta = meta.clone();
                std::thread::spawn(move || {
                    let mut ids = Vec::new();
                    for _ in 0..50 {
                        let r = record(UploadMode::Upload);
                        meta.save(&r).unwrap();
                        ids.push(r.id);
                    }
                    ids
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    };
    let meta = (0..100)
        .find_map(|_| {
            SledMetaStore::open(&dir.path().join("meta"))
                .ok()
                .or_else(|| {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    None
                })
        })
        .expect("sled lock released");
    assert_eq!(meta.list().unwrap().len(), 800);
    for id in ids {
        assert!(meta.load(&id).unwrap().is_some());
    }
}

/// Starting writeback while a fragment arrives is only a hint: the bytes, the offset and the
/// index entry come out the same, and they survive a reopen.
#[tokio::test]
async fn early_writeback_keeps_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let mut rec = record(UploadMode::Upload);
    let bytes: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    {
        let store = open(dir.path()).await;
        store.create(&rec).await.unwrap();
        let mut w = store.fragment_writer(&rec.id, 0).await.unwrap();
        w.start_writeback_every(16 * 1024);
        for chunk in bytes.chunks(5000) {
            w.write(chunk).await.unwrap();
        }
        rec.received = bytes.len() as u64;
        rec.total = Some(bytes.len() as u64 * 2);
        store
            .commit_fragment(w, &rec, bitsd_storage::FragmentDurability::Durable)
            .await
            .unwrap();
    }
    let store = open(dir.path()).await;
    assert_eq!(std::fs::read(store.upload_path(&rec.id)).unwrap(), bytes);
    let loaded = store.load(&rec.id).await.unwrap().unwrap();
    assert_eq!(loaded.received, bytes.len() as u64);
    // A synced fragment leaves no index entry: recovery needs none.
    assert!(store.meta().fragments(&rec.id).unwrap().is_empty());
}

/// Frames handed over without copying are gathered into vectored writes: odd frame sizes, more
/// frames than one gather holds, more bytes than one gather holds, a plain write in between
/// (which writes what is held first) and a tail still held at commit all land in order, and
/// the index entry covers every byte. Bytes still held when a writer is dropped without its
/// commit never reach the file.
#[tokio::test]
async fn gathered_frames_land_in_order_and_only_with_their_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut rec = record(UploadMode::Upload);
    let bytes: Vec<u8> = (0..700 * 1024u32).map(|i| (i * 13 % 253) as u8).collect();
    let store = open(dir.path()).await;
    store.create(&rec).await.unwrap();
    let mut w = store.fragment_writer(&rec.id, 0).await.unwrap();
    let whole = bytes::Bytes::from(bytes.clone());
    let mut at = 0;
    // 100 one-byte frames (more than one gather's frame limit), then frames of 4099 bytes up
    // to past GATHER_BYTES, a plain write, then 4099-byte frames to the end.
    for _ in 0..100 {
        w.write_bytes(whole.slice(at..at + 1)).await.unwrap();
        at += 1;
    }
    while at < bitsd_storage::GATHER_BYTES + 10_000 {
        w.write_bytes(whole.slice(at..at + 4099)).await.unwrap();
        at += 4099;
    }
    w.write(&bytes[at..at + 777]).await.unwrap();
    at += 777;
    while at < bytes.len() {
        let end = (at + 4099).min(bytes.len());
        w.write_bytes(whole.slice(at..end)).await.unwrap();
        at = end;
    }
    assert_eq!(w.written(), bytes.len() as u64);
    rec.received = bytes.len() as u64;
    rec.total = Some(bytes.len() as u64 + 10);
    // Deferred: the entry (what recovery checks) must cover every byte.
    store
        .commit_fragment(w, &rec, bitsd_storage::FragmentDurability::Deferred)
        .await
        .unwrap();
    assert_eq!(std::fs::read(store.upload_path(&rec.id)).unwrap(), bytes);
    let index = store.meta().fragments(&rec.id).unwrap();
    assert_eq!(index.len(), 1);
    assert_eq!(index[0].len, bytes.len() as u64);
    assert_eq!(index[0].crc32c, crc32c::crc32c(&bytes));

    // A fragment whose body fails part way: its writer is dropped, nothing held is written.
    let mut w = store
        .fragment_writer(&rec.id, bytes.len() as u64)
        .await
        .unwrap();
    w.write_bytes(bytes::Bytes::from_static(b"0123456789"))
        .await
        .unwrap();
    drop(w);
    assert_eq!(
        std::fs::metadata(store.upload_path(&rec.id)).unwrap().len(),
        bytes.len() as u64
    );
}

/// A flush requested before other work is waited for later; tickets are ordered, each wait
/// returns once its changes are durable, and the flusher thread ends with the last handle
/// (the database opens again in this process and holds the record).
#[test]
fn flush_tickets_wait_for_their_changes_and_the_flusher_ends_with_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta");
    let rec = record(UploadMode::UploadReply);
    {
        let meta = SledMetaStore::open(&path).unwrap();
        meta.save_lazy(&rec).unwrap();
        let first = meta.request_flush();
        let second = meta.clone().request_flush();
        assert!(second > first);
        meta.wait_flush(second).unwrap();
        meta.wait_flush(first).unwrap();
    }
    let mut reopened = None;
    for _ in 0..100 {
        match SledMetaStore::open(&path) {
            Ok(m) => {
                reopened = Some(m);
                break;
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
    let meta = reopened.expect("sled lock released after the last handle");
    assert_eq!(meta.load(&rec.id).unwrap(), Some(rec));
}

#[tokio::test]
async fn two_reply_writers_of_one_session_never_share_a_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let rec = record(UploadMode::UploadReply);
    store.create(&rec).await.unwrap();
    // Interleaved, as two completion attempts would be: a shared temp file mixes them.
    let mut a = store.reply_writer(&rec.id).await.unwrap();
    a.write(&[b'a'; 1000]).await.unwrap();
    let mut b = store.reply_writer(&rec.id).await.unwrap();
    b.write(&[b'b'; 10]).await.unwrap();
    a.write(&[b'a'; 1000]).await.unwrap();
    assert_eq!(a.finish().await.unwrap().0, 2000);
    assert_eq!(
        std::fs::read(store.reply_path(&rec.id)).unwrap(),
        vec![b'a'; 2000]
    );
    assert_eq!(b.finish().await.unwrap().0, 10);
    assert_eq!(
        std::fs::read(store.reply_path(&rec.id)).unwrap(),
        vec![b'b'; 10]
    );
    // An unfinished attempt's temp file is removed when the store is opened again.
    let mut c = store.reply_writer(&rec.id).await.unwrap();
    c.write(b"never finished").await.unwrap();
    drop(c);
    drop(store);
    let store = open(dir.path()).await;
    let names: Vec<_> = std::fs::read_dir(store.session_dir(&rec.id))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["reply"]);
}
