//! [`BitsServiceBuilder`]: routes, limits, URLs, auth and the storage backend of a [`BitsService`].

use std::sync::Arc;

use bitsd_protocol::UploadLimits;
use bitsd_storage::{LiveCounts, SessionBackend, StorageError};
use http::HeaderValue;

use crate::auth::Authenticator;
use crate::packets;
use crate::request_url::UrlPolicy;
use crate::routes::{Route, RouteTable};
use crate::service::{BitsService, Shared};
use crate::session_limits::{SessionCounts, SessionLimits};
use crate::session_locks::SessionLocks;

/// Builds a [`BitsService`].
pub struct BitsServiceBuilder {
    store: Arc<dyn SessionBackend>,
    /// The live sessions, counted when the builder was made (before any packet can change
    /// the store: a count taken later, after a Close or a purge already removed a session,
    /// would miss that session and then give its slot back a second time).
    live: Result<LiveCounts, StorageError>,
    routes: Vec<Route>,
    limits: UploadLimits,
    urls: UrlPolicy,
    host_id: Option<String>,
    host_id_fallback_timeout: Option<u32>,
    auth: Option<Arc<dyn Authenticator>>,
    session_limits: SessionLimits,
    fsync: crate::session_limits::FsyncPolicy,
}

impl std::fmt::Debug for BitsServiceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitsServiceBuilder")
            .field("routes", &self.routes)
            .field("limits", &self.limits)
            .field("session_limits", &self.session_limits)
            .field("authenticated", &self.auth.is_some())
            .finish_non_exhaustive()
    }
}

/// A builder setting was refused.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The host id cannot be sent as a header value.
    #[error("host id {0:?} is not a valid header value")]
    HostId(String),
    /// Two routes share a prefix.
    #[error("two routes have the prefix {0}")]
    DuplicateRoute(String),
    /// An upload-reply route has no handler.
    #[error("upload-reply route {0} has no reply handler")]
    MissingHandler(String),
    /// The store's sessions could not be read to count the live ones.
    #[error("cannot count the sessions in the store: {0}")]
    Store(#[source] StorageError),
    /// A route's prefix lies inside another route's reply paths (`<prefix>BITS-Sessions/`).
    #[error("{0}")]
    ShadowedReplies(String),
}

impl BitsServiceBuilder {
    /// A builder with no routes and default limits over `store`, whose live sessions were
    /// counted as `live`.
    pub(crate) fn new(
        store: Arc<dyn SessionBackend>,
        live: Result<LiveCounts, StorageError>,
    ) -> Self {
        BitsServiceBuilder {
            store,
            live,
            routes: Vec::new(),
            limits: UploadLimits::default(),
            urls: UrlPolicy::default(),
            host_id: None,
            host_id_fallback_timeout: None,
            auth: None,
            session_limits: SessionLimits::default(),
            fsync: crate::session_limits::FsyncPolicy::default(),
        }
    }

    /// Adds a route.
    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// Sets the upload and fragment size limits.
    pub fn limits(mut self, limits: UploadLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Reply URLs start with this base (`https://bits.example.com`) instead of the request's
    /// scheme and `Host`; for servers behind a reverse proxy.
    pub fn public_base_url(mut self, url: Option<String>) -> Self {
        self.urls.public_base_url = url.map(|u| u.trim_end_matches('/').to_owned());
        self
    }

    /// The server's own address as a URL base (`http://127.0.0.1:8080`). Relative
    /// notification URLs of `http` handlers resolve against the public base URL if one is
    /// set, else against this, and never against the client's `Host`: without either, a
    /// relative notification URL fails with 500. [`crate::start`] sets it to the listener's
    /// address.
    pub fn server_url(mut self, url: Option<String>) -> Self {
        self.urls.server_base_url = url.map(|u| u.trim_end_matches('/').to_owned());
        self
    }

    /// The path under which a host application mounts this service (e.g. axum's
    /// `Router::nest_service("/bits", svc)`, which strips it from requests): reply URLs and
    /// remote URLs get it back.
    pub fn mount_path(mut self, path: &str) -> Self {
        let trimmed = path.trim_matches('/');
        self.urls.mount_path = if trimmed.is_empty() {
            String::new()
        } else {
            format!("/{trimmed}")
        };
        self
    }

    /// Believe `X-Forwarded-Proto` and `X-Forwarded-Host` when building URLs. Turn it on only
    /// behind a reverse proxy that sets (and overwrites) them.
    pub fn trust_forwarded_headers(mut self, trust: bool) -> Self {
        self.urls.trust_forwarded = trust;
        self
    }

    /// Sends `BITS-Host-Id` (and the fallback timeout) on every Create-Session Ack (§8).
    pub fn host_id(mut self, host_id: Option<String>, fallback_timeout_secs: Option<u32>) -> Self {
        self.host_id = host_id;
        self.host_id_fallback_timeout = fallback_timeout_secs;
        self
    }

    /// Requires every request to authenticate through `auth`; sessions then belong to the
    /// user who created them.
    pub fn authenticator(mut self, auth: Option<Arc<dyn Authenticator>>) -> Self {
        self.auth = auth;
        self
    }

    /// Sets the session, disk and body-timeout limits.
    pub fn session_limits(mut self, limits: SessionLimits) -> Self {
        self.session_limits = limits;
        self
    }

    /// When fragment bytes are synced (default: per fragment).
    pub fn fsync(mut self, policy: crate::session_limits::FsyncPolicy) -> Self {
        self.fsync = policy;
        self
    }

    /// Reply URLs use `https` when no public base URL is set (the listener terminates TLS).
    pub fn https(mut self, https: bool) -> Self {
        self.urls.https = https;
        self
    }

    /// The service.
    pub fn build(self) -> Result<BitsService, BuildError> {
        let host_id = match self.host_id {
            None => None,
            Some(h) => Some((
                HeaderValue::from_str(&h).map_err(|_| BuildError::HostId(h.clone()))?,
                self.host_id_fallback_timeout,
            )),
        };
        let mut seen = std::collections::HashSet::new();
        for r in &self.routes {
            if !seen.insert(r.prefix().to_owned()) {
                return Err(BuildError::DuplicateRoute(r.prefix().to_owned()));
            }
            if r.mode() == bitsd_storage::UploadMode::UploadReply && r.handler().is_none() {
                return Err(BuildError::MissingHandler(r.prefix().to_owned()));
            }
        }
        let counts = SessionCounts::from_live(self.live.map_err(BuildError::Store)?);
        if let Some((capturing, shadowed)) = crate::routes::reply_path_conflict(&self.routes) {
            return Err(BuildError::ShadowedReplies(
                crate::routes::reply_path_conflict_message(capturing, shadowed),
            ));
        }
        // Never more than the backend can record: a larger total is the client's error.
        let mut limits = self.limits;
        limits.max_upload_size = limits.max_upload_size.min(self.store.max_upload_size());
        let metrics = crate::metrics::Metrics::new(&self.store.resources());
        Ok(BitsService {
            shared: Arc::new(Shared {
                store: self.store,
                routes: RouteTable::new(self.routes),
                locks: SessionLocks::default(),
                completions: packets::Completions::default(),
                limits,
                urls: self.urls,
                host_id,
                auth: self.auth,
                session_limits: self.session_limits,
                counts,
                metrics,
                fsync: self.fsync,
            }),
        })
    }
}
