//! The default [`MetaStore`]: sled.

use std::path::Path;
use std::sync::Arc;

use bitsd_protocol::SessionId;

use crate::group_flush::{Flusher, LogFiles};
use crate::{FlushTicket, FragmentEntry, MetaStore, SessionRecord, StorageError};

/// Session records and fragment index in a sled database: tree `sessions` (id → JSON record),
/// tree `fragments` (id ‖ offset → len ‖ crc32c), and the bytes of small fragments and
/// replies: tree `chunks` (id ‖ offset → bytes) and tree `replies` (id → bytes).
///
/// Durable writes are group-committed (see `group_flush`): one sled flush covers every
/// request made before it started, so concurrent callers share flushes. A blocking caller of
/// [`MetaStore::flush`] runs the flush itself when none is running; async waiters and
/// [`MetaStore::request_flush`] (start a flush, do other work, then wait) are served by a
/// flusher thread, which ends when the last clone of the store is dropped.
#[derive(Clone, Debug)]
pub struct SledMetaStore {
    db: sled::Db,
    sessions: sled::Tree,
    fragments: sled::Tree,
    /// Small fragments' bytes: id ‖ offset → bytes.
    chunks: sled::Tree,
    /// Small replies' bytes: id → bytes.
    replies: sled::Tree,
    flusher: Arc<Flusher>,
}

fn meta_err(e: sled::Error) -> StorageError {
    StorageError::Meta(e.to_string())
}

fn fragment_key(id: &SessionId, offset: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(id.as_uuid().as_bytes());
    k[16..].copy_from_slice(&offset.to_be_bytes());
    k
}

fn fragment_value(f: &FragmentEntry) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..8].copy_from_slice(&f.len.to_be_bytes());
    v[8..].copy_from_slice(&f.crc32c.to_be_bytes());
    v
}

fn decode_fragment(id: &SessionId, k: &[u8], v: &[u8]) -> Result<FragmentEntry, StorageError> {
    let bad = || StorageError::Corrupt {
        key: id.to_string(),
        why: "fragment entry".into(),
    };
    let offset = u64::from_be_bytes(
        k.get(16..24)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(bad)?,
    );
    let len = u64::from_be_bytes(v.get(..8).and_then(|s| s.try_into().ok()).ok_or_else(bad)?);
    let crc32c = u32::from_be_bytes(
        v.get(8..12)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(bad)?,
    );
    Ok(FragmentEntry {
        offset,
        len,
        crc32c,
    })
}

fn encode(record: &SessionRecord) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(record).map_err(|e| StorageError::Corrupt {
        key: record.id.to_string(),
        why: e.to_string(),
    })
}

fn decode(key: &[u8], value: &[u8]) -> Result<SessionRecord, StorageError> {
    serde_json::from_slice(value).map_err(|e| StorageError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        why: e.to_string(),
    })
}

impl SledMetaStore {
    /// Inserts `key`/`value` into `tree`, then the session's `record`, as plain inserts in that
    /// order (sled recovers a prefix of its log, so a durable record implies the entry before
    /// it), and flushes when `durable`.
    fn insert_before_record(
        &self,
        tree: &sled::Tree,
        key: &[u8],
        value: &[u8],
        record: &SessionRecord,
        durable: bool,
    ) -> Result<(), StorageError> {
        let encoded = encode(record)?;
        tree.insert(key, value).map_err(meta_err)?;
        self.sessions
            .insert(record.id.as_uuid().as_bytes(), encoded)
            .map_err(meta_err)?;
        if durable {
            self.flush()
        } else {
            Ok(())
        }
    }

    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        let db = sled::Config::new().path(dir).open().map_err(meta_err)?;
        let files = LogFiles::open(dir)?;
        Self::with_files(db, Some(files))
    }

    /// Uses a database the host application already opened. bitsd cannot find its files,
    /// so a flush is only as durable as sled makes it (`sync_file_range` on Linux, which does
    /// not flush the drive's write cache): prefer [`SledMetaStore::open`].
    pub fn from_db(db: sled::Db) -> Result<Self, StorageError> {
        Self::with_files(db, None)
    }

    fn with_files(db: sled::Db, files: Option<LogFiles>) -> Result<Self, StorageError> {
        let sessions = db.open_tree("sessions").map_err(meta_err)?;
        let fragments = db.open_tree("fragments").map_err(meta_err)?;
        let chunks = db.open_tree("chunks").map_err(meta_err)?;
        let replies = db.open_tree("replies").map_err(meta_err)?;
        let flusher = Arc::new(Flusher::start(db.clone(), files)?);
        Ok(SledMetaStore {
            db,
            sessions,
            fragments,
            chunks,
            replies,
            flusher,
        })
    }
}

impl MetaStore for SledMetaStore {
    fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>, StorageError> {
        // After a failed flush sled's memory may hold offsets the disk does not: nothing read
        // from it may be acknowledged until a restart (see `group_flush`). Every packet of a
        // session starts with this load, and `/readyz` probes it.
        if let Some(why) = self.flusher.group.poisoned() {
            return Err(crate::group_flush::poison_error(&why));
        }
        let key = id.as_uuid().as_bytes();
        match self.sessions.get(key).map_err(meta_err)? {
            None => Ok(None),
            Some(v) => decode(key, &v).map(Some),
        }
    }

    fn save(&self, record: &SessionRecord) -> Result<(), StorageError> {
        self.save_lazy(record)?;
        self.flush()
    }

    fn save_lazy(&self, record: &SessionRecord) -> Result<(), StorageError> {
        self.sessions
            .insert(record.id.as_uuid().as_bytes(), encode(record)?)
            .map_err(meta_err)?;
        Ok(())
    }

    fn save_with_fragment(
        &self,
        record: &SessionRecord,
        fragment: &FragmentEntry,
        durable: bool,
    ) -> Result<(), StorageError> {
        // Two plain inserts, index entry first. Not a sled transaction: a transaction (or
        // batch) rolls sled's log buffer twice, i.e. two log writes each waited for with
        // `sync_file_range`, on every fragment even when nothing asks for durability. Plain
        // inserts stay in the log buffer until the next flush. sled recovers a prefix of its
        // log, so a durable record implies a durable index entry; an entry whose record was
        // lost (a crash between the two) lies at or past the recorded offset and is
        // overwritten when the client sends those bytes again.
        self.insert_before_record(
            &self.fragments,
            &fragment_key(&record.id, fragment.offset),
            &fragment_value(fragment),
            record,
            durable,
        )
    }

    fn remove(&self, id: &SessionId) -> Result<(), StorageError> {
        self.remove_lazy(id)?;
        self.flush()
    }

    fn remove_lazy(&self, id: &SessionId) -> Result<bool, StorageError> {
        self.remove_fragments(id)?;
        self.remove_chunks_from(id, 0)?;
        self.remove_reply(id)?;
        self.sessions
            .remove(id.as_uuid().as_bytes())
            .map_err(meta_err)?;
        Ok(true)
    }

    fn remove_fragments(&self, id: &SessionId) -> Result<(), StorageError> {
        for key in self.fragments.scan_prefix(id.as_uuid().as_bytes()).keys() {
            self.fragments
                .remove(key.map_err(meta_err)?)
                .map_err(meta_err)?;
        }
        Ok(())
    }

    fn remove_fragments_from(&self, id: &SessionId, offset: u64) -> Result<(), StorageError> {
        let end = fragment_key(id, u64::MAX);
        for key in self.fragments.range(fragment_key(id, offset)..=end).keys() {
            self.fragments
                .remove(key.map_err(meta_err)?)
                .map_err(meta_err)?;
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<SessionRecord>, StorageError> {
        self.sessions
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(meta_err)?;
                decode(&k, &v)
            })
            .collect()
    }

    fn list_page(
        &self,
        after: Option<&SessionId>,
        limit: usize,
    ) -> Result<Vec<SessionRecord>, StorageError> {
        use std::ops::Bound;
        // Records are keyed by the id's bytes: a page is one range read.
        let start = match after {
            Some(a) => Bound::Excluded(a.as_uuid().as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        self.sessions
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv.map_err(meta_err)?;
                decode(&k, &v)
            })
            .collect()
    }

    fn fragments(&self, id: &SessionId) -> Result<Vec<FragmentEntry>, StorageError> {
        self.fragments
            .scan_prefix(id.as_uuid().as_bytes())
            .map(|kv| {
                let (k, v) = kv.map_err(meta_err)?;
                decode_fragment(id, &k, &v)
            })
            .collect()
    }

    fn last_fragment(&self, id: &SessionId) -> Result<Option<FragmentEntry>, StorageError> {
        match self
            .fragments
            .scan_prefix(id.as_uuid().as_bytes())
            .next_back()
        {
            None => Ok(None),
            Some(kv) => {
                let (k, v) = kv.map_err(meta_err)?;
                decode_fragment(id, &k, &v).map(Some)
            }
        }
    }

    fn flush(&self) -> Result<(), StorageError> {
        // The calling (blocking) thread leads the flush when none runs (see `group_flush`).
        self.flusher.group.wait(self.flusher.group.request_quiet())
    }

    fn flush_async(&self) -> Option<crate::meta::FlushFuture> {
        Some(self.flusher.group.flush_async())
    }

    fn request_flush(&self) -> FlushTicket {
        self.flusher.group.request()
    }

    fn wait_flush(&self, ticket: FlushTicket) -> Result<(), StorageError> {
        self.flusher.group.wait(ticket)
    }

    fn size_on_disk(&self) -> Option<u64> {
        self.db.size_on_disk().ok()
    }

    fn holds_bytes(&self) -> bool {
        true
    }

    fn sessions_with_entries(
        &self,
    ) -> Result<Option<std::collections::HashSet<[u8; 16]>>, StorageError> {
        // Keys are the session's 16 bytes then the offset: consecutive keys of one session
        // share their first 16 bytes.
        let mut ids = std::collections::HashSet::new();
        for tree in [&self.fragments, &self.chunks] {
            for key in tree.iter().keys() {
                let key = key.map_err(meta_err)?;
                if let Some(id) = key.get(..16).and_then(|k| <[u8; 16]>::try_from(k).ok()) {
                    ids.insert(id);
                }
            }
        }
        Ok(Some(ids))
    }

    fn save_with_chunk(
        &self,
        record: &SessionRecord,
        offset: u64,
        bytes: &[u8],
        durable: bool,
    ) -> Result<(), StorageError> {
        // Bytes first, then the record, as plain inserts (see `save_with_fragment`): sled
        // recovers a prefix of its log, so a durable record implies durable bytes, and one
        // flush (the group commit) makes every session's bytes and offsets written before it
        // durable together.
        self.insert_before_record(
            &self.chunks,
            &fragment_key(&record.id, offset),
            bytes,
            record,
            durable,
        )
    }

    fn chunks(&self, id: &SessionId) -> Result<Vec<(u64, bytes::Bytes)>, StorageError> {
        self.chunks
            .scan_prefix(id.as_uuid().as_bytes())
            .map(|kv| {
                let (k, v) = kv.map_err(meta_err)?;
                let offset = decode_fragment(id, &k, &[0u8; 12])?.offset;
                Ok((offset, bytes::Bytes::copy_from_slice(&v)))
            })
            .collect()
    }

    fn count_chunks(&self, id: &SessionId, limit: usize) -> Result<usize, StorageError> {
        let mut n = 0;
        for key in self
            .chunks
            .scan_prefix(id.as_uuid().as_bytes())
            .keys()
            .take(limit)
        {
            key.map_err(meta_err)?;
            n += 1;
        }
        Ok(n)
    }

    fn has_chunks(&self, id: &SessionId) -> Result<bool, StorageError> {
        Ok(self
            .chunks
            .scan_prefix(id.as_uuid().as_bytes())
            .next()
            .transpose()
            .map_err(meta_err)?
            .is_some())
    }

    fn remove_chunks_from(&self, id: &SessionId, offset: u64) -> Result<(), StorageError> {
        let end = fragment_key(id, u64::MAX);
        for key in self.chunks.range(fragment_key(id, offset)..=end).keys() {
            self.chunks
                .remove(key.map_err(meta_err)?)
                .map_err(meta_err)?;
        }
        Ok(())
    }

    fn put_reply(&self, id: &SessionId, bytes: &[u8]) -> Result<(), StorageError> {
        self.replies
            .insert(id.as_uuid().as_bytes(), bytes)
            .map_err(meta_err)?;
        Ok(())
    }

    fn reply(&self, id: &SessionId) -> Result<Option<bytes::Bytes>, StorageError> {
        Ok(self
            .replies
            .get(id.as_uuid().as_bytes())
            .map_err(meta_err)?
            .map(|v| bytes::Bytes::copy_from_slice(&v)))
    }

    fn remove_reply(&self, id: &SessionId) -> Result<(), StorageError> {
        self.replies
            .remove(id.as_uuid().as_bytes())
            .map_err(meta_err)?;
        Ok(())
    }
}
