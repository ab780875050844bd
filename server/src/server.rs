//! Running bitsd: the listeners, connection handling and graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bitsd_protocol::UploadLimits;
use bitsd_reply_handlers::EchoHandler;
use bitsd_storage::{SessionStore, StorageError};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::accept::{accept_loop, tls_acceptor, ListenerOptions};
use crate::auth::Authenticator;
use crate::conn_send::SendLimits;
use crate::fault::{FaultInjectingService, FaultPlan, FaultPlanError};
use crate::routes::Route;
use crate::service_builder::BuildError;
use crate::session_limits::SessionLimits;
use crate::transcript::{Transcript, TranscriptOptions};
use crate::{admin, BitsService};

/// An [`Authenticator`] shared by the server's requests.
#[derive(Clone)]
pub struct SharedAuthenticator(pub Arc<dyn Authenticator>);

impl std::fmt::Debug for SharedAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedAuthenticator")
    }
}

/// Certificate chain and private key (PEM files) for the BITS listener.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Everything needed to run a bitsd server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address of the BITS listener.
    pub listen: SocketAddr,
    /// Address of the admin listener (`None`: no admin listener).
    pub admin_listen: Option<SocketAddr>,
    /// Where sessions, replies and committed uploads live.
    pub data_dir: PathBuf,
    /// Base of reply URLs, when clients reach the server under another name.
    pub public_base_url: Option<String>,
    /// Believe `X-Forwarded-Proto` / `X-Forwarded-Host` (behind a proxy that sets them).
    pub trust_forwarded_headers: bool,
    /// Upload and fragment size limits.
    pub limits: UploadLimits,
    /// `BITS-Host-Id` for server farms.
    pub host_id: Option<String>,
    /// `BITS-Host-Id-Fallback-Timeout` in seconds.
    pub host_id_fallback_timeout: Option<u32>,
    /// The routes.
    pub routes: Vec<Route>,
    /// How long a client may take to send a request head.
    pub header_read_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Sessions idle longer than this are removed with their data (BITSSessionTimeout).
    pub session_timeout: Duration,
    /// How often the sweeper looks for expired sessions.
    pub cleanup_interval: Duration,
    /// On a shared backend: how long an object written for a fragment may stay uncommitted
    /// (its commit lost a race or never happened) before the sweeper deletes it. A writer
    /// still sending after that has its commit refused; the client re-sends the fragment.
    pub pending_object_grace: Duration,
    /// Session count, disk reserve and body idle limits.
    pub session_limits: SessionLimits,
    /// When fragment bytes are synced (default: per fragment).
    pub fsync: crate::session_limits::FsyncPolicy,
    /// Local storage: fragments and replies shorter than this many bytes are kept in the
    /// meta store's log, group-committed, instead of per-session files (0: never).
    pub inline_below: u64,
    /// Authentication of every request on the upload routes (`None`: anonymous, the default).
    pub auth: Option<SharedAuthenticator>,
    /// TLS for the BITS listener.
    pub tls: Option<TlsFiles>,
    /// Connections served at once on the BITS listener; more wait to be accepted.
    pub max_connections: usize,
    /// How slow a client may be to take what the server sends (send idle timeout, minimum
    /// response body rate).
    pub send_limits: SendLimits,
    /// Test server mode: faults to inject into the BITS listener's answers (`None`: none).
    pub fault_plan: Option<FaultPlan>,
    /// Test server mode: record a transcript of every request and answer of the BITS listener
    /// (served on the admin listener at `GET /transcript`, and written to the file if one is
    /// given). `None`: no transcript.
    pub transcript: Option<TranscriptOptions>,
    /// A bearer token the admin API requires (`Authorization: Bearer <token>`) on everything
    /// but `/healthz` and `/readyz`. `None`: no token.
    pub admin_token: Option<String>,
    /// Allow the admin listener on an address other than loopback (refused otherwise).
    pub admin_allow_non_loopback: bool,
    /// Where sessions and bytes live (default: local, under `data_dir`).
    pub storage: crate::StorageConfig,
}

impl ServerConfig {
    /// The default routes: `/upload/` plain upload, `/echo/` upload-reply with the echo handler.
    pub fn default_routes() -> Vec<Route> {
        vec![
            Route::upload("/upload/"),
            Route::upload_reply("/echo/", EchoHandler),
        ]
    }
}

impl Default for ServerConfig {
    /// 127.0.0.1:8080, admin on 127.0.0.1:8081, data in `./bitsd-data`, the default routes.
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8081))),
            data_dir: PathBuf::from("bitsd-data"),
            public_base_url: None,
            trust_forwarded_headers: false,
            limits: UploadLimits::default(),
            host_id: None,
            host_id_fallback_timeout: None,
            routes: Self::default_routes(),
            header_read_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            session_timeout: Duration::from_secs(14 * 24 * 3600),
            cleanup_interval: Duration::from_secs(3600),
            pending_object_grace: Duration::from_secs(3600),
            session_limits: SessionLimits::default(),
            fsync: crate::session_limits::FsyncPolicy::default(),
            inline_below: bitsd_storage::INLINE_BELOW,
            auth: None,
            tls: None,
            max_connections: 10_000,
            send_limits: SendLimits::default(),
            fault_plan: None,
            transcript: None,
            admin_token: None,
            admin_allow_non_loopback: false,
            storage: crate::StorageConfig::Local,
        }
    }
}

/// Starting the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory could not be opened.
    #[error("opening data directory {path}: {source}")]
    Storage {
        /// The data directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: StorageError,
    },
    /// The shared storage backend (PostgreSQL, the object store) could not be opened.
    #[error("opening the shared storage backend: {0}")]
    SharedStorage(#[source] StorageError),
    /// A listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is inconsistent.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The admin listener would be reachable from other hosts without being allowed to.
    #[error(
        "admin listener {0} is not a loopback address, and the admin API shows every session \
         id and URL: bind it to 127.0.0.1 or ::1, or allow it explicitly with \
         admin_allow_non_loopback = true (--admin-allow-non-loopback) and protect it with \
         admin_token_file"
    )]
    AdminNotLoopback(SocketAddr),
    /// The TLS certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// The fault plan does not fit together.
    #[error("fault plan: {0}")]
    FaultPlan(#[from] FaultPlanError),
    /// The transcript file could not be created.
    #[error("transcript {path}: {source}")]
    Transcript {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A running server.
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    service: BitsService,
    routes: Vec<Route>,
    https: bool,
    transcript: Option<Transcript>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    grace: Duration,
}

/// Opens the data directory, binds the listeners and starts serving.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    if let Some(a) = config.admin_listen {
        if !a.ip().is_loopback() {
            if !config.admin_allow_non_loopback {
                return Err(ServerError::AdminNotLoopback(a));
            }
            if config.admin_token.is_none() {
                tracing::warn!(admin = %a, "the admin listener is reachable from other hosts \
                    and has no admin token: anyone who reaches it sees every session id and URL");
            }
        }
    }
    let builder = match &config.storage {
        crate::StorageConfig::Local => BitsService::builder(
            SessionStore::open(&config.data_dir)
                .await
                .map_err(|source| ServerError::Storage {
                    path: config.data_dir.clone(),
                    source,
                })?
                .with_inline_below(config.inline_below),
        ),
        crate::StorageConfig::Shared(shared) => {
            BitsService::builder_for(
                crate::storage_config::open_shared(shared, &config.data_dir)
                    .await
                    .map_err(ServerError::SharedStorage)?,
            )
            .await
        }
    };
    let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;
    let mut builder = builder
        .limits(config.limits)
        .session_limits(config.session_limits)
        .fsync(config.fsync)
        .authenticator(config.auth.as_ref().map(|a| a.0.clone()))
        .https(tls.is_some())
        .public_base_url(config.public_base_url.clone())
        .server_url(Some(own_url(addr, tls.is_some())))
        .trust_forwarded_headers(config.trust_forwarded_headers)
        .host_id(config.host_id.clone(), config.host_id_fallback_timeout);
    for r in config.routes.iter().cloned() {
        builder = builder.route(r);
    }
    let service = builder.build()?;
    let transcript = match &config.transcript {
        Some(options) => {
            Some(
                Transcript::open(options).map_err(|source| ServerError::Transcript {
                    path: options.file.clone().unwrap_or_default(),
                    source,
                })?,
            )
        }
        None => None,
    };
    // The test server mode wraps the service; a normal server serves it as is.
    let faulty = if config.fault_plan.is_some() || transcript.is_some() {
        let plan = config.fault_plan.clone().unwrap_or_default();
        if !plan.is_empty() {
            tracing::warn!(
                rules = plan.rules.len(),
                seed = plan.seed,
                "test server mode: the fault plan makes this server misbehave on purpose"
            );
        }
        Some(FaultInjectingService::new(
            service.clone(),
            plan,
            transcript.clone(),
        )?)
    } else {
        None
    };
    let (shutdown, rx) = watch::channel(false);
    let rx2 = rx.clone();
    let mut tasks = Vec::new();
    let options = ListenerOptions {
        header_timeout: config.header_read_timeout,
        grace: config.shutdown_grace,
        max_connections: config.max_connections.max(1),
        send_limits: config.send_limits,
        tls,
    };
    match faulty {
        Some(svc) => tasks.push(tokio::spawn(accept_loop(
            listener,
            rx.clone(),
            options.clone(),
            move || svc.clone(),
        ))),
        None => {
            let svc = service.clone();
            tasks.push(tokio::spawn(accept_loop(
                listener,
                rx.clone(),
                options.clone(),
                move || svc.clone(),
            )));
        }
    }
    let mut admin_addr = None;
    if let Some(a) = config.admin_listen {
        let admin = TcpListener::bind(a)
            .await
            .map_err(|source| ServerError::Bind { addr: a, source })?;
        admin_addr = Some(
            admin
                .local_addr()
                .map_err(|source| ServerError::Bind { addr: a, source })?,
        );
        let svc = service.clone();
        let admin_transcript = transcript.clone();
        let admin_token = config.admin_token.as_deref().map(admin::AdminToken::new);
        let admin_options = ListenerOptions {
            tls: None,
            max_connections: 64,
            ..options
        };
        tasks.push(tokio::spawn(accept_loop(
            admin,
            rx,
            admin_options,
            move || {
                let svc = svc.clone();
                let transcript = admin_transcript.clone();
                let token = admin_token.clone();
                hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    admin::handle_admin_guarded(svc.clone(), transcript.clone(), token.clone(), req)
                })
            },
        )));
    }
    tasks.push(tokio::spawn(sweep_loop(
        service.clone(),
        config.session_timeout,
        config.pending_object_grace,
        config.cleanup_interval,
        rx2,
    )));
    tracing::info!(%addr, admin = %admin_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()), data_dir = %config.data_dir.display(), storage = %config.storage.name(), "bitsd listening");
    Ok(RunningServer {
        addr,
        admin_addr,
        service,
        routes: config.routes.clone(),
        https: config.tls.is_some(),
        transcript,
        shutdown,
        tasks,
        grace: config.shutdown_grace,
    })
}

/// The listener's own address as a URL base: an unspecified address (`0.0.0.0`, `::`)
/// becomes the loopback address of its family, which reaches the same listener.
fn own_url(addr: SocketAddr, https: bool) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => {
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        }
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => {
            std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        }
        ip => ip,
    };
    let scheme = if https { "https" } else { "http" };
    format!("{scheme}://{}", SocketAddr::new(ip, addr.port()))
}

/// Removes expired sessions, then collects uncommitted fragment objects older than `grace`,
/// every `interval` until shutdown.
async fn sweep_loop(
    service: BitsService,
    timeout: Duration,
    grace: Duration,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        match service.remove_expired(timeout).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "expired sessions removed"),
            Err(e) => tracing::error!(error = %e, "session sweep failed"),
        }
        match service.collect_garbage(grace).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "uncommitted fragment objects deleted"),
            Err(e) => tracing::error!(error = %e, "pending-object collection failed"),
        }
    }
}

impl RunningServer {
    /// `https` when the BITS listener terminates TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.https {
            "https"
        } else {
            "http"
        }
    }

    /// The routes being served.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Address of the BITS listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Address of the admin listener.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The service (for progress queries).
    pub fn service(&self) -> &BitsService {
        &self.service
    }

    /// The transcript of the test server mode, when one is recorded.
    pub fn transcript(&self) -> Option<&Transcript> {
        self.transcript.as_ref()
    }

    /// Stops accepting, lets in-flight requests finish (up to the grace period), flushes the
    /// meta store.
    pub async fn shutdown(self) -> Result<(), StorageError> {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        // Completions whose clients hung up still run: let them end within the grace.
        let finished = self.service.completions_finished();
        if tokio::time::timeout(self.grace, finished).await.is_err() {
            tracing::warn!("completion steps still running at shutdown are cut off; their clients re-send the final fragment");
        }
        let result = self.service.store().flush().await;
        if let Some(t) = &self.transcript {
            t.written().await;
        }
        tracing::info!("bitsd stopped");
        result
    }
}
