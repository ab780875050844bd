//! Running bitsd: the listeners, connection handling and graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bitsd_protocol::UploadLimits;
use bitsd_reply_handlers::EchoHandler;
use bitsd_storage::{SessionStore, StorageError};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::routes::Route;
use crate::service::BuildError;
use crate::{admin, BitsService};

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
            limits: UploadLimits::default(),
            host_id: None,
            host_id_fallback_timeout: None,
            routes: Self::default_routes(),
            header_read_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            session_timeout: Duration::from_secs(14 * 24 * 3600),
            cleanup_interval: Duration::from_secs(3600),
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
}

/// A running server.
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    service: BitsService,
    routes: Vec<Route>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Opens the data directory, binds the listeners and starts serving.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    let store = SessionStore::open(&config.data_dir)
        .await
        .map_err(|source| ServerError::Storage {
            path: config.data_dir.clone(),
            source,
        })?;
    let mut builder = BitsService::builder(store)
        .limits(config.limits)
        .public_base_url(config.public_base_url.clone())
        .host_id(config.host_id.clone(), config.host_id_fallback_timeout);
    for r in config.routes.iter().cloned() {
        builder = builder.route(r);
    }
    let service = builder.build()?;
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
    let (shutdown, rx) = watch::channel(false);
    let rx2 = rx.clone();
    let mut tasks = Vec::new();
    let svc = service.clone();
    tasks.push(tokio::spawn(accept_loop(
        listener,
        rx.clone(),
        config.header_read_timeout,
        config.shutdown_grace,
        move || svc.clone(),
    )));
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
        tasks.push(tokio::spawn(accept_loop(
            admin,
            rx,
            config.header_read_timeout,
            config.shutdown_grace,
            move || {
                let svc = svc.clone();
                hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    admin::handle_admin(svc.clone(), req)
                })
            },
        )));
    }
    tasks.push(tokio::spawn(sweep_loop(
        service.clone(),
        config.session_timeout,
        config.cleanup_interval,
        rx2,
    )));
    tracing::info!(%addr, admin = ?admin_addr, data_dir = %config.data_dir.display(), "bitsd listening");
    Ok(RunningServer {
        addr,
        admin_addr,
        service,
        routes: config.routes.clone(),
        shutdown,
        tasks,
    })
}

async fn accept_loop<S, F>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    header_timeout: Duration,
    grace: Duration,
    make_service: F,
) where
    F: Fn() -> S,
    S: hyper::service::Service<
            http::Request<Incoming>,
            Response = http::Response<crate::ResponseBody>,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(stream), make_service());
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => tracing::warn!("shutdown deadline passed with requests in flight"),
    }
}

/// Removes expired sessions every `interval` until shutdown.
async fn sweep_loop(
    service: BitsService,
    timeout: Duration,
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
    }
}

impl RunningServer {
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

    /// Stops accepting, lets in-flight requests finish (up to the grace period), flushes the
    /// meta store.
    pub async fn shutdown(self) -> Result<(), StorageError> {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let result = self.service.store().flush().await;
        tracing::info!("bitsd stopped");
        result
    }
}
