//! Session records: create, load, compare-and-set saves, fragment commits, reply ranges,
//! tombstones, counts and listing.
//!
//! A row keeps the whole [`SessionRecord`] as `jsonb` plus the hot columns (`state`, `owner`,
//! `received`, `total`, `updated_ms`) that the guarded updates test and the indexes use; on
//! load the columns override the copies inside the `jsonb`, so a fragment commit rewrites
//! only the columns. Reply progress lives in the `delivered` column (`int8multirange`) and
//! overrides the record's `reply.delivered`.

use bitsd_protocol::SessionId;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{pg_error, read_committed, PgStateStore};
use crate::{now_millis, ByteRanges, FragmentEntry, SessionRecord, SessionState, StorageError};

/// The columns a record is read from, in [`decode`]'s order.
pub(super) const COLS: &str = "record, state, received, total, updated_ms, \
    ARRAY(SELECT lower(r) FROM unnest(delivered) r ORDER BY 1) AS d_lo, \
    ARRAY(SELECT upper(r) FROM unnest(delivered) r ORDER BY 1) AS d_hi";

/// SQL predicate: the session is not a tombstone.
pub(super) const LIVE: &str = "state IN ('receiving', 'complete', 'reply-ready')";

/// SQL query: the farm's live sessions, from the trigger-kept counter (see the schema).
pub(super) const LIVE_COUNT: &str = "SELECT coalesce(sum(n), 0)::bigint FROM bitsd_live_counts";

/// SQL assignment: a reply made anew (another `created_ms`, or none) starts with no delivered
/// ranges; `$6` is the new record.
const RESET_DELIVERED: &str = "delivered = CASE WHEN (record -> 'reply' -> 'created_ms') \
    IS NOT DISTINCT FROM ($6::jsonb -> 'reply' -> 'created_ms') THEN delivered ELSE '{}' END";

/// SQL predicate: the stored record has no reply yet, or the same one as the new record `$6`
/// (its URL, its object and when it was made; the delivered ranges may differ).
const SAME_REPLY: &str = "(coalesce(record -> 'reply', 'null'::jsonb) = 'null'::jsonb \
    OR (record -> 'reply' -> 'url', record -> 'reply' -> 'kind', record -> 'reply' -> 'created_ms') \
    IS NOT DISTINCT FROM ($6::jsonb -> 'reply' -> 'url', $6::jsonb -> 'reply' -> 'kind', \
    $6::jsonb -> 'reply' -> 'created_ms'))";

/// What a guarded write found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// The write happened; the record as it now is.
    Committed(SessionRecord),
    /// Another write got there first (or the session is a tombstone): the record that won.
    Raced(SessionRecord),
    /// There is no such session.
    Missing,
}

/// What [`PgStateStore::create_limited`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The session exists now (durably).
    Created,
    /// The id is taken (nothing was written).
    Exists,
    /// The owner already has `per_user` live sessions.
    UserLimit,
    /// The farm already has `total` live sessions.
    TotalLimit,
}

/// Live-session limits checked by [`PgStateStore::create_limited`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Most live sessions one owner may have (exact: one owner's creates queue on a lock).
    pub per_user: Option<u64>,
    /// Most live sessions of the farm (exact: see `TOTAL_LIMIT_LOCK`; creates queue on one
    /// lock only within `max_connections` of the limit, and no other write takes it).
    pub total: Option<u64>,
}

/// Advisory-lock key (one `bigint`, a space apart from the per-owner two-key locks) of the
/// total limit. A create far from the limit takes it shared: its count `n` plus every
/// transaction that can be in flight at once (PostgreSQL's `max_connections`, `m`) stays
/// below the limit, so creates in flight together cannot pass it, and they do not wait for
/// each other. A create that finds `n + m` at or past the limit starts again with the lock
/// exclusive: it counts and inserts alone, with no other create in flight. The limit is
/// exact either way; only the last `max_connections` slots below it are taken one at a time.
const TOTAL_LIMIT_LOCK: i64 = 0x6269_7473_6400_0003;

/// What a guarded [`PgStateStore::save`] expects to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    /// `received` as the node read it.
    pub received: u64,
    /// The state as the node read it, when it matters.
    pub state: Option<SessionState>,
}

/// One fragment commit (see [`PgStateStore::commit_fragment`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewFragment {
    /// The session.
    pub id: SessionId,
    /// `received` as the node read it; the fragment's bytes start here.
    pub expected_received: u64,
    /// Bytes the fragment adds (the object holds `expected_received .. + len`).
    pub len: u64,
    /// CRC-32C of those bytes.
    pub crc32c: u32,
    /// The object holding them.
    pub object_key: String,
    /// The upload's size, once known (set on the first fragment).
    pub total: Option<u64>,
    /// A new state to set with the commit (e.g. `Complete` on the last byte).
    pub state: Option<SessionState>,
}

/// One fragment of the index: which object holds which bytes of the upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FragmentObject {
    /// Offset, length and checksum of the bytes.
    pub entry: FragmentEntry,
    /// The object holding them (its first byte is the upload's byte `entry.offset`).
    pub object_key: String,
}

/// What a guarded write of `id` that returned `rows` (0 or 1 of [`COLS`]) on `conn` came to:
/// the written record, or the record that stood in the way, read on this same connection:
/// asking the pool for a second one while holding this one would let writes that all lose at
/// once hold every connection, each waiting for another, until the call timeout
/// (tests/tests/farm_pg_pool.rs).
pub(super) async fn outcome_of(
    conn: &deadpool_postgres::Object,
    id: &SessionId,
    rows: &[Row],
) -> Result<CasOutcome, StorageError> {
    match rows.first() {
        Some(row) => Ok(CasOutcome::Committed(decode(row)?)),
        None => Ok(match load_on(conn, id).await? {
            Some(r) => CasOutcome::Raced(r),
            None => CasOutcome::Missing,
        }),
    }
}

/// The record of `id` read on `conn` (a connection the caller already holds).
async fn load_on(
    conn: &deadpool_postgres::Object,
    id: &SessionId,
) -> Result<Option<SessionRecord>, StorageError> {
    let stmt = conn
        .prepare_cached(&format!("SELECT {COLS} FROM bitsd_sessions WHERE id = $1"))
        .await
        .map_err(pg_error)?;
    let row = conn
        .query_opt(&stmt, &[id.as_uuid()])
        .await
        .map_err(pg_error)?;
    row.as_ref().map(decode).transpose()
}

pub(crate) fn to_i64(v: u64, what: &str) -> Result<i64, StorageError> {
    i64::try_from(v).map_err(|_| StorageError::StateStore(format!("{what} {v} is out of range")))
}

pub(super) fn opt_i64(v: Option<u64>, what: &str) -> Result<Option<i64>, StorageError> {
    v.map(|v| to_i64(v, what)).transpose()
}

pub(super) fn state_text(state: SessionState) -> &'static str {
    state.as_str()
}

/// A session state from its `state` column (`receiving`, `reply-ready`, ...).
pub(super) fn state_of(name: String) -> Result<SessionState, StorageError> {
    serde_json::from_value(serde_json::Value::String(name)).map_err(|e| StorageError::Corrupt {
        key: "bitsd_sessions".into(),
        why: format!("session state column: {e}"),
    })
}

/// A record from a row of [`COLS`].
pub(super) fn decode(row: &Row) -> Result<SessionRecord, StorageError> {
    let json: serde_json::Value = row.get(0);
    let corrupt = |why: String| StorageError::Corrupt {
        key: "bitsd_sessions".into(),
        why,
    };
    let mut record: SessionRecord =
        serde_json::from_value(json).map_err(|e| corrupt(e.to_string()))?;
    record.state = state_of(row.get(1))?;
    record.received = row.get::<_, i64>(2) as u64;
    record.total = row.get::<_, Option<i64>>(3).map(|t| t as u64);
    record.updated_ms = row.get::<_, i64>(4) as u64;
    if let Some(reply) = &mut record.reply {
        let lo: Vec<i64> = row.get(5);
        let hi: Vec<i64> = row.get(6);
        let mut ranges = ByteRanges::new();
        for (a, b) in lo.into_iter().zip(hi) {
            ranges.insert(a as u64, b as u64);
        }
        reply.delivered = ranges;
    }
    Ok(record)
}

fn encode(record: &SessionRecord) -> Result<serde_json::Value, StorageError> {
    serde_json::to_value(record).map_err(|e| StorageError::StateStore(format!("encode: {e}")))
}

impl PgStateStore {
    /// Creates `record`'s session: `true` when created (durably), `false` when the id exists.
    pub async fn create(&self, record: &SessionRecord) -> Result<bool, StorageError> {
        Ok(self.create_limited(record, Limits::default()).await? == CreateOutcome::Created)
    }

    /// Creates `record`'s session unless a limit is reached (see [`Limits`]).
    pub async fn create_limited(
        &self,
        record: &SessionRecord,
        limits: Limits,
    ) -> Result<CreateOutcome, StorageError> {
        let body = encode(record)?;
        let received = to_i64(record.received, "received")?;
        let total = opt_i64(record.total, "total")?;
        let updated = to_i64(record.updated_ms, "updated_ms")?;
        self.timed(async {
            let mut conn = self.conn().await?;
            // First with the total lock shared (creates far from the limit run in parallel),
            // then, near the limit, exclusive (see `TOTAL_LIMIT_LOCK`).
            for exclusive in [false, true] {
                // READ COMMITTED whatever the database's default: each count below must see
                // what committed while this transaction waited for its advisory lock (under
                // REPEATABLE READ the snapshot is taken before the wait, and the limits could
                // be passed).
                let tx = read_committed(&mut conn).await?;
                if let (Some(limit), Some(owner)) = (limits.per_user, &record.owner) {
                    // One owner's creates queue here, so the count cannot be passed.
                    tx.execute(
                        "SELECT pg_advisory_xact_lock(1651078003, hashtext($1))",
                        &[owner],
                    )
                    .await
                    .map_err(pg_error)?;
                    let n: i64 = tx
                        .query_one(
                            &format!(
                                "SELECT count(*) FROM bitsd_sessions WHERE owner = $1 AND {LIVE}"
                            ),
                            &[owner],
                        )
                        .await
                        .map_err(pg_error)?
                        .get(0);
                    if n as u64 >= limit {
                        return Ok(CreateOutcome::UserLimit);
                    }
                }
                if let Some(limit) = limits.total {
                    let lock = if exclusive {
                        "SELECT pg_advisory_xact_lock($1)"
                    } else {
                        "SELECT pg_advisory_xact_lock_shared($1)"
                    };
                    tx.execute(lock, &[&TOTAL_LIMIT_LOCK])
                        .await
                        .map_err(pg_error)?;
                    // A statement of its own: its snapshot is taken with the lock held. The
                    // counter's rows change in the transactions that start and end sessions,
                    // so its sum here is the count of live rows in the same snapshot.
                    let row = tx
                        .query_one(
                            &format!(
                                "SELECT ({LIVE_COUNT}),
                                        current_setting('max_connections')::int8"
                            ),
                            &[],
                        )
                        .await
                        .map_err(pg_error)?;
                    let (n, in_flight) = (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64);
                    if n >= limit {
                        return Ok(CreateOutcome::TotalLimit);
                    }
                    if !exclusive && n.saturating_add(in_flight) >= limit {
                        // Near the limit: again, alone.
                        tx.rollback().await.map_err(pg_error)?;
                        continue;
                    }
                }
                let n = tx
                    .execute(
                        "INSERT INTO bitsd_sessions
                            (id, state, owner, received, total, updated_ms, record)
                         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                        &[
                            record.id.as_uuid(),
                            &state_text(record.state),
                            &record.owner,
                            &received,
                            &total,
                            &updated,
                            &body,
                        ],
                    )
                    .await
                    .map_err(pg_error)?;
                tx.commit().await.map_err(pg_error)?;
                return Ok(if n == 1 {
                    CreateOutcome::Created
                } else {
                    CreateOutcome::Exists
                });
            }
            // The exclusive attempt always returns above.
            Err(StorageError::StateStore(
                "a limited create settled in neither attempt".into(),
            ))
        })
        .await
    }

    /// The record of `id` (live or tombstone), if there is one.
    pub async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>, StorageError> {
        self.timed(async {
            let conn = self.conn().await?;
            load_on(&conn, id).await
        })
        .await
    }

    /// Runs a guarded write of `id` (a statement returning 0 or 1 rows of [`COLS`]) and says
    /// what came of it: the written record, or the record that stood in the way.
    pub(super) async fn guarded(
        &self,
        id: &SessionId,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<CasOutcome, StorageError> {
        self.timed(async {
            let conn = self.conn().await?;
            // Prepared once per pooled connection: one round trip per call instead of two
            // (a parse-and-describe, then the execution), on every fragment's commit.
            let stmt = conn.prepare_cached(sql).await.map_err(pg_error)?;
            let rows = conn.query(&stmt, params).await.map_err(pg_error)?;
            outcome_of(&conn, id, &rows).await
        })
        .await
    }

    /// Stores `record` whole (completion, the reply) if the session is live and still as the
    /// node read it (`expect`); never moves `received` backwards.
    pub async fn save(
        &self,
        record: &SessionRecord,
        expect: Expect,
    ) -> Result<CasOutcome, StorageError> {
        if record.received < expect.received {
            return Err(StorageError::StateStore(format!(
                "refusing to move received of {} back from {} to {}",
                record.id, expect.received, record.received
            )));
        }
        let body = encode(record)?;
        let received = to_i64(record.received, "received")?;
        let total = opt_i64(record.total, "total")?;
        let updated = to_i64(record.updated_ms, "updated_ms")?;
        let expected = to_i64(expect.received, "received")?;
        let expect_state = expect.state.map(state_text);
        let sql = format!(
            "UPDATE bitsd_sessions SET state = $2, received = $3, total = $4, updated_ms = $5,
                    record = $6, {RESET_DELIVERED}
             WHERE id = $1 AND received = $7 AND {LIVE} AND ($8::text IS NULL OR state = $8)
             RETURNING {COLS}"
        );
        let params: [&(dyn ToSql + Sync); 8] = [
            record.id.as_uuid(),
            &state_text(record.state),
            &received,
            &total,
            &updated,
            &body,
            &expected,
            &expect_state,
        ];
        self.guarded(&record.id, &sql, &params).await
    }

    /// Stores `record` whole without a guard on the offset, except that `received` never goes
    /// back (the larger of the stored and the given value is kept), a tombstone stays a
    /// tombstone, and a stored reply stays the reply: a record whose reply is another (or
    /// none) does not replace it. `Raced` then carries the stored record. For writes that do
    /// not decide what is acknowledged (completion bookkeeping): two nodes may complete one
    /// session at once (a client's re-sent final fragment on another node), and the reply the
    /// first of them stored is the one its Ack handed out (tests/tests/farm_completion_race.rs).
    pub async fn put(&self, record: &SessionRecord) -> Result<CasOutcome, StorageError> {
        let body = encode(record)?;
        let received = to_i64(record.received, "received")?;
        let total = opt_i64(record.total, "total")?;
        let updated = to_i64(record.updated_ms, "updated_ms")?;
        let sql = format!(
            "UPDATE bitsd_sessions SET state = $2, received = greatest(received, $3),
                    total = coalesce($4, total), updated_ms = greatest(updated_ms, $5),
                    record = $6, {RESET_DELIVERED}
             WHERE id = $1 AND {LIVE} AND {SAME_REPLY}
             RETURNING {COLS}"
        );
        let params: [&(dyn ToSql + Sync); 6] = [
            record.id.as_uuid(),
            &state_text(record.state),
            &received,
            &total,
            &updated,
            &body,
        ];
        self.guarded(&record.id, &sql, &params).await
    }

    /// Moves the last activity of `id` forward to `updated_ms` (never back) if the session is
    /// live; nothing else of its row changes. A no-op for a tombstone or an unknown id.
    pub async fn touch(&self, id: &SessionId, updated_ms: u64) -> Result<(), StorageError> {
        let updated = to_i64(updated_ms, "updated_ms")?;
        let sql = format!(
            "UPDATE bitsd_sessions SET updated_ms = greatest(updated_ms, $2)
             WHERE id = $1 AND {LIVE}"
        );
        self.execute(&sql, &[id.as_uuid(), &updated]).await?;
        Ok(())
    }

    /// Makes `id` a tombstone (`Closed` or `Cancelled`). `Raced` carries the record when it
    /// already was one (closing twice is harmless).
    pub async fn close(
        &self,
        id: &SessionId,
        state: SessionState,
    ) -> Result<CasOutcome, StorageError> {
        if !state.is_terminal() {
            return Err(StorageError::StateStore(format!(
                "close needs a tombstone state, not {}",
                state.as_str()
            )));
        }
        let now = to_i64(now_millis(), "time")?;
        let sql = format!(
            "UPDATE bitsd_sessions SET state = $2, updated_ms = $3
             WHERE id = $1 AND {LIVE} RETURNING {COLS}"
        );
        self.guarded(id, &sql, &[id.as_uuid(), &state_text(state), &now])
            .await
    }
}
