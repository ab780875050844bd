//! What the store says about an object, and an object being read.

use std::ops::Range;
use std::pin::Pin;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::ObjectKey;
use crate::StorageError;

/// A stream of an object's bytes; a failure midway is a [`StorageError`].
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, StorageError>> + Send>>;

/// What the store says about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its key.
    pub key: ObjectKey,
    /// Its length in bytes.
    pub len: u64,
    /// When it was last written.
    pub last_modified: SystemTime,
    /// Its entity tag, if the store gave one.
    pub e_tag: Option<String>,
}

impl From<object_store::ObjectMeta> for ObjectInfo {
    fn from(meta: object_store::ObjectMeta) -> Self {
        ObjectInfo {
            key: ObjectKey::from_path(meta.location),
            len: meta.size,
            last_modified: meta.last_modified.into(),
            e_tag: meta.e_tag,
        }
    }
}

/// An object (or a byte range of one) being read.
pub struct ObjectRead {
    /// The range of the object this read returns.
    pub range: Range<u64>,
    /// The object's whole length.
    pub total: u64,
    /// Its entity tag, if the store gave one.
    pub e_tag: Option<String>,
    /// When it was last written.
    pub last_modified: SystemTime,
    /// The bytes of `range`, in order.
    pub stream: ByteStream,
}

impl std::fmt::Debug for ObjectRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectRead")
            .field("range", &self.range)
            .field("total", &self.total)
            .field("e_tag", &self.e_tag)
            .finish_non_exhaustive()
    }
}

impl ObjectRead {
    /// Reads the whole stream into memory (for tests and small objects).
    pub async fn bytes(self) -> Result<Vec<u8>, StorageError> {
        let mut out =
            Vec::with_capacity(usize::try_from(self.range.end - self.range.start).unwrap_or(0));
        let mut stream = self.stream;
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }
}
