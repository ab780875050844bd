//! The `[storage]` and `[object_store]` tables: which backend the server runs on.

use std::time::Duration;

use bitsd_storage::shared::objects::ObjectStoreConfig;

use super::StorageEntry;
use crate::storage_config::{SharedStorage, StorageConfig, POSTGRES_URL_ENV};

/// Builds the storage choice from the two tables (both optional: local by default).
pub(super) fn build_storage(
    entry: Option<StorageEntry>,
    object_store: Option<ObjectStoreConfig>,
) -> Result<StorageConfig, String> {
    let backend = entry
        .as_ref()
        .and_then(|e| e.backend.clone())
        .unwrap_or_else(|| "local".to_owned());
    match backend.as_str() {
        "local" => {
            if object_store.is_some() {
                return Err(
                    "[object_store] is only used with [storage] backend = \"shared\"; \
                            set backend = \"shared\" or remove the table"
                        .into(),
                );
            }
            Ok(StorageConfig::Local)
        }
        "shared" => {
            let entry = entry.unwrap_or(StorageEntry {
                backend: None,
                postgres_url: None,
                postgres_max_connections: None,
                postgres_timeout_secs: None,
                postgres_open_commit_secs: None,
                pending_object_grace_secs: None,
            });
            let postgres_url = entry
                .postgres_url
                .or_else(|| std::env::var(POSTGRES_URL_ENV).ok())
                .filter(|u| !u.is_empty())
                .ok_or_else(|| {
                    format!(
                        "[storage] backend = \"shared\" needs postgres_url \
                         (postgres://user:password@host:port/database) or {POSTGRES_URL_ENV}"
                    )
                })?;
            if !(postgres_url.starts_with("postgres://")
                || postgres_url.starts_with("postgresql://"))
            {
                return Err(format!(
                    "postgres_url must start with postgres:// or postgresql://: {:?}",
                    crate::storage_config::redact_url(&postgres_url)
                ));
            }
            let object_store = object_store.ok_or_else(|| {
                "[storage] backend = \"shared\" needs an [object_store] table with at least bucket"
                    .to_owned()
            })?;
            object_store.check()?;
            if entry.postgres_max_connections == Some(0) {
                return Err("postgres_max_connections must be at least 1".into());
            }
            if entry.postgres_timeout_secs == Some(0) {
                return Err("postgres_timeout_secs must be at least 1".into());
            }
            if entry.postgres_open_commit_secs == Some(0) {
                return Err("postgres_open_commit_secs must be at least 1".into());
            }
            Ok(StorageConfig::Shared(Box::new(SharedStorage {
                postgres_url,
                postgres_max_connections: entry.postgres_max_connections.unwrap_or(16),
                postgres_timeout: Duration::from_secs(entry.postgres_timeout_secs.unwrap_or(5)),
                postgres_open_commit: Duration::from_secs(
                    entry.postgres_open_commit_secs.unwrap_or(60),
                ),
                object_store,
            })))
        }
        other => Err(format!(
            "[storage] backend must be \"local\" or \"shared\", not {other:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::ConfigFile;
    use crate::{ServerConfig, StorageConfig};

    fn apply(text: &str) -> Result<ServerConfig, String> {
        let parsed: ConfigFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut config = ServerConfig::default();
        parsed
            .apply(text, "t.toml", &mut config)
            .map_err(|e| e.to_string())?;
        Ok(config)
    }

    /// A refusal points at the key it names, else at the table (not at line 1).
    #[test]
    fn refusals_point_at_the_key_or_the_table() {
        let e = apply(
            "listen = \"127.0.0.1:1\"\n[storage]\nbackend = \"shared\"\n\
             postgres_url = \"mysql://h/d\"\n[object_store]\nbucket = \"b\"\n",
        )
        .unwrap_err();
        assert!(e.starts_with("t.toml:4:1: postgres_url"), "{e}");
        let e = apply(
            "listen = \"127.0.0.1:1\"\n[storage]\nbackend = \"shared\"\n\
             postgres_url = \"postgres://h/d\"\n[object_store]\nprefix = \"p\"\n",
        )
        .unwrap_err();
        assert!(e.starts_with("t.toml:5:1: [object_store] bucket"), "{e}");
        let e = apply("listen = \"127.0.0.1:1\"\n[storage]\nbackend = \"shared\"\n").unwrap_err();
        assert!(e.starts_with("t.toml:3:1: [storage] backend"), "{e}");
    }

    #[test]
    fn local_is_the_default_and_shared_needs_url_and_bucket() {
        assert!(matches!(apply("").unwrap().storage, StorageConfig::Local));
        assert!(matches!(
            apply("[storage]\nbackend = \"local\"\n").unwrap().storage,
            StorageConfig::Local
        ));
        let shared = apply(
            "[storage]\nbackend = \"shared\"\npostgres_url = \"postgres://u:p@h/d\"\n\
             postgres_max_connections = 4\n[object_store]\nbucket = \"b\"\nprefix = \"x\"\n",
        )
        .unwrap();
        match shared.storage {
            StorageConfig::Shared(s) => {
                assert_eq!(s.postgres_url, "postgres://u:p@h/d");
                assert_eq!(s.postgres_max_connections, 4);
                assert_eq!(s.object_store.bucket, "b");
                assert!(!format!("{s:?}").contains(":p@"), "password redacted");
            }
            StorageConfig::Local => panic!("expected shared"),
        }
        let e = apply("[storage]\nbackend = \"nfs\"\n").unwrap_err();
        assert!(e.contains("\"local\" or \"shared\""), "{e}");
        let e = apply("[storage]\nbackend = \"shared\"\npostgres_url = \"postgres://h/d\"\n")
            .unwrap_err();
        assert!(e.contains("[object_store]"), "{e}");
        let e = apply("[object_store]\nbucket = \"b\"\n").unwrap_err();
        assert!(e.contains("only used with"), "{e}");
        let e = apply(
            "[storage]\nbackend = \"shared\"\npostgres_url = \"mysql://h/d\"\n[object_store]\nbucket = \"b\"\n",
        )
        .unwrap_err();
        assert!(e.contains("postgres://"), "{e}");
        let shared = "[storage]\nbackend = \"shared\"\npostgres_url = \"postgres://h/d\"\n\
                      [object_store]\nbucket = \"b\"\n";
        let e = apply(&format!("{shared}presigned_reply_secs = 604801\n")).unwrap_err();
        assert!(e.contains("at most 604800"), "{e}");
        let e = apply(&format!("{shared}fragment_memory_wait_secs = 3601\n")).unwrap_err();
        assert!(
            e.contains("fragment_memory_wait_secs must be at most 3600"),
            "{e}"
        );
        for (set, wait) in [("", 10), ("fragment_memory_wait_secs = 0\n", 0)] {
            match apply(&format!("{shared}{set}")).unwrap().storage {
                StorageConfig::Shared(s) => assert_eq!(
                    s.object_store.fragment_memory_wait(),
                    std::time::Duration::from_secs(wait)
                ),
                StorageConfig::Local => panic!("expected shared"),
            }
        }
        match apply(&format!("{shared}presigned_reply_secs = 900\n"))
            .unwrap()
            .storage
        {
            StorageConfig::Shared(s) => assert_eq!(s.object_store.presigned_reply_secs, Some(900)),
            StorageConfig::Local => panic!("expected shared"),
        }
    }

    #[test]
    fn pending_object_grace_defaults_to_an_hour_and_must_be_positive() {
        use std::time::Duration;
        assert_eq!(
            apply("").unwrap().pending_object_grace,
            Duration::from_secs(3600)
        );
        let set = apply(
            "[storage]\nbackend = \"shared\"\npostgres_url = \"postgres://h/d\"\n\
             pending_object_grace_secs = 600\n[object_store]\nbucket = \"b\"\n",
        )
        .unwrap();
        assert_eq!(set.pending_object_grace, Duration::from_secs(600));
        let e = apply("[storage]\npending_object_grace_secs = 0\n").unwrap_err();
        assert!(e.contains("must be positive"), "{e}");
    }

    #[test]
    fn postgres_open_commit_defaults_to_a_minute_and_must_be_positive() {
        use std::time::Duration;
        let shared = "[storage]\nbackend = \"shared\"\npostgres_url = \"postgres://h/d\"\n";
        let table = "[object_store]\nbucket = \"b\"\n";
        let open = |text: &str| match apply(text).unwrap().storage {
            StorageConfig::Shared(s) => s.postgres_open_commit,
            StorageConfig::Local => panic!("expected shared"),
        };
        assert_eq!(open(&format!("{shared}{table}")), Duration::from_secs(60));
        assert_eq!(
            open(&format!("{shared}postgres_open_commit_secs = 5\n{table}")),
            Duration::from_secs(5)
        );
        let e = apply(&format!("{shared}postgres_open_commit_secs = 0\n{table}")).unwrap_err();
        assert!(
            e.contains("postgres_open_commit_secs must be at least 1"),
            "{e}"
        );
    }
}
