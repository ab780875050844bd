//! A completion's assembly journal in PostgreSQL: what lets a node that takes the client's
//! re-sent final fragment go on with the multipart upload of a node killed while it
//! assembled the upload (see `objects::resume`).

use async_trait::async_trait;
use bitsd_protocol::SessionId;

use super::super::objects::{AssemblyJournal, DonePart, Journal, ObjectKey};
use super::super::pg::{PgStateStore, RecordedAssembly, RecordedPart};
use super::SharedBackend;
use crate::StorageError;

/// The journal slot of a session's reply (a plain upload's is its destination key).
pub(super) const REPLY_SLOT: &str = "reply";

/// The journal of one session's assembly at one slot.
pub(super) struct PgJournal<'a> {
    state: &'a PgStateStore,
    session: SessionId,
    slot: &'a str,
}

impl<'a> PgJournal<'a> {
    pub(super) fn new(state: &'a PgStateStore, session: SessionId, slot: &'a str) -> Self {
        PgJournal {
            state,
            session,
            slot,
        }
    }
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
    async fn find(&self) -> Result<Option<Journal>, StorageError> {
        self.state
            .assembly(&self.session, self.slot)
            .await?
            .map(journal_of)
            .transpose()
    }

    async fn start(&self, key: &ObjectKey, upload_id: &str) -> Result<Journal, StorageError> {
        let recorded = self
            .state
            .start_assembly(&self.session, self.slot, key.as_str(), upload_id)
            .await?;
        journal_of(recorded)
    }

    async fn part_done(&self, upload_id: &str, part: &DonePart) -> Result<(), StorageError> {
        let part = RecordedPart {
            number: part.number,
            start: part.range.start,
            end: part.range.end,
            etag: part.etag.clone(),
        };
        self.state
            .assembly_part_done(&self.session, self.slot, upload_id, &part)
            .await
    }

    async fn forget(&self, upload_id: &str) -> Result<(), StorageError> {
        self.state
            .forget_assembly(&self.session, self.slot, upload_id)
            .await
    }
}

impl SharedBackend {
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
