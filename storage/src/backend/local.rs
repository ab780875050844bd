//! The local backend: [`SessionStore`] (sled records + files) behind [`SessionBackend`].
//!
//! It wraps the store's own operations and keeps their crash-safe orders unchanged:
//!
//! - create: the record is saved and the meta store flushed before the call returns.
//! - small fragment (shorter than the store's inline limit, see `crate::inline`): its bytes
//!   are inserted into sled's log, **then** the record with the new offset (compare-and-set
//!   under the session's lock), **then** the meta store is flushed (group commit; the
//!   caller's durable save for the completing fragment). No file is touched; sled recovers a
//!   prefix of its log, so a durable offset implies durable bytes.
//! - fragment: bytes are written into the upload file at their offset (gathered, page cache);
//!   commit syncs them (`sync_data`, plus the directory entries of a new file), **then**
//!   compares the stored offset with the caller's and saves the record under the session's
//!   in-process lock, **then** flushes the meta store (group commit). A failed sync leaves the
//!   offset where it was. `on-close` and `never` keep their documented weaker orders.
//! - publish: the complete record is flushed first, then parents are made and synced, then
//!   the upload inode is hard-linked (or linked and renamed) into place, then its directory
//!   is fsynced.
//! - reply: a small one is inserted into sled's log before the record that points at it (the
//!   caller's durable save covers both); a larger one is written under a temporary name,
//!   synced, renamed, directory fsynced.
//! - handler input and reads: bytes held in sled are read from there (a chunk wins over file
//!   bytes at its offset); a handler that needs a path gets the file written out from the log
//!   (page cache only: the log stays the durable copy). Publish writes them out and syncs
//!   the file once first.
//! - end: tombstone saved (not flushed: a lost tombstone is ended again by a repeated Close),
//!   then the session's files and the bytes sled holds for it go.
//! - purge: files first, then record, index and held bytes, durably.
//! - sweep: an in-process lock (one node has all the sessions).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bitsd_protocol::SessionId;
use bytes::Bytes;

use super::{
    ByteStream, FragmentCommit, FragmentPlan, FragmentSink, LocalUpload, ReplySink, SessionBackend,
    SweepLock,
};
use crate::fs_util::blocking;
use crate::inline::{file_stream, InlineFragment, InlineReply};
use crate::{
    CommitOutcome, FragmentDurability, FragmentWriter, ReplyKind, ReplyWriter, SessionRecord,
    SessionState, SessionStore, StorageError,
};

/// A fragment on its way into a local upload file.
#[derive(Debug)]
struct LocalFragment {
    store: SessionStore,
    writer: FragmentWriter,
    durability: FragmentDurability,
}

#[async_trait]
impl FragmentSink for LocalFragment {
    async fn write(&mut self, bytes: Bytes) -> Result<(), StorageError> {
        self.writer.write_bytes(bytes).await
    }

    fn written(&self) -> u64 {
        self.writer.written()
    }

    async fn commit(
        self: Box<Self>,
        expected: u64,
        record: &SessionRecord,
    ) -> Result<FragmentCommit, StorageError> {
        let LocalFragment {
            store,
            writer,
            durability,
        } = *self;
        store
            .commit_fragment_if(writer, record, durability, Some(expected))
            .await
    }
}

/// A reply on its way into a local reply file.
#[derive(Debug)]
struct LocalReply(ReplyWriter);

#[async_trait]
impl ReplySink for LocalReply {
    async fn write(&mut self, bytes: Bytes) -> Result<(), StorageError> {
        self.0.write(&bytes).await
    }

    fn len(&self) -> u64 {
        self.0.len()
    }

    async fn finish(self: Box<Self>) -> Result<ReplyKind, StorageError> {
        let (len, crc32c) = self.0.finish().await?;
        Ok(ReplyKind::Stored {
            len,
            crc32c: Some(crc32c),
            in_upload: false,
            object: None,
        })
    }
}

#[async_trait]
impl SessionBackend for SessionStore {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn create(&self, record: &SessionRecord) -> Result<(), StorageError> {
        SessionStore::create(self, record).await
    }

    async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>, StorageError> {
        SessionStore::load(self, id).await
    }

    async fn save(&self, record: &SessionRecord) -> Result<(), StorageError> {
        SessionStore::save(self, record).await
    }

    async fn save_lazy(&self, record: &SessionRecord) -> Result<(), StorageError> {
        SessionStore::save_lazy(self, record).await
    }

    async fn flush(&self) -> Result<(), StorageError> {
        SessionStore::flush(self).await
    }

    async fn begin_fragment(
        &self,
        id: &SessionId,
        plan: FragmentPlan,
    ) -> Result<Box<dyn FragmentSink>, StorageError> {
        if plan.len > 0
            && self.inlines(plan.len)
            && plan.write_at.saturating_add(plan.len) <= crate::inline::INLINE_UPLOAD_MAX
        {
            return Ok(Box::new(InlineFragment {
                store: self.clone(),
                id: *id,
                write_at: plan.write_at,
                limit: plan.len,
                buf: bytes::BytesMut::with_capacity(plan.len as usize),
                durability: plan.durability,
            }));
        }
        // No writeback hints (`FragmentWriter::start_writeback_every`): measured with 1 MiB
        // fragments at 1/8/64 uploads (bitsd-bench, two interleaved A/B pairs), the hints'
        // `posix_fadvise` calls, each on a blocking-pool thread, cost 25-40% more server CPU
        // per GiB and about 1.5-1.8x the context switches, with no throughput gain the runs
        // could show; the commit's `sync_data` writes the bytes either way.
        let writer = self.fragment_writer(id, plan.write_at).await?;
        Ok(Box::new(LocalFragment {
            store: self.clone(),
            writer,
            durability: plan.durability,
        }))
    }

    async fn publish_upload(
        &self,
        id: &SessionId,
        destination: &str,
        allow_overwrite: bool,
    ) -> Result<CommitOutcome, StorageError> {
        self.commit_upload(id, destination, allow_overwrite).await
    }

    async fn destination_exists(&self, destination: &str) -> bool {
        SessionStore::destination_exists(self, destination).await
    }

    async fn read_upload(&self, id: &SessionId) -> Result<ByteStream, StorageError> {
        let record = SessionStore::load(self, id).await?.ok_or_else(|| {
            StorageError::Meta(format!("session {id} has no record; its upload is gone"))
        })?;
        self.upload_stream(id, "read upload", 0, record.received)
            .await
    }

    async fn upload_file(&self, id: &SessionId) -> Result<LocalUpload, StorageError> {
        // A handler gets the path and may move or replace the file: no kept handle may write.
        self.handles.forget(id);
        // Bytes held in the meta store are written out into the file (page cache only: the
        // meta store stays their durable copy, and readers of the upload prefer it).
        if self.meta.has_chunks(id)? {
            let received = SessionStore::load(self, id)
                .await?
                .map_or(0, |r| r.received);
            let (store, id) = (self.clone(), *id);
            blocking(move || store.write_out_blocking(&id, received, false)).await?;
        }
        Ok(LocalUpload::kept(
            self.upload_path(id),
            self.session_dir(id),
        ))
    }

    async fn upload_unread(&self, id: &SessionId) -> Result<LocalUpload, StorageError> {
        self.handles.forget(id);
        // No file is written out: an upload held in the meta store stays there.
        Ok(LocalUpload::kept(
            self.upload_path(id),
            self.session_dir(id),
        ))
    }

    async fn begin_reply(&self, id: &SessionId) -> Result<Box<dyn ReplySink>, StorageError> {
        if self.inlines(0) {
            return Ok(Box::new(InlineReply {
                store: self.clone(),
                id: *id,
                buf: bytes::BytesMut::new(),
                file: None,
            }));
        }
        Ok(Box::new(LocalReply(self.reply_writer(id).await?)))
    }

    async fn store_reply_file(
        &self,
        id: &SessionId,
        src: &Path,
    ) -> Result<ReplyKind, StorageError> {
        if src == self.upload_path(id) && self.meta.has_chunks(id)? {
            // The upload itself, (partly) held in the meta store: served from there.
            let record = SessionStore::load(self, id).await?.ok_or_else(|| {
                StorageError::Meta(format!("session {id} has no record; its upload is gone"))
            })?;
            return Ok(ReplyKind::Stored {
                len: record.received,
                crc32c: None,
                in_upload: true,
                object: None,
            });
        }
        if src != self.upload_path(id) && self.meta.holds_bytes() {
            let len = tokio::fs::metadata(src)
                .await
                .map_err(StorageError::io("stat reply", src))?
                .len();
            if self.inlines(len) {
                let bytes = tokio::fs::read(src)
                    .await
                    .map_err(StorageError::io("read reply", src))?;
                if self.inlines(bytes.len() as u64) {
                    self.meta.put_reply(id, &bytes)?;
                    return Ok(ReplyKind::Stored {
                        len: bytes.len() as u64,
                        crc32c: Some(crc32c::crc32c(&bytes)),
                        in_upload: false,
                        object: None,
                    });
                }
            }
        }
        let kind = self.reply_from_file(id, src).await?;
        // A reply an earlier attempt held in the meta store would shadow the file.
        self.meta.remove_reply(id)?;
        Ok(kind)
    }

    async fn read_reply(
        &self,
        id: &SessionId,
        kind: &ReplyKind,
        start: u64,
        len: u64,
    ) -> Result<ByteStream, StorageError> {
        if let ReplyKind::Stored {
            in_upload: true, ..
        } = kind
        {
            return self.upload_stream(id, "read reply", start, len).await;
        }
        if let Some(held) = self.meta.reply(id)? {
            let from = usize::try_from(start).unwrap_or(usize::MAX).min(held.len());
            let to = usize::try_from(start.saturating_add(len))
                .unwrap_or(usize::MAX)
                .min(held.len());
            return Ok(Box::pin(futures_util::stream::once(std::future::ready(
                Ok(held.slice(from..to)),
            ))));
        }
        file_stream(self.reply_file(id, kind), "read reply", start, len).await
    }

    fn reply_local_path(&self, id: &SessionId, kind: &ReplyKind) -> Option<PathBuf> {
        // Bytes held in the meta store are served through `read_reply`.
        let held = match kind {
            ReplyKind::Stored {
                in_upload: true, ..
            } => self.meta.has_chunks(id),
            _ => self.meta.reply(id).map(|r| r.is_some()),
        };
        match held {
            Ok(false) => Some(self.reply_file(id, kind)),
            _ => None,
        }
    }

    async fn record_reply_delivered(
        &self,
        id: &SessionId,
        created_ms: u64,
        start: u64,
        end: u64,
    ) -> Result<Option<SessionRecord>, StorageError> {
        // Read, merge and save under the session's lock: concurrent downloads of one reply
        // (several connections, several ranges) never lose each other's ranges.
        let _cas = self.locks.cas(id);
        let Some(mut record) = self.meta.load(id)? else {
            return Ok(None);
        };
        match record.reply.as_mut() {
            Some(reply) if reply.created_ms == created_ms => reply.delivered.insert(start, end),
            _ => return Ok(None),
        }
        self.meta.save_lazy(&record)?;
        Ok(Some(record))
    }

    async fn end_session(
        &self,
        record: &mut SessionRecord,
        state: SessionState,
    ) -> Result<(), StorageError> {
        SessionStore::end_session(self, record, state).await
    }

    async fn purge(&self, id: &SessionId) -> Result<(), StorageError> {
        SessionStore::purge(self, id).await
    }

    async fn list(&self) -> Result<Vec<SessionRecord>, StorageError> {
        SessionStore::list(self).await
    }

    async fn list_page(
        &self,
        after: Option<SessionId>,
        limit: usize,
    ) -> Result<Vec<SessionRecord>, StorageError> {
        SessionStore::list_page(self, after, limit).await
    }

    async fn try_sweep_lock(&self) -> Result<Option<SweepLock>, StorageError> {
        Ok(self
            .locks
            .sweep
            .clone()
            .try_lock_owned()
            .ok()
            .map(SweepLock::new))
    }

    fn files_root(&self) -> Option<&Path> {
        Some(self.files_dir())
    }

    fn size_on_disk(&self) -> Option<u64> {
        self.meta.size_on_disk()
    }
}
