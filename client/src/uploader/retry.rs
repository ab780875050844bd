//! The running job: progress reporting, transport retries with back-off, and ending the
//! session (Close / Cancel), retried on 5xx.

use std::sync::Arc;

use bytes::Bytes;
use http::header::HeaderMap;
use tokio_util::sync::CancellationToken;

use super::session::*;
use super::*;
use crate::error::{hresult, BitsFailure, ClientError, ErrorContext, Request};
use crate::http::Http;
use crate::progress::{JobEvent, JobState, Progress};

/// The state of one running job.
pub(crate) struct Run {
    pub(crate) cfg: Arc<Config>,
    pub(crate) http: Http,
    pub(crate) progress: Progress,
    pub(crate) cancel: CancellationToken,
    pub(crate) failures: u32,
    /// When the current run of failures without progress began (for the no-progress timeout).
    pub(crate) stalled_since: Option<std::time::Instant>,
    pub(crate) retries: u32,
    pub(crate) restarts: u32,
    pub(crate) session: Option<Session>,
}

impl Run {
    pub(crate) fn new(cfg: Arc<Config>, cancel: CancellationToken) -> Self {
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
            stalled_since: None,
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

    pub(crate) fn set_uploaded(&mut self, bytes: u64) {
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
        if self.failures == 0 {
            self.stalled_since = Some(std::time::Instant::now());
        }
        self.failures += 1;
        if self.failures > self.cfg.retry.max_retries {
            return Err(e);
        }
        let delay = self.cfg.retry.delay(self.failures);
        if let (Some(limit), Some(since)) = (self.cfg.no_progress_timeout, self.stalled_since) {
            // Like BITSNoProgressTimeout: a job that has made no progress for this long stops
            // with its last error instead of waiting for another try.
            if since.elapsed() + delay > limit {
                tracing::debug!(?limit, "no progress within the no-progress timeout");
                return Err(e);
            }
        }
        self.retries += 1;
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
    pub(crate) fn no_progress(&mut self, request: Request, status: u16) -> Result<(), ClientError> {
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

    pub(crate) fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
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
