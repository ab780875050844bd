//! Swapping a run of small fragments in the index for the one object that now holds their
//! bytes (see the shared backend's `coalesce` module for when and why).

use bitsd_protocol::SessionId;

use super::sessions::{to_i64, FragmentObject};
use super::{pg_error, PgStateStore};
use crate::{now_millis, StorageError};

/// The fragments of session `$1` whose first byte is in `$2..$3` (the statements below add
/// their order).
macro_rules! fragments_in_range {
    () => {
        "SELECT start_offset, len, crc32c, object_key FROM bitsd_fragments
          WHERE session_id = $1 AND start_offset >= $2 AND start_offset < $3"
    };
}

/// [`fragments_in_range!`], in offset order.
const BETWEEN: &str = concat!(fragments_in_range!(), " ORDER BY start_offset");

/// The last `$4` of [`fragments_in_range!`], last first.
const LAST_BETWEEN: &str = concat!(
    fragments_in_range!(),
    " ORDER BY start_offset DESC LIMIT $4"
);

impl PgStateStore {
    /// The last `limit` fragments of `id` whose first byte is in `from..to`, in offset order.
    pub async fn fragments_before(
        &self,
        id: &SessionId,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<FragmentObject>, StorageError> {
        let (from, to) = (to_i64(from, "offset")?, to_i64(to, "offset")?);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(LAST_BETWEEN, &[id.as_uuid(), &from, &to, &limit])
            .await?;
        Ok(rows.iter().rev().map(fragment_of).collect())
    }

    /// Replaces the fragments `run` (consecutive, in offset order, as read before) of `id` in
    /// the index with `merged`, whose object holds the same bytes; `false` (and nothing
    /// changed) unless, in one transaction, the session is still `receiving`, the index still
    /// holds exactly `run` over its range, and `merged`'s pending row is still there (the
    /// collector has not claimed it). The pending row goes with the swap, and the run's
    /// objects get pending rows of their own in it: the caller deletes them, then forgets
    /// the rows ([`PgStateStore::forget_pending_objects`]); a node that dies between the two
    /// leaves them to the collector.
    ///
    /// Locks in the order a fragment commit takes them (the session's row, then pending
    /// rows), so the two cannot deadlock; once this commits no reader follows the old
    /// objects (nothing reads fragments before the upload is complete, and completion needs
    /// the session's row).
    pub async fn replace_fragments(
        &self,
        id: &SessionId,
        run: &[FragmentObject],
        merged: &FragmentObject,
    ) -> Result<bool, StorageError> {
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return Ok(false);
        };
        let from = to_i64(first.entry.offset, "offset")?;
        let to = to_i64(last.entry.offset + last.entry.len, "offset")?;
        let len = to_i64(merged.entry.len, "length")?;
        let crc = i64::from(merged.entry.crc32c);
        if merged.entry.offset != first.entry.offset || to - from != len {
            return Err(StorageError::StateStore(format!(
                "a merged fragment of {len} bytes at {} cannot replace {from}..{to}",
                merged.entry.offset
            )));
        }
        let old_keys: Vec<&str> = run.iter().map(|f| f.object_key.as_str()).collect();
        let now_ms = to_i64(now_millis(), "time")?;
        self.timed(async {
            let mut conn = self.conn().await?;
            let tx = super::read_committed(&mut conn).await?;
            let live = tx
                .query_opt(
                    "SELECT 1 FROM bitsd_sessions WHERE id = $1 AND state = 'receiving'
                     FOR UPDATE",
                    &[id.as_uuid()],
                )
                .await
                .map_err(pg_error)?;
            if live.is_none() {
                return Ok(false);
            }
            let now: Vec<FragmentObject> = tx
                .query(BETWEEN, &[id.as_uuid(), &from, &to])
                .await
                .map_err(pg_error)?
                .iter()
                .map(fragment_of)
                .collect();
            if now != run {
                return Ok(false);
            }
            let pending = tx
                .execute(
                    "DELETE FROM bitsd_pending_objects WHERE object_key = $1 AND session_id = $2",
                    &[&merged.object_key, id.as_uuid()],
                )
                .await
                .map_err(pg_error)?;
            if pending != 1 {
                return Ok(false);
            }
            tx.execute(
                "DELETE FROM bitsd_fragments
                  WHERE session_id = $1 AND start_offset >= $2 AND start_offset < $3",
                &[id.as_uuid(), &from, &to],
            )
            .await
            .map_err(pg_error)?;
            tx.execute(
                "INSERT INTO bitsd_fragments (session_id, start_offset, len, crc32c, object_key)
                 VALUES ($1, $2, $3, $4, $5)",
                &[id.as_uuid(), &from, &len, &crc, &merged.object_key],
            )
            .await
            .map_err(pg_error)?;
            // The run's objects, named by nothing from here on, are pending until the merge
            // deletes them: a node that dies first leaves them to the collector.
            tx.execute(
                "INSERT INTO bitsd_pending_objects (object_key, session_id, created_ms)
                 SELECT k, $2, $3 FROM unnest($1::text[]) AS k
                 ON CONFLICT DO NOTHING",
                &[&old_keys, id.as_uuid(), &now_ms],
            )
            .await
            .map_err(pg_error)?;
            tx.commit().await.map_err(pg_error)?;
            Ok(true)
        })
        .await
    }
}

/// A fragment from a row of `start_offset, len, crc32c, object_key`.
pub(super) fn fragment_of(r: &tokio_postgres::Row) -> FragmentObject {
    FragmentObject {
        entry: crate::FragmentEntry {
            offset: r.get::<_, i64>(0) as u64,
            len: r.get::<_, i64>(1) as u64,
            crc32c: r.get::<_, i64>(2) as u32,
        },
        object_key: r.get(3),
    }
}
