//! The TOML configuration file (`bitsd --config FILE`). Every key is optional; what is absent
//! keeps the default of [`ServerConfig::default`], and command-line flags override the file.
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
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::routes::Route;
use crate::ServerConfig;

mod byte_size;
mod explain;
mod handlers;
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

    /// Applies the file to `config` (the defaults, before command-line flags).
    pub fn apply(
        self,
        text: &str,
        name: &str,
        config: &mut ServerConfig,
    ) -> Result<(), ConfigError> {
        let err = |offset: usize, message: String| {
            let (line, column) = line_col(text, offset);
            ConfigError {
                file: name.to_owned(),
                line,
                column,
                message,
            }
        };
        let at_key = |key: &str| text.find(&format!("\n{key}")).map_or(0, |i| i + 1);
        if let Some(l) = &self.listen {
            config.listen = l
                .parse()
                .map_err(|e| err(at_key("listen"), format!("listen: {e}: {l:?}")))?;
        }
        if let Some(d) = self.data_dir {
            config.data_dir = d;
        }
        if let Some(a) = &self.admin_listen {
            config.admin_listen = parse_admin(a).map_err(|m| err(at_key("admin_listen"), m))?;
        }
        if let Some(u) = self.public_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(err(
                    at_key("public_url"),
                    format!("public_url must start with http:// or https://: {u:?}"),
                ));
            }
            config.public_base_url = Some(u);
        }
        if let Some(t) = self.trust_forwarded_headers {
            config.trust_forwarded_headers = t;
        }
        if let Some(ByteSize(n)) = self.max_upload_size {
            config.limits.max_upload_size = n;
        }
        if let Some(ByteSize(n)) = self.max_fragment_size {
            if n == 0 {
                return Err(err(
                    at_key("max_fragment_size"),
                    "max_fragment_size must be at least 1".into(),
                ));
            }
            config.limits.max_fragment_size = n;
        }
        config.host_id = self.host_id.or(config.host_id.take());
        if let Some(t) = self.host_id_fallback_timeout {
            config.host_id_fallback_timeout = Some(t);
        }
        if let Some(s) = self.session_timeout_secs {
            if s == 0 {
                return Err(err(
                    at_key("session_timeout_secs"),
                    "session_timeout_secs must be positive".into(),
                ));
            }
            config.session_timeout = Duration::from_secs(s);
        }
        if let Some(s) = self.cleanup_interval_secs {
            if s == 0 {
                return Err(err(
                    at_key("cleanup_interval_secs"),
                    "cleanup_interval_secs must be positive".into(),
                ));
            }
            config.cleanup_interval = Duration::from_secs(s);
        }
        if let Some(s) = self.header_read_timeout_secs {
            config.header_read_timeout = Duration::from_secs(s.max(1));
        }
        if let Some(s) = self.body_idle_timeout_secs {
            config.session_limits.body_idle_timeout = Duration::from_secs(s.max(1));
        }
        if let Some(n) = self.min_body_rate {
            config.session_limits.min_body_rate = n;
        }
        if let Some(s) = self.min_body_rate_grace_secs {
            config.session_limits.min_body_rate_grace = Duration::from_secs(s);
        }
        if let Some(n) = self.max_sessions {
            config.session_limits.max_sessions = (n > 0).then_some(n);
        }
        if let Some(n) = self.max_sessions_per_user {
            config.session_limits.max_sessions_per_user = (n > 0).then_some(n);
        }
        if let Some(ByteSize(n)) = self.min_free_disk {
            config.session_limits.min_free_disk = n;
        }
        if let Some(p) = self.fsync {
            config.fsync = p;
        }
        if let Some(n) = self.max_connections {
            config.max_connections = n.max(1);
        }
        if let Some(s) = self.send_idle_timeout_secs {
            config.send_limits.idle_timeout = Duration::from_secs(s.max(1));
        }
        if let Some(n) = self.min_send_rate {
            config.send_limits.min_rate = n;
        }
        if let Some(s) = self.min_send_rate_grace_secs {
            config.send_limits.grace = Duration::from_secs(s);
        }
        match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => config.tls = Some(crate::TlsFiles { cert, key }),
            (None, None) => {}
            _ => {
                return Err(err(
                    at_key("tls_"),
                    "tls_cert and tls_key go together".into(),
                ))
            }
        }
        if let Some(path) = self.fault_plan {
            config.fault_plan = Some(crate::FaultPlan::load(&path)?);
        }
        if let Some(file) = self.transcript {
            config.transcript = Some(crate::TranscriptOptions { file: Some(file) });
        }
        if let Some(auth) = self.auth {
            let a = build_auth(&auth).map_err(|m| {
                let key = ["users_file", "tokens_file"]
                    .into_iter()
                    .find(|k| m.starts_with(k))
                    .and_then(|k| key_offset(text, k));
                err(key.unwrap_or_else(|| at_key("[auth]")), m)
            })?;
            config.auth = Some(crate::SharedAuthenticator(Arc::new(a)));
        }
        if let Some(path) = &self.admin_token_file {
            config.admin_token =
                Some(read_admin_token(path).map_err(|m| err(at_key("admin_token_file"), m))?);
        }
        if let Some(allow) = self.admin_allow_non_loopback {
            config.admin_allow_non_loopback = allow;
        }
        let default_overwrites = self.allow_overwrites.unwrap_or(false);
        if !self.routes.is_empty() {
            let mut routes = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for spanned in self.routes {
                let offset = spanned.span().start;
                let entry = spanned.into_inner();
                let route = build_route(&entry, default_overwrites).map_err(|m| err(offset, m))?;
                if !seen.insert(route.prefix().to_owned()) {
                    return Err(err(
                        offset,
                        format!("two routes have the prefix {}", route.prefix()),
                    ));
                }
                routes.push((offset, route));
            }
            let built: Vec<Route> = routes.iter().map(|(_, r)| r.clone()).collect();
            if let Some((capturing, shadowed)) = crate::routes::reply_path_conflict(&built) {
                let offset = routes
                    .iter()
                    .find(|(_, r)| r.prefix() == capturing.prefix())
                    .map_or(0, |(o, _)| *o);
                return Err(err(
                    offset,
                    crate::routes::reply_path_conflict_message(capturing, shadowed),
                ));
            }
            config.routes = built;
        } else if default_overwrites {
            config.routes = std::mem::take(&mut config.routes)
                .into_iter()
                .map(|r| r.allow_overwrites(true))
                .collect();
        }
        Ok(())
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

fn build_route(entry: &RouteEntry, default_overwrites: bool) -> Result<Route, String> {
    if !entry.prefix.starts_with('/') {
        return Err(format!(
            "route prefix must start with '/': {:?}",
            entry.prefix
        ));
    }
    if entry.prefix.split('/').any(|s| s == ".." || s == ".")
        || entry.prefix.contains(['\\', '%', '?', '#'])
    {
        return Err(format!(
            "route prefix must be a plain path: {:?}",
            entry.prefix
        ));
    }
    let overwrites = entry.allow_overwrites.unwrap_or(default_overwrites);
    let route = match (entry.mode, &entry.handler) {
        (RouteMode::Upload, None) => Route::upload(&entry.prefix),
        (RouteMode::Upload, Some(_)) => {
            return Err(format!(
                "route {}: a handler needs mode = \"upload-reply\" (plain uploads are committed under files/)",
                entry.prefix
            ))
        }
        (RouteMode::UploadReply, None) => {
            return Err(format!("route {}: mode = \"upload-reply\" needs a handler", entry.prefix))
        }
        (RouteMode::UploadReply, Some(spec)) => Route::upload_reply_shared(&entry.prefix, build_handler(spec)?),
    };
    Ok(route.allow_overwrites(overwrites))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(text: &str) -> Result<ServerConfig, ConfigError> {
        let mut config = ServerConfig::default();
        ConfigFile::parse(text, "test.toml")?.apply(text, "test.toml", &mut config)?;
        Ok(config)
    }

    #[test]
    fn empty_file_keeps_defaults() {
        let c = apply("").unwrap();
        assert_eq!(c.listen, ServerConfig::default().listen);
        assert_eq!(c.routes.len(), 2);
    }

    #[test]
    fn keys_and_routes() {
        let c = apply(
            "listen = \"127.0.0.1:9999\"\ndata_dir = \"/tmp/x\"\nadmin_listen = \"off\"\nmax_upload_size = 10\n\
             [[route]]\nprefix = \"/drop/\"\nmode = \"upload\"\nallow_overwrites = true\n\
             [[route]]\nprefix = \"/e/\"\nmode = \"upload-reply\"\nhandler = { kind = \"echo\" }\n",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.admin_listen, None);
        assert_eq!(c.limits.max_upload_size, 10);
        assert_eq!(c.routes.len(), 2);
        assert!(c.routes[0].overwrites_allowed());
        let c = apply("fsync = \"on-close\"\n").unwrap();
        assert_eq!(c.fsync, crate::FsyncPolicy::OnClose);
        assert!(apply("fsync = \"sometimes\"\n").is_err());
    }

    #[test]
    fn the_issue_example_works_as_written() {
        let c = apply(
            r#"listen = "127.0.0.1:8080"
data_dir = "./bitsd-data"

[[route]]
prefix = "/app/"
mode = "upload-reply"
handler = { kind = "http", url = "http://127.0.0.1:9000/handle", notification = "by-value", timeout_secs = 300 }

[[route]]
prefix = "/sum/"
mode = "upload-reply"
handler = { kind = "command", program = "sha256sum", args = [] }

[[route]]
prefix = "/drop/"
mode = "upload"
"#,
        )
        .unwrap();
        let prefixes: Vec<_> = c.routes.iter().map(|r| r.prefix().to_owned()).collect();
        assert_eq!(prefixes, ["/app/", "/sum/", "/drop/"]);
        let e = apply("[[route]]\nprefix = \"/a/\"\nmode = \"upload-reply\"\nhandler = { kind = \"http\", url = \"https://x/\" }\n").unwrap_err();
        assert_eq!(e.line, 1, "{e}");
        assert!(e.message.contains("http"), "{e}");
        let e = apply("[[route]]\nprefix = \"/a/\"\nmode = \"upload-reply\"\nhandler = { kind = \"static\" }\n").unwrap_err();
        assert!(e.message.contains("exactly one"), "{e}");
    }

    #[test]
    fn test_mode_keys() {
        let dir = tempfile::tempdir().unwrap();
        let plan = dir.path().join("faults.toml");
        std::fs::write(
            &plan,
            "seed = 7\n[[rule]]\npacket = \"Fragment\"\nnth = 2\naction = \"lose-ack\"\n",
        )
        .unwrap();
        let c = apply(&format!(
            "fault_plan = {:?}\ntranscript = \"t.jsonl\"\n",
            plan.display().to_string()
        ))
        .unwrap();
        let p = c.fault_plan.unwrap();
        assert_eq!(p.seed, 7);
        assert_eq!(p.rules[0].to_string(), "Fragment#2:lose-ack");
        assert_eq!(
            c.transcript.unwrap().file.as_deref(),
            Some(Path::new("t.jsonl"))
        );
        // A bad plan is reported with the plan's own file and line.
        std::fs::write(
            &plan,
            "[[rule]]\npacket = \"GET\"\naction = \"resync\"\noffset = 1\n",
        )
        .unwrap();
        let e = apply(&format!("fault_plan = {:?}\n", plan.display().to_string())).unwrap_err();
        assert!(e.file.ends_with("faults.toml"), "{e}");
        assert_eq!(e.line, 1, "{e}");
        assert!(e.message.contains("only to Fragment"), "{e}");
    }

    #[test]
    fn errors_name_the_line() {
        let e = apply("listen = \"127.0.0.1:1\"\nbogus = 1\n").unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("test.toml", 2), "{e}");
        assert!(e.message.contains("bogus"), "{e}");
        let e = apply("\n\n[[route]]\nprefix = \"/a/\"\nmode = \"upload-reply\"\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("needs a handler"), "{e}");
        let e = apply("[[route]]\nprefix = \"/a/\"\nmode = \"sideways\"\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let e = apply("listen = \"nope\"\n").unwrap_err();
        assert_eq!(e.line, 1, "{e}");
        let e = apply("[[route]]\nprefix = \"/a/\"\nmode = \"upload\"\n[[route]]\nprefix = \"/a\"\nmode = \"upload\"\n").unwrap_err();
        assert!(e.message.contains("two routes"), "{e}");
        assert_eq!(e.line, 4, "{e}");
    }
}
