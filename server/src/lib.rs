//! bitsd: a durable, embeddable server for the Microsoft BITS upload and upload-reply protocol.
//!
//! [`BitsService`] is the protocol as a service: a `hyper::service::Service` and a
//! `tower::Service` for any request body, which never fails (every problem becomes a BITS Ack
//! or an HTTP status). Routes map URL prefixes to plain upload or upload-reply with a
//! [`ReplyHandler`]. [`start`] runs a complete server with its admin listener.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let server = bitsd::start(bitsd::ServerConfig::default()).await?;
//! println!("BITS on {}", server.addr());
//! server.shutdown().await?;
//! # Ok(()) }
//! ```

mod accept;
mod admin;
pub mod auth;
mod auth_throttle;
mod body;
pub mod config;
mod conn_send;
mod delivery;
mod destination;
pub mod fault;
mod metrics;
mod name_limits;
mod packets;
mod progress;
mod reply_download;
mod request_url;
mod routes;
mod server;
mod service;
mod service_builder;
mod session_limits;
mod session_locks;
pub mod storage_config;
mod tcp_unacked;
mod tls_log;
pub mod transcript;

pub use admin::{handle_admin, handle_admin_with};
pub use auth::{AuthChallenge, AuthFuture, Authenticator, ClientAddr, CredentialsAuthenticator};
pub use bitsd_protocol as protocol;
pub use bitsd_reply_handlers as reply_handlers;
pub use bitsd_reply_handlers::{
    CommandConfig, CommandHandler, DigestHandler, EchoHandler, HandlerError, HttpNotifyConfig,
    HttpNotifyHandler, Notification, Reply, ReplyBody, ReplyHandler, StaticHandler, Upload,
};
pub use bitsd_storage as storage;
pub use bitsd_storage::{SessionBackend, SessionStore, StorageError, UploadMode};
pub use body::ResponseBody;
pub use conn_send::SendLimits;
pub use fault::{
    ConnectionDropped, FaultAction, FaultInjectingService, FaultPacket, FaultPlan, FaultPlanError,
    FaultResponseBody, FaultRule,
};
pub use progress::{ReplyBytes, SessionProgress, UploadBytes};
pub use routes::Route;
pub use server::{start, RunningServer, ServerConfig, ServerError, SharedAuthenticator, TlsFiles};
pub use service::BitsService;
pub use service_builder::{BitsServiceBuilder, BuildError};
pub use session_limits::{FsyncPolicy, SessionLimits, E_TOO_MANY_SESSIONS};
pub use storage_config::{SharedStorage, StorageConfig};
pub use transcript::{Transcript, TranscriptEntry, TranscriptOptions};
