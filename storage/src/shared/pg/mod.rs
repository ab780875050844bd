//! Session state of a farm in PostgreSQL: the one point of truth for what is acknowledged.
//!
//! [`PgStateStore`] holds session records, the acknowledged offset, the fragment index (which
//! object holds which bytes), reply progress as distinct ranges, tombstones, per-user and total
//! live-session counts, the sweeper's single-node lock and the bookkeeping that lets a sweeper
//! find objects no commit ever referenced. Every node of a farm opens one over its own
//! connection pool; nothing in it is cached per node, so any node can continue any session.
//!
//! What each call guarantees (every call that writes is one PostgreSQL transaction, durable
//! when it returns with PostgreSQL's `synchronous_commit = on`):
//! - [`PgStateStore::create`]: the record exists, or the call says the id was taken.
//! - [`PgStateStore::commit_fragment`]: one statement that advances `received` only if it
//!   still equals the value the node read, records the fragment's object in the index and
//!   drops its pending-object row, all or nothing; of several nodes racing on one session
//!   exactly one wins each offset, and the losers get the record that won.
//! - [`PgStateStore::record_reply_range`]: the range is added to the session's set of
//!   delivered ranges (`int8multirange`), so bytes served by any node count once.
//! - [`PgStateStore::try_sweeper_lock`]: at most one node of the farm holds the lock; it is
//!   released when its holder drops it or its connection dies.
//!
//! Connection failures, a database that is shutting down or restarting, and calls that take
//! longer than [`PgOptions::timeout`] come back as [`StorageError::StateStoreUnreachable`]
//! (transient: the server answers the packet with a 5xx and the client retries).

mod assembly;
mod call;
mod coalesce;
mod fragment_commit;
mod gc;
mod listing;
mod reply;
mod schema;
mod sessions;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, QueueMode, RecyclingMethod, Runtime,
};
use tokio::sync::Semaphore;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::StorageError;

pub use assembly::{AssemblyClaim, RecordedAssembly, RecordedPart};
pub use gc::{PendingObject, SweeperLock};
pub use schema::SCHEMA_VERSION;
pub use sessions::{CasOutcome, CreateOutcome, Expect, FragmentObject, Limits, NewFragment};

/// How a [`PgStateStore`] connects.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Connections in this node's pool (each a PostgreSQL backend process).
    pub max_connections: usize,
    /// The longest a call may take (waiting for a connection, connecting, or running its
    /// statements) before it fails as unreachable.
    pub timeout: Duration,
    /// The longest a fragment's commit may stay open, its statement run, while the store
    /// completes the object ([`PgStateStore::commit_pending_fragment_during`]): past it
    /// PostgreSQL ends the transaction and its connection
    /// (`idle_in_transaction_session_timeout`), so a node cut off from PostgreSQL without its
    /// connection closing cannot keep a session's row locked longer. Whole milliseconds.
    pub open_commit_limit: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 16,
            timeout: Duration::from_secs(5),
            open_commit_limit: Duration::from_secs(60),
        }
    }
}

/// The farm's session state in one PostgreSQL database (see the module docs).
#[derive(Clone)]
pub struct PgStateStore {
    pool: Pool,
    config: tokio_postgres::Config,
    timeout: Duration,
    /// Permits for commits whose statement runs while the store completes the object
    /// (`fragment_commit.rs`): each holds a connection meanwhile; half the pool at most.
    overlap: Arc<Semaphore>,
    /// What starts such a commit's transaction (with [`PgOptions::open_commit_limit`]).
    begin_open_commit: Arc<str>,
    /// [`PgOptions::open_commit_limit`], to say so when a commit's transaction outlived it.
    open_commit_limit: Duration,
}

impl std::fmt::Debug for PgStateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStateStore")
            .field("status", &self.pool.status())
            .finish()
    }
}

impl PgStateStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`), then creates or
    /// migrates the schema (safe when several nodes start at once).
    pub async fn connect(url: &str, options: PgOptions) -> Result<Self, StorageError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            StorageError::StateStore(format!(
                "postgres_url is not a valid PostgreSQL URL ({e}); expected postgres://user:password@host:port/database"
            ))
        })?;
        config.connect_timeout(options.timeout);
        if config.get_application_name().is_none() {
            config.application_name("bitsd");
        }
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.max_connections.max(1))
            // The connection returned last is taken first: under a light or middling load
            // a few backends stay busy and warm instead of every one of them in turn
            // (docs/farm-performance-log-4.md, "The pool's order").
            .queue_mode(QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.timeout))
            .create_timeout(Some(options.timeout))
            .recycle_timeout(Some(options.timeout))
            .build()
            .map_err(|e| StorageError::StateStore(format!("connection pool: {e}")))?;
        let store = PgStateStore {
            pool,
            config,
            timeout: options.timeout,
            overlap: Arc::new(Semaphore::new(options.max_connections / 2)),
            begin_open_commit: fragment_commit::begin(options.open_commit_limit).into(),
            open_commit_limit: options.open_commit_limit,
        };
        store.migrate().await?;
        Ok(store)
    }

    /// A pooled connection.
    async fn conn(&self) -> Result<Object, StorageError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// This node's pool of connections now.
    pub fn pool(&self) -> crate::ConnectionPool {
        let status = self.pool.status();
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        crate::ConnectionPool {
            max: n(status.max_size),
            open: n(status.size),
            idle: n(status.available),
            waiting: n(status.waiting),
        }
    }

    /// Runs `fut` under the call timeout.
    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StorageError::StateStoreUnreachable(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }
}

/// Maps a PostgreSQL error: connection trouble and a server going away are transient.
pub(crate) fn pg_error(e: tokio_postgres::Error) -> StorageError {
    let transient = match e.code() {
        None => true, // no SQLSTATE: the connection failed or closed (I/O, EOF, timeout)
        Some(code) => {
            let c = code.code();
            c.starts_with("08") // connection exception
                || c.starts_with("57P") // admin/crash shutdown, cannot connect now
                || c.starts_with("53") // insufficient resources (too many connections, disk full)
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::READ_ONLY_SQL_TRANSACTION // a standby during failover
                // a commit left open past `open_commit_limit`: ended, nothing committed
                || *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
        }
    };
    let text = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    };
    if transient {
        StorageError::StateStoreUnreachable(text)
    } else {
        StorageError::StateStore(text)
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StorageError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_error(e),
        other => StorageError::StateStoreUnreachable(other.to_string()),
    }
}

/// The CTE that makes a single statement's transaction commit without waiting for the WAL
/// flush: `set_config(.., true)` lasts for that transaction only, never for the pooled
/// connection's next one. `MATERIALIZED` and a `FROM cfg` in the statement make it run.
/// Used as `WITH {NO_FLUSH_CTE} ...` (tests/tests/farm_pg_wal.rs checks each user).
pub(super) const NO_FLUSH_CTE: &str =
    "cfg AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true))";

/// Starts a transaction at READ COMMITTED, whatever the database's or role's
/// `default_transaction_isolation`: bitsd's explicit transactions wait for advisory locks and
/// then read what committed meanwhile, which a snapshot taken at a higher level (before the
/// wait) would not show.
pub(super) async fn read_committed(
    conn: &mut Object,
) -> Result<deadpool_postgres::Transaction<'_>, StorageError> {
    conn.build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
        .start()
        .await
        .map_err(pg_error)
}
