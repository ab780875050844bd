//! Reply progress: the distinct reply byte ranges delivered, counted once whichever node
//! served them (`int8multirange` in the session's row).

use bitsd_protocol::SessionId;

use super::sessions::{decode, to_i64, COLS};
use super::{PgStateStore, NO_FLUSH_CTE};
use crate::{SessionRecord, StorageError};

impl PgStateStore {
    /// Adds the reply bytes `[start, end)` to the session's delivered ranges and returns how
    /// many distinct bytes have been delivered (`None`: no such session). Any node serving
    /// any range counts each byte once.
    pub async fn record_reply_range(
        &self,
        id: &SessionId,
        start: u64,
        end: u64,
    ) -> Result<Option<u64>, StorageError> {
        let (s, e) = (to_i64(start, "range start")?, to_i64(end, "range end")?);
        let e = e.max(s);
        let row = self
            .query_opt(
                "UPDATE bitsd_sessions
                    SET delivered = delivered + int8multirange(int8range($2, $3))
                  WHERE id = $1
                  RETURNING (SELECT coalesce(sum(upper(r) - lower(r)), 0)::bigint
                               FROM unnest(delivered) r)",
                &[id.as_uuid(), &s, &e],
            )
            .await?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }

    /// Adds `[start, end)` to the delivered ranges of the reply of `id` made at `created_ms`
    /// and returns the record as it now is; `None` when the session is gone or its reply is
    /// not that one any more (a reply produced again is counted afresh: storing a reply with
    /// a new `created_ms` empties the ranges).
    ///
    /// Progress, so **not** waited for on disk (`synchronous_commit` off for this one
    /// statement's transaction, as the seam allows): no WAL flush of its own, and the session's
    /// row lock is let go that much sooner (the client's Close, often on another node, waits
    /// for it). A crash of PostgreSQL itself can lose the ranges of the last moments (up to
    /// three times its `wal_writer_delay`), and so can a failover (the setting skips a
    /// synchronous standby too); they count again when the client downloads them again.
    pub async fn record_reply_delivered(
        &self,
        id: &SessionId,
        created_ms: u64,
        start: u64,
        end: u64,
    ) -> Result<Option<SessionRecord>, StorageError> {
        let (s, e) = (to_i64(start, "range start")?, to_i64(end, "range end")?);
        let e = e.max(s);
        let made = to_i64(created_ms, "reply time")?;
        // The join makes the update read `cfg` for the row it changes.
        let sql = format!(
            "WITH {NO_FLUSH_CTE}
             UPDATE bitsd_sessions
                SET delivered = delivered + int8multirange(int8range($2, $3))
               FROM cfg
              WHERE id = $1 AND (record -> 'reply' ->> 'created_ms')::bigint = $4
              RETURNING {COLS}"
        );
        let row = self.query_opt(&sql, &[id.as_uuid(), &s, &e, &made]).await?;
        row.as_ref().map(decode).transpose()
    }
}
