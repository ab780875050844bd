//! One object written from body frames with bounded memory: a single PUT below the part
//! size, a multipart upload above.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use super::budget::{FragmentMemory, Held};
use super::error::map_err;
use super::stream_put::StreamPut;
use super::ObjectKey;
use crate::StorageError;

/// Frames shorter than this are copied into the writer's own buffer, so that a body sent in
/// tiny frames does not pin one read buffer per frame; longer ones are held as they are.
const COPY_BELOW: usize = 64 * 1024;

/// Parts of a multipart upload in flight at once (besides the one being filled): memory per
/// writer stays below `(1 + PARTS_IN_FLIGHT) × part size`.
const PARTS_IN_FLIGHT: usize = 1;

/// What [`ObjectWriter::count_past`] reserves, and when.
struct CountPast {
    memory: FragmentMemory,
    from: u64,
    most: u64,
}

/// An object written and durable in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredObject {
    /// Its key.
    pub key: ObjectKey,
    /// Its length in bytes.
    pub len: u64,
    /// CRC-32C (Castagnoli) of its bytes.
    pub crc32c: u32,
}

impl Drop for ObjectWriter {
    /// A writer dropped mid-multipart (the client went away mid-fragment) aborts its upload in
    /// the background, so its parts do not linger in the store.
    fn drop(&mut self) {
        if let Some(mp) = self.multipart.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = mp.abort().await;
                });
            }
        }
    }
}

/// An object on its way into the store. Bytes handed over with
/// [`ObjectWriter::write_bytes`] are held until they reach the part size; a shorter object is
/// sent with one PUT by [`ObjectWriter::finish`], a longer one becomes a multipart upload
/// whose parts go out as they fill (one in flight while the next fills). Dropping the writer
/// without `finish` stores nothing visible and aborts the multipart upload in the background
/// ([`ObjectWriter::abort`] does it before it returns).
pub struct ObjectWriter {
    store: Arc<dyn ObjectStore>,
    key: ObjectKey,
    part_size: usize,
    /// Frames held before the multipart upload starts, in order, then `copies`.
    held: Vec<Bytes>,
    copies: BytesMut,
    held_len: usize,
    multipart: Option<WriteMultipart>,
    /// A cut-through PUT the held bytes are also forwarded to (see `stream_put.rs`).
    stream: Option<StreamPut>,
    /// The node's fragment memory a streamed writer keeps its copy in while it has room
    /// (`None`: not streamed, or not counted).
    memory: Option<FragmentMemory>,
    /// What this writer holds of the node's fragment memory.
    budget: Held,
    /// A streamed writer let go of its bytes when `memory` had no room for them: should the
    /// stream break, there is nothing to send again.
    let_go: bool,
    /// Counted once past its first bytes (a writer of unknown length, see
    /// [`ObjectWriter::count_past`]).
    count_past: Option<CountPast>,
    len: u64,
    crc32c: u32,
}

impl std::fmt::Debug for ObjectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectWriter")
            .field("key", &self.key)
            .field("len", &self.len)
            .field("multipart", &self.multipart.is_some())
            .finish_non_exhaustive()
    }
}

impl ObjectWriter {
    pub(crate) fn new(store: Arc<dyn ObjectStore>, key: ObjectKey, part_size: usize) -> Self {
        ObjectWriter {
            store,
            key,
            part_size,
            held: Vec::new(),
            copies: BytesMut::new(),
            held_len: 0,
            multipart: None,
            stream: None,
            memory: None,
            budget: Held::none(),
            let_go: false,
            count_past: None,
            len: 0,
            crc32c: 0,
        }
    }

    /// Counts this writer in `memory` once it is handed more than `from` bytes: it then
    /// reserves the most it can hold (the part being filled and one in flight), all at once,
    /// waiting as a fragment that holds its bytes does (a transient
    /// [`StorageError::Busy`] when there is no room in time). For objects whose length is not
    /// known before they end (replies); a short one is never counted.
    pub(crate) fn count_past(&mut self, memory: FragmentMemory, from: u64) {
        self.count_past = Some(CountPast {
            memory,
            from,
            most: 2 * self.part_size as u64,
        });
    }

    /// Forwards the bytes of a single-PUT object through `stream` as they come. They are
    /// also held, for the ordinary PUT should the stream break, while `memory` has room for
    /// them (see `budget.rs`).
    pub(crate) fn stream_through(&mut self, stream: StreamPut, memory: FragmentMemory) {
        self.stream = Some(stream);
        self.memory = Some(memory);
    }

    /// Keeps `held`, reserved in the node's fragment memory for what this writer will hold,
    /// until the writer is finished or dropped (see `budget.rs`).
    pub(crate) fn hold(&mut self, held: Held) {
        self.budget = held;
    }

    /// The key being written.
    pub fn key(&self) -> &ObjectKey {
        &self.key
    }

    /// Bytes handed over so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no byte was handed over yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// CRC-32C of the bytes written so far.
    pub fn crc32c(&self) -> u32 {
        self.crc32c
    }

    /// Appends `bytes`; may wait while a part is in flight (back-pressure on the body).
    pub async fn write_bytes(&mut self, bytes: Bytes) -> Result<(), StorageError> {
        if bytes.is_empty() {
            return Ok(());
        }
        if let Some(count) = &self.count_past {
            if self.len + bytes.len() as u64 > count.from {
                self.budget = count.memory.reserve(count.most, self.key.as_str()).await?;
                self.count_past = None;
            }
        }
        self.crc32c = crc32c::crc32c_append(self.crc32c, &bytes);
        self.len += bytes.len() as u64;
        if let Some(mp) = self.multipart.as_mut() {
            mp.wait_for_capacity(PARTS_IN_FLIGHT)
                .await
                .map_err(map_err("write", self.key.as_str()))?;
            if bytes.len() < COPY_BELOW {
                mp.write(&bytes);
            } else {
                mp.put(bytes);
            }
            return Ok(());
        }
        if let Some(stream) = self.stream.as_mut() {
            stream.send(bytes.clone()).await;
            if self.let_go {
                return Ok(());
            }
            let keep = self.held_len as u64 + bytes.len() as u64;
            if let Some(memory) = &self.memory {
                if !memory.try_grow(&mut self.budget, keep) {
                    // No room to keep the bytes for a second try: the stream alone goes on.
                    self.let_go = true;
                    self.held.clear();
                    self.copies = BytesMut::new();
                    self.held_len = 0;
                    self.budget = Held::none();
                    return Ok(());
                }
            }
        }
        self.held_len += bytes.len();
        if bytes.len() < COPY_BELOW {
            self.copies.extend_from_slice(&bytes);
        } else {
            self.flush_copies();
            self.held.push(bytes);
        }
        if self.held_len >= self.part_size {
            self.start_multipart().await?;
        }
        Ok(())
    }

    /// Appends a copy of `bytes`.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        self.write_bytes(Bytes::copy_from_slice(bytes)).await
    }

    fn flush_copies(&mut self) {
        if !self.copies.is_empty() {
            self.held.push(self.copies.split().freeze());
        }
    }

    async fn start_multipart(&mut self) -> Result<(), StorageError> {
        // Past the part size: no single PUT (the stream never sends its last byte).
        self.stream = None;
        self.flush_copies();
        let upload = self
            .store
            .put_multipart(self.key.path())
            .await
            .map_err(map_err("start multipart upload", self.key.as_str()))?;
        let mut mp = WriteMultipart::new_with_chunk_size(upload, self.part_size);
        for bytes in self.held.drain(..) {
            mp.put(bytes);
        }
        self.held_len = 0;
        self.multipart = Some(mp);
        Ok(())
    }

    /// Sends what is held and completes the object; it is durable in the store when this
    /// returns. On failure nothing is visible at the key (a multipart upload is aborted).
    pub async fn finish(mut self) -> Result<StoredObject, StorageError> {
        let key = self.key.clone();
        if let Some(mp) = self.multipart.take() {
            // `finish` aborts the upload itself when a part or the completion fails.
            mp.finish()
                .await
                .map_err(map_err("complete multipart upload", key.as_str()))?;
        } else if match self.stream.take() {
            Some(stream) => stream.finish().await,
            None => false,
        } {
            // Streamed while the body arrived: stored.
        } else if self.let_go {
            return Err(StorageError::Busy(format!(
                "the streamed PUT of {key} did not complete, and the node's fragment memory had \
                 no room to keep its bytes for a second try: the client sends the fragment again"
            )));
        } else {
            self.flush_copies();
            let payload: PutPayload = self.held.drain(..).collect();
            self.store
                .put(key.path(), payload)
                .await
                .map_err(map_err("put", key.as_str()))?;
        }
        Ok(StoredObject {
            key,
            len: self.len,
            crc32c: self.crc32c,
        })
    }

    /// Gives up: an unfinished multipart upload is aborted (its parts removed); nothing was
    /// visible at the key. Errors are ignored (the bucket's lifecycle rule for incomplete
    /// uploads is the backstop).
    pub async fn abort(mut self) {
        if let Some(mp) = self.multipart.take() {
            let _ = mp.abort().await;
        }
    }
}
