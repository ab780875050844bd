//! [`SessionStore`]: session records plus per-session files, in crash-safe order.
//!
//! The store is split by concern: this file holds the store itself, its layout and the record
//! operations; `fragment_writer` the upload bytes and their commit, `publish` the commit of a
//! plain upload under the files root, `reply_writer` stored replies, `recovery` what happens
//! at open.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bitsd_protocol::SessionId;

use crate::fs_util::{
    blocking, create_dir_all_private, dir_exists, make_private, remove_dir_all_if_exists,
};
use crate::handle_cache::{HandleCache, HANDLE_CACHE_SIZE};
use crate::{MetaStore, ReplyKind, SessionRecord, SessionState, SledMetaStore, StorageError};

pub(crate) const UPLOAD_FILE: &str = "upload";
pub(crate) const REPLY_FILE: &str = "reply";
/// Temporary reply files are `reply.<unique>.tmp`: each completion attempt writes its own
/// (recovery removes every `*.tmp` of a live session).
pub(crate) fn reply_temp_name() -> String {
    format!("reply.{}.tmp", uuid::Uuid::new_v4().simple())
}

/// Sessions on disk: the meta store for records and index, files for bytes.
///
/// Everything the store creates is private to the server's user: directories 0700, files
/// 0600 (the data directory, when the store creates it, and the sled database included).
#[derive(Clone)]
pub struct SessionStore {
    pub(crate) meta: Arc<dyn MetaStore>,
    pub(crate) sessions_dir: PathBuf,
    pub(crate) files_dir: PathBuf,
    pub(crate) locks: Arc<StoreLocks>,
    /// Fragments and replies shorter than this are held in the meta store (see `inline`).
    pub(crate) inline_below: u64,
    /// Upload files kept open across a session's fragments (see `handle_cache`).
    pub(crate) handles: Arc<HandleCache>,
}

/// In-process locks of a [`SessionStore`]: the compare-and-set of a fragment's offset
/// (sharded by session, held only around a read and a write in memory) and the sweeper's.
#[derive(Debug, Default)]
pub(crate) struct StoreLocks {
    cas: [std::sync::Mutex<()>; 16],
    pub(crate) sweep: Arc<tokio::sync::Mutex<()>>,
}

impl StoreLocks {
    /// The compare-and-set lock of session `id`.
    pub(crate) fn cas(&self, id: &SessionId) -> std::sync::MutexGuard<'_, ()> {
        let shard = id.as_uuid().as_bytes()[15] as usize % self.cas.len();
        // A poisoned lock guards no data (`()`): go on.
        self.cas[shard]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("sessions_dir", &self.sessions_dir)
            .finish_non_exhaustive()
    }
}

impl SessionStore {
    /// Opens the store under `data_dir` with sled in `<data_dir>/meta`, creating what is missing
    /// (directories 0700; sled's files are made 0600), and recovers every session (see
    /// [`SessionStore::recover`]). Directories that exist already keep their mode: `meta`,
    /// `sessions` and `files` made by the store are 0700, so what is in them stays private
    /// even in a data directory others may list.
    pub async fn open(data_dir: &Path) -> Result<Self, StorageError> {
        let dir = data_dir.to_owned();
        let meta = blocking(move || {
            create_dir_all_private(&dir)?;
            let meta_dir = dir.join("meta");
            create_dir_all_private(&meta_dir)?;
            let meta = SledMetaStore::open(&meta_dir)?;
            // sled creates its files with the process umask.
            make_private(&meta_dir)?;
            Ok(meta)
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
            locks: Arc::default(),
            inline_below: crate::INLINE_BELOW,
            handles: Arc::new(HandleCache::new(HANDLE_CACHE_SIZE)),
        };
        let (s, f) = (store.sessions_dir.clone(), store.files_dir.clone());
        blocking(move || {
            create_dir_all_private(&s)?;
            create_dir_all_private(&f)
        })
        .await?;
        store.recover().await?;
        Ok(store)
    }

    /// Keeps at most `files` upload files open across their sessions' fragments (0: every
    /// fragment opens and closes its file; the default is 256). Set it before the store is
    /// shared.
    pub fn with_open_upload_files(mut self, files: usize) -> Self {
        self.handles = Arc::new(HandleCache::new(files));
        self
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

    /// At most `limit` records whose ids follow `after`, in id order, tombstones included: a
    /// page of [`SessionStore::list`] that reads only the page.
    pub async fn list_page(
        &self,
        after: Option<SessionId>,
        limit: usize,
    ) -> Result<Vec<SessionRecord>, StorageError> {
        let meta = self.meta.clone();
        blocking(move || meta.list_page(after.as_ref(), limit)).await
    }

    /// Creates a new session: its record, durably, so the Create-Session Ack that follows
    /// survives a crash (a lost session would make the client start its job over). The flush
    /// is the meta store's group commit, shared with every other durable change in flight.
    /// Its directory is made when its first bytes arrive (an idle session costs no directory).
    pub async fn create(&self, record: &SessionRecord) -> Result<(), StorageError> {
        self.save(record).await
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

    /// Ends a session: deletes its upload and reply files, the bytes the meta store holds for it
    /// and its fragment index and keeps the
    /// record as a tombstone in `state` (Closed or Cancelled). The deletions run off the
    /// runtime.
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
        // Saved under the session's compare-and-set lock: a fragment commit that checked the
        // record as live cannot then write it back over the tombstone (it commits before the
        // tombstone, or finds it and loses).
        {
            let _cas = self.locks.cas(&rec.id);
            meta.save_lazy(&rec)?;
        }
        // A fragment in flight cannot give its handle back after this (see `handle_cache`).
        self.handles.forget(&rec.id);
        if self.small_without_files(&rec.id, &dir)? {
            meta.remove_fragments(&rec.id)?;
            return SessionStore::remove_held(&*meta, &rec.id);
        }
        blocking(move || {
            meta.remove_fragments(&rec.id)?;
            SessionStore::remove_held(&*meta, &rec.id)?;
            remove_dir_all_if_exists(&dir)
        })
        .await
    }

    /// Whether ending or purging session `id` is quick memory work, right for the calling
    /// task: it has no directory (an inline-only session never had one; one `lstat` on the
    /// runtime costs less than a hand-off to a blocking thread and back), no fragment index
    /// and only a few held chunks (an upload sent in tiny fragments can hold many: removing
    /// them stays off the runtime).
    fn small_without_files(&self, id: &SessionId, dir: &Path) -> Result<bool, StorageError> {
        /// More held chunks than this are removed on the blocking pool.
        const FEW_CHUNKS: usize = 16;
        Ok(!dir_exists(dir)
            && self.meta.last_fragment(id)?.is_none()
            && self.meta.count_chunks(id, FEW_CHUNKS + 1)? <= FEW_CHUNKS)
    }

    /// Removes every trace of a session: files, record, index (timeouts, cleanup).
    pub async fn purge(&self, id: &SessionId) -> Result<(), StorageError> {
        let (meta, id, dir) = (self.meta.clone(), *id, self.session_dir(id));
        self.handles.forget(&id);
        // No files (an inline-only session): the removals are memory work and the flush is
        // the group commit, awaited here instead of on a blocking thread.
        // The record goes under the session's compare-and-set lock: a fragment commit that
        // found it live cannot then save it back (it commits before, or finds none and
        // loses), as for the tombstone in `end_session`.
        let lazy = self.small_without_files(&id, &dir)? && {
            let _cas = self.locks.cas(&id);
            meta.remove_lazy(&id)?
        };
        let removed = if lazy {
            self.flush().await
        } else {
            let locks = Arc::clone(&self.locks);
            blocking(move || {
                remove_dir_all_if_exists(&dir)?;
                let _cas = locks.cas(&id);
                meta.remove(&id)
            })
            .await
        };
        // Again, now that the record is gone: a fragment that checked a slot out after the
        // forget above and won its commit before the record went may have given its handle
        // back (to a file that is now unlinked; a session re-created with this id would write
        // into it). From here on no commit of this session can win, so none can give one
        // back.
        self.handles.forget(&id);
        removed
    }

    /// Makes every earlier meta change durable: the meta store's group commit, awaited on the
    /// calling task when the store can (no blocking-pool thread per waiter).
    pub async fn flush(&self) -> Result<(), StorageError> {
        if let Some(wait) = self.meta.flush_async() {
            return wait.await;
        }
        let meta = self.meta.clone();
        blocking(move || meta.flush()).await
    }
}
