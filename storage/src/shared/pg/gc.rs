//! What the sweeper needs: the objects a session owns, objects no commit ever referenced,
//! removal of a session's rows, and the farm-wide sweeper lock.
//!
//! The order that leaves nothing behind: a node records an object key as pending
//! ([`PgStateStore::add_pending_object`]) BEFORE it writes the object; the fragment commit
//! that references the object deletes that row in its own transaction. A key still pending
//! long after it was written ([`PgStateStore::stale_pending_objects`]) belongs to a commit
//! that lost its race or never happened (the node died): the sweeper deletes the object, then
//! the row. Removing a session: read [`PgStateStore::session_objects`], delete those objects,
//! then [`PgStateStore::remove`] (a crash in between only repeats the deletes next time).

use bitsd_protocol::SessionId;
use tokio_postgres::NoTls;

use super::coalesce::fragment_of;
use super::sessions::{decode, to_i64, COLS, LIVE};
use super::{pg_error, FragmentObject, PgStateStore, NO_FLUSH_CTE};
use crate::{now_millis, StorageError};

/// Advisory-lock key of the sweeper (one node of the farm sweeps at a time).
const SWEEPER_LOCK: i64 = 0x6269_7473_6400_0002;

/// An object written for a commit that has not (yet) referenced it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingObject {
    /// The object's key.
    pub object_key: String,
    /// The session it was written for.
    pub session: SessionId,
    /// When it was recorded (ms since the epoch).
    pub created_ms: u64,
}

impl PendingObject {
    /// From a row of `object_key, session_id, created_ms`.
    fn from_row(row: &tokio_postgres::Row) -> Self {
        PendingObject {
            object_key: row.get(0),
            session: SessionId::from_uuid(row.get(1)),
            created_ms: row.get::<_, i64>(2) as u64,
        }
    }
}

/// The farm-wide sweeper lock, held on a connection of its own: while this value lives and
/// [`SweeperLock::is_held`] says so, no other node holds it. Dropping it closes the connection,
/// which releases the lock; so does the death of this node or of the connection.
pub struct SweeperLock {
    client: tokio_postgres::Client,
    connection: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for SweeperLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SweeperLock")
            .field("held", &self.is_held())
            .finish()
    }
}

impl SweeperLock {
    /// Whether the lock is still held (its connection is alive). A sweeper checks this before
    /// each batch and stops when it is gone: another node may hold the lock by then.
    pub fn is_held(&self) -> bool {
        !self.client.is_closed() && !self.connection.is_finished()
    }
}

impl Drop for SweeperLock {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl PgStateStore {
    /// Takes the farm-wide sweeper lock if no other node holds it (`None`: someone does).
    pub async fn try_sweeper_lock(&self) -> Result<Option<SweeperLock>, StorageError> {
        self.timed(async {
            let (client, connection) = self.config.connect(NoTls).await.map_err(pg_error)?;
            let connection = tokio::spawn(async move {
                let _ = connection.await;
            });
            let lock = SweeperLock { client, connection };
            let got: bool = lock
                .client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&SWEEPER_LOCK])
                .await
                .map_err(pg_error)?
                .get(0);
            Ok(got.then_some(lock))
        })
        .await
    }

    /// Records that `object_key` is about to be written for `session` (call BEFORE the PUT).
    ///
    /// The row is committed without waiting for PostgreSQL's WAL flush (`synchronous_commit
    /// = off` for this transaction only): it costs no disk sync, and the fragment commit that
    /// follows flushes it along with itself. Only a crash of PostgreSQL itself within its WAL
    /// writer delay (200 ms by default) after this call, before that commit, can lose the row;
    /// the object is then left for a bucket lifecycle rule rather than the sweeper (a leak,
    /// never a wrong byte).
    ///
    /// `false` when a row for `object_key` exists already (of any session) and none went in:
    /// keys are unique, so a publish marker claims its destination for one session at a time.
    pub async fn add_pending_object(
        &self,
        session: &SessionId,
        object_key: &str,
    ) -> Result<bool, StorageError> {
        self.insert_pending(session, object_key, None).await
    }

    /// [`PgStateStore::add_pending_object`] for a fragment's object, only while `session` is
    /// live (receiving, complete or reply-ready): `false` when the session is gone or ended
    /// (another node cancelled, closed or purged it), and no row went in. One round trip, as
    /// the unconditional insert.
    pub async fn add_fragment_pending_object(
        &self,
        session: &SessionId,
        object_key: &str,
    ) -> Result<bool, StorageError> {
        self.insert_pending(session, object_key, Some(LIVE)).await
    }

    /// [`PgStateStore::add_pending_object`] for a merge of a session's fragments, only while
    /// `session` is receiving (a merge that starts after the upload completed or ended would
    /// only lose at its swap): `false`, and no row, otherwise.
    pub async fn add_merge_pending_object(
        &self,
        session: &SessionId,
        object_key: &str,
    ) -> Result<bool, StorageError> {
        self.insert_pending(session, object_key, Some("state = 'receiving'"))
            .await
    }

    /// The pending-row insert of all three: one statement (autocommit, so a failure leaves
    /// no transaction open on the pooled connection) without a WAL flush of its own; with a
    /// condition on the session's row, only while it holds. Whether the row went in.
    async fn insert_pending(
        &self,
        session: &SessionId,
        object_key: &str,
        only_while: Option<&str>,
    ) -> Result<bool, StorageError> {
        if object_key.contains('\0') {
            return Err(StorageError::StateStore(
                "an object key must not contain NUL".into(),
            ));
        }
        let now = to_i64(now_millis(), "time")?;
        let live = only_while
            .map(|cond| {
                format!("WHERE EXISTS (SELECT 1 FROM bitsd_sessions WHERE id = $2 AND {cond})")
            })
            .unwrap_or_default();
        let sql = format!(
            "WITH {NO_FLUSH_CTE}
             INSERT INTO bitsd_pending_objects (object_key, session_id, created_ms)
             SELECT $1, $2, $3 FROM cfg {live}
             ON CONFLICT (object_key) DO NOTHING"
        );
        let inserted = self
            .execute(&sql, &[&object_key, session.as_uuid(), &now])
            .await?;
        Ok(inserted == 1)
    }

    /// [`PgStateStore::load`] and [`PgStateStore::add_fragment_pending_object`] in one round
    /// trip (one prepared statement): the record of `id` (live or tombstone), and whether
    /// `object_key` went in as pending, which it does only while the session is live. A
    /// Fragment's first step, so that its object's pending row costs no round trip of its
    /// own. The row's commit is not waited for on disk (`synchronous_commit` off for this
    /// transaction, as the separate insert): a row lost with PostgreSQL's last moments
    /// leaves at worst an object for the orphan collector, never a wrong byte.
    pub async fn load_reserving(
        &self,
        id: &SessionId,
        object_key: &str,
    ) -> Result<(Option<crate::SessionRecord>, bool), StorageError> {
        let now = to_i64(now_millis(), "time")?;
        // A data-modifying CTE runs to completion whether or not the query reads it, and
        // `set_config(.., true)` lasts for this statement's transaction.
        let sql = format!(
            "WITH {NO_FLUSH_CTE},
             ins AS (
                INSERT INTO bitsd_pending_objects (object_key, session_id, created_ms)
                SELECT $2, $1, $3 FROM cfg
                 WHERE EXISTS (SELECT 1 FROM bitsd_sessions WHERE id = $1 AND {LIVE})
                ON CONFLICT (object_key) DO NOTHING RETURNING 1)
             SELECT {COLS}, (SELECT count(*) FROM ins) AS reserved
               FROM bitsd_sessions WHERE id = $1"
        );
        let row = self
            .query_opt(&sql, &[id.as_uuid(), &object_key, &now])
            .await?;
        match row {
            None => Ok((None, false)),
            Some(row) => {
                let reserved = row.get::<_, i64>("reserved") == 1;
                Ok((Some(decode(&row)?), reserved))
            }
        }
    }

    /// Forgets a pending object (after deleting it, or when its commit referenced it).
    pub async fn forget_pending_object(&self, object_key: &str) -> Result<(), StorageError> {
        self.execute(
            "DELETE FROM bitsd_pending_objects WHERE object_key = $1",
            &[&object_key],
        )
        .await?;
        Ok(())
    }

    /// Forgets the pending rows of session `id` for `object_keys` (objects deleted).
    pub async fn forget_pending_objects(
        &self,
        id: &SessionId,
        object_keys: &[&str],
    ) -> Result<(), StorageError> {
        self.execute(
            "DELETE FROM bitsd_pending_objects WHERE session_id = $1 AND object_key = ANY($2)",
            &[id.as_uuid(), &object_keys],
        )
        .await?;
        Ok(())
    }

    /// Forgets `object_key`'s pending row only if it is session `id`'s (a publish marker
    /// that session left; another session's marker for the same key stays).
    pub async fn forget_own_pending_object(
        &self,
        id: &SessionId,
        object_key: &str,
    ) -> Result<(), StorageError> {
        self.execute(
            "DELETE FROM bitsd_pending_objects WHERE object_key = $1 AND session_id = $2",
            &[&object_key, id.as_uuid()],
        )
        .await?;
        Ok(())
    }

    /// Whether `object_key` has a pending row (not yet claimed by the collector, nor
    /// referenced by a commit, nor forgotten).
    pub async fn is_pending(&self, object_key: &str) -> Result<bool, StorageError> {
        let row = self
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM bitsd_pending_objects WHERE object_key = $1)",
                &[&object_key],
            )
            .await?;
        Ok(row.get(0))
    }

    /// At most `limit` pending objects recorded before `before_ms`, oldest first: written for
    /// commits that lost or never happened, once `before_ms` is older than any commit can take.
    pub async fn stale_pending_objects(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<PendingObject>, StorageError> {
        let before = to_i64(before_ms, "time")?;
        let limit = limit.min(i64::MAX as usize) as i64;
        let rows = self
            .query(
                "SELECT object_key, session_id, created_ms FROM bitsd_pending_objects
                 WHERE created_ms < $1 ORDER BY created_ms LIMIT $2",
                &[&before, &limit],
            )
            .await?;
        Ok(rows.iter().map(PendingObject::from_row).collect())
    }

    /// Claims for deletion at most `limit` pending objects recorded before `before_ms` whose
    /// keys start with `under` (the sessions' prefix: publish markers under `files/` are never
    /// claimed), oldest first: their rows are deleted, durably, and returned; the caller then
    /// deletes the objects.
    ///
    /// Rows first, objects second: a fragment commit needs its object's pending row
    /// ([`PgStateStore::commit_pending_fragment`] locks it), so once a row is claimed no commit
    /// can reference its object, and a commit that got the row first leaves nothing to claim.
    /// A crash between the two steps leaves the objects in the bucket without a row (a leak
    /// until their session is closed or swept, never a wrong byte). Rows locked by a commit in
    /// flight are skipped, so two collectors never claim one row.
    pub async fn claim_stale_pending_objects(
        &self,
        before_ms: u64,
        under: &str,
        limit: usize,
    ) -> Result<Vec<PendingObject>, StorageError> {
        let before = to_i64(before_ms, "time")?;
        let limit = limit.min(i64::MAX as usize) as i64;
        let rows = self
            .query(
                "DELETE FROM bitsd_pending_objects WHERE object_key IN (
                    SELECT object_key FROM bitsd_pending_objects
                     WHERE created_ms < $1 AND starts_with(object_key, $2)
                     ORDER BY created_ms LIMIT $3 FOR UPDATE SKIP LOCKED)
                 RETURNING object_key, session_id, created_ms",
                &[&before, &under, &limit],
            )
            .await?;
        Ok(rows.iter().map(PendingObject::from_row).collect())
    }

    /// What tells this database apart from any other: its name and when bitsd created its
    /// schema (the first migration's time, to the microsecond). The sweeper writes it next
    /// to the session prefixes so that it never takes another database's sessions for
    /// orphans.
    pub async fn database_identity(&self) -> Result<String, StorageError> {
        let row = self
            .query_one(
                "SELECT current_database()::text || ' created '
                        || coalesce((SELECT to_char(min(applied_at) AT TIME ZONE 'UTC',
                                            'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
                                     FROM bitsd_schema_version), 'never')",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Which of `ids` have no session row (neither live nor a tombstone), in one query: the
    /// sweeper's check of session prefixes found in the bucket.
    pub async fn sessions_without_row(
        &self,
        ids: &[SessionId],
    ) -> Result<Vec<SessionId>, StorageError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<uuid::Uuid> = ids.iter().map(|id| *id.as_uuid()).collect();
        let rows = self
            .query(
                "SELECT u FROM unnest($1::uuid[]) AS u
                 WHERE NOT EXISTS (SELECT 1 FROM bitsd_sessions s WHERE s.id = u)",
                &[&ids],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| SessionId::from_uuid(r.get(0)))
            .collect())
    }

    /// The fragment index of `id` in offset order: which object holds which bytes.
    pub async fn fragments(&self, id: &SessionId) -> Result<Vec<FragmentObject>, StorageError> {
        let rows = self
            .query(
                "SELECT start_offset, len, crc32c, object_key FROM bitsd_fragments
                 WHERE session_id = $1 ORDER BY start_offset",
                &[id.as_uuid()],
            )
            .await?;
        Ok(rows.iter().map(fragment_of).collect())
    }

    /// Every object key `id` owns: its fragments' and its pending ones.
    pub async fn session_objects(&self, id: &SessionId) -> Result<Vec<String>, StorageError> {
        let rows = self
            .query(
                "SELECT object_key FROM bitsd_fragments WHERE session_id = $1
                 UNION ALL
                 SELECT object_key FROM bitsd_pending_objects WHERE session_id = $1",
                &[id.as_uuid()],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Removes the session's record, fragment index and pending objects' rows (one
    /// transaction); `false` when there was no record. Delete its objects first.
    pub async fn remove(&self, id: &SessionId) -> Result<bool, StorageError> {
        let n = self
            .query_one(
                "WITH p AS (DELETE FROM bitsd_pending_objects WHERE session_id = $1),
                      s AS (DELETE FROM bitsd_sessions WHERE id = $1 RETURNING id)
                 SELECT count(*) FROM s",
                &[id.as_uuid()],
            )
            .await?
            .get::<_, i64>(0);
        Ok(n == 1)
    }
}
