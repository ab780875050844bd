//! Applying a parsed configuration file onto a [`ServerConfig`]: every key, and the routes.

use std::sync::Arc;
use std::time::Duration;

use crate::routes::Route;
use crate::ServerConfig;

use super::{
    build_auth, build_handler, key_offset, line_col, parse_admin, read_admin_token, ByteSize,
    ConfigError, ConfigFile, RouteEntry, RouteMode,
};

impl ConfigFile {
    /// Applies the file to `config` (the defaults, before command-line flags).
    pub fn apply(
        mut self,
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
        let storage_at = text.find("[storage]").unwrap_or(0);
        if let Some(s) = self
            .storage
            .as_ref()
            .and_then(|e| e.pending_object_grace_secs)
        {
            if s == 0 {
                return Err(err(
                    storage_at,
                    "pending_object_grace_secs must be positive".into(),
                ));
            }
            config.pending_object_grace = Duration::from_secs(s);
        }
        config.storage =
            super::storage::build_storage(self.storage.take(), self.object_store.take()).map_err(
                |m| match storage_error_at(text, &m) {
                    Some(offset) => err(offset, m),
                    // Nothing to point at (a table that is missing): the file alone.
                    None => ConfigError {
                        file: name.to_owned(),
                        line: 0,
                        column: 0,
                        message: m,
                    },
                },
            )?;
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
        if let Some(ByteSize(n)) = self.inline_below {
            config.inline_below = n;
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

pub(super) fn build_route(entry: &RouteEntry, default_overwrites: bool) -> Result<Route, String> {
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

/// Where in `text` a `[storage]` / `[object_store]` refusal points: the first key the message
/// names that the file sets, else the table the message names, else `[storage]`; `None` when
/// the file has none of them.
fn storage_error_at(text: &str, message: &str) -> Option<usize> {
    let named_key = message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.contains('_') || word.len() > 3)
        .find_map(|word| key_offset(text, word));
    named_key
        .or_else(|| {
            message
                .contains("[object_store]")
                .then(|| text.find("[object_store]"))
                .flatten()
        })
        .or_else(|| text.find("[storage]"))
}
