//! Counting and listing sessions across the farm.

use std::collections::HashMap;

use bitsd_protocol::SessionId;

use super::sessions::{decode, state_of, to_i64, COLS, LIVE, LIVE_COUNT};
use super::PgStateStore;
use crate::{SessionRecord, SessionState, StorageError};

impl PgStateStore {
    /// Live (not tombstoned) sessions of the farm: the sum of the trigger-kept counter
    /// (64 rows, whatever the number of sessions; see the schema's `LIVE_COUNTER`).
    pub async fn live_count(&self) -> Result<u64, StorageError> {
        self.count(LIVE_COUNT, None).await
    }

    /// Live sessions of `owner`.
    pub async fn live_count_of(&self, owner: &str) -> Result<u64, StorageError> {
        self.count(
            &format!("SELECT count(*) FROM bitsd_sessions WHERE owner = $1 AND {LIVE}"),
            Some(owner),
        )
        .await
    }

    async fn count(&self, sql: &str, owner: Option<&str>) -> Result<u64, StorageError> {
        let row = match owner {
            Some(o) => self.query_one(sql, &[&o]).await?,
            None => self.query_one(sql, &[]).await?,
        };
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// At most `limit` records (live and tombstones) whose ids follow `after`, in id order
    /// (the order of the id's 16 bytes).
    pub async fn list_page(
        &self,
        after: Option<&SessionId>,
        limit: usize,
    ) -> Result<Vec<SessionRecord>, StorageError> {
        let limit = limit.min(i64::MAX as usize) as i64;
        let after = after.map(|a| *a.as_uuid());
        let rows = self
            .query(
                &format!(
                    "SELECT {COLS} FROM bitsd_sessions
                     WHERE $1::uuid IS NULL OR id > $1 ORDER BY id LIMIT $2"
                ),
                &[&after, &limit],
            )
            .await?;
        rows.iter().map(decode).collect()
    }

    /// At most `limit` records (live and tombstones) untouched since `updated_before_ms`,
    /// oldest first: the sweeper's candidates.
    pub async fn idle_sessions(
        &self,
        updated_before_ms: u64,
        limit: usize,
    ) -> Result<Vec<SessionRecord>, StorageError> {
        let before = to_i64(updated_before_ms, "time")?;
        let limit = limit.min(i64::MAX as usize) as i64;
        let rows = self
            .query(
                &format!(
                    // The index is on the minute (schema version 4): the rows of the
                    // cutoff's own minute are filtered on the exact time.
                    "SELECT {COLS} FROM bitsd_sessions
                     WHERE idle_minute <= $1::bigint / 60000 AND updated_ms < $1
                     ORDER BY idle_minute, updated_ms LIMIT $2"
                ),
                &[&before, &limit],
            )
            .await?;
        rows.iter().map(decode).collect()
    }

    /// Live sessions of the farm in total, and per owner (sessions without an owner count
    /// only in the total). One indexed query.
    pub async fn live_counts(&self) -> Result<(u64, HashMap<String, u64>), StorageError> {
        let rows = self
            .query(
                &format!("SELECT owner, count(*) FROM bitsd_sessions WHERE {LIVE} GROUP BY owner"),
                &[],
            )
            .await?;
        let mut total = 0;
        let mut per_user = HashMap::new();
        for row in rows {
            let n = row.get::<_, i64>(1) as u64;
            total += n;
            if let Some(owner) = row.get::<_, Option<String>>(0) {
                per_user.insert(owner, n);
            }
        }
        Ok((total, per_user))
    }

    /// Records of the farm (live and tombstones) per state: one `GROUP BY` over the state
    /// column, whatever the number of sessions (what `/metrics` reports).
    pub async fn count_by_state(&self) -> Result<HashMap<SessionState, u64>, StorageError> {
        let rows = self
            .query(
                "SELECT state, count(*) FROM bitsd_sessions GROUP BY state",
                &[],
            )
            .await?;
        let mut counts = HashMap::new();
        for row in rows {
            let state = state_of(row.get(0))?;
            counts.insert(state, row.get::<_, i64>(1) as u64);
        }
        Ok(counts)
    }

    /// Every record of the farm, tombstones included (read in pages of 1000).
    pub async fn list(&self) -> Result<Vec<SessionRecord>, StorageError> {
        let mut all = Vec::new();
        let mut after: Option<SessionId> = None;
        loop {
            let page = self.list_page(after.as_ref(), 1000).await?;
            let done = page.len() < 1000;
            after = page.last().map(|r| r.id);
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }
}
