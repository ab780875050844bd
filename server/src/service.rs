//! [`BitsService`]: the hyper and tower service that speaks the BITS upload protocol.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bitsd_protocol::{header, Ack, BitsError, SessionId, UploadLimits};
use bitsd_storage::{LiveCounts, SessionBackend, SessionRecord, SessionStore, StorageError};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use tracing::Instrument;

use crate::auth::Authenticator;
use crate::body::ResponseBody;
use crate::progress::SessionProgress;
use crate::request_url::UrlPolicy;
use crate::routes::RouteTable;
use crate::service_builder::BitsServiceBuilder;
use crate::session_limits::{SessionCounts, SessionLimits};
use crate::session_locks::SessionLocks;
use crate::{packets, reply_download};

/// Errors a request body may fail with.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the server shares between requests.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn SessionBackend>,
    pub(crate) routes: RouteTable,
    pub(crate) locks: SessionLocks,
    pub(crate) completions: packets::Completions,
    pub(crate) limits: UploadLimits,
    pub(crate) urls: UrlPolicy,
    pub(crate) host_id: Option<(HeaderValue, Option<u32>)>,
    pub(crate) auth: Option<Arc<dyn Authenticator>>,
    pub(crate) session_limits: SessionLimits,
    pub(crate) counts: SessionCounts,
    pub(crate) metrics: crate::metrics::Metrics,
    pub(crate) fsync: crate::session_limits::FsyncPolicy,
}

impl Shared {
    /// The live-session counts: counted from the store when the service is built, then kept
    /// in step with every change of a session's liveness.
    pub(crate) fn counts(&self) -> &SessionCounts {
        &self.counts
    }
}

/// The BITS upload / upload-reply service. Cheap to clone; every clone serves the same
/// sessions. It is a `hyper::service::Service` and a `tower::Service` for any request body,
/// and never fails: every problem becomes a BITS Ack or an HTTP status.
#[derive(Clone)]
pub struct BitsService {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for BitsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitsService")
            .field("routes", &self.shared.routes)
            .finish_non_exhaustive()
    }
}

impl BitsService {
    /// Starts building a service over `store`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let store = bitsd::SessionStore::open(dir.path()).await?;
    /// let service = bitsd::BitsService::builder(store)
    ///     .route(bitsd::Route::upload("/upload/"))
    ///     // Any async closure from Upload to Result<Reply, HandlerError> is a reply handler.
    ///     .route(bitsd::Route::upload_reply("/size/", |u: bitsd::Upload| async move {
    ///         Ok::<_, bitsd::HandlerError>(bitsd::Reply::bytes(format!("{} bytes", u.len)))
    ///     }))
    ///     .mount_path("/bits")
    ///     .build()?;
    /// // `service` is a hyper and a tower Service: serve it, layer it, or nest it in axum.
    /// # drop(service);
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder(store: SessionStore) -> BitsServiceBuilder {
        // The local store counts from memory, right here (the builder is not async).
        let live = store
            .meta()
            .list()
            .map(|records| LiveCounts::from_records(&records));
        Self::builder_counted(Arc::new(store), live)
    }

    /// Starts building a service over any storage backend (the local [`SessionStore`] or a
    /// shared one); its live sessions are counted first.
    pub async fn builder_for(store: Arc<dyn SessionBackend>) -> BitsServiceBuilder {
        let live = store.count_live().await;
        Self::builder_counted(store, live)
    }

    fn builder_counted(
        store: Arc<dyn SessionBackend>,
        live: Result<LiveCounts, StorageError>,
    ) -> BitsServiceBuilder {
        BitsServiceBuilder::new(store, live)
    }

    /// The storage backend the service runs on.
    pub fn store(&self) -> &Arc<dyn SessionBackend> {
        &self.shared.store
    }

    /// Upload and reply progress of a session (also of closed ones while their tombstone lasts).
    pub async fn progress(&self, id: &SessionId) -> Result<Option<SessionProgress>, StorageError> {
        Ok(self
            .shared
            .store
            .load(id)
            .await?
            .as_ref()
            .map(SessionProgress::of))
    }

    /// Progress of every session the store holds.
    pub async fn all_progress(&self) -> Result<Vec<SessionProgress>, StorageError> {
        let mut records = self.shared.store.list().await?;
        records.sort_by_key(|r| r.created_ms);
        Ok(records.iter().map(SessionProgress::of).collect())
    }

    /// One page of [`BitsService::all_progress`], ordered by session id: at most `limit`
    /// sessions whose ids follow `after`, and the id to continue after when more remain. Only
    /// the page is read from the store.
    pub async fn progress_page(
        &self,
        after: Option<&SessionId>,
        limit: usize,
    ) -> Result<(Vec<SessionProgress>, Option<SessionId>), StorageError> {
        // One more than the page tells whether another page follows.
        let mut records = self
            .shared
            .store
            .list_page(after.copied(), limit.saturating_add(1))
            .await?;
        let more = records.len() > limit;
        records.truncate(limit);
        let next = if more {
            records.last().map(|r| r.id)
        } else {
            None
        };
        Ok((records.iter().map(SessionProgress::of).collect(), next))
    }

    /// Prometheus text exposition of the server's metrics (sessions by state, bytes, fragments
    /// by outcome, errors by `BITS-Error-Code`, reply bytes, handler latency, sled size).
    pub async fn metrics_text(&self) -> Result<String, StorageError> {
        let counts = self.shared.store.count_by_state().await?;
        let states = [
            bitsd_storage::SessionState::Receiving,
            bitsd_storage::SessionState::Complete,
            bitsd_storage::SessionState::ReplyReady,
            bitsd_storage::SessionState::Closed,
            bitsd_storage::SessionState::Cancelled,
        ]
        .map(|st| {
            (
                st.as_str(),
                i64::try_from(counts.get(&st).copied().unwrap_or(0)).unwrap_or(i64::MAX),
            )
        });
        Ok(self.shared.metrics.render(
            &states,
            self.shared.store.size_on_disk(),
            &self.shared.store.resources(),
        ))
    }

    /// Waits until no completion step runs. A completion (the reply handler's run, the storing
    /// of its reply, the commit of a plain upload) goes on after its client hangs up; call this
    /// after the listeners have stopped, before the runtime goes away, so that none is cut off.
    pub async fn completions_finished(&self) {
        self.shared.completions.idle().await;
    }

    /// Whether the storage backend can serve packets (for `/readyz`): the session store
    /// answers, and on a farm the object store has not refused this node's key. A reason is
    /// logged when not.
    pub async fn ready(&self) -> bool {
        match self.shared.store.ready().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "not ready");
                false
            }
        }
    }

    /// Deletes what fragment writes left without a commit (a race lost to another node, a node
    /// or client gone mid-fragment) once older than `grace`, on the one node of a farm that
    /// holds the sweeper's lock (nothing to do on the local backend). Returns how many
    /// objects went.
    pub async fn collect_garbage(&self, grace: std::time::Duration) -> Result<usize, StorageError> {
        let Some(_sweeping) = self.shared.store.try_sweep_lock().await? else {
            return Ok(0);
        };
        self.shared.store.collect_garbage(grace).await
    }

    /// Removes every session (live or tombstone) idle for longer than `idle`, with its upload,
    /// reply and record (BITSSessionTimeout, §7). Later packets of such a session get 500
    /// `BG_E_SESSION_NOT_FOUND`. Returns how many were removed.
    pub async fn remove_expired(&self, idle: std::time::Duration) -> Result<usize, StorageError> {
        let now = bitsd_storage::now_millis();
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        let expired = |updated_ms: u64| now.saturating_sub(updated_ms) > idle_ms;
        let mut removed = 0;
        // One sweeper at a time (on a shared backend: one node of the farm).
        let Some(_sweeping) = self.shared.store.try_sweep_lock().await? else {
            return Ok(0);
        };
        // The candidates in batches, oldest first (a shared backend reads only these rows).
        const BATCH: usize = 1000;
        let before = now.saturating_sub(idle_ms);
        loop {
            let batch = self.shared.store.idle_sessions(before, BATCH).await?;
            let mut removed_now = 0;
            for record in &batch {
                let _guard = self.shared.locks.lock(record.id).await;
                // Re-check under the lock: a packet may have arrived meanwhile.
                match self.shared.store.load(&record.id).await? {
                    Some(current) if expired(current.updated_ms) => {
                        self.purge_locked(&current).await?;
                        tracing::info!(session = %record.id, state = current.state.as_str(), "session expired and removed");
                        removed_now += 1;
                    }
                    _ => {}
                }
            }
            removed += removed_now;
            // A short batch was the last; one that removed nothing would come back the same.
            if batch.len() < BATCH || removed_now == 0 {
                break;
            }
        }
        Ok(removed)
    }

    /// Removes one session now, exactly as the session timeout does: its upload, reply, record
    /// and tombstone, and its place in the session limits. Later packets of the session get 500
    /// `BG_E_SESSION_NOT_FOUND` and its reply URL 404. Returns whether the session existed.
    /// (The test server mode's `expire-session` and `forget-session` faults use it.)
    pub async fn remove_session(&self, id: &SessionId) -> Result<bool, StorageError> {
        let _guard = self.shared.locks.lock(*id).await;
        match self.shared.store.load(id).await? {
            Some(current) => {
                self.purge_locked(&current).await?;
                tracing::info!(session = %id, state = current.state.as_str(), "session removed");
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Purges a session whose lock the caller holds and releases its live-session count.
    async fn purge_locked(&self, current: &SessionRecord) -> Result<(), StorageError> {
        self.shared.store.purge(&current.id).await?;
        if !current.state.is_terminal() {
            self.shared.counts().release(current.owner.as_deref());
        }
        Ok(())
    }

    /// Handles one request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<ResponseBody>
    where
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let span = tracing::info_span!(
            "request",
            method = %req.method(),
            path = %req.uri().path(),
            packet = tracing::field::Empty,
            session = tracing::field::Empty,
            user = tracing::field::Empty,
        );
        let shared = self.shared.clone();
        async move {
            if let Some(why) = crate::request_url::hostile_path(req.uri().path()) {
                return refuse_hostile_target(&req, why);
            }
            let route = shared.routes.find(req.uri().path()).cloned();
            let (parts, body) = req.into_parts();
            let method = parts.method.clone();
            let is_bits = method.as_str() == "BITS_POST";
            // Authentication applies to the upload routes; other paths answer 404 / 501 as is.
            let mut user = None;
            if let (Some(auth), Some(_)) = (&shared.auth, &route) {
                match auth.authenticate_async(&parts).await {
                    Ok(u) => {
                        tracing::Span::current().record("user", u.as_str());
                        user = Some(u);
                    }
                    Err(challenge) => {
                        tracing::info!("request without valid credentials: 401");
                        let mut res = if is_bits {
                            Ack::with_status(StatusCode::UNAUTHORIZED).into_response()
                        } else {
                            plain(StatusCode::UNAUTHORIZED, "authentication required\n")
                        };
                        for v in challenge.www_authenticate {
                            res.headers_mut().append(http::header::WWW_AUTHENTICATE, v);
                        }
                        if let Some(wait) = challenge.retry_after {
                            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                            res.headers_mut()
                                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
                        }
                        return res;
                    }
                }
            }
            if is_bits {
                return packets::handle(&shared, route.as_ref(), user.as_deref(), parts, body)
                    .await;
            }
            drop(body);
            let Some(route) = route else {
                return plain(StatusCode::NOT_FOUND, "not found\n");
            };
            if method == Method::GET || method == Method::HEAD {
                if let Some(res) =
                    reply_download::handle(&shared, &route, user.as_deref(), &parts).await
                {
                    return res;
                }
            }
            let mut res = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            res.headers_mut().insert(
                http::header::ALLOW,
                HeaderValue::from_static("BITS_POST, GET, HEAD"),
            );
            res
        }
        .instrument(span)
        .await
    }
}

/// 400 for a request target refused before routing: a BITS Ack (`E_INVALIDARG`, fatal for
/// the client) for `BITS_POST`, plain text otherwise.
fn refuse_hostile_target<B>(req: &Request<B>, why: &'static str) -> Response<ResponseBody> {
    if req.method().as_str() == "BITS_POST" {
        error_ack(
            &BitsError::invalid_arg(why),
            raw_session(req.headers()).as_ref(),
            None,
        )
        .into_response()
    } else {
        tracing::info!(reason = why, "request target refused");
        plain(StatusCode::BAD_REQUEST, "bad request target\n")
    }
}

/// A small plain-text response.
pub(crate) fn plain(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut res = Response::new(ResponseBody::full(Bytes::from_static(text.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res.headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from(text.len()));
    res
}

/// The Ack of a failed packet, echoing the request's session id, logged by severity.
pub(crate) fn error_ack(
    err: &BitsError,
    raw_session: Option<&HeaderValue>,
    received: Option<u64>,
) -> Ack {
    // 501 (no uploads on this URL) is the client's mistake, not a server failure.
    if err.status().is_server_error() && err.status() != StatusCode::NOT_IMPLEMENTED {
        tracing::warn!(status = err.status().as_u16(), code = %err.code(), reason = err.reason(), "packet failed");
    } else {
        tracing::info!(status = err.status().as_u16(), code = %err.code(), reason = err.reason(), "packet refused");
    }
    let mut ack = Ack::error(err);
    // A refusal the client caused says why, in words a person can act on.
    if err.status().is_client_error() {
        if let Some(message) = error_message(err.reason()) {
            ack = ack.header(header::BITSD_ERROR_MESSAGE, message);
        }
    }
    if let Some(raw) = raw_session {
        ack = ack.echo_session(raw);
    }
    if let Some(n) = received {
        ack = ack.received(n);
    }
    ack
}

/// An error reason as a header value: printable ASCII only (anything else, including line
/// breaks from client-sent values, becomes `?`), at most 200 characters.
fn error_message(reason: &str) -> Option<HeaderValue> {
    let text: String = reason
        .chars()
        .take(200)
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    HeaderValue::from_str(text).ok()
}

/// A storage failure as the client sees it: 500 with the OS error's HRESULT where it is known.
pub(crate) fn storage_failure(e: StorageError) -> BitsError {
    tracing::error!(error = %e, "storage failure");
    if e.is_transient() {
        // The state store or the object store is unreachable: 503, which a client retries.
        return BitsError::new(
            http::StatusCode::SERVICE_UNAVAILABLE,
            bitsd_protocol::HResult::http_error(503),
            bitsd_protocol::ErrorContext::Server,
            e.to_string(),
        );
    }
    let code = if e.is_disk_full() {
        bitsd_protocol::HResult::E_DISK_FULL
    } else {
        bitsd_protocol::HResult::E_FAIL
    };
    BitsError::internal(code, e.to_string())
}

/// The session id header of a request, for echoing.
pub(crate) fn raw_session(headers: &http::HeaderMap) -> Option<HeaderValue> {
    headers.get(header::BITS_SESSION_ID).cloned()
}

type ServiceFuture =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

impl<B> hyper::service::Service<Request<B>> for BitsService
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn call(&self, req: Request<B>) -> Self::Future {
        let svc = self.clone();
        Box::pin(async move { Ok(svc.handle(req).await) })
    }
}

impl<B> tower_service::Service<Request<B>> for BitsService
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        hyper::service::Service::call(&*self, req)
    }
}
