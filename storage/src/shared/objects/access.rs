//! Whether the store takes this node's bucket (container) and credentials: what a node asks
//! at start and what `/readyz` asks again while it runs.

use futures_util::StreamExt;
use object_store::ObjectStoreExt;

use super::error::map_err;
use super::Objects;
use crate::StorageError;

/// What [`Objects::access`] writes (and deletes at once).
const ACCESS_CHECK_BODY: &[u8] =
    b"bitsd writes and deletes this object at start to check its access\n";

/// What the store answered to [`Objects::access`].
#[derive(Debug)]
pub enum Access {
    /// It took the listing, the write and the delete.
    Granted,
    /// It refused one of them (a wrong key, secret, region or bucket, a missing permission:
    /// any answer that is not transient). A node stops at start on it, and is not ready
    /// while it lasts.
    Refused(StorageError),
    /// It did not answer, or answered that it cannot now (transient): a node starts and stays
    /// ready, its packets getting 503 until the store is back.
    NoAnswer(StorageError),
}

impl Objects {
    /// Whether the store takes this node's bucket and credentials for what a node does: one
    /// listing request under the prefix (its first page), then a small object written at
    /// [`Objects::access_check_key`] and deleted again. What a node asks at start, so that a
    /// wrong key, secret, region or bucket, or a key that may read but not write, stops it
    /// there instead of failing every fragment later; and what `/readyz` asks again while it
    /// runs. Which answers are a refusal is decided here, for both.
    pub async fn access(&self) -> Access {
        match self.check_access().await {
            Ok(()) => Access::Granted,
            Err(e) if e.is_transient() => Access::NoAnswer(e),
            Err(e) => Access::Refused(e),
        }
    }

    /// The requests of [`Objects::access`].
    async fn check_access(&self) -> Result<(), StorageError> {
        self.list_stream(self.prefix()).next().await.transpose()?;
        let key = self.access_check_key();
        self.store
            .put(key.path(), ACCESS_CHECK_BODY.into())
            .await
            .map_err(map_err("put", key.as_str()))?;
        self.delete(std::slice::from_ref(&key)).await
    }
}
