//! The schema and its migrations, applied at start under an advisory lock so that several
//! nodes starting at once migrate it exactly once.

use super::{pg_error, PgStateStore};
use crate::StorageError;

/// The schema version this build creates and understands.
pub const SCHEMA_VERSION: i32 = 1;

/// Advisory-lock key held (per transaction) while migrating.
const MIGRATE_LOCK: i64 = 0x6269_7473_6400_0001;

/// Migration `n` takes the schema from version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1
    "CREATE TABLE bitsd_sessions (
        id          uuid PRIMARY KEY,
        state       text   NOT NULL,
        owner       text,
        received    bigint NOT NULL CHECK (received >= 0),
        total       bigint,
        updated_ms  bigint NOT NULL,
        record      jsonb  NOT NULL,
        delivered   int8multirange NOT NULL DEFAULT '{}'
    );
    CREATE INDEX bitsd_sessions_live_owner ON bitsd_sessions (owner)
        WHERE state IN ('receiving', 'complete', 'reply-ready');
    CREATE INDEX bitsd_sessions_updated ON bitsd_sessions (updated_ms);
    CREATE TABLE bitsd_fragments (
        session_id    uuid   NOT NULL REFERENCES bitsd_sessions (id) ON DELETE CASCADE,
        start_offset  bigint NOT NULL,
        len           bigint NOT NULL,
        crc32c        bigint NOT NULL,
        object_key    text   NOT NULL,
        PRIMARY KEY (session_id, start_offset)
    );
    CREATE TABLE bitsd_pending_objects (
        object_key  text   PRIMARY KEY,
        session_id  uuid   NOT NULL,
        created_ms  bigint NOT NULL
    );
    CREATE INDEX bitsd_pending_objects_created ON bitsd_pending_objects (created_ms);",
];

impl PgStateStore {
    /// Creates the schema or migrates it to [`SCHEMA_VERSION`]; idempotent, and safe when
    /// several nodes run it at once (they queue on an advisory lock; the first migrates, the
    /// others find the work done). A database migrated by a newer bitsd is refused.
    pub async fn migrate(&self) -> Result<(), StorageError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(pg_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
            .await
            .map_err(pg_error)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS bitsd_schema_version (
                version integer NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await
        .map_err(pg_error)?;
        let row = tx
            .query_one(
                "SELECT coalesce(max(version), 0) FROM bitsd_schema_version",
                &[],
            )
            .await
            .map_err(pg_error)?;
        let current: i32 = row.get(0);
        if current > SCHEMA_VERSION {
            return Err(StorageError::StateStore(format!(
                "the database's bitsd schema is version {current}, newer than this bitsd's \
                 {SCHEMA_VERSION}: upgrade bitsd on this node"
            )));
        }
        for (from, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            tx.batch_execute(sql).await.map_err(pg_error)?;
            tx.execute(
                "INSERT INTO bitsd_schema_version (version) VALUES ($1)",
                &[&(from as i32 + 1)],
            )
            .await
            .map_err(pg_error)?;
        }
        tx.commit().await.map_err(pg_error)
    }

    /// The schema version the database is at.
    pub async fn schema_version(&self) -> Result<i32, StorageError> {
        let conn = self.conn().await?;
        let row = conn
            .query_one(
                "SELECT coalesce(max(version), 0) FROM bitsd_schema_version",
                &[],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.get(0))
    }
}
