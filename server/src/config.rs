//! The TOML configuration file (`bitsd --config FILE`). Every key is optional; what is absent
//! keeps the default of [`ServerConfig::default`](crate::ServerConfig::default), and command-line flags override the file.
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! data_dir = "./bitsd-data"
//!
//! [[route]]
//! prefix = "/echo/"
//! mode = "upload-reply"
//! handler = { kind = "echo" }
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

mod apply;
mod byte_size;
mod explain;
mod handlers;
mod storage;
pub use byte_size::ByteSize;
use explain::{io_reason, key_offset};
pub use handlers::build_handler;

/// A configuration file was refused: where, and why. Displayed as `file:line:column: message`,
/// or `file: message` when the error is not tied to a place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.located())]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// 1-based line (0 when the error is not tied to a place).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn located(&self) -> String {
        if self.line == 0 {
            format!("{}: {}", self.file, self.message)
        } else {
            format!(
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Address of the BITS listener.
    pub listen: Option<String>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Address of the admin listener, or `"off"`.
    pub admin_listen: Option<String>,
    /// Base of reply URLs (`https://bits.example.com`).
    pub public_url: Option<String>,
    /// Believe `X-Forwarded-Proto` / `X-Forwarded-Host` (only behind a proxy that sets them).
    pub trust_forwarded_headers: Option<bool>,
    /// BITSMaximumUploadSize in bytes (`"10GiB"` style suffixes allowed).
    pub max_upload_size: Option<ByteSize>,
    /// Largest fragment in bytes (413 above it; suffixes allowed).
    pub max_fragment_size: Option<ByteSize>,
    /// BITSAllowOverwrites, the default of every route.
    pub allow_overwrites: Option<bool>,
    /// BITSHostId.
    pub host_id: Option<String>,
    /// BITSHostIdFallbackTimeout in seconds.
    pub host_id_fallback_timeout: Option<u32>,
    /// BITSSessionTimeout in seconds.
    pub session_timeout_secs: Option<u64>,
    /// How often expired sessions are removed, in seconds.
    pub cleanup_interval_secs: Option<u64>,
    /// Seconds a client may take to send a request head.
    pub header_read_timeout_secs: Option<u64>,
    /// Seconds a request body may stall before the request is abandoned.
    pub body_idle_timeout_secs: Option<u64>,
    /// The slowest a Fragment's body may arrive after its grace period, bytes per second
    /// (0: no minimum).
    pub min_body_rate: Option<u64>,
    /// Seconds a Fragment's body may arrive slower than `min_body_rate`.
    pub min_body_rate_grace_secs: Option<u64>,
    /// Live sessions in total (0: unlimited).
    pub max_sessions: Option<usize>,
    /// Live sessions per authenticated user (BITSNumberOfSessionsLimit; 0: unlimited).
    pub max_sessions_per_user: Option<usize>,
    /// Free bytes the data directory's file system keeps in reserve (suffixes allowed).
    pub min_free_disk: Option<ByteSize>,
    /// Connections served at once.
    pub max_connections: Option<usize>,
    /// Seconds a response write may wait for the client to read before the connection closes.
    pub send_idle_timeout_secs: Option<u64>,
    /// The slowest a client may take a reply download after its grace period, bytes per
    /// second (0: no minimum).
    pub min_send_rate: Option<u64>,
    /// Seconds a reply download may be taken slower than `min_send_rate`.
    pub min_send_rate_grace_secs: Option<u64>,
    /// `per-fragment` (default), `on-close` or `never`.
    pub fsync: Option<crate::FsyncPolicy>,
    /// Fragments and replies shorter than this are kept in the meta store's log (local
    /// storage; suffixes allowed; 0: never).
    pub inline_below: Option<ByteSize>,
    /// PEM certificate chain: serve HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Authentication (off when absent).
    pub auth: Option<AuthEntry>,
    /// Test server mode: a fault plan file (TOML) whose faults the server injects.
    pub fault_plan: Option<PathBuf>,
    /// Test server mode: a file for the JSON-lines transcript of every request and answer.
    pub transcript: Option<PathBuf>,
    /// The routes; when there are none, the default `/upload/` and `/echo/` routes apply.
    #[serde(default, rename = "route")]
    pub routes: Vec<Spanned<RouteEntry>>,
    /// A file holding the admin API's bearer token (required on everything but the probes).
    pub admin_token_file: Option<PathBuf>,
    /// Allow the admin listener on an address other than loopback.
    pub admin_allow_non_loopback: Option<bool>,
    /// The `[storage]` table: which backend (`local`, the default, or `shared`).
    pub storage: Option<StorageEntry>,
    /// The `[object_store]` table: the shared backend's bucket.
    pub object_store: Option<bitsd_storage::shared::objects::ObjectStoreConfig>,
}

/// The `[storage]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageEntry {
    /// `"local"` (sled + files under `data_dir`, the default) or `"shared"` (PostgreSQL +
    /// `[object_store]`).
    pub backend: Option<String>,
    /// PostgreSQL URL of the shared backend (else the `BITSD_POSTGRES_URL` environment variable).
    pub postgres_url: Option<String>,
    /// Connections in this node's PostgreSQL pool (default 16).
    pub postgres_max_connections: Option<usize>,
    /// Seconds one PostgreSQL call may take before the packet gets a transient error (default 5).
    pub postgres_timeout_secs: Option<u64>,
    /// Seconds a fragment's commit may stay open in PostgreSQL while the object store
    /// completes the fragment's object, before PostgreSQL ends it (default 60).
    pub postgres_open_commit_secs: Option<u64>,
    /// Seconds an object written for a fragment may stay uncommitted before the sweeper
    /// deletes it (default 3600).
    pub pending_object_grace_secs: Option<u64>,
}

/// The `[auth]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthEntry {
    /// `user:$argon2id$…` lines (`bitsd hash-password`).
    pub users_file: Option<PathBuf>,
    /// `user:<sha256 hex of the token>` lines.
    pub tokens_file: Option<PathBuf>,
    /// The realm of the challenge (default `bitsd`).
    pub realm: Option<String>,
}

/// One `[[route]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteEntry {
    /// URL prefix, e.g. `/app/`.
    pub prefix: String,
    /// `upload` or `upload-reply`.
    pub mode: RouteMode,
    /// The reply handler (upload-reply routes).
    pub handler: Option<HandlerSpec>,
    /// BITSAllowOverwrites for this route.
    pub allow_overwrites: Option<bool>,
}

/// A route's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouteMode {
    /// Plain upload, committed under `files/`.
    Upload,
    /// Upload-reply, answered by the route's handler.
    UploadReply,
}

/// How a notification backend gets the upload (BITSServerNotificationType).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotificationMode {
    /// Type 2: the upload is the request body.
    ByValue,
    /// Type 1: the request names the upload and reply files.
    ByReference,
}

/// A reply handler as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum HandlerSpec {
    /// The reply is the upload.
    Echo,
    /// The reply is a JSON receipt (size, SHA-256, session id, time).
    Digest,
    /// Every client gets the same file or URL.
    Static {
        /// A file served as every reply.
        file: Option<PathBuf>,
        /// An absolute URL handed out as every reply URL.
        url: Option<String>,
    },
    /// A program: upload on stdin, reply on stdout.
    Command {
        /// The program.
        program: String,
        /// Its arguments.
        #[serde(default)]
        args: Vec<String>,
        /// Seconds before the process group is killed (default 300).
        timeout_secs: Option<u64>,
        /// Status the client sees when the program exits non-zero (default 500).
        failure_status: Option<u16>,
        /// Extra environment variables.
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// Names of the server's environment variables passed through to the program (the
        /// program otherwise starts with a clean environment).
        #[serde(default)]
        pass_env: Vec<String>,
    },
    /// IIS-compatible backend notification (BITSServerNotificationURL).
    Http {
        /// The notification URL (absolute, or relative to the job's remote URL).
        url: String,
        /// `by-value` (default) or `by-reference`.
        notification: Option<NotificationMode>,
        /// Seconds to wait for the backend (default 300).
        timeout_secs: Option<u64>,
        /// Also send the `BITS-*-DataEntity-Name` header spellings (by reference).
        #[serde(default)]
        data_entity_headers: bool,
    },
}

/// 1-based line and column of a byte offset in `text`.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, column)
}

impl ConfigFile {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<(ConfigFile, String), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            message: format!("cannot read the configuration file: {}", io_reason(&e)),
        })?;
        let file = Self::parse(&text, &path.display().to_string())?;
        Ok((file, text))
    }

    /// Parses configuration text; `name` is used in errors.
    pub fn parse(text: &str, name: &str) -> Result<ConfigFile, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((0, 0), |s| line_col(text, s.start));
            ConfigError {
                file: name.to_owned(),
                line,
                column,
                message: explain::explain_toml_error(text, e.span().map(|s| s.start), e.message()),
            }
        })
    }
}

/// Builds the credentials authenticator of an `[auth]` table.
pub fn build_auth(entry: &AuthEntry) -> Result<crate::CredentialsAuthenticator, String> {
    if entry.users_file.is_none() && entry.tokens_file.is_none() {
        return Err("[auth] needs users_file and/or tokens_file".into());
    }
    let mut auth = crate::CredentialsAuthenticator::new(entry.realm.as_deref().unwrap_or("bitsd"));
    if let Some(f) = &entry.users_file {
        auth = auth
            .with_users_file(f)
            .map_err(|e| format!("users_file: {e}"))?;
    }
    if let Some(f) = &entry.tokens_file {
        auth = auth
            .with_tokens_file(f)
            .map_err(|e| format!("tokens_file: {e}"))?;
    }
    Ok(auth)
}

/// Reads the admin token from `path`: the file's content without surrounding whitespace, at
/// least 16 bytes.
pub fn read_admin_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("admin_token_file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.len() < 16 {
        return Err(format!(
            "admin_token_file {}: the token must be at least 16 characters (e.g. `openssl rand -hex 32`)",
            path.display()
        ));
    }
    Ok(token.to_owned())
}

/// Parses an admin listener value: an address, or `off` / `none` / empty for no listener.
pub fn parse_admin(value: &str) -> Result<Option<SocketAddr>, String> {
    match value.trim() {
        "" | "off" | "none" | "false" => Ok(None),
        v => v
            .parse()
            .map(Some)
            .map_err(|e| format!("admin_listen: {e}: {v:?}")),
    }
}

#[cfg(test)]
mod tests;
