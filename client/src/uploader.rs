//! The upload client: configuration, jobs, and the client state machine (§3.1 of MC-BUP as
//! summarised in `BITS-UPLOAD.md`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bitsd_protocol::header as h;
use bitsd_protocol::{ContentRange, BITS_1_5_UPLOAD_PROTOCOL};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::error::{hresult, BitsFailure, ClientError, ErrorContext, HResult, Request};
use crate::http::Http;
use crate::progress::{JobEvent, JobState, Progress, ProgressObserver};
use crate::target::Target;

/// Back-off between retries after transient errors: `initial_delay`, doubled after every
/// further consecutive failure up to `max_delay`; the job fails after `max_retries`
/// consecutive failures without progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before the first retry.
    pub initial_delay: Duration,
    /// Upper bound of the delay.
    pub max_delay: Duration,
    /// Consecutive failures (without progress) after which the job gives up with the last error.
    pub max_retries: u32,
}

impl RetryPolicy {
    /// The delay before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(30);
        self.initial_delay
            .saturating_mul(1u32 << shift)
            .min(self.max_delay)
    }
}

impl Default for RetryPolicy {
    /// 1 s, doubling up to 60 s, at most 10 consecutive retries.
    fn default() -> Self {
        RetryPolicy {
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            max_retries: 10,
        }
    }
}

/// Where the reply of an upload-reply job goes.
pub enum ReplyDestination {
    /// A file, written as `<path>.part` and renamed into place when complete.
    File(PathBuf),
    /// Memory: returned in [`ReplyOutcome::bytes`].
    Memory,
    /// Any writer (e.g. stdout), written in order as the bytes arrive.
    Writer(Box<dyn AsyncWrite + Send + Unpin>),
}

impl std::fmt::Debug for ReplyDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyDestination::File(p) => f.debug_tuple("File").field(p).finish(),
            ReplyDestination::Memory => f.write_str("Memory"),
            ReplyDestination::Writer(_) => f.write_str("Writer(..)"),
        }
    }
}

/// What the job does about a reply.
#[derive(Debug)]
pub enum ReplyMode {
    /// A plain upload job (`BG_JOB_TYPE_UPLOAD`): a `BITS-Reply-URL` is ignored.
    None,
    /// An upload-reply job (`BG_JOB_TYPE_UPLOAD_REPLY`): the final Ack must carry
    /// `BITS-Reply-URL`, and the reply is downloaded to the destination.
    Required(ReplyDestination),
    /// Download the reply if the final Ack offers one, otherwise finish as a plain upload.
    IfOffered(ReplyDestination),
}

/// Cancels a running job: the client stops, sends Cancel-Session for its session, and the job
/// ends with [`ClientError::Cancelled`].
#[derive(Clone, Debug, Default)]
pub struct CancelHandle(CancellationToken);

impl CancelHandle {
    /// A new handle, not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests cancellation.
    pub fn cancel(&self) {
        self.0.cancel();
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.is_cancelled()
    }
}

/// One upload: the remote URL, the local file, the reply mode and a cancel handle.
#[derive(Debug)]
pub struct UploadJob {
    url: String,
    file: PathBuf,
    reply: ReplyMode,
    cancel: CancelHandle,
}

impl UploadJob {
    /// A plain upload of `file` to `url`.
    pub fn new(url: impl Into<String>, file: impl Into<PathBuf>) -> Self {
        UploadJob {
            url: url.into(),
            file: file.into(),
            reply: ReplyMode::None,
            cancel: CancelHandle::new(),
        }
    }

    /// Makes this an upload-reply job whose reply goes to `dest`.
    pub fn reply_to(mut self, dest: ReplyDestination) -> Self {
        self.reply = ReplyMode::Required(dest);
        self
    }

    /// Downloads a reply to `dest` only if the server offers one.
    pub fn reply_if_offered(mut self, dest: ReplyDestination) -> Self {
        self.reply = ReplyMode::IfOffered(dest);
        self
    }

    /// Uses this cancel handle (e.g. one shared with a Ctrl-C handler).
    pub fn with_cancel_handle(mut self, cancel: CancelHandle) -> Self {
        self.cancel = cancel;
        self
    }

    /// The job's cancel handle.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }
}

/// The downloaded reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyOutcome {
    /// The `BITS-Reply-URL` it came from.
    pub url: String,
    /// Its size in bytes.
    pub size: u64,
    /// The bytes, for [`ReplyDestination::Memory`].
    pub bytes: Option<Bytes>,
    /// The file, for [`ReplyDestination::File`].
    pub path: Option<PathBuf>,
}

/// A finished upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadOutcome {
    /// The session that completed the upload.
    pub session_id: String,
    /// The URL the final packets went to (the Host-Id rewrite, if one was in use).
    pub url: String,
    /// Bytes uploaded (the file size).
    pub bytes_uploaded: u64,
    /// The fragment size at the end (smaller than configured after 413s).
    pub fragment_size: u64,
    /// How many times the upload restarted with a new Create-Session.
    pub restarts: u32,
    /// How many retries after transient errors it took.
    pub retries: u32,
    /// The reply, for upload-reply jobs.
    pub reply: Option<ReplyOutcome>,
    /// Whether Close-Session was acknowledged.
    pub closed: bool,
}

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) fragment_size: u64,
    pub(crate) retry: RetryPolicy,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) authorization: Option<HeaderValue>,
    pub(crate) user_agent: HeaderValue,
    pub(crate) ping_first: bool,
    pub(crate) cancel_on_error: bool,
    pub(crate) reply_chunk_size: Option<u64>,
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
                authorization: None,
                user_agent: HeaderValue::from_static(concat!(
                    "bitsd-client/",
                    env!("CARGO_PKG_VERSION")
                )),
                ping_first: false,
                cancel_on_error: true,
                reply_chunk_size: None,
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

    /// How long a response, or one piece of a reply body, may take (default 330 s: the final
    /// Ack waits for the server application, which may take 5 minutes).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.request_timeout = timeout;
        self
    }

    /// HTTP Basic credentials, sent with every request (packets and reply download).
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
    pub fn cancel_on_error(mut self, cancel: bool) -> Self {
        self.cfg.cancel_on_error = cancel;
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
        self.cfg.tls = crate::http::tls_connector(&self.cfg.tls_roots, self.cfg.tls_insecure);
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
        let result = run.execute(job).await;
        match result {
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                let cancelled = matches!(e, ClientError::Cancelled);
                if let Some(s) = run.session.take() {
                    if cancelled || self.cfg.cancel_on_error {
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

/// Host-Id redirection state of a session (§8).
struct HostId {
    fallback: Option<Duration>,
    first_failure: Option<Instant>,
}

pub(crate) struct Session {
    id: String,
    id_header: HeaderValue,
    original: Target,
    target: Target,
    host_id: Option<HostId>,
    needs_ping: bool,
    acked: u64,
}

impl Session {
    fn new(id: String, original: Target) -> Self {
        Session {
            id,
            id_header: HeaderValue::from_static(""),
            target: original.clone(),
            original,
            host_id: None,
            needs_ping: false,
            acked: 0,
        }
    }

    /// An HTTP response came back from the current target: the fallback timer resets.
    fn reachable(&mut self) {
        if let Some(hid) = self.host_id.as_mut() {
            hid.first_failure = None;
        }
    }

    /// The current target could not be reached. Returns true when the client fell back to the
    /// original URL.
    fn unreachable(&mut self) -> bool {
        let Some(hid) = self.host_id.as_mut() else {
            return false;
        };
        let first = *hid.first_failure.get_or_insert_with(Instant::now);
        match hid.fallback {
            Some(t) if first.elapsed() >= t => {
                self.target = self.original.clone();
                self.host_id = None;
                self.needs_ping = false;
                true
            }
            _ => false,
        }
    }
}

/// An Ack (or any response to a packet): status and headers.
pub(crate) struct Ack {
    pub(crate) status: u16,
    pub(crate) headers: HeaderMap,
}

impl Ack {
    fn header(&self, name: &HeaderName) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    }

    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    fn is_ack(&self) -> bool {
        self.header(&h::BITS_PACKET_TYPE)
            .is_some_and(|v| v.eq_ignore_ascii_case("ack"))
    }

    /// `BITS-Error-Code`, if present and parsable.
    fn error_code(&self) -> Option<HResult> {
        let v = self.header(&h::BITS_ERROR_CODE)?;
        parse_hex(v).map(HResult)
    }

    /// The failure this response reports: its `BITS-Error-Code` and `BITS-Error-Context`, or
    /// `BG_E_HTTP_ERROR_<status>` in the server context when it carries none.
    fn failure(&self, request: Request) -> BitsFailure {
        let code = match self.error_code() {
            Some(c) if c != HResult::OK => c,
            _ => HResult::http_error(self.status),
        };
        let context = self
            .header(&h::BITS_ERROR_CONTEXT)
            .and_then(parse_hex)
            .map(ErrorContext::from_value)
            .unwrap_or(ErrorContext::RemoteFile);
        BitsFailure::from_response(request, self.status, code, context)
    }

    fn received(&self) -> Option<Result<u64, ()>> {
        self.header(&h::BITS_RECEIVED_CONTENT_RANGE)
            .map(|v| v.parse::<u64>().map_err(|_| ()))
    }
}

fn parse_hex(v: &str) -> Option<u32> {
    let v = v.trim();
    let digits = v
        .strip_prefix("0x")
        .or_else(|| v.strip_prefix("0X"))
        .unwrap_or(v);
    if digits.is_empty() {
        return None;
    }
    u32::from_str_radix(digits, 16).ok()
}

fn offered_protocol() -> String {
    format!("{{{BITS_1_5_UPLOAD_PROTOCOL}}}")
}

fn same_guid(a: &str, b: &str) -> bool {
    let strip = |s: &str| {
        s.trim()
            .trim_start_matches('{')
            .trim_end_matches('}')
            .to_ascii_lowercase()
    };
    strip(a) == strip(b)
}

/// The file being uploaded.
struct Source {
    file: tokio::fs::File,
    path: PathBuf,
    total: u64,
}

/// The reply part of a job, without the destination.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ReplyWanted {
    No,
    Required,
    IfOffered,
}

impl ReplyWanted {
    fn of(mode: &ReplyMode) -> Self {
        match mode {
            ReplyMode::None => ReplyWanted::No,
            ReplyMode::Required(_) => ReplyWanted::Required,
            ReplyMode::IfOffered(_) => ReplyWanted::IfOffered,
        }
    }
}

enum FragmentResult {
    Acked {
        received: Option<u64>,
        reply_url: Option<String>,
    },
    Gap(u64),
    TooLarge,
}

/// The state of one running job.
pub(crate) struct Run {
    pub(crate) cfg: Arc<Config>,
    pub(crate) http: Http,
    pub(crate) progress: Progress,
    cancel: CancellationToken,
    pub(crate) failures: u32,
    retries: u32,
    restarts: u32,
    pub(crate) session: Option<Session>,
}

impl Run {
    fn new(cfg: Arc<Config>, cancel: CancellationToken) -> Self {
        let http = Http::new(
            cfg.tls.clone(),
            cfg.connect_timeout,
            cfg.request_timeout,
            cfg.authorization.clone(),
            cfg.user_agent.clone(),
        );
        Run {
            cfg,
            http,
            progress: Progress::new(),
            cancel,
            failures: 0,
            retries: 0,
            restarts: 0,
            session: None,
        }
    }

    pub(crate) fn report(&self) {
        if let Some(o) = &self.cfg.observer {
            o.progress(&self.progress);
        }
    }

    pub(crate) fn event(&self, e: JobEvent) {
        tracing::debug!(event = ?e, "bits job");
        if let Some(o) = &self.cfg.observer {
            o.event(&e);
        }
    }

    pub(crate) fn set_state(&mut self, state: JobState) {
        if self.progress.state != state {
            self.progress.state = state;
            self.report();
        }
    }

    fn set_uploaded(&mut self, bytes: u64) {
        if self.progress.upload.bytes_transferred != bytes {
            self.progress.upload.bytes_transferred = bytes;
            self.report();
        }
    }

    /// After an error: fatal errors end the job; transient ones cost one retry and a back-off.
    pub(crate) async fn recover(&mut self, e: ClientError) -> Result<(), ClientError> {
        if !e.is_transient() {
            return Err(e);
        }
        self.failures += 1;
        if self.failures > self.cfg.retry.max_retries {
            return Err(e);
        }
        self.retries += 1;
        let delay = self.cfg.retry.delay(self.failures);
        self.event(JobEvent::Retrying {
            attempt: self.failures,
            delay,
            error: e.to_string(),
        });
        self.set_state(JobState::TransientError);
        let cancel = self.cancel.clone();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(ClientError::Cancelled),
            _ = tokio::time::sleep(delay) => Ok(()),
        }
    }

    /// Counts a step that made no progress (a 200 or 416 that moves nothing); too many in a row
    /// end the job with `BG_E_NO_PROGRESS`.
    fn no_progress(&mut self, request: Request, status: u16) -> Result<(), ClientError> {
        self.failures += 1;
        if self.failures > self.cfg.retry.max_retries {
            return Err(BitsFailure::fatal(
                hresult::BG_E_NO_PROGRESS,
                ErrorContext::RemoteFile,
                Some(request),
            )
            .with_status(status)
            .with_detail("the server keeps acknowledging without taking the data")
            .into());
        }
        Ok(())
    }

    async fn packet(
        &mut self,
        request: Request,
        target: &Target,
        session_id: Option<&HeaderValue>,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<Ack, ClientError> {
        let packet_type = match request {
            Request::Ping => "Ping",
            Request::CreateSession => "Create-Session",
            Request::Fragment => "Fragment",
            Request::CloseSession => "Close-Session",
            Request::CancelSession => "Cancel-Session",
            // Not packets; never sent through here.
            Request::ReplyHead | Request::ReplyGet => "Ping",
        };
        headers.insert(h::BITS_PACKET_TYPE, HeaderValue::from_static(packet_type));
        if let Some(id) = session_id {
            headers.insert(h::BITS_SESSION_ID, id.clone());
        }
        let method = Method::from_bytes(b"BITS_POST").map_err(|e| ClientError::InvalidUrl {
            url: target.to_string(),
            reason: e.to_string(),
        })?;
        let parts = self
            .http
            .send_ack(request, method, target, headers, body)
            .await?;
        Ok(Ack {
            status: parts.status.as_u16(),
            headers: parts.headers,
        })
    }

    async fn ping(&mut self, target: &Target) -> Result<(), ClientError> {
        let ack = self
            .packet(Request::Ping, target, None, HeaderMap::new(), Bytes::new())
            .await?;
        if ack.is_success() {
            Ok(())
        } else {
            Err(ack.failure(Request::Ping).into())
        }
    }

    async fn create_session(&mut self, original: &Target) -> Result<Session, ClientError> {
        let offered = offered_protocol();
        let mut headers = HeaderMap::new();
        headers.insert(
            h::BITS_SUPPORTED_PROTOCOLS,
            HeaderValue::from_str(&offered).map_err(|e| ClientError::InvalidUrl {
                url: original.to_string(),
                reason: e.to_string(),
            })?,
        );
        let ack = self
            .packet(
                Request::CreateSession,
                original,
                None,
                headers,
                Bytes::new(),
            )
            .await?;
        let req = Request::CreateSession;
        if !ack.is_success() {
            return Err(ack.failure(req).into());
        }
        if !ack.is_ack() {
            return Err(ClientError::invalid_response(
                req,
                ack.status,
                "response is not a BITS Ack (no BITS-Packet-Type: Ack)",
            ));
        }
        let protocol = ack.header(&h::BITS_PROTOCOL).unwrap_or("").to_owned();
        if !same_guid(&protocol, &offered) {
            return Err(BitsFailure::fatal(
                hresult::BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH,
                ErrorContext::RemoteFile,
                Some(req),
            )
            .with_status(ack.status)
            .with_detail(format!("offered {offered}, server chose {protocol:?}"))
            .into());
        }
        let id = match ack.headers.get(&h::BITS_SESSION_ID) {
            Some(v) if !v.as_bytes().is_empty() => v.clone(),
            _ => {
                return Err(ClientError::invalid_response(
                    req,
                    ack.status,
                    "Create-Session Ack carries no BITS-Session-Id",
                ))
            }
        };
        let mut session = Session::new(
            String::from_utf8_lossy(id.as_bytes()).into_owned(),
            original.clone(),
        );
        session.id_header = id;
        self.event(JobEvent::SessionCreated {
            session_id: session.id.clone(),
            protocol: protocol.clone(),
        });
        if let Some(host_id) = ack.header(&h::BITS_HOST_ID).filter(|v| !v.is_empty()) {
            let target = original
                .with_host_id(host_id)
                .map_err(|e| ClientError::invalid_response(req, ack.status, e.to_string()))?;
            let fallback = ack
                .header(&h::BITS_HOST_ID_FALLBACK_TIMEOUT)
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs);
            self.event(JobEvent::HostIdRedirect {
                url: target.to_string(),
                fallback_timeout: fallback,
            });
            session.target = target;
            session.needs_ping = true;
            session.host_id = Some(HostId {
                fallback,
                first_failure: None,
            });
        }
        Ok(session)
    }

    async fn read_fragment(src: &mut Source, offset: u64, len: u64) -> Result<Bytes, ClientError> {
        let (file, path, total) = (&mut src.file, src.path.as_path(), src.total);
        let io = |source: std::io::Error| ClientError::LocalFile {
            path: path.to_owned(),
            source,
        };
        let now = file.metadata().await.map_err(io)?.len();
        if now != total {
            return Err(BitsFailure::fatal(
                hresult::BG_E_LOCAL_FILE_CHANGED,
                ErrorContext::LocalFile,
                Some(Request::Fragment),
            )
            .with_detail(format!(
                "{} changed size from {total} to {now} bytes during the upload",
                path.display()
            ))
            .into());
        }
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(io)?;
        let len = usize::try_from(len).map_err(|_| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "fragment larger than memory",
            ))
        })?;
        let mut buf = vec![0u8; len];
        file.read_exact(&mut buf).await.map_err(io)?;
        Ok(Bytes::from(buf))
    }

    async fn fragment(
        &mut self,
        target: &Target,
        session_id: &HeaderValue,
        range: ContentRange,
        content_name: Option<&HeaderValue>,
        body: Bytes,
    ) -> Result<FragmentResult, ClientError> {
        let req = Request::Fragment;
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_RANGE,
            HeaderValue::from_str(&range.to_string()).map_err(|e| ClientError::InvalidUrl {
                url: target.to_string(),
                reason: e.to_string(),
            })?,
        );
        if let Some(name) = content_name {
            headers.insert(h::CONTENT_NAME, name.clone());
        }
        let ack = self
            .packet(req, target, Some(session_id), headers, body)
            .await?;
        match ack.status {
            413 => Ok(FragmentResult::TooLarge),
            416 => match ack.received() {
                Some(Ok(r)) => Ok(FragmentResult::Gap(r)),
                _ => Err(ClientError::invalid_response(
                    req,
                    416,
                    "416 without a usable BITS-Received-Content-Range",
                )),
            },
            s if (200..300).contains(&s) => {
                if !ack.is_ack() {
                    return Err(ClientError::invalid_response(
                        req,
                        s,
                        "response is not a BITS Ack (no BITS-Packet-Type: Ack)",
                    ));
                }
                let received = match ack.received() {
                    None => None,
                    Some(Ok(r)) => Some(r),
                    Some(Err(())) => {
                        return Err(ClientError::invalid_response(
                            req,
                            s,
                            "unparsable BITS-Received-Content-Range",
                        ))
                    }
                };
                let reply_url = ack
                    .header(&h::BITS_REPLY_URL)
                    .filter(|v| !v.is_empty())
                    .map(str::to_owned);
                Ok(FragmentResult::Acked {
                    received,
                    reply_url,
                })
            }
            _ => Err(ack.failure(req).into()),
        }
    }

    /// Close-Session or Cancel-Session: re-sent on 5xx and dropped connections (at most
    /// `retries` times), never on 1xx–4xx; `BG_E_SESSION_NOT_FOUND` counts as done.
    pub(crate) async fn end_session(
        &mut self,
        kind: Request,
        session: &Session,
        cancellable: bool,
        retries: u32,
    ) -> Result<(), ClientError> {
        let mut attempt = 0u32;
        loop {
            let sent = self
                .packet(
                    kind,
                    &session.target,
                    Some(&session.id_header),
                    HeaderMap::new(),
                    Bytes::new(),
                )
                .await;
            let err: ClientError = match sent {
                Ok(ack) if ack.is_success() => break,
                Ok(ack) => {
                    let f = ack.failure(kind);
                    if f.code() == hresult::BG_E_SESSION_NOT_FOUND {
                        break;
                    }
                    if !(500..600).contains(&ack.status) {
                        return Err(f.into());
                    }
                    f.into()
                }
                Err(e) if e.is_transient() => e,
                Err(e) => return Err(e),
            };
            attempt += 1;
            if attempt > retries {
                return Err(err);
            }
            let delay = self.cfg.retry.delay(attempt);
            self.event(JobEvent::Retrying {
                attempt,
                delay,
                error: err.to_string(),
            });
            if cancellable {
                let cancel = self.cancel.clone();
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Err(ClientError::Cancelled),
                    _ = tokio::time::sleep(delay) => {}
                }
            } else {
                tokio::time::sleep(delay).await;
            }
        }
        self.event(match kind {
            Request::CancelSession => JobEvent::SessionCancelled {
                session_id: session.id.clone(),
            },
            _ => JobEvent::SessionClosed {
                session_id: session.id.clone(),
            },
        });
        Ok(())
    }

    async fn execute(&mut self, job: UploadJob) -> Result<UploadOutcome, ClientError> {
        // Taken apart so no reference to the (not `Sync`) reply writer lives across an await.
        let UploadJob {
            url,
            file: path,
            reply,
            cancel: _,
        } = job;
        let original = Target::parse(&url)?;
        let io = |source: std::io::Error| ClientError::LocalFile {
            path: path.clone(),
            source,
        };
        let file = tokio::fs::File::open(&path).await.map_err(io)?;
        let total = file.metadata().await.map_err(io)?.len();
        let mut src = Source {
            file,
            path: path.clone(),
            total,
        };
        self.progress.upload.bytes_total = total;
        self.report();
        self.set_state(JobState::Connecting);
        if self.cfg.ping_first {
            loop {
                let token = self.cancel.clone();
                match with_cancel(&token, self.ping(&original)).await {
                    Ok(()) => break,
                    Err(e) => self.recover(e).await?,
                }
            }
            self.failures = 0;
        }

        let mut session = None;
        let mut frag = self.cfg.fragment_size.max(1);
        let r = self
            .upload_loop(
                &mut session,
                &mut src,
                ReplyWanted::of(&reply),
                &original,
                &mut frag,
            )
            .await;
        self.session = session;
        let reply_url = r?;
        self.failures = 0;
        self.event(JobEvent::UploadComplete {
            reply_url: reply_url.clone(),
        });

        let reply = match (reply_url, reply) {
            (Some(url), ReplyMode::Required(dest) | ReplyMode::IfOffered(dest)) => {
                let base = self
                    .session
                    .as_ref()
                    .map(|s| s.target.clone())
                    .unwrap_or_else(|| original.clone());
                Some(crate::reply::download(self, &base, &url, dest).await?)
            }
            _ => None,
        };
        self.set_state(JobState::Transferred);

        let Some(session) = self.session.take() else {
            return Err(ClientError::Cancelled);
        };
        let closed = match self
            .end_session(
                Request::CloseSession,
                &session,
                true,
                self.cfg.retry.max_retries,
            )
            .await
        {
            Ok(()) => true,
            Err(ClientError::Cancelled) => {
                self.session = Some(session);
                return Err(ClientError::Cancelled);
            }
            Err(e) => {
                tracing::warn!(error = %e, "Close-Session failed");
                false
            }
        };
        self.set_state(JobState::Acknowledged);
        Ok(UploadOutcome {
            session_id: session.id.clone(),
            url: session.target.to_string(),
            bytes_uploaded: total,
            fragment_size: frag,
            restarts: self.restarts,
            retries: self.retries,
            reply,
            closed,
        })
    }

    /// Ping, Create-Session and Fragments until the server holds the whole file. Returns the
    /// reply URL, if the job wants one and the final Ack carried it.
    async fn upload_loop(
        &mut self,
        session: &mut Option<Session>,
        src: &mut Source,
        wanted: ReplyWanted,
        original: &Target,
        frag: &mut u64,
    ) -> Result<Option<String>, ClientError> {
        let token = self.cancel.clone();
        let total = src.total;
        let content_name = src
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| HeaderValue::from_str(n).ok());
        let want_reply = wanted != ReplyWanted::No;
        let reply_required = wanted == ReplyWanted::Required;
        let mut offset = 0u64;
        let mut restarts_without_progress = 0u32;
        loop {
            if token.is_cancelled() {
                return Err(ClientError::Cancelled);
            }
            let Some(s) = session.as_mut() else {
                self.set_state(JobState::Connecting);
                match with_cancel(&token, self.create_session(original)).await {
                    Ok(new) => {
                        offset = 0;
                        self.set_uploaded(0);
                        *session = Some(new);
                    }
                    Err(e) => self.recover(e).await?,
                }
                continue;
            };
            if s.needs_ping {
                let target = s.target.clone();
                match with_cancel(&token, self.ping(&target)).await {
                    Ok(()) => {
                        s.needs_ping = false;
                        s.reachable();
                    }
                    Err(e) => {
                        self.note_failure(s, &e);
                        self.recover(e).await?;
                    }
                }
                continue;
            }
            self.set_state(JobState::Transferring);
            let len = (*frag).min(total - offset);
            let range = if total == 0 {
                ContentRange::empty_upload()
            } else {
                ContentRange::new(offset, offset + len - 1, total).ok_or_else(|| {
                    ClientError::invalid_response(
                        Request::Fragment,
                        0,
                        format!("cannot send bytes {offset}+{len} of {total}"),
                    )
                })?
            };
            let body = Self::read_fragment(src, offset, len).await?;
            let name = if offset == 0 {
                content_name.as_ref()
            } else {
                None
            };
            let target = s.target.clone();
            let id = s.id_header.clone();
            let r = with_cancel(&token, self.fragment(&target, &id, range, name, body)).await;
            let end = offset + len;
            match r {
                Err(e) if e.is_session_not_found() => {
                    restarts_without_progress += 1;
                    if restarts_without_progress > self.cfg.retry.max_retries {
                        return Err(e);
                    }
                    self.restarts += 1;
                    self.event(JobEvent::SessionRestarted {
                        old_session_id: s.id.clone(),
                    });
                    // No session: the next turn sends Create-Session and starts from 0.
                    *session = None;
                }
                Err(e) => {
                    self.note_failure(s, &e);
                    self.recover(e).await?;
                }
                Ok(FragmentResult::TooLarge) => {
                    s.reachable();
                    if len <= 1 {
                        return Err(BitsFailure::fatal(
                            hresult::BG_E_TOO_LARGE,
                            ErrorContext::RemoteFile,
                            Some(Request::Fragment),
                        )
                        .with_status(413)
                        .with_detail("the server refuses even a one-byte fragment")
                        .into());
                    }
                    let to = len / 2;
                    self.event(JobEvent::FragmentSizeReduced { from: len, to });
                    *frag = to;
                }
                Ok(FragmentResult::Gap(received)) => {
                    s.reachable();
                    if received > total || received == offset {
                        return Err(ClientError::invalid_response(
                            Request::Fragment,
                            416,
                            format!(
                                "416 asks for offset {received} (sent {offset}, total {total})"
                            ),
                        ));
                    }
                    self.event(JobEvent::Resync {
                        from: offset,
                        to: received,
                    });
                    if received > s.acked {
                        s.acked = received;
                        self.failures = 0;
                        restarts_without_progress = 0;
                    } else {
                        self.no_progress(Request::Fragment, 416)?;
                    }
                    offset = received;
                    self.set_uploaded(received);
                }
                Ok(FragmentResult::Acked {
                    received,
                    reply_url,
                }) => {
                    s.reachable();
                    let received = received.unwrap_or(end);
                    if received > total {
                        return Err(ClientError::invalid_response(
                            Request::Fragment,
                            200,
                            format!(
                                "BITS-Received-Content-Range {received} is past the end ({total})"
                            ),
                        ));
                    }
                    if received != end {
                        self.event(JobEvent::Resync {
                            from: end,
                            to: received,
                        });
                    }
                    if received > s.acked || total == 0 {
                        s.acked = received;
                        self.failures = 0;
                        restarts_without_progress = 0;
                    } else if received <= offset {
                        self.no_progress(Request::Fragment, 200)?;
                    }
                    offset = received;
                    self.set_uploaded(received);
                    if received == total {
                        if !want_reply {
                            return Ok(None);
                        }
                        if let Some(url) = reply_url {
                            return Ok(Some(url));
                        }
                        if end == total {
                            if reply_required {
                                return Err(ClientError::invalid_response(
                                    Request::Fragment,
                                    200,
                                    "the final Ack of an upload-reply job carries no BITS-Reply-URL",
                                ));
                            }
                            return Ok(None);
                        }
                        // The server already holds everything but this was not the final
                        // fragment: re-send the final one to learn the reply URL (§6.2).
                        offset = total - (*frag).min(total);
                    }
                }
            }
        }
    }

    pub(crate) fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// A transport failure on the Host-Id target may trigger the fallback to the original URL.
    fn note_failure(&self, s: &mut Session, e: &ClientError) {
        if matches!(e, ClientError::Transport { .. }) {
            if s.unreachable() {
                self.event(JobEvent::HostIdFallback {
                    url: s.target.to_string(),
                });
            }
        } else {
            s.reachable();
        }
    }
}

/// Runs `fut` unless `token` is cancelled first.
pub(crate) async fn with_cancel<T>(
    token: &CancellationToken,
    fut: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::select! {
        biased;
        _ = token.cancelled() => Err(ClientError::Cancelled),
        r = fut => r,
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

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(700),
            max_retries: 5,
        };
        let d: Vec<u128> = (1..=5).map(|a| p.delay(a).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 700, 700]);
        assert_eq!(p.delay(1000), Duration::from_millis(700));
    }

    #[test]
    fn hex_codes_and_guids() {
        assert_eq!(parse_hex("0x8020001f"), Some(0x8020_001f));
        assert_eq!(parse_hex("0X5"), Some(5));
        assert_eq!(parse_hex("7"), Some(7));
        assert_eq!(parse_hex("0x"), None);
        assert!(same_guid(
            "{7DF0354D-249B-430F-820D-3D2A9BEF4931}",
            &offered_protocol()
        ));
        assert_eq!(offered_protocol(), "{7df0354d-249b-430f-820d-3d2a9bef4931}");
    }
}
