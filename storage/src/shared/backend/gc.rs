//! The shared backend's garbage: objects of fragment commits that lost their race or never
//! happened (the node died, the client went away mid-fragment), a published upload's
//! fragment objects, and the objects PostgreSQL knows of an ended session.

use std::time::Duration;

use bitsd_protocol::SessionId;

use super::SharedBackend;
use crate::shared::objects::{FragmentObject, ObjectKey};
use crate::{now_millis, StorageError};

/// Pending rows claimed per round trip.
const BATCH: usize = 1000;

impl SharedBackend {
    /// Deletes the objects of fragment commits that lost their race or never happened: the
    /// pending rows older than `grace` under `<prefix>/sessions/` (never a publish marker
    /// under `files/`). Rows are claimed (deleted) first, then their objects; see
    /// [`crate::shared::pg::PgStateStore::claim_stale_pending_objects`] for why that order
    /// is safe against a slow writer's commit. Returns how many objects were deleted.
    pub async fn collect_pending_objects(&self, grace: Duration) -> Result<usize, StorageError> {
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        let before = now_millis().saturating_sub(grace_ms);
        // A trailing slash: `…/sessions-x` is not under `…/sessions`.
        let under = format!("{}/", self.objects.sessions_prefix().as_str());
        let mut deleted = 0;
        loop {
            let claimed = self
                .state
                .claim_stale_pending_objects(before, &under, BATCH)
                .await?;
            let keys: Vec<ObjectKey> = claimed
                .iter()
                .filter_map(|p| ObjectKey::parse(&p.object_key))
                .collect();
            // A failure here leaves these objects without a row: they go with their session
            // (Close, Cancel and the sweeper delete everything under the session's prefix).
            self.objects.delete(&keys).await?;
            deleted += keys.len();
            if claimed.len() < BATCH {
                return Ok(deleted);
            }
        }
    }

    /// Deletes a published plain upload's fragment objects. Call only after the upload is
    /// recorded `committed` in PostgreSQL: from then on nothing reads them (a repeated publish
    /// answers from the record), while before it a retried publish must find them to assemble
    /// the file again. A crash or a failure here leaves them for Close, Cancel or the
    /// sweeper, which delete the session's whole prefix.
    pub(super) async fn drop_published_fragments(&self, fragments: &[FragmentObject]) {
        let keys: Vec<ObjectKey> = fragments.iter().map(|f| f.key.clone()).collect();
        if let Err(e) = self.objects.delete(&keys).await {
            tracing::warn!(error = %e, "published upload: its fragment objects stay until the session ends");
        }
    }

    /// Deletes the objects of session `id` that PostgreSQL knows of (its fragment index, its
    /// pending rows under the session's prefix) and its reply (`reply`, the object its record
    /// names): one request, no listing. Never
    /// a published file (a publish marker names a key under `files/`). An object PostgreSQL
    /// does not know (a pending row lost with PostgreSQL's last moments) goes with the purge
    /// of the tombstone, which lists the session's prefix.
    pub(super) async fn delete_known_objects(
        &self,
        id: &SessionId,
        reply: Option<ObjectKey>,
    ) -> Result<(), StorageError> {
        let prefix = self.objects.session_prefix(id);
        let mut keys: Vec<ObjectKey> = self
            .state
            .session_objects(id)
            .await?
            .iter()
            .filter_map(|k| ObjectKey::parse(k))
            .filter(|k| k.starts_with(&prefix))
            .collect();
        keys.extend(reply);
        self.objects.delete(&keys).await
    }
}
