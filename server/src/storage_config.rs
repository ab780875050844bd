//! Which storage backend a server runs on: the local one (sled + files under `data_dir`, the
//! default) or the shared farm backend (PostgreSQL + an object store).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bitsd_storage::shared::objects::ObjectStoreConfig;
use bitsd_storage::shared::pg::PgOptions;
use bitsd_storage::shared::SharedBackend;
use bitsd_storage::{SessionBackend, StorageError};

/// The environment variable that supplies `postgres_url` when the file does not.
pub const POSTGRES_URL_ENV: &str = "BITSD_POSTGRES_URL";

/// Where sessions and bytes live.
#[derive(Clone, Debug, Default)]
pub enum StorageConfig {
    /// sled + files under `data_dir`, no other process (the default).
    #[default]
    Local,
    /// A farm: session state in PostgreSQL, bytes in an object store; any node continues any
    /// session.
    Shared(Box<SharedStorage>),
}

/// The shared backend's settings (`[storage]` with `backend = "shared"`, and `[object_store]`).
#[derive(Clone)]
pub struct SharedStorage {
    /// `postgres://user:password@host:port/database`.
    pub postgres_url: String,
    /// Connections in this node's pool.
    pub postgres_max_connections: usize,
    /// The longest one PostgreSQL call may take before it fails as unreachable (transient).
    pub postgres_timeout: Duration,
    /// The longest a fragment's commit may stay open, its statement run, while the store
    /// completes the object; past it PostgreSQL ends the transaction (the packet gets a 503).
    pub postgres_open_commit: Duration,
    /// The bucket.
    pub object_store: ObjectStoreConfig,
}

impl std::fmt::Debug for SharedStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStorage")
            .field("postgres_url", &redact_url(&self.postgres_url))
            .field("postgres_max_connections", &self.postgres_max_connections)
            .field("postgres_timeout", &self.postgres_timeout)
            .field("postgres_open_commit", &self.postgres_open_commit)
            .field("object_store", &self.object_store)
            .finish()
    }
}

/// `postgres_url` without its password (for logs and `check-config`).
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:<redacted>{}",
                    &url[..s + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl StorageConfig {
    /// `"local"` or `"shared"`.
    pub fn name(&self) -> &'static str {
        match self {
            StorageConfig::Local => "local",
            StorageConfig::Shared(_) => "shared",
        }
    }
}

/// Connects the shared backend; temporary copies of uploads for reply handlers go under
/// `data_dir/shared-tmp`.
pub(crate) async fn open_shared(
    shared: &SharedStorage,
    data_dir: &Path,
) -> Result<Arc<dyn SessionBackend>, StorageError> {
    let scratch = data_dir.join("shared-tmp");
    // Leftovers of a crashed process (nothing in them is needed).
    let _ = std::fs::remove_dir_all(&scratch);
    let backend = SharedBackend::connect(
        &shared.postgres_url,
        PgOptions {
            max_connections: shared.postgres_max_connections,
            timeout: shared.postgres_timeout,
            open_commit_limit: shared.postgres_open_commit,
        },
        &shared.object_store,
        scratch,
    )
    .await?;
    Ok(Arc::new(backend))
}
