//! A fragment's commit: the compare-and-set that advances a session's acknowledged offset,
//! records the fragment's object in the index and drops its pending-object row, in one
//! statement; and the same statement run while the store completes the object, with only
//! `COMMIT` after the store's answer ([`PgStateStore::commit_pending_fragment_during`]).

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use deadpool_postgres::Object;
use tokio_postgres::types::ToSql;

use super::sessions::{opt_i64, outcome_of, state_text, to_i64, CasOutcome, NewFragment, COLS};
use super::{pg_error, PgStateStore};
use crate::{now_millis, StorageError};

/// The statement of a fragment commit (`fenced`: it also requires the object's pending row,
/// locking it; `open`: it also requires the transaction [`begin`] starts, and changes nothing
/// in any other). Its parameters are [`CommitParams::list`]'s. Made once per variant (it is
/// the key of each connection's cache of prepared statements).
fn commit_sql(fenced: bool, open: bool) -> &'static str {
    static MADE: [OnceLock<String>; 4] = [const { OnceLock::new() }; 4];
    MADE[usize::from(fenced) * 2 + usize::from(open)].get_or_init(|| make_commit_sql(fenced, open))
}

fn make_commit_sql(fenced: bool, open: bool) -> String {
    let fence = if fenced {
        "AND EXISTS (SELECT 1 FROM bitsd_pending_objects WHERE object_key = $9 FOR UPDATE)"
    } else {
        ""
    };
    let open = if open {
        "AND current_setting('bitsd.open_commit', true) = 'on'"
    } else {
        ""
    };
    format!(
        "WITH upd AS (
            UPDATE bitsd_sessions
               SET received = $3, total = coalesce($4, total),
                   state = coalesce($5, state), updated_ms = $6
             WHERE id = $1 AND received = $2 AND state = 'receiving'
               AND ($4::bigint IS NULL OR total IS NULL OR total = $4) {fence} {open}
             RETURNING *),
         frag AS (
            INSERT INTO bitsd_fragments (session_id, start_offset, len, crc32c, object_key)
            SELECT id, $2, $7, $8, $9 FROM upd),
         pend AS (
            DELETE FROM bitsd_pending_objects
             WHERE object_key = $9 AND EXISTS (SELECT 1 FROM upd))
         SELECT {COLS} FROM upd"
    )
}

/// What starts the transaction of [`PgStateStore::commit_pending_fragment_during`]: READ
/// COMMITTED (as a statement of its own would run), ended by PostgreSQL if it stays open
/// longer than `limit` between statements (a node cut off from PostgreSQL without its
/// connection closing, or a store that does not answer), so no session row stays locked
/// longer: the node's `COMMIT` then fails, the packet gets a transient 503 and nothing was
/// committed. (At least 1 ms: 0 would mean no limit.) It also sets `bitsd.open_commit` for
/// the transaction, which the commit's statement (sent right behind it, before its answer)
/// requires: were `BEGIN` ever to fail, the statement, run on its own and committed at once,
/// would change nothing.
pub(super) fn begin(limit: Duration) -> String {
    let ms = limit.as_millis().clamp(1, i32::MAX as u128);
    format!(
        "BEGIN ISOLATION LEVEL READ COMMITTED; \
         SET LOCAL idle_in_transaction_session_timeout = {ms}; \
         SET LOCAL bitsd.open_commit = on"
    )
}

/// A commit's values in PostgreSQL's types.
struct CommitParams<'a> {
    c: &'a NewFragment,
    expected: i64,
    new_received: i64,
    total: Option<i64>,
    state: Option<&'static str>,
    now: i64,
    len: i64,
    crc: i64,
}

impl<'a> CommitParams<'a> {
    fn new(c: &'a NewFragment) -> Result<Self, StorageError> {
        if c.len == 0 {
            return Err(StorageError::StateStore(
                "a fragment commit must add bytes".into(),
            ));
        }
        let expected = to_i64(c.expected_received, "received")?;
        let len = to_i64(c.len, "fragment length")?;
        let new_received = expected
            .checked_add(len)
            .ok_or_else(|| StorageError::StateStore("received overflows".into()))?;
        Ok(CommitParams {
            c,
            expected,
            new_received,
            total: opt_i64(c.total, "total")?,
            state: c.state.map(state_text),
            now: to_i64(now_millis(), "time")?,
            len,
            crc: i64::from(c.crc32c),
        })
    }

    /// `$1` … `$9` of [`commit_sql`].
    fn list(&self) -> [&(dyn ToSql + Sync); 9] {
        [
            self.c.id.as_uuid(),
            &self.expected,
            &self.new_received,
            &self.total,
            &self.state,
            &self.now,
            &self.len,
            &self.crc,
            &self.c.object_key,
        ]
    }
}

/// A pooled connection inside a transaction that is not over. Ended with `COMMIT` or
/// `ROLLBACK` it goes back to the pool; dropped before (a failed call, a timeout, the
/// packet's future dropped) it is taken out of the pool and closed, so PostgreSQL rolls the
/// transaction back and no later call ever runs inside it.
struct OpenTransaction(Option<Object>);

impl OpenTransaction {
    fn conn(&self) -> Result<&Object, StorageError> {
        self.0
            .as_ref()
            .ok_or_else(|| StorageError::StateStore("the transaction is over".into()))
    }

    /// Ends the transaction with `sql` (`COMMIT` or `ROLLBACK`).
    async fn end(mut self, sql: &str) -> Result<(), StorageError> {
        self.conn()?.batch_execute(sql).await.map_err(pg_error)?;
        // Over: the connection goes back to the pool as it is.
        drop(self.0.take());
        Ok(())
    }
}

impl Drop for OpenTransaction {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(Object::take(conn));
        }
    }
}

impl PgStateStore {
    /// Commits one fragment: in one statement (one transaction, one round trip), advances
    /// `received` from `expected_received` to `expected_received + len` only if the session is
    /// still receiving (a complete or ended session takes no more bytes), `received` still
    /// equals `expected_received` and the upload's total, once set, is the one the fragment
    /// was checked against, records the fragment's object in
    /// the index and drops its pending-object row. `Raced` carries the record that won (its
    /// `received` is what the client is told); the caller then deletes its object and calls
    /// [`PgStateStore::forget_pending_object`] (or leaves both to the sweeper).
    pub async fn commit_fragment(&self, c: &NewFragment) -> Result<CasOutcome, StorageError> {
        let p = CommitParams::new(c)?;
        self.guarded(&c.id, commit_sql(false, false), &p.list())
            .await
    }

    /// [`PgStateStore::commit_fragment`] that also requires the object's pending row (written
    /// by [`PgStateStore::add_pending_object`] before the object) to be there still: the row
    /// is locked for the statement, so the pending-object collector
    /// ([`PgStateStore::claim_stale_pending_objects`]), which deletes the row before it
    /// deletes the object, and this commit exclude each other. A commit whose row was claimed
    /// answers `Raced` with the unchanged offset (the client re-sends the fragment); it never
    /// references an object the collector deletes. What the shared backend's fragments use.
    pub async fn commit_pending_fragment(
        &self,
        c: &NewFragment,
    ) -> Result<CasOutcome, StorageError> {
        let p = CommitParams::new(c)?;
        self.guarded(&c.id, commit_sql(true, false), &p.list())
            .await
    }

    /// [`PgStateStore::commit_pending_fragment`] while `store` (the store completing the
    /// fragment's object) runs, so the commit's statement does not wait for the store's
    /// answer and only `COMMIT` does. The order is that of a commit after the store:
    ///
    /// 1. `BEGIN` and the commit's statement, alongside `store`: the session's row and the
    ///    object's pending row are locked, the new offset is written but not committed, so
    ///    no other transaction sees it (nor can another commit of the session pass it: it
    ///    waits for this one's end, then finds the offset it expected gone or still there).
    /// 2. `store` answers. Only when it stored the object, and the statement won, does
    ///    `COMMIT` make the offset durable; otherwise `ROLLBACK`, and the store's error or
    ///    the record that won comes back as from a commit after the store.
    ///
    /// A node that dies in between leaves no commit: PostgreSQL rolls back the transaction of
    /// a closed connection, and ends one left open longer than
    /// [`PgOptions::open_commit_limit`](super::PgOptions::open_commit_limit). The transaction
    /// holds a pooled connection for the store's time, so at most half the pool does so at
    /// once; past that (or with a pool of one), the commit waits for `store` and runs as
    /// [`PgStateStore::commit_pending_fragment`] does.
    pub async fn commit_pending_fragment_during<T>(
        &self,
        c: &NewFragment,
        store: impl Future<Output = Result<T, StorageError>>,
    ) -> Result<(T, CasOutcome), StorageError> {
        let Ok(_permit) = self.overlap.clone().try_acquire_owned() else {
            let stored = store.await?;
            return Ok((stored, self.commit_pending_fragment(c).await?));
        };
        let p = CommitParams::new(c)?;
        let sql = commit_sql(true, true);
        let opened = Instant::now();
        let statement = self.timed(async {
            let open = OpenTransaction(Some(self.conn().await?));
            let conn = open.conn()?;
            let stmt = conn.prepare_cached(sql).await.map_err(pg_error)?;
            // `BEGIN` and the statement in one round trip: both are sent before either answer
            // is read (a connection sends its requests in the order they are first polled).
            let params = p.list();
            let (begun, rows) = tokio::join!(
                conn.batch_execute(&self.begin_open_commit),
                conn.query(&stmt, &params)
            );
            begun.map_err(pg_error)?;
            let rows = rows.map_err(pg_error)?;
            // A lost race's record is read in this transaction (a statement of its own sees
            // what committed before it).
            let outcome = outcome_of(conn, &c.id, &rows).await?;
            Ok((open, outcome))
        });
        let (stored, statement) = tokio::join!(store, statement);
        let stored = match stored {
            Ok(stored) => stored,
            Err(e) => {
                if let Ok((open, _)) = statement {
                    let _ = self.timed(open.end("ROLLBACK")).await;
                }
                return Err(e);
            }
        };
        let (open, outcome) = statement?;
        match outcome {
            CasOutcome::Committed(_) => {
                if let Err(e) = self.timed(open.end("COMMIT")).await {
                    return Err(self.outlived(e, opened.elapsed()));
                }
            }
            // Nothing was written: a failed rollback only closes the connection.
            _ => {
                let _ = self.timed(open.end("ROLLBACK")).await;
            }
        }
        Ok((stored, outcome))
    }

    /// A failed `COMMIT` of a transaction open `open` long: past
    /// [`PgOptions::open_commit_limit`](super::PgOptions::open_commit_limit), PostgreSQL ended
    /// it (its connection closes, so the error alone would read as PostgreSQL being down).
    fn outlived(&self, e: StorageError, open: Duration) -> StorageError {
        if open < self.open_commit_limit {
            return e;
        }
        tracing::debug!(error = %e, "the COMMIT of a transaction open past its limit failed");
        StorageError::CommitOutlived(format!(
            "a fragment's commit stayed open {:.1} s while the object store completed its \
             object, longer than postgres_open_commit_secs ({} s): PostgreSQL ended it and \
             nothing was committed; the client re-sends the fragment (a store this slow needs \
             a larger postgres_open_commit_secs)",
            open.as_secs_f64(),
            self.open_commit_limit.as_secs_f64(),
        ))
    }
}
