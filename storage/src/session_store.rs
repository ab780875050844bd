//! [`SessionStore`]: session records plus per-session files, in crash-safe order.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use bitsd_protocol::SessionId;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use crate::{
    FragmentEntry, MetaStore, ReplyKind, SessionRecord, SessionState, SledMetaStore, StorageError,
};

const UPLOAD_FILE: &str = "upload";
const REPLY_FILE: &str = "reply";
const REPLY_TEMP: &str = "reply.tmp";

/// How durable a fragment is when [`SessionStore::commit_fragment`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragmentDurability {
    /// Bytes synced, then offset and index committed and flushed: the Ack may go out.
    Durable,
    /// Bytes (and every earlier byte of the file) synced; offset committed but not flushed:
    /// the caller flushes before it answers (the completing fragment, whose Ack waits for the
    /// completion step's own durable save).
    BytesDurable,
    /// Nothing synced (an fsync policy other than per-fragment): a crash may lose the bytes
    /// and the offset, and the client resends from an earlier offset.
    Deferred,
}

/// What happened when a plain upload was committed to its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The file is at its destination.
    Committed,
    /// The destination exists and overwrites are off (§6.3).
    DestinationExists,
    /// The destination is a directory, or its path crosses a symlink or a non-directory.
    DestinationInvalid,
}

/// Sessions on disk: the meta store for records and index, files for bytes.
#[derive(Clone)]
pub struct SessionStore {
    meta: Arc<dyn MetaStore>,
    sessions_dir: PathBuf,
    files_dir: PathBuf,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("sessions_dir", &self.sessions_dir)
            .finish_non_exhaustive()
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Task(e.to_string()))?
}

/// fsyncs a directory so that entries created or renamed in it survive a crash.
fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StorageError::io("fsync directory", dir))
}

fn create_dir_synced(dir: &Path) -> Result<(), StorageError> {
    match fs::create_dir(dir) {
        Ok(()) => {
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StorageError::io("create directory", dir)(e)),
    }
}

/// Cuts bytes of an earlier, unacknowledged attempt that lie past `end`.
fn cut_past(file: &fs::File, end: u64, path: &Path) -> Result<(), StorageError> {
    let len = file
        .metadata()
        .map_err(StorageError::io("stat upload", path))?
        .len();
    if len > end {
        file.set_len(end)
            .map_err(StorageError::io("truncate upload", path))?;
    }
    Ok(())
}

/// Whether `path` holds `entry`'s bytes: its range is there and its CRC-32C matches.
fn fragment_on_disk(path: &Path, entry: &FragmentEntry) -> Result<bool, StorageError> {
    use std::os::unix::fs::FileExt;
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(StorageError::io("open upload", path)(e)),
    };
    let mut buf = vec![0u8; entry.len.min(1 << 20) as usize];
    let (mut at, end, mut crc) = (entry.offset, entry.offset + entry.len, 0u32);
    while at < end {
        let want = ((end - at) as usize).min(buf.len());
        let n = file
            .read_at(&mut buf[..want], at)
            .map_err(StorageError::io("read upload", path))?;
        if n == 0 {
            return Ok(false);
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        at += n as u64;
    }
    Ok(crc == entry.crc32c)
}

fn remove_dir_all_if_exists(dir: &Path) -> Result<(), StorageError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::io("remove directory", dir)(e)),
    }
}

impl SessionStore {
    /// Opens the store under `data_dir` with sled in `<data_dir>/meta`, creating what is missing,
    /// and recovers every session (see [`SessionStore::recover`]).
    pub async fn open(data_dir: &Path) -> Result<Self, StorageError> {
        let dir = data_dir.to_owned();
        let meta = blocking(move || {
            fs::create_dir_all(&dir).map_err(StorageError::io("create data directory", &dir))?;
            SledMetaStore::open(&dir.join("meta"))
        })
        .await?;
        Self::with_meta(data_dir, Arc::new(meta)).await
    }

    /// Opens the store under `data_dir` with a meta store the caller supplies.
    pub async fn with_meta(
        data_dir: &Path,
        meta: Arc<dyn MetaStore>,
    ) -> Result<Self, StorageError> {
        let store = SessionStore {
            meta,
            sessions_dir: data_dir.join("sessions"),
            files_dir: data_dir.join("files"),
        };
        let (s, f) = (store.sessions_dir.clone(), store.files_dir.clone());
        blocking(move || {
            fs::create_dir_all(&s).map_err(StorageError::io("create directory", &s))?;
            fs::create_dir_all(&f).map_err(StorageError::io("create directory", &f))?;
            Ok(())
        })
        .await?;
        store.recover().await?;
        Ok(store)
    }

    /// Brings the files in line with the meta store, which is authoritative: upload bytes past
    /// the acknowledged offset are cut off, half-written replies are dropped, files of sessions
    /// with no record and leftovers of tombstoned sessions are removed.
    pub async fn recover(&self) -> Result<(), StorageError> {
        let store = self.clone();
        blocking(move || store.recover_blocking()).await
    }

    fn recover_blocking(&self) -> Result<(), StorageError> {
        let records = self.meta.list()?;
        let mut known = std::collections::HashSet::new();
        for mut record in records {
            known.insert(record.id.simple());
            let dir = self.session_dir(&record.id);
            if record.state.is_terminal() {
                remove_dir_all_if_exists(&dir)?;
                continue;
            }
            let _ = fs::remove_file(dir.join(REPLY_TEMP));
            let mut changed = false;
            let acknowledged = record.received;
            // Upload bytes past the recorded offset were cut: their index entries go too.
            let mut cut = false;
            let upload = dir.join(UPLOAD_FILE);
            if record.state == SessionState::Receiving && record.received > 0 && !record.committed {
                // The last fragment's offset may have become durable before its bytes did
                // (see `commit_fragment`): keep it only if its bytes are there.
                if let Some(last) = self.meta.last_fragment(&record.id)? {
                    if last.offset + last.len == record.received
                        && !fragment_on_disk(&upload, &last)?
                    {
                        tracing::warn!(session = %record.id, offset = last.offset, len = last.len, "last fragment not on disk (a crash before its Ack); the session resumes before it");
                        record.received = last.offset;
                        changed = true;
                    }
                }
            }
            if let Ok(meta) = fs::metadata(&upload) {
                if meta.len() > record.received {
                    let f = fs::OpenOptions::new()
                        .write(true)
                        .open(&upload)
                        .map_err(StorageError::io("open", &upload))?;
                    f.set_len(record.received)
                        .map_err(StorageError::io("truncate", &upload))?;
                    f.sync_all().map_err(StorageError::io("fsync", &upload))?;
                    tracing::debug!(session = %record.id, len = meta.len(), received = record.received, "cut unacknowledged upload bytes");
                    cut = true;
                } else if meta.len() < record.received && !record.committed {
                    tracing::warn!(session = %record.id, len = meta.len(), received = record.received, "upload file shorter than acknowledged; resuming from the file length");
                    record.received = meta.len();
                    if record.state == SessionState::Complete {
                        record.state = SessionState::Receiving;
                    }
                    changed = true;
                }
            } else if record.received > 0
                && !record.committed
                && record.state == SessionState::Receiving
            {
                tracing::warn!(session = %record.id, received = record.received, "upload file missing; session restarts at 0");
                record.received = 0;
                changed = true;
            }
            if cut || record.received < acknowledged {
                self.meta
                    .remove_fragments_from(&record.id, record.received)?;
            }
            if let Some(reply) = &record.reply {
                if let Some(len) = reply.len() {
                    let ok = fs::metadata(self.reply_file(&record.id, &reply.kind))
                        .map(|m| m.len() == len)
                        .unwrap_or(false);
                    if !ok {
                        tracing::warn!(session = %record.id, "reply file missing or wrong size; the reply will be produced again");
                        record.reply = None;
                        record.state = SessionState::Complete;
                        changed = true;
                    }
                }
            }
            if changed {
                self.meta.save_lazy(&record)?;
            }
        }
        let entries = fs::read_dir(&self.sessions_dir)
            .map_err(StorageError::io("read directory", &self.sessions_dir))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                tracing::debug!(dir = %entry.path().display(), "removing files of a session with no record");
                let path = entry.path();
                if path.is_dir() {
                    remove_dir_all_if_exists(&path)?;
                } else {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        self.meta.flush()
    }

    /// The meta store.
    pub fn meta(&self) -> &Arc<dyn MetaStore> {
        &self.meta
    }

    /// Root under which plain uploads are committed.
    pub fn files_dir(&self) -> &Path {
        &self.files_dir
    }

    /// A session's private directory (upload, reply, and files its reply handler makes).
    pub fn session_dir(&self, id: &SessionId) -> PathBuf {
        self.sessions_dir.join(id.simple())
    }

    /// Path of a session's upload bytes (`BITS-Sessions/{id}/request` in IIS terms).
    pub fn upload_path(&self, id: &SessionId) -> PathBuf {
        self.session_dir(id).join(UPLOAD_FILE)
    }

    /// Path of a session's stored reply.
    pub fn reply_path(&self, id: &SessionId) -> PathBuf {
        self.session_dir(id).join(REPLY_FILE)
    }

    /// The file that holds a stored reply: the reply file, or the upload file for a reply
    /// that is the upload itself (`in_upload`).
    pub fn reply_file(&self, id: &SessionId, kind: &ReplyKind) -> PathBuf {
        match kind {
            ReplyKind::Stored {
                in_upload: true, ..
            } => self.upload_path(id),
            _ => self.reply_path(id),
        }
    }

    /// The record of `id`.
    ///
    /// Read on the calling task: the meta store answers reads from its cache, and a thread
    /// hand-off would cost more than the read.
    pub async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>, StorageError> {
        self.meta.load(id)
    }

    /// Every record, tombstones included.
    pub async fn list(&self) -> Result<Vec<SessionRecord>, StorageError> {
        let meta = self.meta.clone();
        blocking(move || meta.list()).await
    }

    /// Creates a new session: its record, not flushed. A crash that loses it only makes the
    /// client's next packet get session-not-found, and the client starts over with a new
    /// Create-Session (§4.2, B3); the first fragment's commit makes it durable. Its directory
    /// is made when its first bytes arrive (an idle session costs no directory).
    ///
    /// An unflushed save is memory work in the meta store, done on the calling task.
    pub async fn create(&self, record: &SessionRecord) -> Result<(), StorageError> {
        self.meta.save_lazy(record)
    }

    /// Stores a record durably: saved on the calling task, flushed off the runtime.
    pub async fn save(&self, record: &SessionRecord) -> Result<(), StorageError> {
        self.meta.save_lazy(record)?;
        self.flush().await
    }

    /// Stores a record without waiting for durability (memory work, on the calling task).
    pub async fn save_lazy(&self, record: &SessionRecord) -> Result<(), StorageError> {
        self.meta.save_lazy(record)
    }

    /// Opens the session's upload file for new bytes starting at `write_at`.
    ///
    /// Bytes are written into the page cache right on the calling task (a memory copy, no
    /// thread hand-off per body frame); the one slow step, making them durable, runs off the
    /// runtime in [`SessionStore::commit_fragment`], together with the meta commit.
    pub async fn fragment_writer(
        &self,
        id: &SessionId,
        write_at: u64,
    ) -> Result<FragmentWriter, StorageError> {
        let dir = self.session_dir(id);
        let path = dir.join(UPLOAD_FILE);
        let created = fs::symlink_metadata(&path).is_err();
        // A new directory is made here (metadata in memory, quick) and fsynced into its parent
        // by the commit, with the bytes: one trip off the runtime instead of two.
        let created_dir = created
            && match fs::create_dir(&dir) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(StorageError::io("create directory", &dir)(e)),
            };
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(StorageError::io("open upload", &path))?;
        Ok(FragmentWriter {
            file: Some(Arc::new(file)),
            path,
            dir,
            created,
            created_dir,
            offset: write_at,
            written: 0,
            pending: Vec::new(),
            pending_len: 0,
            crc32c: 0,
            writeback_every: None,
            kicked_to: write_at,
        })
    }

    /// Commits a written fragment: `record` (which must already carry the new `received`)
    /// and the fragment's index entry go to the meta store, and, as `durability` asks, the
    /// bytes and the meta store are made durable. With [`FragmentDurability::Durable`] the
    /// server may Ack once this returns; with [`FragmentDurability::BytesDurable`] the caller
    /// makes a later change durable (or calls [`SessionStore::flush`]) before it answers: the
    /// completing fragment, whose Ack waits for the reply anyway, saves one flush that way.
    ///
    /// With `Durable`, the bytes' `sync_data` and the meta store's flush run at the same time
    /// (one device round trip instead of two in a row; the Ack waits for both). A crash
    /// between the two can leave a durable offset over bytes that never reached the disk:
    /// only for the session's last fragment (a session's fragments are serialized and each
    /// waits for its sync), and [`SessionStore::recover`] checks exactly that fragment against
    /// its CRC-32C in the index and cuts it off if the bytes are not there.
    pub async fn commit_fragment(
        &self,
        mut writer: FragmentWriter,
        record: &SessionRecord,
        durability: FragmentDurability,
    ) -> Result<(), StorageError> {
        writer.write_pending()?;
        let file = writer
            .file
            .take()
            .ok_or_else(|| StorageError::Task("fragment already committed".into()))?;
        let entry = FragmentEntry {
            offset: writer.offset,
            len: writer.written,
            crc32c: writer.crc32c,
        };
        let end = entry.offset + entry.len;
        let (path, dir, created, created_dir) = (
            writer.path.clone(),
            writer.dir.clone(),
            writer.created,
            writer.created_dir,
        );
        let sessions_dir = self.sessions_dir.clone();
        // `all`: also entries an earlier (deferred) fragment may have created unsynced.
        let sync_entries = move |all: bool| -> Result<(), StorageError> {
            if created || all {
                sync_dir(&dir)?;
            }
            if created_dir || all {
                sync_dir(&sessions_dir)?;
            }
            Ok(())
        };
        match durability {
            FragmentDurability::Deferred => {
                // Nothing to wait for: all of it is memory work and a stat, done right here.
                cut_past(&file, end, &path)?;
                self.meta.save_with_fragment(record, &entry, false)
            }
            FragmentDurability::Durable => {
                self.meta.save_with_fragment(record, &entry, false)?;
                // The meta store's flush starts now (its flusher thread, shared with
                // concurrent sessions) and runs while this trip syncs the bytes.
                let ticket = self.meta.request_flush();
                let meta = self.meta.clone();
                blocking(move || {
                    cut_past(&file, end, &path)?;
                    file.sync_data()
                        .map_err(StorageError::io("fsync upload", &path))?;
                    sync_entries(false)?;
                    meta.wait_flush(ticket)
                })
                .await
            }
            FragmentDurability::BytesDurable => {
                blocking(move || {
                    cut_past(&file, end, &path)?;
                    // Also covers earlier deferred fragments and a file created by one.
                    file.sync_data()
                        .map_err(StorageError::io("fsync upload", &path))?;
                    sync_entries(true)
                })
                .await?;
                self.meta.save_with_fragment(record, &entry, false)
            }
        }
    }

    /// Opens a temporary reply file for the session.
    pub async fn reply_writer(&self, id: &SessionId) -> Result<ReplyWriter, StorageError> {
        let dir = self.session_dir(id);
        let d = dir.clone();
        blocking(move || create_dir_synced(&d)).await?;
        let temp = dir.join(REPLY_TEMP);
        let file = tokio::fs::File::create(&temp)
            .await
            .map_err(StorageError::io("create reply", &temp))?;
        Ok(ReplyWriter {
            file,
            temp,
            dir,
            len: 0,
            crc32c: 0,
        })
    }

    /// Makes a file a reply handler produced the session's reply, crash-safely, and says how
    /// it is held. The session's own upload (the echo handler) is complete and never written
    /// again, and its completing fragment synced its bytes and its name: the reply is served
    /// from it, with no file work at all (`in_upload`). Any other file is copied under a
    /// temporary name, synced, renamed into place, and the directory is fsynced.
    pub async fn reply_from_file(
        &self,
        id: &SessionId,
        src: &Path,
    ) -> Result<ReplyKind, StorageError> {
        let dir = self.session_dir(id);
        if src == dir.join(UPLOAD_FILE) {
            let len = fs::metadata(src)
                .map_err(StorageError::io("stat upload", src))?
                .len();
            return Ok(ReplyKind::Stored {
                len,
                crc32c: None,
                in_upload: true,
            });
        }
        let src = src.to_owned();
        blocking(move || {
            create_dir_synced(&dir)?;
            let temp = dir.join(REPLY_TEMP);
            let _ = fs::remove_file(&temp);
            fs::copy(&src, &temp).map_err(StorageError::io("copy into reply", &src))?;
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&temp)
                .map_err(StorageError::io("open", &temp))?;
            f.sync_data()
                .map_err(StorageError::io("fsync reply", &temp))?;
            let len = fs::metadata(&temp)
                .map_err(StorageError::io("stat reply", &temp))?
                .len();
            let dst = dir.join(REPLY_FILE);
            fs::rename(&temp, &dst).map_err(StorageError::io("rename reply", &dst))?;
            sync_dir(&dir)?;
            Ok(ReplyKind::Stored {
                len,
                crc32c: None,
                in_upload: false,
            })
        })
        .await
    }

    /// Commits a complete upload to `destination` (relative to the files root, made only of
    /// normal components) atomically. Without overwrites the file is hard-linked into place, so
    /// an existing file is never replaced; with overwrites it is linked to a temporary name and
    /// renamed over the destination. Then the directory is fsynced. The session keeps its upload
    /// file (a second name of the same inode, so no extra space) until it ends, which makes a
    /// retry after a crash idempotent: a destination that already is this inode counts as done.
    pub async fn commit_upload(
        &self,
        id: &SessionId,
        destination: &str,
        allow_overwrite: bool,
    ) -> Result<CommitOutcome, StorageError> {
        let rel = PathBuf::from(destination);
        if rel.as_os_str().is_empty()
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Ok(CommitOutcome::DestinationInvalid);
        }
        let (files, dir, simple) = (self.files_dir.clone(), self.session_dir(id), id.simple());
        blocking(move || {
            let src = dir.join(UPLOAD_FILE);
            let dst = files.join(&rel);
            if !safe_parent(&files, &rel)? {
                return Ok(CommitOutcome::DestinationInvalid);
            }
            if fs::symlink_metadata(&src).is_err() {
                // A zero-byte upload never wrote a file.
                create_dir_synced(&dir)?;
                let f = fs::File::create(&src).map_err(StorageError::io("create upload", &src))?;
                f.sync_all()
                    .map_err(StorageError::io("fsync upload", &src))?;
            }
            let parent = dst.parent().unwrap_or(&files).to_owned();
            fs::create_dir_all(&parent).map_err(StorageError::io("create directory", &parent))?;
            if let Ok(m) = fs::symlink_metadata(&dst) {
                if same_inode(&src, &m) {
                    return Ok(CommitOutcome::Committed);
                }
                if !m.is_file() {
                    return Ok(CommitOutcome::DestinationInvalid);
                }
                if !allow_overwrite {
                    return Ok(CommitOutcome::DestinationExists);
                }
            }
            if allow_overwrite {
                let temp = parent.join(format!(".bitsd-commit-{simple}.tmp"));
                let _ = fs::remove_file(&temp);
                fs::hard_link(&src, &temp).map_err(StorageError::io("link upload", &temp))?;
                fs::rename(&temp, &dst).map_err(StorageError::io("commit upload", &dst))?;
            } else {
                match fs::hard_link(&src, &dst) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        return Ok(CommitOutcome::DestinationExists)
                    }
                    Err(e) => return Err(StorageError::io("commit upload", &dst)(e)),
                }
            }
            sync_dir(&parent)?;
            Ok(CommitOutcome::Committed)
        })
        .await
    }

    /// Whether a destination (relative to the files root) exists already.
    pub async fn destination_exists(&self, destination: &str) -> bool {
        tokio::fs::symlink_metadata(self.files_dir.join(destination))
            .await
            .is_ok()
    }

    /// Ends a session: deletes its upload and reply files and keeps the record as a tombstone in
    /// `state` (Closed or Cancelled).
    pub async fn end_session(
        &self,
        record: &mut SessionRecord,
        state: SessionState,
    ) -> Result<(), StorageError> {
        record.state = state;
        record.touch();
        let (meta, rec, dir) = (
            self.meta.clone(),
            record.clone(),
            self.session_dir(&record.id),
        );
        // Not flushed: if a crash loses the tombstone, the record still says the session was
        // live, a repeated Close finds it and ends it again; nothing acknowledged is lost.
        meta.save_lazy(&rec)?;
        meta.remove_fragments(&rec.id)?;
        blocking(move || remove_dir_all_if_exists(&dir)).await
    }

    /// Removes every trace of a session: files, record, index (timeouts, cleanup).
    pub async fn purge(&self, id: &SessionId) -> Result<(), StorageError> {
        let (meta, id, dir) = (self.meta.clone(), *id, self.session_dir(id));
        blocking(move || {
            remove_dir_all_if_exists(&dir)?;
            meta.remove(&id)
        })
        .await
    }

    /// Makes every earlier meta change durable (shutdown).
    pub async fn flush(&self) -> Result<(), StorageError> {
        let meta = self.meta.clone();
        blocking(move || meta.flush()).await
    }
}

#[cfg(unix)]
fn same_inode(src: &Path, dst: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(src).is_ok_and(|m| m.ino() == dst.ino() && m.dev() == dst.dev())
}

#[cfg(not(unix))]
fn same_inode(_src: &Path, _dst: &fs::Metadata) -> bool {
    false
}

/// Every existing ancestor of `rel` under `root` is a real directory, not a symlink or a file.
fn safe_parent(root: &Path, rel: &Path) -> Result<bool, StorageError> {
    let mut at = root.to_owned();
    let comps: Vec<_> = rel.components().collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(StorageError::io("inspect", &at)(e)),
        }
    }
    Ok(true)
}

/// Body bytes a [`FragmentWriter`] holds before it writes them with one `pwritev`.
///
/// An HTTP body arrives in frames of whatever size the socket reads gave (often not a multiple
/// of the page size), and a page-cache write costs per call and per partly written page as well
/// as per byte: on the benchmark machine (docs/performance.md) writing the same bytes as they
/// arrived cost 0.38 ms per MiB, gathered into writes of 256 KiB 0.21 ms, the same as writing
/// whole 1 MiB buffers (0.16–0.19 ms). The frames are held as they are (`Bytes`, no copy), so a
/// connection holds at most this much plus the HTTP read buffer its frames were cut from.
pub const GATHER_BYTES: usize = 256 * 1024;

/// Frames a [`FragmentWriter`] holds at most before it writes them, whatever their size (a
/// body that trickles in byte by byte is written every this many frames, well under `IOV_MAX`).
const GATHER_FRAMES: usize = 64;

/// New bytes of one fragment on their way to the upload file.
///
/// Bytes handed over with [`FragmentWriter::write_bytes`] are gathered up to [`GATHER_BYTES`]
/// and written into the page cache with one vectored write; [`SessionStore::commit_fragment`]
/// writes what is still held before it makes anything durable.
#[derive(Debug)]
pub struct FragmentWriter {
    file: Option<Arc<fs::File>>,
    path: PathBuf,
    dir: PathBuf,
    /// The upload file is new: its directory entry needs an fsync of `dir`.
    created: bool,
    /// `dir` is new too: its entry needs an fsync of the sessions directory.
    created_dir: bool,
    offset: u64,
    /// Bytes written to the file so far (not counting `pending`).
    written: u64,
    /// Frames accepted but not written yet, in order; they go at `offset + written`.
    pending: Vec<Bytes>,
    /// Total length of `pending`.
    pending_len: usize,
    crc32c: u32,
    /// Start writeback after every this many new bytes (see `start_writeback_every`).
    writeback_every: Option<u64>,
    /// File offset up to which writeback was started.
    kicked_to: u64,
}

impl FragmentWriter {
    /// Asks the kernel to start writing the bytes back to disk every `bytes` bytes, while the
    /// rest of the body is still arriving (`posix_fadvise(DONTNEED)` starts writeback of
    /// dirty pages without waiting for it). The `sync_data` at commit then only waits for the
    /// tail: the disk works while the network does. For writers whose bytes will be synced.
    pub fn start_writeback_every(&mut self, bytes: u64) {
        self.writeback_every = Some(bytes.max(1));
    }

    fn kick_writeback(&mut self) {
        let Some(every) = self.writeback_every else {
            return;
        };
        let end = self.offset + self.written;
        if end - self.kicked_to < every {
            return;
        }
        if let Some(file) = &self.file {
            // Submitting writeback costs block allocation and a device notification: done on
            // a blocking thread, so the runtime thread goes on receiving meanwhile.
            let (file, path) = (file.clone(), self.path.clone());
            let (from, len) = (self.kicked_to, end - self.kicked_to);
            drop(tokio::task::spawn_blocking(move || {
                use std::os::unix::io::AsRawFd;
                let advised = match (i64::try_from(from), i64::try_from(len)) {
                    (Ok(from), Ok(len)) => nix::fcntl::posix_fadvise(
                        file.as_raw_fd(),
                        from,
                        len,
                        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                    )
                    .map_err(|e| e.to_string()),
                    _ => Err("range out of bounds".to_owned()),
                };
                if let Err(e) = advised {
                    // Only a hint: the commit's sync_data writes the bytes either way.
                    tracing::debug!(error = %e, path = %path.display(), "writeback hint refused");
                }
            }));
        }
        self.kicked_to = end;
    }

    /// Writes the next bytes (after every byte accepted so far) into the page cache now,
    /// together with any bytes still held.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        self.write_bytes(Bytes::copy_from_slice(bytes)).await?;
        self.write_pending()
    }

    /// The upload file, until the fragment is committed.
    fn file(&self) -> Result<&Arc<fs::File>, StorageError> {
        self.file
            .as_ref()
            .ok_or_else(|| StorageError::Task("fragment already committed".into()))
    }

    /// Accepts the next bytes (after every byte accepted so far) without copying them: they
    /// are held until [`GATHER_BYTES`] are pending, then written with one vectored write.
    pub async fn write_bytes(&mut self, bytes: Bytes) -> Result<(), StorageError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.file()?;
        self.crc32c = crc32c::crc32c_append(self.crc32c, &bytes);
        self.pending_len += bytes.len();
        self.pending.push(bytes);
        if self.pending_len >= GATHER_BYTES || self.pending.len() >= GATHER_FRAMES {
            self.write_pending()?;
        }
        Ok(())
    }

    /// Writes the held frames with vectored writes (a short write goes on where it stopped).
    fn write_pending(&mut self) -> Result<(), StorageError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let file = self.file()?;
        let mut slices: Vec<io::IoSlice<'_>> =
            self.pending.iter().map(|b| io::IoSlice::new(b)).collect();
        let mut left = &mut slices[..];
        let mut at = self.offset + self.written;
        while !left.is_empty() {
            let offset = i64::try_from(at).map_err(|_| {
                StorageError::io("write upload", &self.path)(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "offset out of range",
                ))
            })?;
            match nix::sys::uio::pwritev(&**file, left, offset) {
                Ok(0) => {
                    return Err(StorageError::io("write upload", &self.path)(
                        io::ErrorKind::WriteZero.into(),
                    ))
                }
                Ok(n) => {
                    at += n as u64;
                    io::IoSlice::advance_slices(&mut left, n);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(StorageError::io("write upload", &self.path)(e.into())),
            }
        }
        self.written += self.pending_len as u64;
        self.pending.clear();
        self.pending_len = 0;
        self.kick_writeback();
        Ok(())
    }

    /// Bytes accepted so far (written or held).
    pub fn written(&self) -> u64 {
        self.written + self.pending_len as u64
    }

    /// Writes the held bytes into the page cache (durability is what committing adds).
    pub async fn flush(&mut self) -> Result<(), StorageError> {
        self.write_pending()
    }
}

/// A reply on its way to the session's reply file (temp name, `sync_data`, rename, fsync dir).
#[derive(Debug)]
pub struct ReplyWriter {
    file: tokio::fs::File,
    temp: PathBuf,
    dir: PathBuf,
    len: u64,
    crc32c: u32,
}

impl ReplyWriter {
    /// Appends reply bytes.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        self.file
            .write_all(bytes)
            .await
            .map_err(StorageError::io("write reply", &self.temp))?;
        self.crc32c = crc32c::crc32c_append(self.crc32c, bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes the reply durable under its final name; returns its length and CRC-32C.
    pub async fn finish(mut self) -> Result<(u64, u32), StorageError> {
        self.file
            .flush()
            .await
            .map_err(StorageError::io("write reply", &self.temp))?;
        self.file
            .sync_data()
            .await
            .map_err(StorageError::io("fsync reply", &self.temp))?;
        drop(self.file);
        let (temp, dir) = (self.temp, self.dir);
        blocking(move || {
            let dst = dir.join(REPLY_FILE);
            fs::rename(&temp, &dst).map_err(StorageError::io("rename reply", &dst))?;
            sync_dir(&dir)
        })
        .await?;
        Ok((self.len, self.crc32c))
    }
}
