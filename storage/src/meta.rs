//! The `MetaStore` trait: where session records and the fragment index live.

use bitsd_protocol::SessionId;
use bytes::Bytes;

use crate::{FragmentEntry, SessionRecord, StorageError};

/// Session records and the fragment index. "Durable" means the change survives a crash of the
/// process and of the machine once the call returns.
///
/// The calls that wait for the disk (`save`, `flush`, `wait_flush`, `remove`, a durable
/// `save_with_fragment`) and recovery (`list`, `last_fragment`, ...) are made off the async
/// runtime by [`crate::SessionStore`]; the others (`load`, `save_lazy`, a non-durable
/// `save_with_fragment`, `remove_fragments`, `request_flush`) are made on the request's task
/// and must not wait for the disk (sled answers them from memory).
pub trait MetaStore: Send + Sync + 'static {
    /// The record of `id`, if there is one (live or tombstone).
    fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>, StorageError>;
    /// Stores `record` durably.
    fn save(&self, record: &SessionRecord) -> Result<(), StorageError>;
    /// Stores `record` without waiting for it to be durable (progress counters and the like).
    fn save_lazy(&self, record: &SessionRecord) -> Result<(), StorageError>;
    /// Stores one fragment-index entry and `record` (durably when `durable`) such that a
    /// durable record implies a durable entry: atomically, or entry first on a store that
    /// recovers a prefix of its writes (sled). An entry may thus outlive a lost record update;
    /// it then lies at or past the record's `received` (see [`MetaStore::fragments`]).
    fn save_with_fragment(
        &self,
        record: &SessionRecord,
        fragment: &FragmentEntry,
        durable: bool,
    ) -> Result<(), StorageError>;
    /// Removes the record of `id` and its fragment index, durably.
    fn remove(&self, id: &SessionId) -> Result<(), StorageError>;
    /// Removes what [`MetaStore::remove`] removes, without waiting for durability (memory
    /// work; the caller flushes). Returns `false` when the store cannot (the default): the
    /// caller then uses [`MetaStore::remove`] off the runtime.
    fn remove_lazy(&self, id: &SessionId) -> Result<bool, StorageError> {
        let _ = id;
        Ok(false)
    }
    /// Removes the fragment index of `id` (the record stays), without waiting for durability.
    fn remove_fragments(&self, id: &SessionId) -> Result<(), StorageError>;
    /// Every record.
    fn list(&self) -> Result<Vec<SessionRecord>, StorageError>;
    /// At most `limit` records whose ids follow `after` (all when `None`), in id order (the
    /// order of the id's 16 bytes). The default filters [`MetaStore::list`]; a store that
    /// keeps records in id order should read only the page.
    fn list_page(
        &self,
        after: Option<&SessionId>,
        limit: usize,
    ) -> Result<Vec<SessionRecord>, StorageError> {
        let mut records = self.list()?;
        records.retain(|r| after.is_none_or(|a| r.id.as_uuid() > a.as_uuid()));
        records.sort_by_key(|r| *r.id.as_uuid());
        records.truncate(limit);
        Ok(records)
    }
    /// Removes the entries of `id` at or past `offset` (recovery: leftovers of a fragment that
    /// was never acknowledged), without waiting for durability.
    fn remove_fragments_from(&self, id: &SessionId, offset: u64) -> Result<(), StorageError>;
    /// The fragment index of `id`, in offset order: one entry per fragment whose bytes were
    /// committed without a sync (`fsync = "on-close"`), which recovery checks against the
    /// file; a sync that covers them removes them, so a session synced per fragment has none.
    /// Entries at or past the record's `received` are leftovers of an unacknowledged fragment
    /// (recovery removes them).
    fn fragments(&self, id: &SessionId) -> Result<Vec<FragmentEntry>, StorageError>;
    /// The ids (their 16 bytes) of every session that has fragment index entries or held
    /// upload chunks, read in one pass (recovery looks at the others no further); `None`
    /// when the store cannot tell, and each session is asked on its own. The default: `None`.
    fn sessions_with_entries(
        &self,
    ) -> Result<Option<std::collections::HashSet<[u8; 16]>>, StorageError> {
        Ok(None)
    }
    /// The last entry of the fragment index of `id` (recovery checks its bytes).
    fn last_fragment(&self, id: &SessionId) -> Result<Option<FragmentEntry>, StorageError> {
        Ok(self.fragments(id)?.pop())
    }
    /// Makes every earlier change durable.
    fn flush(&self) -> Result<(), StorageError>;
    /// Starts making every earlier change durable and returns at once, with a ticket to wait
    /// for that with [`MetaStore::wait_flush`] (the caller can sync its own files meanwhile).
    /// The default starts nothing: its `wait_flush` flushes.
    fn request_flush(&self) -> FlushTicket {
        FlushTicket::default()
    }
    /// Waits until every change made before `ticket` was taken is durable.
    fn wait_flush(&self, ticket: FlushTicket) -> Result<(), StorageError> {
        let _ = ticket;
        self.flush()
    }
    /// Bytes the store takes on disk, if it can tell.
    fn size_on_disk(&self) -> Option<u64>;

    /// Starts making every earlier change durable and returns a future that resolves when
    /// that is done, without a thread waiting for it (`None`: the store has no such wait; the
    /// caller runs [`MetaStore::flush`] off the runtime).
    fn flush_async(&self) -> Option<FlushFuture> {
        None
    }

    /// Whether the store can hold small fragments' and replies' bytes in its own log (the
    /// `*_chunk*` and `*_reply*` calls below). The default: no (bytes go to files).
    fn holds_bytes(&self) -> bool {
        false
    }
    /// Stores upload bytes `bytes` of `record.id` at `offset` and then `record` (durably when
    /// `durable`), such that a durable record implies durable bytes: atomically, or the bytes
    /// first on a store that recovers a prefix of its writes (sled). Memory work unless
    /// `durable`.
    fn save_with_chunk(
        &self,
        record: &SessionRecord,
        offset: u64,
        bytes: &[u8],
        durable: bool,
    ) -> Result<(), StorageError> {
        let _ = (record, offset, bytes, durable);
        Err(StorageError::Meta(
            "this meta store holds no upload bytes".into(),
        ))
    }
    /// The upload bytes of `id` the store holds, as `(offset, bytes)` in offset order (chunks
    /// never overlap). Memory work.
    fn chunks(&self, id: &SessionId) -> Result<Vec<(u64, Bytes)>, StorageError> {
        let _ = id;
        Ok(Vec::new())
    }
    /// Whether the store holds any upload bytes of `id`. Memory work.
    fn has_chunks(&self, id: &SessionId) -> Result<bool, StorageError> {
        Ok(!self.chunks(id)?.is_empty())
    }
    /// How many chunks of upload bytes of `id` the store holds, counting at most `limit`.
    /// Memory work, bounded by `limit`.
    fn count_chunks(&self, id: &SessionId, limit: usize) -> Result<usize, StorageError> {
        Ok(self.chunks(id)?.len().min(limit))
    }
    /// Removes the upload bytes of `id` held at or past `offset`, without waiting for
    /// durability.
    fn remove_chunks_from(&self, id: &SessionId, offset: u64) -> Result<(), StorageError> {
        let _ = (id, offset);
        Ok(())
    }
    /// Stores `bytes` as the reply of `id` (replacing one held before), without waiting for
    /// durability: the caller's next durable save makes it durable too (it is written first).
    fn put_reply(&self, id: &SessionId, bytes: &[u8]) -> Result<(), StorageError> {
        let _ = (id, bytes);
        Err(StorageError::Meta(
            "this meta store holds no reply bytes".into(),
        ))
    }
    /// The reply bytes of `id` the store holds, if any. Memory work.
    fn reply(&self, id: &SessionId) -> Result<Option<Bytes>, StorageError> {
        let _ = id;
        Ok(None)
    }
    /// Removes the reply bytes of `id`, without waiting for durability.
    fn remove_reply(&self, id: &SessionId) -> Result<(), StorageError> {
        let _ = id;
        Ok(())
    }
}

/// What [`MetaStore::flush_async`] returns.
pub type FlushFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StorageError>> + Send>>;

/// A flush request of a [`MetaStore`]: changes made before it was taken are durable once
/// [`MetaStore::wait_flush`] returns for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlushTicket(u64);

impl FlushTicket {
    /// A ticket with a store-defined number (the n-th request, say).
    pub fn new(n: u64) -> Self {
        FlushTicket(n)
    }

    /// The ticket's number.
    pub fn get(self) -> u64 {
        self.0
    }
}
