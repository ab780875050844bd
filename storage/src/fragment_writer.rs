//! A fragment's bytes on their way into the upload file, and their commit.

use std::fs;
use std::io;
use std::sync::Arc;

use bitsd_protocol::SessionId;
use bytes::{Bytes, BytesMut};

use crate::fs_util::{
    blocking, cut_past, make_dir, open_upload, remove_dir_all_if_exists, sync_dir,
};
use crate::session_store::UPLOAD_FILE;
use crate::{FragmentCommit, FragmentEntry, SessionRecord, SessionStore, StorageError};

/// How durable a fragment is when [`SessionStore::commit_fragment`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragmentDurability {
    /// The bytes (and every earlier byte of the file) are synced first; only then is the new
    /// offset committed and flushed: the Ack may go out. A failed sync leaves the offset where
    /// it was, so the client's re-send is written again.
    Durable,
    /// The bytes (and every earlier byte of the file) are synced first, then the new offset
    /// is committed but not flushed: the caller makes it durable before it answers (the
    /// completing fragment, whose Ack waits for the completion step's own durable save).
    BytesDurable,
    /// Nothing is synced; the offset and an index entry with the fragment's CRC-32C are
    /// committed without a flush (`fsync = "on-close"`). After a crash,
    /// [`SessionStore::recover`] checks every such fragment's bytes and resumes before the
    /// first one that is not on disk. The entries go once a sync covers their bytes.
    Deferred,
    /// Nothing is synced and nothing is checked (`fsync = "never"`): after an operating-system
    /// crash the offset may cover bytes that never reached the disk.
    Unsynced,
}

/// Body bytes a [`FragmentWriter`] gathers before it writes them with one `pwritev`.
///
/// An HTTP body arrives in frames of whatever size the socket reads gave (often not a multiple
/// of the page size), and a page-cache write costs per call and per partly written page as well
/// as per byte: on the benchmark machine (docs/performance.md) writing the same bytes as they
/// arrived cost 0.38 ms per MiB, gathered into writes of 256 KiB 0.21 ms, the same as writing
/// whole 1 MiB buffers (0.16–0.19 ms).
pub const GATHER_BYTES: usize = 256 * 1024;

/// Frames shorter than this are copied into the writer's own buffer; longer ones are held as
/// they are (`Bytes`, no copy).
///
/// A held frame keeps the whole HTTP read buffer it was cut from alive, however short the
/// frame: a body sent one byte at a time would pin one read allocation per byte. Copying the
/// short ones bounds what a writer keeps alive to [`GATHER_BYTES`] of copies plus at most
/// `GATHER_BYTES / COPY_BELOW` held frames (four), each with its read buffer, whatever the
/// frames' sizes.
pub const COPY_BELOW: usize = 64 * 1024;

/// New bytes of one fragment on their way to the upload file.
///
/// Bytes handed over with [`FragmentWriter::write_bytes`] are gathered up to [`GATHER_BYTES`]
/// and written into the page cache with one vectored write; [`SessionStore::commit_fragment`]
/// writes what is still held before it makes anything durable.
#[derive(Debug)]
pub struct FragmentWriter {
    file: Option<Arc<fs::File>>,
    /// The session, and the token its kept handle was checked out with (see
    /// `handle_cache`): the handle goes back to the store's cache after a won commit.
    id: SessionId,
    token: u64,
    path: std::path::PathBuf,
    dir: std::path::PathBuf,
    /// The upload file is new: its directory entry needs an fsync of `dir`.
    created: bool,
    /// `dir` is new too: its entry needs an fsync of the sessions directory.
    created_dir: bool,
    offset: u64,
    /// Bytes written to the file so far (not counting what is held).
    written: u64,
    /// Held frames and frozen copies, in order; they go at `offset + written`, then `copies`.
    pending: Vec<Bytes>,
    /// Copies of short frames that came after the last entry of `pending`.
    copies: BytesMut,
    /// Total length of `pending` and `copies`.
    pending_len: usize,
    crc32c: u32,
    /// Start writeback after every this many new bytes (see `start_writeback_every`).
    writeback_every: Option<u64>,
    /// File offset up to which writeback was started.
    kicked_to: u64,
    /// Set when this writer created the upload file: dropped without a commit (the client
    /// went away), it removes the session's directory again if the session has ended since
    /// (see the `Drop` impl).
    ended_check: Option<SessionStore>,
}

impl Drop for FragmentWriter {
    /// A writer that made the upload file and is dropped uncommitted, for a session that was
    /// closed, cancelled or purged meanwhile, re-created that session's directory: it goes
    /// again (checked and removed under the session's compare-and-set lock, off the runtime).
    fn drop(&mut self) {
        let Some(store) = self.ended_check.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (id, dir) = (self.id, std::mem::take(&mut self.dir));
        self.file = None;
        rt.spawn_blocking(move || store.remove_dir_if_ended(&id, &dir));
    }
}

impl SessionStore {
    /// Removes `dir`, the directory of session `id` that a late fragment re-created, if the
    /// session has ended (no record, or a tombstone): checked under the session's
    /// compare-and-set lock, so a session that is live keeps it. Blocking.
    fn remove_dir_if_ended(&self, id: &SessionId, dir: &std::path::Path) {
        let _cas = self.locks.cas(id);
        let ended = match self.meta.load(id) {
            Ok(current) => current.is_none_or(|c| c.state.is_terminal()),
            Err(_) => false,
        };
        if ended {
            if let Err(e) = remove_dir_all_if_exists(dir) {
                tracing::warn!(session = %id, error = %e, "could not remove the directory a late fragment re-created");
            }
        }
    }
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
        self.accept(bytes, None)?;
        self.write_pending()
    }

    /// The upload file, until the fragment is committed.
    fn file(&self) -> Result<&Arc<fs::File>, StorageError> {
        self.file
            .as_ref()
            .ok_or_else(|| StorageError::Task("fragment already committed".into()))
    }

    /// Accepts the next bytes (after every byte accepted so far): a frame of [`COPY_BELOW`]
    /// bytes or more is held without copying, a shorter one is copied (and dropped at once);
    /// once [`GATHER_BYTES`] are pending they are written with one vectored write.
    pub async fn write_bytes(&mut self, bytes: Bytes) -> Result<(), StorageError> {
        self.accept(&bytes, Some(&bytes))?;
        if self.pending_len >= GATHER_BYTES {
            self.write_pending()?;
        }
        Ok(())
    }

    /// Takes `bytes` in: held when `owned` is given and the frame is long, copied otherwise.
    fn accept(&mut self, bytes: &[u8], owned: Option<&Bytes>) -> Result<(), StorageError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.file()?;
        self.crc32c = crc32c::crc32c_append(self.crc32c, bytes);
        self.pending_len += bytes.len();
        match owned {
            Some(frame) if frame.len() >= COPY_BELOW => {
                if !self.copies.is_empty() {
                    let copies = self.copies.split().freeze();
                    self.pending.push(copies);
                }
                self.pending.push(frame.clone());
            }
            _ => self.copies.extend_from_slice(bytes),
        }
        Ok(())
    }

    /// Writes the held frames with vectored writes (a short write goes on where it stopped).
    fn write_pending(&mut self) -> Result<(), StorageError> {
        if self.pending_len == 0 {
            return Ok(());
        }
        let file = self.file()?;
        let mut slices: Vec<io::IoSlice<'_>> = self
            .pending
            .iter()
            .map(|b| io::IoSlice::new(b))
            .chain((!self.copies.is_empty()).then(|| io::IoSlice::new(&self.copies)))
            .collect();
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
        self.copies.clear();
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

impl SessionStore {
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
        let kept = self.handles.check_out(id);
        let (file, created, created_dir) = match kept.file {
            // Kept open since an earlier fragment's commit won: the file exists, and its
            // directory entries were synced by that commit when it was durable (or will be by
            // the next sync that covers all of them, as for any later fragment).
            Some(file) => (file, false, false),
            None => {
                let created = fs::symlink_metadata(&path).is_err();
                // A new directory is made here (metadata in memory, quick) and fsynced into
                // its parent by the commit, with the bytes: one trip off the runtime instead
                // of two.
                let created_dir = created && make_dir(&dir)?;
                let file = open_upload(&path)?;
                (Arc::new(file), created, created_dir)
            }
        };
        Ok(FragmentWriter {
            file: Some(file),
            id: *id,
            token: kept.token,
            path,
            dir,
            created,
            created_dir,
            offset: write_at,
            written: 0,
            pending: Vec::new(),
            copies: BytesMut::new(),
            pending_len: 0,
            crc32c: 0,
            writeback_every: None,
            kicked_to: write_at,
            ended_check: created.then(|| self.clone()),
        })
    }

    /// Commits a written fragment: `record` (which must already carry the new `received`) goes
    /// to the meta store, and the bytes and the record are made as durable as `durability`
    /// asks.
    ///
    /// The order is what makes an Ack safe: **an offset only becomes durable after its
    /// bytes are.** With [`FragmentDurability::Durable`] the bytes are `sync_data`'d first
    /// (with the directory entries of a new file); only when that succeeded is the record
    /// saved and the meta store flushed (a group commit shared with concurrent sessions), so
    /// a failed sync (EIO, ENOSPC at writeback) leaves the recorded offset where it was and
    /// the client's re-send is written and synced again rather than answered as held. The
    /// same sync covers every earlier byte of the file, so index entries of fragments written
    /// without a sync are removed with it. With [`FragmentDurability::BytesDurable`] the order
    /// is the same but the flush is the caller's. [`FragmentDurability::Deferred`] and
    /// [`FragmentDurability::Unsynced`] sync nothing (see their documentation).
    pub async fn commit_fragment(
        &self,
        writer: FragmentWriter,
        record: &SessionRecord,
        durability: FragmentDurability,
    ) -> Result<(), StorageError> {
        self.commit_fragment_if(writer, record, durability, None)
            .await
            .map(|_| ())
    }

    /// [`SessionStore::commit_fragment`] as a compare-and-set: with `expected`, the record is
    /// saved only if the stored record is live and its `received` still equals `expected`,
    /// checked and saved under the session's in-process lock (after the bytes are synced,
    /// before the flush; the order is otherwise the same). Otherwise nothing is saved and the
    /// stored record is returned in [`FragmentCommit::Lost`].
    pub(crate) async fn commit_fragment_if(
        &self,
        mut writer: FragmentWriter,
        record: &SessionRecord,
        durability: FragmentDurability,
        expected: Option<u64>,
    ) -> Result<FragmentCommit, StorageError> {
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
        // Committed from here on (won or lost): the drop-time check is not this writer's.
        writer.ended_check = None;
        let (path, dir, created, created_dir) = (
            std::mem::take(&mut writer.path),
            std::mem::take(&mut writer.dir),
            writer.created,
            writer.created_dir,
        );
        let litter = dir.clone();
        // Given back to the store's cache only if the commit wins (see `handle_cache`).
        let (keep, token, id) = (file.clone(), writer.token, writer.id);
        let sessions_dir = self.sessions_dir.clone();
        // `all`: also entries an earlier (unsynced) fragment may have created.
        let sync_entries = move |all: bool| -> Result<(), StorageError> {
            if created || all {
                sync_dir(&dir)?;
            }
            if created_dir || all {
                sync_dir(&sessions_dir)?;
            }
            Ok(())
        };
        // Bytes past the fragment's end (an unacknowledged longer write) are cut off. With a
        // compare-and-set the cut waits until the commit has won, under the session's lock: a
        // losing writer must never cut bytes the winner committed. That late cut is not synced
        // (if a crash loses it, the file is longer than the offset and recovery cuts it).
        let cut_early = expected.is_none();
        let (file_for_cut, path_for_cut) = (file.clone(), path.clone());
        let cut_late = move |meta: &dyn crate::MetaStore,
                             save: &dyn Fn(&dyn crate::MetaStore) -> Result<(), StorageError>|
              -> Result<(), StorageError> {
            if !cut_early {
                cut_past(&file_for_cut, end, &path_for_cut)?;
            }
            save(meta)
        };
        let outcome = match durability {
            FragmentDurability::Unsynced => {
                // Nothing to wait for: memory work and a stat, done right here.
                if cut_early {
                    cut_past(&file, end, &path)?;
                }
                self.save_if(record, expected, |meta| {
                    cut_late(meta, &|meta| meta.save_lazy(record))
                })
            }
            FragmentDurability::Deferred => {
                if cut_early {
                    cut_past(&file, end, &path)?;
                }
                self.save_if(record, expected, |meta| {
                    cut_late(meta, &|meta| meta.save_with_fragment(record, &entry, false))
                })
            }
            FragmentDurability::Durable | FragmentDurability::BytesDurable => {
                let (store, record) = (self.clone(), record.clone());
                let flush = durability == FragmentDurability::Durable;
                let outcome = blocking(move || {
                    let meta = store.meta.clone();
                    // 1. The bytes, then 2. the offset, then 3. the flush (or the caller's).
                    let synced = (if cut_early {
                        cut_past(&file, end, &path)
                    } else {
                        Ok(())
                    })
                    .and_then(|()| {
                            file.sync_data()
                                .map_err(StorageError::io("fsync upload", &path))
                        })
                        .and_then(|()| sync_entries(!flush));
                    if let Err(e) = synced {
                        // A session ended or purged meanwhile (its files went): the commit
                        // lost, it did not fail.
                        if let Some(expected) = expected {
                            let current = meta.load(&record.id)?;
                            if !current
                                .as_ref()
                                .is_some_and(|c| !c.state.is_terminal() && c.received == expected)
                            {
                                return Ok(FragmentCommit::Lost {
                                    current: current.map(Box::new),
                                });
                            }
                        }
                        return Err(e);
                    }
                    let outcome = store.save_if(&record, expected, |meta| {
                        cut_late(meta, &|meta| meta.save_lazy(&record))
                    })?;
                    if outcome != FragmentCommit::Committed {
                        return Ok(outcome);
                    }
                    // Entries of earlier unsynced fragments are covered by this sync. The
                    // completing fragment's Ack does not wait for their removal (an on-close
                    // upload can have many): recovery ignores the entries of a complete
                    // session and Close removes what is left.
                    if meta.last_fragment(&record.id)?.is_some() {
                        if flush {
                            meta.remove_fragments(&record.id)?;
                        } else {
                            drop(tokio::task::spawn_blocking(move || {
                                if let Err(e) = meta.remove_fragments(&record.id) {
                                    tracing::warn!(session = %record.id, error = %e, "removing synced fragment entries failed; Close removes them");
                                }
                            }));
                            return Ok(FragmentCommit::Committed);
                        }
                    }
                    // 3. The group commit, on this thread: it leads the flush when none runs
                    // (no hand-off to the flusher thread and back), else it follows the one
                    // that covers this record.
                    if flush {
                        meta.flush()?;
                    }
                    Ok(FragmentCommit::Committed)
                })
                .await?;
                Ok(outcome)
            }
        }?;
        match &outcome {
            FragmentCommit::Committed => self.handles.give_back(&id, token, keep),
            // This writer opened the upload file after a Close, Cancel or purge had removed
            // the session's directory, and so made it again: it goes again (the ended
            // session's own removal may have run already). Nothing of it is acknowledged.
            FragmentCommit::Lost { current }
                if created && current.as_ref().is_none_or(|c| c.state.is_terminal()) =>
            {
                drop(keep);
                let store = self.clone();
                let _ = blocking(move || {
                    store.remove_dir_if_ended(&id, &litter);
                    Ok(())
                })
                .await;
            }
            FragmentCommit::Lost { .. } => {}
        }
        Ok(outcome)
    }

    /// Runs `save` (memory work on the meta store) if `expected` is `None`, or if the stored
    /// record of `record.id` is live with `received == expected`: checked and saved under the
    /// session's compare-and-set lock.
    pub(crate) fn save_if(
        &self,
        record: &SessionRecord,
        expected: Option<u64>,
        save: impl FnOnce(&dyn crate::MetaStore) -> Result<(), StorageError>,
    ) -> Result<FragmentCommit, StorageError> {
        let Some(expected) = expected else {
            save(&*self.meta)?;
            return Ok(FragmentCommit::Committed);
        };
        let _cas = self.locks.cas(&record.id);
        let current = self.meta.load(&record.id)?;
        match current {
            Some(c) if !c.state.is_terminal() && c.received == expected => {
                save(&*self.meta)?;
                Ok(FragmentCommit::Committed)
            }
            current => Ok(FragmentCommit::Lost {
                current: current.map(Box::new),
            }),
        }
    }
}
