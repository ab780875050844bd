//! The upload client: configuration, jobs, and the client state machine (§3.1 of MC-BUP as
//! summarised in `BITS-UPLOAD.md`), split by concern:
//!
//! - [`job`]: what a job is (URL, file, reply destination, cancel handle) and what it returns;
//! - this module: the configuration, its builder and [`BitsUploader`];
//! - `state_machine`: the job's run (Create-Session, Fragments, reply, Close-Session);
//! - `packets`: the BITS packets and their Acks;
//! - `session`: one server session and its Host-Id redirection;
//! - `retry`: the running job's transport retries, back-off and session ending.

mod job;
mod packets;
mod retry;
mod session;
mod state_machine;

pub use job::{
    CancelHandle, ReplyDestination, ReplyMode, ReplyOutcome, ResumeFrom, RetryPolicy, UploadJob,
    UploadOutcome,
};
pub(crate) use retry::{with_cancel, Run};
use session::Session;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::header::HeaderValue;
use tokio_util::sync::CancellationToken;

use crate::error::{ClientError, Request};
use crate::progress::{JobState, ProgressObserver};
use crate::target::Target;

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) fragment_size: u64,
    pub(crate) retry: RetryPolicy,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) no_progress_timeout: Option<Duration>,
    pub(crate) authorization: Option<HeaderValue>,
    pub(crate) user_agent: HeaderValue,
    pub(crate) ping_first: bool,
    pub(crate) cancel_on_error: bool,
    pub(crate) reply_chunk_size: Option<u64>,
    pub(crate) max_memory_reply: u64,
    pub(crate) observer: Option<Arc<dyn ProgressObserver>>,
    pub(crate) tls_insecure: bool,
    pub(crate) tls_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    pub(crate) tls: Option<tokio_rustls::TlsConnector>,
}

/// Builds a [`BitsUploader`].
#[derive(Clone)]
pub struct BitsUploaderBuilder {
    cfg: Config,
}

impl std::fmt::Debug for BitsUploaderBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitsUploaderBuilder")
            .field("fragment_size", &self.cfg.fragment_size)
            .field("retry", &self.cfg.retry)
            .finish_non_exhaustive()
    }
}

/// 64 MiB: the default cap of a reply kept in memory ([`BitsUploaderBuilder::max_memory_reply`]).
pub const DEFAULT_MAX_MEMORY_REPLY: u64 = 64 * 1024 * 1024;

/// 1 MiB: the default fragment size.
pub const DEFAULT_FRAGMENT_SIZE: u64 = 1024 * 1024;

impl Default for BitsUploaderBuilder {
    fn default() -> Self {
        BitsUploaderBuilder {
            cfg: Config {
                fragment_size: DEFAULT_FRAGMENT_SIZE,
                retry: RetryPolicy::default(),
                connect_timeout: Duration::from_secs(30),
                request_timeout: Duration::from_secs(330),
                no_progress_timeout: None,
                authorization: None,
                user_agent: HeaderValue::from_static(concat!(
                    "bitsd-client/",
                    env!("CARGO_PKG_VERSION")
                )),
                ping_first: false,
                cancel_on_error: true,
                reply_chunk_size: None,
                max_memory_reply: DEFAULT_MAX_MEMORY_REPLY,
                observer: None,
                tls_insecure: false,
                tls_roots: Vec::new(),
                tls: None,
            },
        }
    }
}

impl BitsUploaderBuilder {
    /// Bytes per Fragment (default 1 MiB; at least 1). A 413 halves it for the rest of the job.
    pub fn fragment_size(mut self, bytes: u64) -> Self {
        self.cfg.fragment_size = bytes.max(1);
        self
    }

    /// Back-off and retry budget for transient errors.
    pub fn retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.cfg.retry = retry;
        self
    }

    /// How long connecting may take (default 30 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.connect_timeout = timeout;
        self
    }

    /// Gives up when the job has made no progress for this long while retrying transient
    /// errors (Windows' `BITSNoProgressTimeout`); default: only the retry budget counts.
    pub fn no_progress_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.no_progress_timeout = Some(timeout);
        self
    }

    /// How long a response, or one piece of a reply body, may take (default 330 s: the final
    /// Ack waits for the server application, which may take 5 minutes).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.request_timeout = timeout;
        self
    }

    /// HTTP Basic credentials. Like Windows BITS, the client never sends them pre-emptively:
    /// only after the origin the job names (scheme, host, port) answers 401, and then only to
    /// that origin and to `https` Host-Id nodes it redirects to; never to a reply URL on
    /// another host or over plain `http` to a host the user did not name.
    pub fn credentials(mut self, user: &str, password: &str) -> Self {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        self.cfg.authorization = HeaderValue::from_str(&format!("Basic {token}")).ok();
        self
    }

    /// The `User-Agent` header (default `bitsd-client/<version>`).
    pub fn user_agent(mut self, agent: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(agent) {
            self.cfg.user_agent = v;
        }
        self
    }

    /// Send a Ping before Create-Session (what Windows does to settle authentication first).
    /// Off by default: without authentication Windows starts with Create-Session.
    pub fn ping_first(mut self, ping: bool) -> Self {
        self.cfg.ping_first = ping;
        self
    }

    /// After a fatal error, send Cancel-Session so the server frees the session (default on).
    /// A job that gives up on a transient error (its retries spent) never cancels: the
    /// session stays on the server for [`UploadJob::resume`].
    pub fn cancel_on_error(mut self, cancel: bool) -> Self {
        self.cfg.cancel_on_error = cancel;
        self
    }

    /// Largest reply a [`ReplyDestination::Memory`] accepts (default 64 MiB): a larger reply
    /// fails the job with `BG_E_TOO_LARGE` before it is downloaded.
    pub fn max_memory_reply(mut self, bytes: u64) -> Self {
        self.cfg.max_memory_reply = bytes;
        self
    }

    /// Largest range one reply GET asks for (default: the whole rest of the reply).
    pub fn reply_chunk_size(mut self, bytes: u64) -> Self {
        self.cfg.reply_chunk_size = Some(bytes.max(1));
        self
    }

    /// Receives progress and events.
    pub fn observer(mut self, observer: Arc<dyn ProgressObserver>) -> Self {
        self.cfg.observer = Some(observer);
        self
    }

    /// `https`: accept any server certificate (self-signed test servers). Off by default.
    pub fn tls_insecure(mut self, insecure: bool) -> Self {
        self.cfg.tls_insecure = insecure;
        self
    }

    /// `https`: also trust this root certificate (DER), next to the web PKI roots.
    pub fn add_root_certificate(mut self, der: Vec<u8>) -> Self {
        self.cfg
            .tls_roots
            .push(rustls_pki_types::CertificateDer::from(der));
        self
    }

    /// The uploader.
    pub fn build(mut self) -> BitsUploader {
        self.cfg.tls = crate::tls::tls_connector(&self.cfg.tls_roots, self.cfg.tls_insecure);
        BitsUploader {
            cfg: Arc::new(self.cfg),
        }
    }
}

/// A BITS upload client. Cheap to clone; every job runs independently.
///
/// ```no_run
/// # async fn run() -> Result<(), bitsd_client::ClientError> {
/// use bitsd_client::{BitsUploader, ReplyDestination};
/// let uploader = BitsUploader::builder().fragment_size(256 * 1024).build();
/// let done = uploader.upload("http://127.0.0.1:8080/upload/a.bin", "a.bin").await?;
/// println!("uploaded {} bytes in session {}", done.bytes_uploaded, done.session_id);
/// let done = uploader
///     .upload_reply("http://127.0.0.1:8080/echo/q.bin", "q.bin", ReplyDestination::Memory)
///     .await?;
/// let reply = done.reply.and_then(|r| r.bytes);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct BitsUploader {
    cfg: Arc<Config>,
}

impl std::fmt::Debug for BitsUploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitsUploader")
            .field("fragment_size", &self.cfg.fragment_size)
            .finish_non_exhaustive()
    }
}

impl Default for BitsUploader {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl BitsUploader {
    /// A builder with the defaults.
    pub fn builder() -> BitsUploaderBuilder {
        BitsUploaderBuilder::default()
    }

    /// A plain upload job (`BG_JOB_TYPE_UPLOAD`).
    pub async fn upload(
        &self,
        url: &str,
        file: impl AsRef<Path>,
    ) -> Result<UploadOutcome, ClientError> {
        self.run(UploadJob::new(url, file.as_ref())).await
    }

    /// An upload-reply job (`BG_JOB_TYPE_UPLOAD_REPLY`): upload, then download the reply.
    pub async fn upload_reply(
        &self,
        url: &str,
        file: impl AsRef<Path>,
        reply: ReplyDestination,
    ) -> Result<UploadOutcome, ClientError> {
        self.run(UploadJob::new(url, file.as_ref()).reply_to(reply))
            .await
    }

    /// Runs a job to its end: uploaded (and reply downloaded) and the session closed, or a fatal
    /// error, or cancelled.
    pub async fn run(&self, job: UploadJob) -> Result<UploadOutcome, ClientError> {
        let mut run = Run::new(self.cfg.clone(), job.cancel.0.clone());
        let handle = job.cancel.clone();
        let result = run.execute(job).await;
        match result {
            Ok(outcome) => Ok(outcome),
            Err(ClientError::Cancelled) if handle.is_suspended() => {
                let session = run.session.take();
                run.set_state(JobState::Suspended);
                Err(ClientError::Suspended {
                    session_id: session.as_ref().map(|s| s.id.clone()),
                    offset: session.as_ref().map_or(0, |s| s.acked),
                })
            }
            Err(e) => {
                let cancelled = matches!(e, ClientError::Cancelled);
                if let Some(s) = run.session.take() {
                    // A job that gave up on a transient error (retries spent) leaves its
                    // session on the server, as a BITS job in TRANSIENT_ERROR does: the
                    // caller may resume it.
                    if cancelled || (self.cfg.cancel_on_error && !e.is_transient()) {
                        // Best effort and quick: the job has already failed or been cancelled.
                        let attempts = self.cfg.retry.max_retries.min(2);
                        if let Err(ce) = run
                            .end_session(Request::CancelSession, &s, false, attempts)
                            .await
                        {
                            tracing::debug!(error = %ce, "Cancel-Session failed");
                        }
                    }
                }
                run.set_state(if cancelled {
                    JobState::Cancelled
                } else {
                    JobState::Error
                });
                Err(e)
            }
        }
    }

    /// Sends Cancel-Session for a session known from elsewhere (retried on 5xx; a
    /// `BG_E_SESSION_NOT_FOUND` counts as done).
    pub async fn cancel_session(&self, url: &str, session_id: &str) -> Result<(), ClientError> {
        self.end_session(url, session_id, Request::CancelSession)
            .await
    }

    /// Sends Close-Session for a session known from elsewhere (retried on 5xx; a
    /// `BG_E_SESSION_NOT_FOUND` counts as done).
    pub async fn close_session(&self, url: &str, session_id: &str) -> Result<(), ClientError> {
        self.end_session(url, session_id, Request::CloseSession)
            .await
    }

    async fn end_session(
        &self,
        url: &str,
        session_id: &str,
        kind: Request,
    ) -> Result<(), ClientError> {
        let target = Target::parse(url)?;
        let mut run = Run::new(self.cfg.clone(), CancellationToken::new());
        run.http.set_origin(&target);
        let mut session = Session::new(String::new(), target);
        session.id_header =
            HeaderValue::from_str(session_id).map_err(|_| ClientError::InvalidUrl {
                url: url.to_owned(),
                reason: format!("session id {session_id:?} cannot be sent in a header"),
            })?;
        session.id = session_id.to_owned();
        let retries = self.cfg.retry.max_retries;
        run.end_session(kind, &session, false, retries).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_futures_are_send() {
        fn send<T: Send>(_: T) {}
        let up = BitsUploader::default();
        send(
            up.run(
                UploadJob::new("http://x/", "y")
                    .reply_if_offered(ReplyDestination::Writer(Box::new(tokio::io::sink()))),
            ),
        );
        send(up.cancel_session("http://x/", "{id}"));
    }
}
