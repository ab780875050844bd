//! Upload files kept open across a session's fragments (the store's handle cache), attacked:
//! Close, Cancel and purge (what the sweeper calls) with a handle kept and with a fragment in
//! flight, racing ends against fragments, a session id used again after a purge, more
//! sessions than the cache holds, publish, and a restart. A kept handle that outlived its
//! file shows up as a `(deleted)` descriptor of this process; one that wrote into a removed
//! file loses acknowledged bytes: both are checked on real files and a real sled database.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use bitsd_storage::{
    CommitOutcome, FragmentCommit, FragmentDurability, FragmentPlan, SessionBackend, SessionRecord,
    SessionState, SessionStore, UploadMode, HANDLE_CACHE_SIZE,
};
use bytes::Bytes;

mod common;
use common::{collect, fragment, open, record};

/// The targets of this process's descriptors that lie under `dir`.
fn fds_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| p.starts_with(&dir))
        .collect()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

/// A store where every fragment goes to the upload file (no inline bytes).
async fn files_only(dir: &Path) -> SessionStore {
    open(dir).await.with_inline_below(0)
}

/// Close, Cancel and purge of a session whose upload file is kept open close that handle:
/// nothing of this process points into the removed directory afterwards.
#[tokio::test]
async fn close_cancel_and_purge_close_the_kept_handle() {
    let dir = tempfile::tempdir().unwrap();
    let store = files_only(dir.path()).await;
    let b: Arc<dyn SessionBackend> = Arc::new(store.clone());
    for end in 0..3 {
        let mut rec = record(UploadMode::Upload);
        b.create(&rec).await.unwrap();
        for part in pattern(8192, end).chunks(4096) {
            let r = fragment(&*b, &mut rec, part, 16384, FragmentDurability::Durable).await;
            assert_eq!(r, FragmentCommit::Committed);
        }
        let sdir = store.session_dir(&rec.id);
        assert_eq!(
            fds_under(&sdir).len(),
            1,
            "the upload file is not kept open"
        );
        match end {
            0 => b.end_session(&mut rec, SessionState::Closed).await.unwrap(),
            1 => b
                .end_session(&mut rec, SessionState::Cancelled)
                .await
                .unwrap(),
            _ => b.purge(&rec.id).await.unwrap(),
        }
        assert!(!sdir.exists());
        assert_eq!(fds_under(&sdir), Vec::<String>::new(), "end #{end}");
    }
}

/// Cancel, Close or purge while a fragment is in flight (its writer holds the kept handle):
/// the commit loses, and its handle is not kept for a session whose file is gone.
#[tokio::test]
async fn ending_a_session_with_a_fragment_in_flight() {
    fragment_against_an_end(true).await;
}

/// A fragment begun after its session was closed, cancelled or purged (its packet loaded the
/// record just before the end): opening the upload file re-creates the removed directory, the
/// commit loses, and the directory it brought back goes again: nothing of the ended session is
/// left on disk.
#[tokio::test]
async fn a_fragment_begun_after_the_end_leaves_no_directory_behind() {
    fragment_against_an_end(false).await;
}

/// A fragment begun after its session ended whose client then went away (the writer is
/// dropped, never committed) removes the directory it re-created; one of a live session that
/// is abandoned leaves the session as it was, and the re-sent fragment is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_fragment_removes_only_an_ended_sessions_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = files_only(dir.path()).await;
    let b: Arc<dyn SessionBackend> = Arc::new(store.clone());
    let plan = FragmentPlan {
        write_at: 0,
        len: 4096,
        durability: FragmentDurability::Durable,
    };
    // Ended: Cancel, Close, purge.
    for end in 0..3 {
        let rec = record(UploadMode::Upload);
        b.create(&rec).await.unwrap();
        end_by(&*b, &rec, end).await;
        let mut sink = b.begin_fragment(&rec.id, plan).await.unwrap();
        sink.write(Bytes::from(pattern(4096, 3))).await.unwrap();
        let sdir = store.session_dir(&rec.id);
        assert!(sdir.exists(), "the late fragment re-created the directory");
        drop(sink);
        let mut gone = false;
        for _ in 0..100 {
            if !sdir.exists() {
                gone = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(gone, "end #{end}: {} left", sdir.display());
    }
    // Live: the abandoned first fragment leaves the session usable.
    let mut rec = record(UploadMode::Upload);
    b.create(&rec).await.unwrap();
    let mut sink = b.begin_fragment(&rec.id, plan).await.unwrap();
    sink.write(Bytes::from(pattern(2048, 4))).await.unwrap();
    drop(sink);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(store.session_dir(&rec.id).exists());
    let data = pattern(4096, 5);
    let r = fragment(&*b, &mut rec, &data, 4096, FragmentDurability::Durable).await;
    assert_eq!(r, FragmentCommit::Committed);
    assert_eq!(collect(b.read_upload(&rec.id).await.unwrap()).await, data);
}

/// Ends `rec`'s session by Cancel (`end` 0), Close (1) or purge (2).
async fn end_by(b: &dyn SessionBackend, rec: &SessionRecord, end: u8) {
    let mut ended = rec.clone();
    match end {
        0 => b
            .end_session(&mut ended, SessionState::Cancelled)
            .await
            .unwrap(),
        1 => b
            .end_session(&mut ended, SessionState::Closed)
            .await
            .unwrap(),
        _ => b.purge(&rec.id).await.unwrap(),
    }
}

/// For each end (Cancel, Close, purge) and durability: a session's second fragment begun
/// before the end (`begun_before`) or after it, then committed. The commit loses, and no
/// directory, file or handle of the session is left.
async fn fragment_against_an_end(begun_before: bool) {
    let dir = tempfile::tempdir().unwrap();
    let store = files_only(dir.path()).await;
    let b: Arc<dyn SessionBackend> = Arc::new(store.clone());
    for end in 0..3 {
        for durability in [FragmentDurability::Durable, FragmentDurability::Unsynced] {
            let mut rec = record(UploadMode::Upload);
            b.create(&rec).await.unwrap();
            let first = fragment(&*b, &mut rec, &pattern(4096, 1), 8192, durability).await;
            assert_eq!(first, FragmentCommit::Committed);
            let plan = FragmentPlan {
                write_at: 4096,
                len: 4096,
                durability,
            };
            let begin = || async {
                let mut sink = b.begin_fragment(&rec.id, plan).await.unwrap();
                sink.write(Bytes::from(pattern(4096, 2))).await.unwrap();
                sink
            };
            let sink = if begun_before {
                Some(begin().await)
            } else {
                None
            };
            end_by(&*b, &rec, end).await;
            let sdir = store.session_dir(&rec.id);
            if !begun_before {
                assert!(!sdir.exists());
            }
            let sink = match sink {
                Some(sink) => sink,
                None => begin().await,
            };
            let mut next = rec.clone();
            next.received = 8192;
            let outcome = sink.commit(4096, &next).await.unwrap();
            assert!(
                matches!(outcome, FragmentCommit::Lost { .. }),
                "{outcome:?}"
            );
            assert!(
                !sdir.exists(),
                "end #{end}, {durability:?}, begun before: {begun_before}: {} left",
                sdir.display()
            );
            assert_eq!(fds_under(&sdir), Vec::<String>::new(), "end #{end}");
        }
    }
}

/// Sessions ended (or purged) while their fragments race on other threads: whatever the
/// interleaving, no handle of a removed file stays open, and a live session's bytes are all
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ends_racing_fragments_leave_no_handle_of_a_removed_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = files_only(dir.path()).await;
    let b: Arc<dyn SessionBackend> = Arc::new(store.clone());
    let mut tasks = Vec::new();
    for i in 0..24u8 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let mut rec = record(UploadMode::Upload);
            b.create(&rec).await.unwrap();
            let writer = {
                let (b, mut rec) = (b.clone(), rec.clone());
                tokio::spawn(async move {
                    for _ in 0..8 {
                        let d = if i % 2 == 0 {
                            FragmentDurability::Durable
                        } else {
                            FragmentDurability::Unsynced
                        };
                        let data = pattern(4096, i);
                        if fragment(&*b, &mut rec, &data, 1 << 20, d).await
                            != FragmentCommit::Committed
                        {
                            return;
                        }
                    }
                })
            };
            // End after a varying number of the writer's fragments.
            for _ in 0..(i % 5) {
                tokio::task::yield_now().await;
                tokio::time::sleep(std::time::Duration::from_micros(300)).await;
            }
            if i % 3 == 0 {
                b.purge(&rec.id).await.unwrap();
            } else {
                b.end_session(&mut rec, SessionState::Cancelled)
                    .await
                    .unwrap();
            }
            // A begin_fragment that got in after the end may open (and re-create) the
            // directory: its commit loses and its handle is dropped with the sink.
            let _ = writer.await;
            rec.id
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    let left: Vec<_> = fds_under(dir.path())
        .into_iter()
        .filter(|p| p.contains("/sessions/"))
        .collect();
    assert_eq!(
        left,
        Vec::<String>::new(),
        "handles of ended sessions kept open"
    );
    for id in ids {
        let state = b.load(&id).await.unwrap().map(|r| r.state);
        assert!(matches!(state, None | Some(SessionState::Cancelled)));
    }
}

/// A session id used again after a purge (a record re-created with the same id) gets a fresh
/// upload file: a handle kept from before the purge would write the new bytes into the
/// removed file and lose them.
#[tokio::test]
async fn a_purged_id_used_again_writes_a_fresh_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = files_only(dir.path()).await;
    let b: Arc<dyn SessionBackend> = Arc::new(store.clone());
    let mut rec = record(UploadMode::Upload);
    b.create(&rec).await.unwrap();
    let first = pattern(4096, 7);
    let r = fragment(&*b, &mut rec, &first, 8192, FragmentDurability::Durable);
    assert_eq!(r.await, FragmentCommit::Committed);
    b.purge(&rec.id).await.unwrap();
    let mut again = record(UploadMode::Upload);
    again.id = rec.id;
    b.create(&again).await.unwrap();
    let data = pattern(8192, 9);
    for part in data.chunks(4096) {
        let r = fragment(&*b, &mut again, part, 8192, FragmentDurability::Durable).await;
        assert_eq!(r, FragmentCommit::Committed);
    }
    assert_eq!(std::fs::read(store.upload_path(&rec.id)).unwrap(), data);
    assert_eq!(collect(b.read_upload(&rec.id).await.unwrap()).await, data);
    let deleted: Vec<_> = fds_under(dir.path())
        .into_iter()
        .filter(|p| p.ends_with("(deleted)"))
        .collect();
    assert_eq!(deleted, Vec::<String>::new());
}

/// More sessions than the cache holds, their fragments interleaved: at most the cache's size
/// of upload files stay open, and every session's bytes are exactly what was sent (evicted
/// handles are opened again).
#[tokio::test]
async fn more_sessions_than_the_cache_holds() {
    let dir = tempfile::tempdir().unwrap();
    let store = files_only(dir.path()).await;
    let b: Arc<dyn SessionBackend> = Arc::new(store.clone());
    let n = HANDLE_CACHE_SIZE + 44;
    let mut recs = Vec::new();
    for _ in 0..n {
        let rec = record(UploadMode::Upload);
        b.create(&rec).await.unwrap();
        recs.push(rec);
    }
    for round in 0..3u8 {
        for (i, rec) in recs.iter_mut().enumerate() {
            let d = if i % 16 == 0 {
                FragmentDurability::Durable
            } else {
                FragmentDurability::Unsynced
            };
            let part = pattern(1024, round.wrapping_add(i as u8));
            let r = fragment(&*b, rec, &part, 3 * 1024, d).await;
            assert_eq!(r, FragmentCommit::Committed);
        }
        let open_files = fds_under(&dir.path().join("sessions")).len();
        assert!(
            open_files <= HANDLE_CACHE_SIZE,
            "{open_files} upload files open"
        );
    }
    for (i, rec) in recs.iter().enumerate() {
        let want: Vec<u8> = (0..3u8)
            .flat_map(|round| pattern(1024, round.wrapping_add(i as u8)))
            .collect();
        assert_eq!(collect(b.read_upload(&rec.id).await.unwrap()).await, want);
    }
}

/// Publishing a complete upload closes its kept handle (the file becomes a published file
/// nothing may write into), and a restart with handles kept loses no acknowledged byte.
#[tokio::test]
async fn publish_and_restart_with_kept_handles() {
    let dir = tempfile::tempdir().unwrap();
    let store = files_only(dir.path()).await;
    let b: Arc<dyn SessionBackend> = Arc::new(store.clone());
    let data = pattern(3 * 4096, 3);
    let mut rec = record(UploadMode::Upload);
    b.create(&rec).await.unwrap();
    for part in data[..8192].chunks(4096) {
        let r = fragment(
            &*b,
            &mut rec,
            part,
            data.len() as u64,
            FragmentDurability::Durable,
        );
        assert_eq!(r.await, FragmentCommit::Committed);
    }
    assert_eq!(fds_under(&store.session_dir(&rec.id)).len(), 1);
    drop((b, store));
    let store = files_only(dir.path()).await;
    let b: Arc<dyn SessionBackend> = Arc::new(store.clone());
    let mut rec = b.load(&rec.id).await.unwrap().unwrap();
    assert_eq!(rec.received, 8192);
    let r = fragment(
        &*b,
        &mut rec,
        &data[8192..],
        data.len() as u64,
        FragmentDurability::BytesDurable,
    );
    assert_eq!(r.await, FragmentCommit::Committed);
    b.save(&rec).await.unwrap();
    assert_eq!(
        b.publish_upload(&rec.id, "out/file.bin", false)
            .await
            .unwrap(),
        CommitOutcome::Committed
    );
    assert_eq!(
        fds_under(&store.session_dir(&rec.id)),
        Vec::<String>::new(),
        "a handle of the published file is kept"
    );
    assert_eq!(
        std::fs::read(store.files_dir().join("out/file.bin")).unwrap(),
        data
    );
}
