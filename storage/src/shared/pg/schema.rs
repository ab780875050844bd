//! The schema and its migrations, applied at start under an advisory lock so that several
//! nodes starting at once migrate it exactly once.

use super::{pg_error, PgStateStore};
use crate::StorageError;

/// The schema version this build creates and understands.
pub const SCHEMA_VERSION: i32 = 6;

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
    // 1 -> 2: the live-session counter (see `LIVE_COUNTER`).
    LIVE_COUNTER,
    // 2 -> 3: the counter's trigger takes a shard no other transaction holds (see
    // `COUNT_LIVE_SKIPPING`).
    COUNT_LIVE_SKIPPING,
    // 3 -> 4: session updates in place (see `UPDATES_IN_PLACE`).
    UPDATES_IN_PLACE,
    // 4 -> 5: assembly journals (see `ASSEMBLY_JOURNALS`).
    ASSEMBLY_JOURNALS,
    // 5 -> 6: one attempt at a time works on an assembly (see `ASSEMBLY_LEASES`).
    ASSEMBLY_LEASES,
];

/// The attempt that works on an assembly now (`holder`, a random id per attempt) and until
/// when, by PostgreSQL's clock, unless it renews its lease (`held_until_ms`). Another attempt
/// (the client's re-sent final fragment on another node) waits for the lease to end instead
/// of sending the same parts at once: a store completing an upload while a part of it is
/// sent again refuses the completion (Garage: `InvalidPart`). A killed node's lease runs
/// out, and the next attempt takes the assembly over.
const ASSEMBLY_LEASES: &str = "ALTER TABLE bitsd_assemblies
        ADD COLUMN holder uuid,
        ADD COLUMN held_until_ms bigint NOT NULL DEFAULT 0;";

/// The multipart upload of an assembly in progress and its parts the store answered, so that
/// the next attempt (on any node) goes on with them (`crate::shared::objects::AssemblyJournal`).
/// One per session and `slot` (the destination of a plain upload, `reply` for a reply). Rows
/// go with their session; a session's end aborts the uploads still recorded first.
const ASSEMBLY_JOURNALS: &str = "CREATE TABLE bitsd_assemblies (
        session_id  uuid   NOT NULL REFERENCES bitsd_sessions (id) ON DELETE CASCADE,
        slot        text   NOT NULL,
        object_key  text   NOT NULL,
        upload_id   text   NOT NULL,
        created_ms  bigint NOT NULL,
        PRIMARY KEY (session_id, slot)
    );
    CREATE TABLE bitsd_assembly_parts (
        session_id   uuid   NOT NULL,
        slot         text   NOT NULL,
        part_number  integer NOT NULL,
        start_offset bigint NOT NULL,
        end_offset   bigint NOT NULL,
        etag         text   NOT NULL,
        PRIMARY KEY (session_id, slot, part_number),
        FOREIGN KEY (session_id, slot) REFERENCES bitsd_assemblies (session_id, slot)
            ON DELETE CASCADE
    );";

/// Live sessions counted by triggers in 64 shard rows, so that a Create-Session under a total
/// limit sums 64 small rows instead of counting every live session (`count(*)` grows with the
/// farm). A session's shard is `hashtext(id::text) & 63`; a row's count changes only when a
/// session enters or leaves the live states (`receiving`, `complete`, `reply-ready`): its
/// insert, its delete, or an update of `state` across that line. Every bitsd statement writes
/// one session row, so a transaction holds at most one shard row and two can never deadlock
/// on them; with this version's trigger two sessions waited for each other when they shared a
/// shard and both started or ended at once (version 3's trigger skips held rows:
/// [`COUNT_LIVE_SKIPPING`]). The shard row is updated in the transaction that changes
/// the session, so the counter's sum in any snapshot equals a count of live rows in it.
///
/// The table is locked against writes first: a node of the old version creating sessions while
/// this migrates waits, and its session is counted by the trigger once it goes on.
const LIVE_COUNTER: &str = "LOCK TABLE bitsd_sessions IN SHARE ROW EXCLUSIVE MODE;
    CREATE TABLE bitsd_live_counts (
        shard integer PRIMARY KEY,
        n     bigint  NOT NULL
    ) WITH (fillfactor = 50);
    INSERT INTO bitsd_live_counts (shard, n)
        SELECT s.shard, coalesce(c.n, 0)
          FROM generate_series(0, 63) AS s (shard)
          LEFT JOIN (SELECT hashtext(id::text) & 63 AS shard, count(*) AS n
                       FROM bitsd_sessions
                      WHERE state IN ('receiving', 'complete', 'reply-ready')
                      GROUP BY 1) AS c USING (shard);
    CREATE FUNCTION bitsd_count_live() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        was_live boolean := false;
        is_live  boolean := false;
        sid      uuid;
    BEGIN
        IF TG_OP <> 'INSERT' THEN
            was_live := OLD.state IN ('receiving', 'complete', 'reply-ready');
            sid := OLD.id;
        END IF;
        IF TG_OP <> 'DELETE' THEN
            is_live := NEW.state IN ('receiving', 'complete', 'reply-ready');
            sid := NEW.id;
        END IF;
        IF was_live <> is_live THEN
            UPDATE bitsd_live_counts
               SET n = n + CASE WHEN is_live THEN 1 ELSE -1 END
             WHERE shard = hashtext(sid::text) & 63;
        END IF;
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER bitsd_live_count_rows AFTER INSERT OR DELETE ON bitsd_sessions
        FOR EACH ROW EXECUTE FUNCTION bitsd_count_live();
    CREATE TRIGGER bitsd_live_count_state AFTER UPDATE OF state ON bitsd_sessions
        FOR EACH ROW
        WHEN ((OLD.state IN ('receiving', 'complete', 'reply-ready'))
              IS DISTINCT FROM (NEW.state IN ('receiving', 'complete', 'reply-ready')))
        EXECUTE FUNCTION bitsd_count_live();";

/// The counter's trigger from version 3 on. What counts is the sum of the 64 rows, not which
/// row holds which session, so a session entering or leaving the live states updates the
/// first shard row, from its own (`hashtext(id::text) & 63`) on, that **no other transaction
/// holds** (`FOR UPDATE SKIP LOCKED`): Create-Sessions and ends of different sessions never
/// wait for each other on the counter while fewer than 64 of them commit at once (with
/// version 2 two sessions of one shard waited for each other's commit, WAL flush included).
/// Only when all 64 rows are held does it wait, for the session's own row. Every bitsd
/// statement writes one session row, so a transaction holds at most one shard row and waits,
/// if ever, while holding none: no deadlock. (A session's +1 and its -1 may land on
/// different rows; a row can go negative; the sum stays exact.)
const COUNT_LIVE_SKIPPING: &str = "CREATE OR REPLACE FUNCTION bitsd_count_live()
    RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        was_live boolean := false;
        is_live  boolean := false;
        sid      uuid;
        own      integer;
        picked   integer;
    BEGIN
        IF TG_OP <> 'INSERT' THEN
            was_live := OLD.state IN ('receiving', 'complete', 'reply-ready');
            sid := OLD.id;
        END IF;
        IF TG_OP <> 'DELETE' THEN
            is_live := NEW.state IN ('receiving', 'complete', 'reply-ready');
            sid := NEW.id;
        END IF;
        IF was_live <> is_live THEN
            own := hashtext(sid::text) & 63;
            SELECT shard INTO picked FROM bitsd_live_counts
             ORDER BY (shard - own) & 63
             LIMIT 1 FOR UPDATE SKIP LOCKED;
            UPDATE bitsd_live_counts
               SET n = n + CASE WHEN is_live THEN 1 ELSE -1 END
             WHERE shard = coalesce(picked, own);
        END IF;
        RETURN NULL;
    END
    $$;";

/// Version 4: a fragment's commit updates its session's row in place (a heap-only tuple, HOT)
/// instead of adding a new entry to each of the table's three indexes. Every commit sets
/// `updated_ms`, and an update that changes an indexed column cannot be HOT; the sweeper's
/// index on `updated_ms` is replaced by one on the minute it falls in (`idle_minute`, a stored
/// generated column), which changes at most once a minute per session. The table's pages keep
/// 30 % free (`fillfactor`) so the new version of a row fits beside the old one. Fewer index
/// writes, less WAL and less for autovacuum to clean per fragment.
///
/// Adding the column rewrites the table under an exclusive lock: nodes wait for it (its time
/// grows with the table). The old index goes first so the rewrite does not rebuild it, and
/// the table is analyzed at the end so the planner knows the new column at once. Nodes of
/// version 3 still running meanwhile keep working against it (they set `updated_ms`; the
/// column follows), but their sweeper's query (`ORDER BY updated_ms`) has no index any more
/// and reads the whole table.
const UPDATES_IN_PLACE: &str = "DROP INDEX bitsd_sessions_updated;
    ALTER TABLE bitsd_sessions
        ADD COLUMN idle_minute bigint GENERATED ALWAYS AS (updated_ms / 60000) STORED,
        SET (fillfactor = 70);
    CREATE INDEX bitsd_sessions_idle ON bitsd_sessions (idle_minute);
    ANALYZE bitsd_sessions;";

impl PgStateStore {
    /// Creates the schema or migrates it to [`SCHEMA_VERSION`]; idempotent, and safe when
    /// several nodes run it at once (they queue on an advisory lock; the first migrates, the
    /// others find the work done). A database migrated by a newer bitsd is refused.
    pub async fn migrate(&self) -> Result<(), StorageError> {
        let mut conn = self.conn().await?;
        let tx = super::read_committed(&mut conn).await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
            .await
            .map_err(pg_error)?;
        // `IF NOT EXISTS` on a migrated database is PostgreSQL's NOTICE "already exists,
        // skipping", which the client would log at every start: notices stay quiet here.
        tx.batch_execute(
            "SET LOCAL client_min_messages = warning;
             CREATE TABLE IF NOT EXISTS bitsd_schema_version (
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
