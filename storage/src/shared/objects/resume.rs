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
//!
//! One attempt at a time works on an assembly: it holds a lease on the journal, renewed while
//! it works ([`while_held`]). Another attempt (the client's final fragment sent again, on
//! another node, while the first still assembles) waits for the lease to end instead of
//! sending the same parts at once; a store completing an upload while one of its parts is
//! sent again refuses the completion (Garage: `InvalidPart`), and each attempt would then
//! abort the upload the other completes. A killed node's lease runs out after [`LEASE`].

use std::future::Future;
use std::ops::Range;
use std::time::Duration;

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

/// How long an attempt holds an assembly unless it renews its lease: how long the next
/// attempt waits after a node died while it assembled.
pub const LEASE: Duration = Duration::from_secs(2);

/// How often a working attempt renews its lease.
const RENEW_EVERY: Duration = Duration::from_millis(500);

/// How long an attempt waits for another's lease to end before it answers
/// [`StorageError::Busy`] (the client sends the fragment again).
pub(super) const WAIT_FOR_HOLDER: Duration = Duration::from_secs(30);

/// How often a waiting attempt looks again.
pub(super) const LOOK_EVERY: Duration = Duration::from_millis(100);

/// What [`AssemblyJournal::claim`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The upload an earlier attempt started, now held by this attempt.
    Taken(Journal),
    /// Another attempt holds the assembly.
    Held,
    /// No upload is recorded.
    None,
}

/// Where one assembly records its multipart upload (one per session and destination), for
/// one attempt: the lease it takes is this attempt's.
#[async_trait]
pub trait AssemblyJournal: Send + Sync {
    /// Takes the upload an earlier attempt started, if one is recorded and no other attempt
    /// holds it.
    async fn claim(&self) -> Result<Claim, StorageError>;
    /// Records the upload `upload_id` just started at `key`, held by this attempt; false when
    /// another attempt recorded one first (this one is not recorded).
    async fn start(&self, key: &ObjectKey, upload_id: &str) -> Result<bool, StorageError>;
    /// Renews this attempt's lease; false when it holds the assembly no more.
    async fn renew(&self) -> Result<bool, StorageError>;
    /// Lets go of the assembly now, for the next attempt.
    async fn release(&self);
    /// Records a part the store answered, for the upload `upload_id`; false (nothing
    /// recorded) when the journal names another upload or none, or another attempt holds it.
    async fn part_done(&self, upload_id: &str, part: &DonePart) -> Result<bool, StorageError>;
    /// The store completed the upload `upload_id`: forgets it, or keeps it (and the lease)
    /// until the caller has recorded the outcome, when the caller asked for that.
    async fn completed(&self, upload_id: &str) -> Result<(), StorageError>;
    /// Forgets the upload `upload_id` (no use to anyone).
    async fn forget(&self, upload_id: &str) -> Result<(), StorageError>;
}

/// The error of an attempt that no longer holds its assembly.
pub(super) fn lost_lease(key: &ObjectKey) -> StorageError {
    StorageError::Busy(format!(
        "another attempt took over the assembly of {key} (this one did not renew its lease in \
         time); the client sends the fragment again"
    ))
}

/// Runs `work` while renewing the lease of `journal`'s attempt; ends it with
/// [`lost_lease`] when another attempt took the assembly over. A renewal that fails (PostgreSQL
/// unreachable) is not an end: `work` finds out for itself.
pub(super) async fn while_held<T, E: From<StorageError>>(
    journal: Option<&dyn AssemblyJournal>,
    key: &ObjectKey,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let Some(j) = journal else {
        return work.await;
    };
    let keep = async {
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match j.renew().await {
                Ok(true) => {}
                Ok(false) => return lost_lease(key),
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "could not renew an assembly's lease")
                }
            }
        }
    };
    tokio::select! {
        done = work => done,
        lost = keep => Err(lost.into()),
    }
}
