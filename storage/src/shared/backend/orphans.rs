//! Orphaned session prefixes: objects under `<prefix>/sessions/<id>/` whose session has no
//! row in PostgreSQL. They come from a row deleted by hand, from a writer that recorded its
//! pending row and sent its object while another node purged the session (the purge listed
//! and deleted the objects, then removed the row and its pending rows; the late object has
//! neither), and from a crash between a pending row's claim and its object's delete when the
//! session was purged since. Nothing else ever deletes them, so the sweeper compares the
//! bucket with PostgreSQL now and then ([`ORPHAN_SCAN_INTERVAL`]).
//!
//! Why deleting them is safe: a session's row is inserted (durably) before its id is given
//! to the client, and every object of a session is written after its row was read, so a
//! session that has objects had a row before them; once the row is gone the session never
//! comes back (ids are random, never reused), and no reader finds its objects (readers follow
//! the fragment index and the reply record, both gone with the row). As a further guard, a
//! prefix is deleted only when its newest object is older than the grace period (the one of
//! pending objects), so a writer still sending to a session removed a moment ago is not
//! raced, and its object, if it lands later, goes at a later scan. Published files live under
//! `<prefix>/files/` and are never listed here.
//!
//! One prefix of a bucket belongs to one PostgreSQL database: a second farm (another
//! database) on the same prefix would see the first farm's sessions as orphans. The first
//! scan writes the database's identity to `<prefix>/sessions.owner`; a scan that finds
//! another database's identity there deletes nothing and fails with an error (the marker is
//! written without a conditional PUT, which Garage ignores: two farms started on one prefix
//! in the same instant could both miss each other; any later scan of either sees it).

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bitsd_protocol::SessionId;

use super::SharedBackend;
use crate::shared::objects::ObjectKey;
use crate::StorageError;

/// How often [`SharedBackend::collect_orphan_sessions`] runs from the sweeper (the first
/// sweep of a node runs it): one listing of `<prefix>/sessions/` by delimiter costs a request
/// per thousand sessions, too much for every sweep of a large farm.
pub const ORPHAN_SCAN_INTERVAL: Duration = Duration::from_secs(15 * 60);

/// Session ids asked of PostgreSQL per query.
const BATCH: usize = 1000;

/// When this node last compared the bucket with PostgreSQL.
#[derive(Debug, Default)]
pub(super) struct OrphanSchedule {
    last: Mutex<Option<Instant>>,
}

impl OrphanSchedule {
    /// Whether a scan is due now (and if so, records it as started).
    fn due(&self) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < ORPHAN_SCAN_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

impl SharedBackend {
    /// Runs [`SharedBackend::collect_orphan_sessions`] when [`ORPHAN_SCAN_INTERVAL`] has passed
    /// since this node last did (the sweeper calls this on every sweep); else 0.
    pub(super) async fn collect_orphans_if_due(
        &self,
        grace: Duration,
    ) -> Result<usize, StorageError> {
        if !self.orphan_scan.due() {
            return Ok(0);
        }
        self.collect_orphan_sessions(grace).await
    }

    /// The sessions that have objects in the bucket but no row in PostgreSQL (neither live
    /// nor a tombstone).
    /// Fails, finding nothing, when the prefix belongs to another database (see the module
    /// docs).
    pub async fn orphan_sessions(&self) -> Result<Vec<SessionId>, StorageError> {
        self.check_owner().await?;
        let listed = self.objects.session_ids().await?;
        let mut orphans = Vec::new();
        for batch in listed.chunks(BATCH) {
            orphans.extend(self.state.sessions_without_row(batch).await?);
        }
        Ok(orphans)
    }

    /// Checks `<prefix>/sessions.owner` against this database's identity, writing it when
    /// absent.
    async fn check_owner(&self) -> Result<(), StorageError> {
        let mine = self.state.database_identity().await?;
        let key = self.owner_key();
        match self.objects.read(&key, None).await {
            Ok(read) => {
                let found = read.bytes().await?;
                if found == mine.as_bytes() {
                    Ok(())
                } else {
                    Err(StorageError::Corrupt {
                        key: key.to_string(),
                        why: format!(
                            "this bucket prefix belongs to PostgreSQL database {:?}, not to this \
                             farm's {mine:?}: no orphaned session is deleted (give each farm \
                             its own [object_store] prefix)",
                            String::from_utf8_lossy(&found)
                        ),
                    })
                }
            }
            Err(StorageError::ObjectNotFound { .. }) => {
                let body = bytes::Bytes::from(mine.into_bytes());
                self.objects
                    .put_stream(
                        key,
                        futures_util::stream::iter([Ok::<_, StorageError>(body)]),
                    )
                    .await?;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Where the identity of the database that owns the session prefixes is kept (beside
    /// `sessions/`, not under it, so no session listing sees it).
    fn owner_key(&self) -> ObjectKey {
        self.objects.prefix().join("sessions.owner")
    }

    /// Deletes the objects of every orphaned session (see the module docs) whose newest
    /// object is older than `grace`; returns how many objects were deleted. A prefix with a
    /// younger object stays for a later scan.
    pub async fn collect_orphan_sessions(&self, grace: Duration) -> Result<usize, StorageError> {
        let orphans = self.orphan_sessions().await?;
        let now = SystemTime::now();
        let mut deleted = 0;
        for id in orphans {
            let objects = self.objects.list(&self.objects.session_prefix(&id)).await?;
            let young = objects.iter().any(|o| {
                now.duration_since(o.last_modified)
                    .map_or(true, |age| age < grace)
            });
            if young || objects.is_empty() {
                continue;
            }
            let keys: Vec<ObjectKey> = objects.into_iter().map(|o| o.key).collect();
            self.objects.delete(&keys).await?;
            tracing::info!(session = %id, objects = keys.len(), "orphaned session objects deleted (no row in PostgreSQL)");
            deleted += keys.len();
        }
        Ok(deleted)
    }
}
