//! One statement on a pooled connection under the call timeout, which is what most calls of
//! [`PgStateStore`] are. A statement is prepared once per connection and cached by its text,
//! so the text must come from a bounded set (SQL with constants formatted in; values go in
//! parameters).

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{pg_error, PgStateStore};
use crate::StorageError;

/// A statement's parameters.
pub(super) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl PgStateStore {
    /// The rows `sql` returns.
    pub(super) async fn query(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, StorageError> {
        self.timed(async {
            let conn = self.conn().await?;
            let stmt = conn.prepare_cached(sql).await.map_err(pg_error)?;
            conn.query(&stmt, params).await.map_err(pg_error)
        })
        .await
    }

    /// The row `sql` returns, if any (more than one is an error).
    pub(super) async fn query_opt(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<Row>, StorageError> {
        self.timed(async {
            let conn = self.conn().await?;
            let stmt = conn.prepare_cached(sql).await.map_err(pg_error)?;
            conn.query_opt(&stmt, params).await.map_err(pg_error)
        })
        .await
    }

    /// The one row `sql` returns (none, or more than one, is an error).
    pub(super) async fn query_one(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Row, StorageError> {
        self.timed(async {
            let conn = self.conn().await?;
            let stmt = conn.prepare_cached(sql).await.map_err(pg_error)?;
            conn.query_one(&stmt, params).await.map_err(pg_error)
        })
        .await
    }

    /// How many rows `sql` changed.
    pub(super) async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, StorageError> {
        self.timed(async {
            let conn = self.conn().await?;
            let stmt = conn.prepare_cached(sql).await.map_err(pg_error)?;
            conn.execute(&stmt, params).await.map_err(pg_error)
        })
        .await
    }
}
