//! A completion's assembly journal in PostgreSQL: what lets a node that takes the client's
//! re-sent final fragment go on with the multipart upload of a node killed while it
//! assembled the upload (see `objects::resume`).

use std::sync::Mutex;

use async_trait::async_trait;
use bitsd_protocol::SessionId;

use uuid::Uuid;

use super::super::objects::{AssemblyJournal, Claim, DonePart, Journal, ObjectKey, LEASE};
use super::super::pg::{AssemblyClaim, PgStateStore, RecordedAssembly, RecordedPart};
use super::session_map::SessionMap;
use super::SharedBackend;
use crate::StorageError;

/// The journal slot of a session's reply (a plain upload's is its destination key).
pub(super) const REPLY_SLOT: &str = "reply";

/// The journal of one session's assembly at one slot, for one attempt (`holder`, the id
/// of its lease).
pub(super) struct PgJournal<'a> {
    state: &'a PgStateStore,
    session: SessionId,
    slot: &'a str,
    holder: Uuid,
    /// With [`PgJournal::forget_later`]: the upload the assembly completed, forgotten by
    /// [`PgJournal::forget_now`].
    later: Option<Mutex<Option<String>>>,
}

impl<'a> PgJournal<'a> {
    pub(super) fn new(state: &'a PgStateStore, session: SessionId, slot: &'a str) -> Self {
        PgJournal {
            state,
            session,
            slot,
            holder: Uuid::new_v4(),
            later: None,
        }
    }

    /// Keeps the completed upload recorded (and this attempt's lease on it) until
    /// [`PgJournal::forget_now`]: the caller records its outcome in PostgreSQL first, so that
    /// an attempt waiting on the lease finds that outcome once the journal is gone.
    pub(super) fn forget_later(mut self) -> Self {
        self.later = Some(Mutex::new(None));
        self
    }

    /// The upload the assembly completed, kept by [`PgJournal::forget_later`], for the caller
    /// to forget later still (see [`ReplyJournals`]).
    pub(super) fn take_completed(&self) -> Option<String> {
        self.later
            .as_ref()
            .and_then(|m| m.lock().unwrap_or_else(|e| e.into_inner()).take())
    }

    /// Forgets the upload the assembly completed, if it was kept by
    /// [`PgJournal::forget_later`]. A failure is logged: the session's end removes it.
    pub(super) async fn forget_now(&self) {
        if let Some(upload_id) = self.take_completed() {
            if let Err(e) = self.forget(&upload_id).await {
                tracing::warn!(session = %self.session, error = %e, "an assembled upload's journal stays until its session ends");
            }
        }
    }
}

/// The lease in milliseconds, as PostgreSQL keeps it.
fn lease_ms() -> i64 {
    i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX)
}

/// A recorded assembly as the object store wants it.
fn journal_of(recorded: RecordedAssembly) -> Result<Journal, StorageError> {
    let key = ObjectKey::parse(&recorded.object_key).ok_or_else(|| StorageError::Corrupt {
        key: "bitsd_assemblies".into(),
        why: format!("object key {:?} is not a valid key", recorded.object_key),
    })?;
    Ok(Journal {
        key,
        upload_id: recorded.upload_id,
        parts: recorded
            .parts
            .into_iter()
            .map(|p| DonePart {
                number: p.number,
                range: p.start..p.end,
                etag: p.etag,
            })
            .collect(),
    })
}

#[async_trait]
impl AssemblyJournal for PgJournal<'_> {
    async fn claim(&self) -> Result<Claim, StorageError> {
        let claim = self
            .state
            .claim_assembly(&self.session, self.slot, &self.holder, lease_ms())
            .await?;
        Ok(match claim {
            AssemblyClaim::Taken(recorded) => Claim::Taken(journal_of(recorded)?),
            AssemblyClaim::Held => Claim::Held,
            AssemblyClaim::None => Claim::None,
        })
    }

    async fn start(&self, key: &ObjectKey, upload_id: &str) -> Result<bool, StorageError> {
        self.state
            .start_assembly(
                &self.session,
                self.slot,
                (key.as_str(), upload_id),
                &self.holder,
                lease_ms(),
            )
            .await
    }

    async fn renew(&self) -> Result<bool, StorageError> {
        self.state
            .renew_assembly(&self.session, self.slot, &self.holder, lease_ms())
            .await
    }

    async fn release(&self) {
        if let Err(e) = self
            .state
            .release_assembly(&self.session, self.slot, &self.holder)
            .await
        {
            tracing::warn!(session = %self.session, error = %e, "could not let go of an assembly; the next attempt waits for its lease to end");
        }
    }

    async fn part_done(&self, upload_id: &str, part: &DonePart) -> Result<bool, StorageError> {
        let part = RecordedPart {
            number: part.number,
            start: part.range.start,
            end: part.range.end,
            etag: part.etag.clone(),
        };
        self.state
            .assembly_part_done(&self.session, self.slot, (upload_id, &self.holder), &part)
            .await
    }

    async fn completed(&self, upload_id: &str) -> Result<(), StorageError> {
        if let Some(later) = &self.later {
            *later.lock().unwrap_or_else(|e| e.into_inner()) = Some(upload_id.to_string());
            return Ok(());
        }
        self.forget(upload_id).await
    }

    async fn forget(&self, upload_id: &str) -> Result<(), StorageError> {
        self.state
            .forget_assembly(&self.session, self.slot, upload_id)
            .await
    }
}

/// Entries a [`ReplyJournals`] keeps at most (entries of sessions whose save failed and that
/// ended on another node would otherwise stay for the node's life).
const MAX_KEPT: usize = 10_000;

/// Reply assemblies this node completed whose journals wait for the reply to be recorded in
/// the session (the server stores the reply, then saves the record naming it). Another
/// node's attempt at the same reply, waiting on the journal's lease, finds the reply
/// recorded once the journal goes, and answers with it instead of a transient error. An
/// entry goes when a record of its session is saved with its reply ready, or the session
/// ends; one left by a failed save keeps its journal until the session ends (the next
/// attempt finds its upload completed, forgets it and assembles afresh). At most
/// [`MAX_KEPT`] entries: a full table drops an arbitrary one, whose journal then stays until
/// its session ends, as after a failed save.
#[derive(Clone, Debug)]
pub(super) struct ReplyJournals(SessionMap<String>);

impl Default for ReplyJournals {
    fn default() -> Self {
        ReplyJournals(SessionMap::new(MAX_KEPT))
    }
}

impl ReplyJournals {
    /// Keeps session `id`'s completed reply upload `upload_id` recorded for now.
    pub(super) fn keep(&self, id: SessionId, upload_id: String) {
        self.0.insert(id, upload_id);
    }

    /// The reply upload of `id` kept, if any (forgotten here).
    pub(super) fn take(&self, id: &SessionId) -> Option<String> {
        self.0.remove(id)
    }
}

impl SharedBackend {
    /// Forgets the journal of session `id`'s reply assembly, once its reply is recorded (see
    /// [`ReplyJournals`]). A failure is logged: the session's end removes it.
    pub(super) async fn forget_reply_journal(&self, id: &SessionId) {
        if let Some(upload_id) = self.reply_journals.take(id) {
            if let Err(e) = self.state.forget_assembly(id, REPLY_SLOT, &upload_id).await {
                tracing::warn!(session = %id, error = %e, "an assembled reply's journal stays until its session ends");
            }
        }
    }

    /// Aborts the multipart uploads of assemblies still recorded for session `id` (a node
    /// died while it completed the session, and no attempt finished it since), and forgets
    /// them. Their parts are in the store until then.
    pub(super) async fn abort_recorded_assemblies(
        &self,
        id: &SessionId,
    ) -> Result<(), StorageError> {
        for (slot, key, upload_id) in self.state.session_assemblies(id).await? {
            if let Some(key) = ObjectKey::parse(&key) {
                self.objects.abort_upload(&key, &upload_id).await;
                self.state.forget_assembly(id, &slot, &upload_id).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_journals_keep_at_most_max_kept_and_always_the_newest() {
        let kept = ReplyJournals::default();
        let ids: Vec<SessionId> = (0..MAX_KEPT + 5).map(|_| SessionId::random()).collect();
        for (i, id) in ids.iter().enumerate() {
            kept.keep(*id, format!("upload-{i}"));
        }
        assert_eq!(kept.0.len(), MAX_KEPT);
        let last = ids.last().copied().unwrap_or_else(SessionId::random);
        assert_eq!(kept.take(&last), Some(format!("upload-{}", MAX_KEPT + 4)));
        assert_eq!(kept.take(&last), None);
        // Keeping an id again replaces its entry without dropping another.
        let first_kept = kept.0.ids().first().copied();
        if let Some(id) = first_kept {
            kept.keep(id, "again".into());
            assert_eq!(kept.0.len(), MAX_KEPT - 1);
            assert_eq!(kept.take(&id), Some("again".into()));
        }
    }
}
