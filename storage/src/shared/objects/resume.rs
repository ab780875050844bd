//! What lets an assembly go on where an earlier attempt stopped: the journal of its multipart
//! upload (the upload's id, its key, and the parts finished so far), kept by the caller in
//! PostgreSQL (see `crate::shared::pg::PgStateStore::assembly`).
//!
//! An upload is complete and its bytes never change, so a part of the same number covering
//! the same bytes of the upload is the same part whichever attempt sent it: a later attempt
//! (on any node, after the first one's node was killed) keeps every recorded part its own plan
//! has too and sends only the others. The store's multipart upload holds the parts until the
//! completion; PostgreSQL only says which of them exist.
//!
//! The order, per part: the store answers the part (durable there), then the part is
//! recorded. A part sent and never recorded is sent again (it replaces itself). Once the
//! store completed the upload, the journal is forgotten; an attempt that finds a journal whose
//! upload the store no longer knows (completed by an attempt that died before forgetting it,
//! or aborted) forgets it and starts a new upload.

use std::ops::Range;

use async_trait::async_trait;

use super::ObjectKey;
use crate::StorageError;

/// A part of a multipart upload that the store answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DonePart {
    /// Its number (1-based, as S3 counts).
    pub number: u32,
    /// The bytes of the upload it holds.
    pub range: Range<u64>,
    /// The store's ETag for it, as the completion must name it.
    pub etag: String,
}

/// A multipart upload started for an assembly, and its parts recorded so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Journal {
    /// The key the upload completes at.
    pub key: ObjectKey,
    /// The store's id of the multipart upload.
    pub upload_id: String,
    /// Parts recorded, in any order.
    pub parts: Vec<DonePart>,
}

/// Where one assembly records its multipart upload (one per session and destination).
#[async_trait]
pub trait AssemblyJournal: Send + Sync {
    /// The upload an earlier attempt started, if one is recorded.
    async fn find(&self) -> Result<Option<Journal>, StorageError>;
    /// Records the upload `upload_id` just started at `key`, unless another attempt recorded
    /// one first; returns the one recorded (with its parts).
    async fn start(&self, key: &ObjectKey, upload_id: &str) -> Result<Journal, StorageError>;
    /// Records a part the store answered, for the upload `upload_id` (nothing when the
    /// journal names another upload or none any more).
    async fn part_done(&self, upload_id: &str, part: &DonePart) -> Result<(), StorageError>;
    /// Forgets the upload `upload_id` (completed, or no use to anyone).
    async fn forget(&self, upload_id: &str) -> Result<(), StorageError>;
}
