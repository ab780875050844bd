//! Storage errors.

use std::io;
use std::path::PathBuf;

/// A storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The meta store failed (the backend's own error, as text).
    #[error("meta store: {0}")]
    Meta(String),
    /// A stored record could not be decoded.
    #[error("corrupt record {key}: {why}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// What was wrong.
        why: String,
    },
    /// A background task panicked or was cancelled.
    #[error("storage task failed: {0}")]
    Task(String),
    /// The shared state store (PostgreSQL) is unreachable or did not answer in time. This is
    /// transient: the client's retry succeeds once the database is back.
    #[error("the state store is unreachable: {0} (check that PostgreSQL is running and reachable at the configured postgres_url)")]
    StateStoreUnreachable(String),
    /// The shared state store (PostgreSQL) refused an operation (a SQL error, a schema this
    /// version does not know, a value out of range).
    #[error("state store: {0}")]
    StateStore(String),
    /// The object store could not be reached or did not answer in time, or answered that it
    /// cannot serve the request now (a 5xx or 429): transient, the client should retry.
    #[error(
        "the object store is unreachable ({op} {key}): {why}; \
         check that it is up and that [object_store] endpoint points at it"
    )]
    ObjectStoreUnreachable {
        /// What was being done.
        op: &'static str,
        /// The object key (or prefix).
        key: String,
        /// The store client's error, as text.
        why: String,
    },
    /// The object store refused a request (credentials, permissions, bucket, bad request).
    #[error("object store {op} {key}: {why}; check the [object_store] bucket and credentials")]
    ObjectStore {
        /// What was being done.
        op: &'static str,
        /// The object key (or prefix).
        key: String,
        /// The store client's error, as text.
        why: String,
    },
    /// The node has no room for the request now (its `[object_store] fragment_memory` is
    /// full): transient, the client retries later.
    #[error("the node is busy: {0}")]
    Busy(String),
    /// A fragment's commit stayed open in PostgreSQL longer than its limit
    /// (`[storage] postgres_open_commit_secs`) while the object store completed the
    /// fragment's object: PostgreSQL ended it and nothing was committed. Transient: the
    /// client re-sends the fragment.
    #[error("{0}")]
    CommitOutlived(String),
    /// An object the caller expected is not in the store.
    #[error("object {key} is not in the object store")]
    ObjectNotFound {
        /// The object key.
        key: String,
    },
}

impl StorageError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> StorageError {
        let path = path.into();
        move |source| StorageError::Io { op, path, source }
    }

    /// The OS error behind this error, if it is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            StorageError::Io { source, .. } => Some(source),
            _ => None,
        }
    }

    /// Whether the error is transient: the same request may succeed when retried (the state
    /// store or the object store was unreachable, or the node was busy; nothing acknowledged
    /// was lost).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StorageError::StateStoreUnreachable(_)
                | StorageError::ObjectStoreUnreachable { .. }
                | StorageError::Busy(_)
                | StorageError::CommitOutlived(_)
        )
    }

    /// Whether this is [`StorageError::ObjectStoreUnreachable`]: a transient failure the
    /// client should retry (nothing acknowledged was lost).
    pub fn is_object_store_unreachable(&self) -> bool {
        matches!(self, StorageError::ObjectStoreUnreachable { .. })
    }

    /// Whether the disk is full (or over quota).
    pub fn is_disk_full(&self) -> bool {
        self.io_error().is_some_and(|e| {
            e.kind() == io::ErrorKind::StorageFull || e.kind() == io::ErrorKind::QuotaExceeded
        })
    }
}
