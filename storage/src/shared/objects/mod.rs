//! The farm's bytes in an S3-compatible object store (AWS S3, Garage, MinIO, Ceph RGW, R2…)
//! or an Azure Blob Storage container (`azure.rs`), through the `object_store` crate.
//!
//! The store only holds bytes; PostgreSQL decides what is acknowledged and committed. Nothing
//! here relies on conditional writes (`If-Match` / `If-None-Match`: Garage ignores them):
//! every fragment gets a key of its own (its offset plus a random nonce), so two nodes racing
//! on one session never overwrite each other's object, and the loser's object is garbage
//! (collected with the session, or by a sweep of [`Objects::list`]).
//!
//! ```text
//! <prefix>/sessions/<session-id>/frag/<offset, 20 digits>-<nonce>   one object per fragment
//! <prefix>/sessions/<session-id>/reply-<nonce>                      the stored reply
//! <prefix>/files/<path>                                             committed plain uploads
//! ```
//!
//! Durability: a fragment or reply object is durable when [`ObjectWriter::finish`] returns
//! (its single PUT or its CompleteMultipartUpload was answered 200: the store has it on its
//! write quorum); an assembled upload when [`Objects::assemble`] returns. A writer dropped or
//! aborted before `finish` leaves no object (an unfinished multipart upload is aborted; the
//! bucket should also have a lifecycle rule that aborts incomplete multipart uploads after a
//! day, for a node killed mid-upload).

mod access;
mod assemble;
mod assemble_copy;
mod azure;
mod budget;
mod config;
mod error;
mod info;
mod keys;
mod part_copy;
mod part_plan;
mod resume;
mod stream_put;
mod writer;

use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::multipart::MultipartStore;
use object_store::signer::Signer;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};

pub use access::Access;
pub use assemble::{Assembled, FragmentObject};
pub use budget::{FragmentMemory, DEFAULT_FRAGMENT_MEMORY};
pub use config::{
    ObjectStoreConfig, StoreService, DEFAULT_AZURE_BLOCK_SIZE, DEFAULT_MERGE_PARTS_FROM,
    DEFAULT_PART_SIZE, MAX_AZURE_BLOCK_SIZE, MAX_PART_SIZE, MAX_PRESIGNED_SECS,
    MIN_AZURE_BLOCK_SIZE, MIN_PART_SIZE,
};
pub use info::{ByteStream, ObjectInfo, ObjectRead};
pub use keys::{ObjectKey, MAX_KEY_LEN};
pub use resume::{AssemblyJournal, Claim, DonePart, Journal, LEASE};
pub use writer::{ObjectWriter, StoredObject};

/// A reply ([`Objects::reply_writer`]) is counted in the node's fragment memory once it is
/// longer than this: 64 KiB.
pub const COUNT_REPLIES_FROM: u64 = 64 * 1024;

use crate::StorageError;
use error::map_err;

/// The farm's object store: one bucket, every key under one prefix.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    /// The same client, for the multipart calls of an assembly.
    multipart: Arc<dyn MultipartStore>,
    /// The same client, for presigned reply URLs (`None`: a store without them).
    signer: Option<Arc<dyn Signer>>,
    /// `UploadPartCopy` requests (`None`: `server_side_copy = false`).
    copier: Option<Arc<part_copy::PartCopier>>,
    /// Cut-through PUTs of fragments (`None`: `stream_fragments = false`).
    streamer: Option<Arc<stream_put::StreamPutter>>,
    prefix: ObjectKey,
    part_size: usize,
    /// `coalesce_fragments`.
    coalesce: bool,
    /// `merge_parts_from`.
    merge_parts_from: Option<u64>,
    /// `presigned_reply_secs` (`None`: replies are served through the nodes).
    presigned_reply_ttl: Option<Duration>,
    /// `fragment_memory`: shared by every clone (one budget per node).
    fragment_memory: FragmentMemory,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Objects")
            .field("store", &self.store)
            .field("prefix", &self.prefix)
            .field("part_size", &self.part_size)
            .field("copies_parts", &self.copier.is_some())
            .field("streams_fragments", &self.streamer.is_some())
            .finish_non_exhaustive()
    }
}

impl Objects {
    /// Connects to the store `config` describes (nothing is sent until the first request).
    pub fn new(config: &ObjectStoreConfig) -> Result<Self, StorageError> {
        if config.service == StoreService::Azure {
            let azure = Arc::new(config.build_azure()?);
            return Ok(Self::with_parts(
                config,
                Arc::clone(&azure) as Arc<dyn ObjectStore>,
                azure,
                None,
                None,
                None,
            ));
        }
        let (s3, location) = config.build()?;
        let s3 = Arc::new(s3);
        let (connect, timeout, retries) = config.timeouts();
        let streamer = if config.stream_fragments() {
            Some(Arc::new(stream_put::StreamPutter::new(
                Arc::clone(&s3) as Arc<dyn ObjectStore>,
                location.clone(),
                Arc::clone(s3.credentials()),
                connect,
                timeout,
            )?))
        } else {
            None
        };
        let copier = if config.server_side_copy() {
            Some(Arc::new(part_copy::PartCopier::new(
                location,
                Arc::clone(s3.credentials()),
                connect,
                timeout,
                retries,
            )?))
        } else {
            None
        };
        Ok(Self::with_parts(
            config,
            Arc::clone(&s3) as Arc<dyn ObjectStore>,
            Arc::clone(&s3) as Arc<dyn MultipartStore>,
            Some(s3),
            copier,
            streamer,
        ))
    }

    /// The store's clients and the table's settings, together.
    fn with_parts(
        config: &ObjectStoreConfig,
        store: Arc<dyn ObjectStore>,
        multipart: Arc<dyn MultipartStore>,
        signer: Option<Arc<dyn Signer>>,
        copier: Option<Arc<part_copy::PartCopier>>,
        streamer: Option<Arc<stream_put::StreamPutter>>,
    ) -> Self {
        Objects {
            store,
            multipart,
            signer,
            copier,
            streamer,
            prefix: ObjectKey::new(&config.prefix),
            part_size: config.part_size(),
            coalesce: config.coalesce_fragments(),
            merge_parts_from: config.merge_parts_from(),
            presigned_reply_ttl: config.presigned_reply_ttl(),
            fragment_memory: FragmentMemory::with_wait(
                config.fragment_memory(),
                config.fragment_memory_wait(),
            ),
        }
    }
    /// The node's budget for fragment bytes in memory (`fragment_memory`).
    pub fn fragment_memory(&self) -> &FragmentMemory {
        &self.fragment_memory
    }

    /// The prefix every key of this store starts with.
    pub fn prefix(&self) -> &ObjectKey {
        &self.prefix
    }

    /// Fragments at or above this length are written as a multipart upload of parts this
    /// long; shorter ones with one PUT. Also the part size of assembled uploads.
    pub fn part_size(&self) -> usize {
        self.part_size
    }

    /// Whether runs of small fragments are merged while an upload goes on
    /// (`coalesce_fragments`).
    pub fn coalesce_fragments(&self) -> bool {
        self.coalesce
    }

    /// Whether the small fragments of an upload of `total` bytes are merged into part-sized
    /// objects (`merge_parts_from`), which pays only while the store copies parts itself.
    pub fn merges_into_parts(&self, total: u64) -> bool {
        let copies = self.copier.as_ref().is_some_and(|c| !c.refused());
        self.coalesce && copies && self.merge_parts_from.is_some_and(|from| total >= from)
    }

    /// How long a presigned reply URL lasts, when reply downloads are redirected to the store
    /// (`presigned_reply_secs`).
    pub fn presigned_reply_ttl(&self) -> Option<Duration> {
        self.presigned_reply_ttl
    }

    /// A URL that lets whoever holds it send `method` (GET or HEAD) for the object at `key`
    /// for `ttl`, signed with this store's credentials (SigV4 query parameters). Computed
    /// locally (no request; temporary credentials may be fetched first).
    pub async fn presigned_url(
        &self,
        method: http::Method,
        key: &ObjectKey,
        ttl: Duration,
    ) -> Result<String, StorageError> {
        let Some(signer) = &self.signer else {
            return Err(StorageError::ObjectStore {
                op: "presign",
                key: key.as_str().to_owned(),
                why: "this store has no presigned URLs".into(),
            });
        };
        signer
            .signed_url(method, key.path(), ttl)
            .await
            .map(String::from)
            .map_err(map_err("presign", key.as_str()))
    }

    /// Starts writing an object at `key`; nothing is visible before [`ObjectWriter::finish`].
    pub fn writer(&self, key: ObjectKey) -> ObjectWriter {
        ObjectWriter::new(Arc::clone(&self.store), key, self.part_size)
    }

    /// Starts writing a fragment of `len` bytes at `key`: as [`Objects::writer`], but a
    /// fragment shorter than the part size is streamed to the store while it arrives
    /// (`stream_fragments`, see `stream_put.rs`); nothing is visible before
    /// [`ObjectWriter::finish`] either way. The bytes it holds count in the node's
    /// [`FragmentMemory`]: a fragment that is not streamed first reserves what it will hold,
    /// and fails with a transient [`StorageError::Busy`] when that does not fit in time.
    pub async fn fragment_writer(
        &self,
        key: ObjectKey,
        len: u64,
    ) -> Result<ObjectWriter, StorageError> {
        let mut writer = self.writer(key);
        if let Some(streamer) = &self.streamer {
            if len > 0 && len < self.part_size as u64 && streamer.enabled() {
                writer.stream_through(
                    streamer.start(writer.key(), len),
                    self.fragment_memory.clone(),
                );
                return Ok(writer);
            }
        }
        self.count_in_memory(writer, len, 0).await
    }

    /// As [`Objects::writer`] for an object whose length is not known before it ends (a
    /// reply): counted in the node's [`FragmentMemory`] once past its first
    /// [`COUNT_REPLIES_FROM`] bytes, when it reserves the most it can hold (2 × the part size),
    /// waiting as a fragment that holds its bytes does.
    pub fn reply_writer(&self, key: ObjectKey) -> ObjectWriter {
        let mut writer = self.writer(key);
        writer.count_past(self.fragment_memory.clone(), COUNT_REPLIES_FROM);
        writer
    }

    /// Writes the bytes of `body`, `len` of them, to `key`, counted in the node's
    /// [`FragmentMemory`] as [`Objects::counted_writer`] is, plus the `ahead` bytes `body`
    /// holds of its own before the writer takes them (a merge reading several fragments'
    /// objects at once; 0 for a body read as it is written), in one reservation given back
    /// when the write ends. The object is durable when this returns. A failed body read
    /// aborts the write.
    pub async fn put_stream_counted<S, E>(
        &self,
        key: ObjectKey,
        len: u64,
        ahead: u64,
        body: S,
    ) -> Result<StoredObject, StorageError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<StorageError>,
    {
        let writer = self.count_in_memory(self.writer(key), len, ahead).await?;
        write_all(writer, body).await
    }

    /// As [`Objects::writer`] for an object of `len` bytes, counted in the node's
    /// [`FragmentMemory`] like a fragment that is not streamed: what it will hold is reserved
    /// first, and a transient [`StorageError::Busy`] comes back when that does not fit in
    /// time.
    pub async fn counted_writer(
        &self,
        key: ObjectKey,
        len: u64,
    ) -> Result<ObjectWriter, StorageError> {
        self.count_in_memory(self.writer(key), len, 0).await
    }

    /// Reserves what `writer` of an object of `len` bytes will hold, plus `ahead` bytes held
    /// before it by the stream that feeds it.
    async fn count_in_memory(
        &self,
        mut writer: ObjectWriter,
        len: u64,
        ahead: u64,
    ) -> Result<ObjectWriter, StorageError> {
        // A multipart writer holds the part being filled and one in flight.
        let most = len.min(2 * self.part_size as u64) + ahead;
        let held = self
            .fragment_memory
            .reserve(most, writer.key().as_str())
            .await?;
        writer.hold(held);
        Ok(writer)
    }

    /// Whether fragments shorter than the part size are streamed to the store now
    /// (`stream_fragments`, and the store has not refused an unsigned payload).
    pub fn streams_fragments(&self) -> bool {
        self.streamer.as_ref().is_some_and(|s| s.enabled())
    }

    /// Writes the bytes of `body` to `key` (bounded memory: see [`ObjectWriter`]); the object
    /// is durable when this returns. A failed body read aborts the write.
    pub async fn put_stream<S, E>(
        &self,
        key: ObjectKey,
        body: S,
    ) -> Result<StoredObject, StorageError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: Into<StorageError>,
    {
        write_all(self.writer(key), body).await
    }

    /// Reads an object, or the byte range `range` of it (clamped to its end), as a stream.
    pub async fn read(
        &self,
        key: &ObjectKey,
        range: Option<Range<u64>>,
    ) -> Result<ObjectRead, StorageError> {
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..GetOptions::default()
        };
        let got = self
            .store
            .get_opts(key.path(), options)
            .await
            .map_err(map_err("read", key.as_str()))?;
        let owned = key.as_str().to_string();
        let range = got.range.clone();
        let meta = got.meta.clone();
        let stream = got
            .into_stream()
            .map_err(move |e| map_err("read", &owned)(e));
        Ok(ObjectRead {
            range,
            total: meta.size,
            e_tag: meta.e_tag,
            last_modified: meta.last_modified.into(),
            stream: Box::pin(stream),
        })
    }

    /// Length, last-modified time and entity tag of an object.
    pub async fn head(&self, key: &ObjectKey) -> Result<ObjectInfo, StorageError> {
        self.store
            .head(key.path())
            .await
            .map(ObjectInfo::from)
            .map_err(map_err("head", key.as_str()))
    }

    /// Deletes objects (bulk requests of up to 1000 keys where the store has them); keys
    /// already gone are not an error.
    pub async fn delete(&self, keys: &[ObjectKey]) -> Result<(), StorageError> {
        if keys.is_empty() {
            return Ok(());
        }
        let paths: Vec<_> = keys.iter().map(|k| Ok(k.path().clone())).collect();
        let store = Arc::clone(&self.store);
        // In a task of its own: object_store 0.14 panics on a DeleteObjects answer that names
        // a key the request did not (a store's bug, or keys encoded differently), and a panic
        // must not end the caller (the sweeper's loop, a Close's clean-up); it becomes an
        // error here.
        let deleted = tokio::spawn(async move {
            let mut results = store.delete_stream(futures_util::stream::iter(paths).boxed());
            while let Some(result) = results.next().await {
                match result {
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
        .await;
        match deleted {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(map_err("delete", keys[0].as_str())(e)),
            Err(join) if join.is_panic() => Err(StorageError::ObjectStore {
                op: "delete",
                key: keys[0].as_str().to_owned(),
                why: format!(
                    "the object store client failed on the store's DeleteObjects answer ({join}); \
                     check the store's logs"
                ),
            }),
            Err(join) => Err(StorageError::Task(format!(
                "deleting {} was cancelled: {join}",
                keys[0].as_str()
            ))),
        }
    }

    /// Every object under `prefix` (for garbage collection of leftovers).
    pub async fn list(&self, prefix: &ObjectKey) -> Result<Vec<ObjectInfo>, StorageError> {
        self.store
            .list(Some(prefix.path()))
            .map_ok(ObjectInfo::from)
            .try_collect()
            .await
            .map_err(map_err("list", prefix.as_str()))
    }

    /// Every object under `prefix`, as a stream (listing pages are fetched as it is read):
    /// what a sweep of a large bucket uses instead of [`Objects::list`].
    pub fn list_stream(
        &self,
        prefix: &ObjectKey,
    ) -> Pin<Box<dyn Stream<Item = Result<ObjectInfo, StorageError>> + Send>> {
        let key = prefix.as_str().to_string();
        Box::pin(
            self.store
                .list(Some(prefix.path()))
                .map_ok(ObjectInfo::from)
                .map_err(move |e| map_err("list", &key)(e)),
        )
    }

    /// The sessions that have objects in the store (one listing of `<prefix>/sessions/` by
    /// delimiter, not of every object): the sweeper compares them with PostgreSQL's sessions.
    /// Names that are not session ids are skipped.
    pub async fn session_ids(&self) -> Result<Vec<bitsd_protocol::SessionId>, StorageError> {
        let prefix = self.sessions_prefix();
        let listed = self
            .store
            .list_with_delimiter(Some(prefix.path()))
            .await
            .map_err(map_err("list", prefix.as_str()))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename()?.parse().ok())
            .collect())
    }

    /// Deletes every object of a session (its fragments, including those of commits that
    /// lost a race, and its reply); returns how many there were.
    pub async fn delete_session(
        &self,
        session: &bitsd_protocol::SessionId,
    ) -> Result<usize, StorageError> {
        let objects = self.list(&self.session_prefix(session)).await?;
        let keys: Vec<ObjectKey> = objects.into_iter().map(|o| o.key).collect();
        self.delete(&keys).await?;
        Ok(keys.len())
    }
}

/// Writes `body` into `writer` and completes the object; a failed body read or write aborts.
async fn write_all<S, E>(mut writer: ObjectWriter, body: S) -> Result<StoredObject, StorageError>
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: Into<StorageError>,
{
    let mut body = std::pin::pin!(body);
    while let Some(frame) = body.next().await {
        match frame {
            Ok(bytes) => {
                if let Err(e) = writer.write_bytes(bytes).await {
                    writer.abort().await;
                    return Err(e);
                }
            }
            Err(e) => {
                writer.abort().await;
                return Err(e.into());
            }
        }
    }
    writer.finish().await
}

/// An [`Objects`] under `prefix` for unit tests that only make keys: its endpoint is never
/// called (a discard port).
#[cfg(test)]
pub(crate) fn unconnected(prefix: &str) -> Objects {
    #[allow(clippy::unwrap_used)]
    Objects::new(&ObjectStoreConfig {
        bucket: "b".into(),
        prefix: prefix.into(),
        endpoint: Some("http://127.0.0.1:9".into()),
        region: Some("garage".into()),
        access_key_id: Some("k".into()),
        secret_access_key: Some("s".into()),
        ..ObjectStoreConfig::default()
    })
    .unwrap()
}

/// Every future here must be `Send`, so a multi-threaded server can hold it across awaits.
#[cfg(test)]
#[allow(dead_code)]
fn futures_are_send(
    objects: &Objects,
    writer: &mut ObjectWriter,
    fragments: &[FragmentObject],
    key: &ObjectKey,
    session: &bitsd_protocol::SessionId,
) {
    fn send<T: Send>(_: T) {}
    send(writer.write_bytes(Bytes::new()));
    send(objects.writer(key.clone()).finish());
    send(objects.writer(key.clone()).abort());
    send(objects.put_stream(
        key.clone(),
        futures_util::stream::empty::<Result<Bytes, StorageError>>(),
    ));
    send(objects.assemble(key, fragments, 0));
    send(objects.read(key, None));
    send(objects.head(key));
    send(objects.list(key));
    send(objects.delete(std::slice::from_ref(key)));
    send(objects.delete_session(session));
    send(objects.session_ids());
    send(objects.list_stream(key));
    send(objects.read_upload(fragments, 0, key));
}
