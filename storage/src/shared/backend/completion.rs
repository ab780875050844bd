//! What completing a session writes on the shared backend, where two nodes may complete one
//! session at once (a client re-sends its final fragment, the balancer hands it to another
//! node, and the first node still works on it; the session lock of a node does not reach the
//! other): the published file of a plain upload, and the record of a reply. The rule is that
//! what a final Ack handed out never changes: a publish that loses to another attempt of the
//! same session answers with that attempt's commit, and a reply stored second is dropped in
//! favour of the first (tests/tests/farm_completion_race.rs).

use bitsd_protocol::SessionId;

use super::super::objects::ObjectKey;
use super::super::pg::CasOutcome;
use super::journal::PgJournal;
use super::sinks::reply_object;
use super::SharedBackend;
use crate::{CommitOutcome, SessionRecord, StorageError};

impl SharedBackend {
    /// Whether an object is at `dest` (one HEAD).
    pub(super) async fn destination_taken(&self, dest: &ObjectKey) -> Result<bool, StorageError> {
        match self.objects.head(dest).await {
            Ok(_) => Ok(true),
            Err(StorageError::ObjectNotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The publish of [`SessionBackend::publish_upload`], for a session not committed when
    /// read (`record`) to a valid `destination`.
    pub(super) async fn publish(
        &self,
        id: &SessionId,
        mut record: SessionRecord,
        destination: &str,
        allow_overwrite: bool,
    ) -> Result<CommitOutcome, StorageError> {
        let dest = self.objects.file_key(destination);
        // This session's publish marker: a crashed earlier attempt of the same session (or one
        // running on another node now) may have written the destination already; that is not
        // someone else's file.
        let ours = |keys: &[String]| keys.iter().any(|k| k == dest.as_str());
        if !allow_overwrite && !ours(&self.state.session_objects(id).await?) {
            if self.destination_taken(&dest).await? {
                return Ok(CommitOutcome::DestinationExists);
            }
            // The marker's key is unique: of two sessions publishing to one destination at
            // once, only one gets it, and the other's destination exists.
            if !self.state.add_pending_object(id, dest.as_str()).await? {
                // Unless the marker is this session's own, put there by another node's
                // attempt since we looked: both attempts write the same bytes.
                if !ours(&self.state.session_objects(id).await?) {
                    return Ok(CommitOutcome::DestinationExists);
                }
            } else {
                // A session whose publish ended (its marker gone) between the HEAD above and
                // our marker has its file in place: look again, now that no one else can.
                match self.destination_taken(&dest).await {
                    Ok(false) => {}
                    taken => {
                        // Our marker must not let a retry skip these checks.
                        if let Err(e) = self.state.forget_pending_object(dest.as_str()).await {
                            tracing::warn!(session = %id, error = %e, "could not drop a publish marker");
                        }
                        return taken.map(|_| CommitOutcome::DestinationExists);
                    }
                }
            }
        }
        let fragments = self.fragments(id).await?;
        // Journaled: a node killed meanwhile leaves its multipart upload to the next attempt.
        // The journal goes once the commit is recorded: another node's attempt waiting on
        // this one's lease then finds the session committed and answers the final Ack.
        let journal = PgJournal::new(&self.state, *id, dest.as_str()).forget_later();
        self.objects
            .assemble_resumable(&dest, &fragments, record.received, &journal)
            .await?;
        // Correctness from PostgreSQL: `committed` only once the assembled object exists.
        record.committed = true;
        record.touch();
        match self.state.put(&record).await? {
            CasOutcome::Committed(_) => {}
            CasOutcome::Raced(_) | CasOutcome::Missing => {
                return Err(StorageError::StateStore(format!(
                    "session {id} ended while its upload was being published"
                )))
            }
        }
        journal.forget_now().await;
        self.state.forget_pending_object(dest.as_str()).await?;
        // Committed: the fragments are not read again, so their objects can go now rather
        // than at Close (the bytes are not stored twice meanwhile).
        self.drop_published_fragments(&fragments).await;
        Ok(CommitOutcome::Committed)
    }

    /// After a whole-record write of `mine` came back `Raced` with `stored`: if `mine` carried
    /// a reply of its own (an object this attempt wrote) and `stored` names another one (a
    /// reply another node stored first, or none because the session ended), this attempt's
    /// object is deleted; nothing will ever read it. A failed delete is left to the purge of
    /// the session's tombstone (a listing of its prefix).
    pub(super) async fn discard_lost_reply(&self, mine: &SessionRecord, stored: &SessionRecord) {
        let id = mine.id;
        let key = |r: &SessionRecord| {
            r.reply
                .as_ref()
                .and_then(|reply| reply_object(&self.objects, &id, &reply.kind))
        };
        let Some(ours) = key(mine) else { return };
        if key(stored).as_ref() == Some(&ours) {
            return;
        }
        tracing::info!(session = %id, "another completion of this session stored its reply first; dropping this one's");
        if let Err(e) = self.objects.delete(&[ours]).await {
            tracing::warn!(session = %id, error = %e, "could not delete a reply that lost; the sweeper deletes it with the tombstone");
        }
    }
}
