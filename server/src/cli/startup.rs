//! Logging setup and startup errors in words a person can act on.

use std::io::IsTerminal;
use std::path::Path;

use bitsd::{ServerError, StorageError};
use tracing_subscriber::EnvFilter;

/// Installs the log subscriber on stderr: colours only when stderr is a terminal (and
/// `NO_COLOR` is unset), level from `RUST_LOG` (default `default_level`).
pub fn init_logging(json: bool, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .init();
    }
}

/// Checks the data directory before anything opens it: a plain file in its place gets a
/// sentence instead of `File exists (os error 17)`.
pub fn check_data_dir(dir: &Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(format!(
            "the data directory {} is a file, not a directory: move it away or choose another --data-dir",
            dir.display()
        )),
        _ => Ok(()),
    }
}

/// What to print when the server could not start.
pub fn explain_start_error(err: &ServerError) -> String {
    match err {
        ServerError::Storage { path, source } => explain_storage(path, source),
        ServerError::Bind { addr, source } => match source.kind() {
            std::io::ErrorKind::AddrInUse => format!(
                "cannot listen on {addr}: the address is in use (another bitsd, or another server on that port)"
            ),
            std::io::ErrorKind::PermissionDenied => format!(
                "cannot listen on {addr}: permission denied (ports below 1024 need privileges; use a higher port or a proxy)"
            ),
            _ => err.to_string(),
        },
        other => other.to_string(),
    }
}

fn explain_storage(dir: &Path, source: &StorageError) -> String {
    let text = source.to_string();
    if text.contains("could not acquire lock") || text.contains("WouldBlock") {
        return format!(
            "the data directory {} is in use by another bitsd (it holds the lock on {}): stop that one, or give this one its own --data-dir",
            dir.display(),
            dir.join("meta").join("db").display()
        );
    }
    if let StorageError::Io { path, source, .. } = source {
        match source.kind() {
            std::io::ErrorKind::PermissionDenied => {
                return format!(
                    "permission denied: {} (data directory {}): run bitsd as a user that may write there, or choose another --data-dir",
                    path.display(),
                    dir.display()
                )
            }
            std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::NotADirectory => {
                return format!(
                    "{} is in the way: a file where bitsd needs a directory (data directory {})",
                    path.display(),
                    dir.display()
                )
            }
            _ => {}
        }
    }
    if text.contains("Permission denied") {
        return format!(
            "permission denied in the data directory {}: {text}",
            dir.display()
        );
    }
    format!("opening the data directory {}: {text}", dir.display())
}
