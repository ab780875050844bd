//! The shared backend's sinks: a fragment streamed into its own object, a reply into the
//! session's reply object.

use async_trait::async_trait;
use bitsd_protocol::SessionId;
use bytes::Bytes;
use tokio::task::JoinHandle;

use super::super::objects::{ObjectKey, ObjectWriter, Objects};
use super::super::pg::{CasOutcome, Expect, NewFragment, PgStateStore};
use super::coalesce::Coalescer;
use super::recent::RecentSessions;
use crate::backend::{FragmentCommit, FragmentSink, ReplySink};
use crate::{ReplyKind, SessionRecord, SessionState, StorageError};

/// A fragment on its way into its own object (`…/frag/<offset>-<nonce>`). Its pending row is
/// inserted while the body streams and is committed before the object is completed, so an
/// object whose commit never happens is found by the sweeper.
pub(super) struct SharedFragment {
    pub(super) id: SessionId,
    pub(super) state: PgStateStore,
    pub(super) writer: ObjectWriter,
    /// The store the object is written to (a lost commit may delete its object: `commit`).
    pub(super) objects: Objects,
    pub(super) pending: PendingRow,
    pub(super) coalescer: Option<Coalescer>,
    /// Told the session's record after the commit (see `recent.rs`).
    pub(super) recent: RecentSessions,
}

/// A fragment's pending-object row on its way into PostgreSQL, in a task of its own so that
/// its round trip overlaps the body. A sink dropped before its commit (the client went away)
/// leaves the task to finish: the row then names an object that never came to be, which the
/// collector forgets after the grace (deleting a missing object is not an error).
pub(super) struct PendingRow {
    task: Option<JoinHandle<Result<bool, StorageError>>>,
    /// The insert's outcome once learned: the row went in (`true`) or the session was found
    /// ended or gone (`false`).
    inserted: Option<bool>,
}

impl PendingRow {
    /// Starts inserting the pending row of `key` for session `id`, only while the session
    /// is live (another node may have ended it since this one loaded it).
    pub(super) fn insert(state: &PgStateStore, id: SessionId, key: String) -> Self {
        let state = state.clone();
        PendingRow {
            task: Some(tokio::spawn(async move {
                state.add_fragment_pending_object(&id, &key).await
            })),
            inserted: None,
        }
    }

    /// A row that is in already (recorded with the session's load, see [`ReservedKey`]).
    pub(super) fn already_inserted() -> Self {
        PendingRow {
            task: None,
            inserted: Some(true),
        }
    }

    /// The insert's error if it has failed already (so a fragment whose row cannot be
    /// written stops early instead of after its whole body), without waiting.
    async fn check(&mut self) -> Result<(), StorageError> {
        if self.task.as_ref().is_some_and(|t| t.is_finished()) {
            self.wait().await?;
        }
        Ok(())
    }

    /// Waits until the row is committed (`true`), the session was found ended or gone and
    /// no row went in (`false`), or the insert failed.
    async fn wait(&mut self) -> Result<bool, StorageError> {
        if let Some(task) = self.task.take() {
            let inserted = task.await.unwrap_or_else(|e| {
                Err(StorageError::StateStore(format!(
                    "the pending-object insert did not finish: {e}"
                )))
            })?;
            self.inserted = Some(inserted);
        }
        Ok(self.inserted.unwrap_or(false))
    }
}

/// A fragment object key recorded as pending together with the session's load
/// ([`PgStateStore::load_reserving`]), for the fragment starting at `offset`. Taken by the
/// fragment that uses it; dropped unused (the packet was answered without new bytes, or
/// failed first), it forgets its row in the background (the collector would after the grace).
pub(super) struct ReservedKey {
    pub(super) id: SessionId,
    pub(super) offset: u64,
    pub(super) key: Option<ObjectKey>,
    pub(super) state: PgStateStore,
}

impl ReservedKey {
    /// The key, for a fragment of session `id` whose first new byte is at `offset`; `None`
    /// when it was reserved for another one (the caller begins as usual and this reservation
    /// is forgotten).
    pub(super) fn take_for(&mut self, id: &SessionId, offset: u64) -> Option<ObjectKey> {
        if self.id == *id && self.offset == offset {
            self.key.take()
        } else {
            None
        }
    }
}

impl Drop for ReservedKey {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let state = self.state.clone();
            rt.spawn(async move {
                if let Err(e) = state.forget_pending_object(key.as_str()).await {
                    tracing::debug!(key = key.as_str(), error = %e, "an unused reserved key stays pending for the collector");
                }
            });
        }
    }
}

impl std::fmt::Debug for SharedFragment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedFragment")
            .field("id", &self.id)
            .field("key", &self.writer.key().as_str())
            .field("written", &self.writer.len())
            .finish()
    }
}

#[async_trait]
impl FragmentSink for SharedFragment {
    async fn write(&mut self, bytes: Bytes) -> Result<(), StorageError> {
        self.pending.check().await?;
        self.writer.write_bytes(bytes).await
    }

    fn written(&self) -> u64 {
        self.writer.len()
    }

    /// 0. the pending row is committed (inserted while the body streamed): no object is
    /// visible at the key before it, 1. the object is completed (durable on the store's write
    /// quorum), 2. one PostgreSQL
    /// statement advances `received` only if it still equals `expected` and records the
    /// object in the fragment index, provided the object's pending row is still there (the
    /// pending-object collector claims rows before it deletes objects). A lost commit's object
    /// stays pending for the collector. The statement of 2 runs while 1 does, in a
    /// transaction committed only after the store's answer: the offset is durable, and seen
    /// by anyone, only once the object is.
    async fn commit(
        self: Box<Self>,
        expected: u64,
        record: &SessionRecord,
    ) -> Result<FragmentCommit, StorageError> {
        let SharedFragment {
            id,
            state,
            writer,
            objects,
            mut pending,
            coalescer,
            recent,
        } = *self;
        if writer.is_empty() {
            // No new bytes (a repeated last fragment): nothing to store; the record is saved
            // under the same compare-and-set.
            let key = writer.key().as_str().to_string();
            writer.abort().await;
            // The row is forgotten only once it is in (else the forget could come first and
            // leave the row to the collector); a failed insert left nothing to forget.
            let inserted = matches!(pending.wait().await, Ok(true));
            let outcome = state
                .save(
                    record,
                    // Only over a session still receiving: a node that read (or
                    // remembered) it receiving must not write over another node's
                    // completion of the same empty upload.
                    Expect {
                        received: expected,
                        state: Some(SessionState::Receiving),
                    },
                )
                .await?;
            if inserted {
                let _ = state.forget_pending_object(&key).await;
            }
            return Ok(settle(outcome, &recent, &id));
        }
        // The order the collector relies on: the row is committed BEFORE the object exists.
        match pending.wait().await {
            Err(e) => {
                writer.abort().await;
                return Err(e);
            }
            Ok(false) => {
                // The session ended or went on another node after this one loaded it: no
                // object is completed (a streamed body never gets its last byte), the commit
                // loses with what is stored now.
                writer.abort().await;
                recent.forget(&id);
                let current = state.load(&id).await?;
                return Ok(FragmentCommit::Lost {
                    current: current.map(Box::new),
                });
            }
            Ok(true) => {}
        }
        // The commit's statement runs while the store completes the object; only its
        // `COMMIT` waits for the store's answer (see `commit_pending_fragment_during`).
        let fragment = NewFragment {
            id,
            expected_received: expected,
            len: writer.len(),
            crc32c: writer.crc32c(),
            object_key: writer.key().as_str().to_string(),
            total: record.total,
            state: Some(record.state),
        };
        let (stored, outcome) = state
            .commit_pending_fragment_during(&fragment, writer.finish())
            .await?;
        // After the Ack's commit, behind the upload: small fragments before a boundary merged.
        if let (Some(c), CasOutcome::Committed(now)) = (&coalescer, &outcome) {
            if now.state == SessionState::Receiving {
                c.after_commit(id, expected, expected + stored.len, now.total);
            }
        }
        if !matches!(outcome, CasOutcome::Committed(_)) {
            drop_if_unnamed(state.clone(), objects, stored.key);
        }
        Ok(settle(outcome, &recent, &id))
    }
}

/// After a lost commit, in the background: deletes the fragment's object when its pending row
/// is gone (the collector claimed it while the body streamed, and deleted the object before
/// it existed; or the session was purged). Nothing else names that object: the collector
/// would never find it, nor would Close. With the row still there, the collector deletes it
/// after the grace. The index never names it (the commit lost), and its key is this writer's
/// alone (a random nonce), so deleting it can lose no byte.
fn drop_if_unnamed(state: PgStateStore, objects: Objects, key: ObjectKey) {
    tokio::spawn(async move {
        match state.is_pending(key.as_str()).await {
            Ok(true) => {}
            Ok(false) => {
                if let Err(e) = objects.delete(std::slice::from_ref(&key)).await {
                    tracing::warn!(key = key.as_str(), error = %e, "the object of a commit lost after its pending row was collected stays until its session is swept");
                }
            }
            Err(e) => {
                tracing::debug!(key = key.as_str(), error = %e, "a lost commit's object: its pending row could not be checked");
            }
        }
    });
}

/// The commit's outcome for the service; the node remembers the record it committed (or
/// forgets the session when its commit lost).
fn settle(outcome: CasOutcome, recent: &RecentSessions, id: &SessionId) -> FragmentCommit {
    match outcome {
        CasOutcome::Committed(now) => {
            recent.remember(&now);
            FragmentCommit::Committed
        }
        CasOutcome::Raced(r) => {
            recent.forget(id);
            FragmentCommit::Lost {
                current: Some(Box::new(r)),
            }
        }
        CasOutcome::Missing => {
            recent.forget(id);
            FragmentCommit::Lost { current: None }
        }
    }
}

/// A reply on its way into the session's reply object (one PUT or a multipart upload: a
/// reader sees the whole reply or none).
pub(super) struct SharedReply {
    pub(super) writer: ObjectWriter,
    /// The object's name under the session's prefix, for the record.
    pub(super) name: String,
}

impl std::fmt::Debug for SharedReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedReply")
            .field("key", &self.writer.key().as_str())
            .field("written", &self.writer.len())
            .finish()
    }
}

#[async_trait]
impl ReplySink for SharedReply {
    async fn write(&mut self, bytes: Bytes) -> Result<(), StorageError> {
        self.writer.write_bytes(bytes).await
    }

    fn len(&self) -> u64 {
        self.writer.len()
    }

    async fn finish(self: Box<Self>) -> Result<ReplyKind, StorageError> {
        let stored = self.writer.finish().await?;
        Ok(ReplyKind::Stored {
            len: stored.len,
            crc32c: Some(stored.crc32c),
            in_upload: false,
            object: Some(self.name),
        })
    }
}

/// The object that holds a stored reply: the one `kind` names, or `reply` for a record written
/// before every attempt had an object of its own. `None` for a reply with no object (static)
/// or a name bitsd never gives (`reply-` and hex digits only: a record altered by hand must
/// not reach outside the session's prefix).
pub(super) fn reply_object(
    objects: &Objects,
    id: &SessionId,
    kind: &ReplyKind,
) -> Option<ObjectKey> {
    let ReplyKind::Stored { object, .. } = kind else {
        return None;
    };
    let name = object.as_deref().unwrap_or("reply");
    let ours = name == "reply"
        || name
            .strip_prefix("reply-")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_hexdigit()));
    ours.then(|| objects.session_prefix(id).join(name))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn objects() -> Objects {
        crate::shared::objects::unconnected("farm")
    }

    fn stored(object: Option<&str>) -> ReplyKind {
        ReplyKind::Stored {
            len: 1,
            crc32c: None,
            in_upload: false,
            object: object.map(str::to_owned),
        }
    }

    #[test]
    fn every_reply_gets_its_own_object_and_a_record_names_only_the_sessions() {
        let (objects, id) = (objects(), SessionId::random());
        let (key, name) = objects.reply_key(&id);
        let (other, _) = objects.reply_key(&id);
        assert_ne!(key, other, "every attempt writes its own object");
        assert!(name.starts_with("reply-"), "{name}");
        assert_eq!(reply_object(&objects, &id, &stored(Some(&name))), Some(key));
        // A record written before replies had objects of their own.
        assert_eq!(
            reply_object(&objects, &id, &stored(None)),
            Some(objects.session_prefix(&id).join("reply"))
        );
        assert_eq!(reply_object(&objects, &id, &ReplyKind::Static), None);
        // A record altered by hand never reaches outside the session's prefix.
        for hostile in [
            "../x",
            "reply-../../files/a",
            "reply-",
            "frag/0",
            "reply-1/2",
            "",
        ] {
            assert_eq!(
                reply_object(&objects, &id, &stored(Some(hostile))),
                None,
                "{hostile}"
            );
        }
    }
}
