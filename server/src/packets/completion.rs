//! The completion step (§6): once the last byte of an upload is held, commit a plain upload
//! to its destination, or run the route's reply handler and store its reply.
//!
//! A completion runs in a task of its own, detached from the request that started it: the
//! handler run, the storing of the reply and the record update always run to their end, even
//! when the client hangs up (hyper then drops the request's future). The task holds the
//! session lock until it is done, so at most one completion of a session runs at a time and
//! no other packet of the session sees it half done. A re-sent final fragment that arrives
//! while it runs joins it: it waits for it and gets the same Ack; it never starts a second run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bitsd_protocol::{Ack, BitsError, FragmentPacket, SessionId};
use bitsd_reply_handlers::{ReplyBody, Upload};
use bitsd_storage::{
    now_millis, ByteRanges, CommitOutcome, ReplyKind, ReplyRecord, SessionRecord, SessionState,
    UploadMode,
};
use futures_util::StreamExt;
use http::request::Parts;
use http::HeaderValue;
use tokio::sync::watch;
use tracing::Instrument;

use super::fragment::Failure;
use crate::request_url::RequestOrigin;
use crate::routes::Route;
use crate::service::{storage_failure, Shared};
use crate::session_locks::SessionGuard;

/// What a completion ends with: the final fragment's Ack or its failure.
type Outcome = Result<Ack, Failure>;

/// The completions running now, at most one per session. A running completion's entry is
/// removed before it releases the session lock, so whoever takes the lock next finds the
/// record as the completion left it, and no entry.
#[derive(Default)]
pub(crate) struct Completions {
    running: Mutex<HashMap<SessionId, watch::Receiver<Option<Outcome>>>>,
}

impl Completions {
    fn table(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<SessionId, watch::Receiver<Option<Outcome>>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The running completion of `id`, to wait for.
    fn get(&self, id: &SessionId) -> Option<watch::Receiver<Option<Outcome>>> {
        self.table().get(id).cloned()
    }

    /// Waits until no completion runs (those that start meanwhile included).
    pub(crate) async fn idle(&self) {
        loop {
            let running: Vec<_> = self.table().values().cloned().collect();
            if running.is_empty() {
                return;
            }
            for mut rx in running {
                // An error means the task is gone without an outcome: it is not running either.
                let _ = rx.wait_for(Option::is_some).await;
            }
            // The entry goes just after the outcome is sent.
            tokio::task::yield_now().await;
        }
    }
}

/// Removes a completion's entry when its task ends, however it ends (a panic included).
struct Registered<'a> {
    completions: &'a Completions,
    id: SessionId,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.completions.table().remove(&self.id);
    }
}

/// Runs the completion step of `record` in a detached task that owns the session lock
/// (`guard`) until the step has run to its end, and waits for its outcome. If this future is
/// dropped (the client hung up), the task goes on; a re-sent final fragment joins it (see
/// [`join`]). With `flush_on_error`, a failed step first makes the held upload durable (the
/// error Ack reports the whole upload as held).
pub(super) async fn complete_detached(
    shared: &Arc<Shared>,
    route: &Route,
    parts: &Parts,
    mut record: SessionRecord,
    guard: SessionGuard,
    flush_on_error: bool,
) -> Outcome {
    let id = record.id;
    let reply_base = RequestOrigin::of(parts, &shared.urls).reply_base(&shared.urls);
    let (tx, rx) = watch::channel(None);
    shared.completions.table().insert(id, rx.clone());
    let (task_shared, route) = (Arc::clone(shared), route.clone());
    let task = async move {
        let registered = Registered {
            completions: &task_shared.completions,
            id,
        };
        let mut outcome = complete(&task_shared, &route, &reply_base, &mut record).await;
        if outcome.is_err() && flush_on_error {
            if let Err(e) = task_shared.store.flush().await {
                outcome = Err(Failure {
                    error: storage_failure(e),
                    received: None,
                });
            }
        }
        tx.send_replace(Some(outcome));
        // The entry goes before the lock: the next holder of the lock finds no completion.
        drop(registered);
        drop(guard);
    };
    tokio::spawn(task.instrument(tracing::Span::current()));
    wait(rx).await
}

/// If a completion of the packet's session is running and the packet re-sends the final
/// fragment, waits for that completion and returns its outcome (the body, which the server
/// already holds, must be read first by the caller: `read_body`). `None`: no completion is
/// running, or the packet is something else; the caller goes the usual way (the session lock).
pub(super) async fn join<F, Fut>(
    shared: &Shared,
    route: &Route,
    user: Option<&str>,
    packet: &FragmentPacket,
    read_body: F,
) -> Option<Outcome>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), BitsError>>,
{
    let id = packet.session_id;
    let rx = shared.completions.get(&id)?;
    // Read without the lock (the completion holds it): only to check that this is the same
    // session, seen by its owner, on its route, and that the packet ends where the upload does.
    let record = shared.store.load(&id).await.ok()??;
    let range = &packet.range;
    let same = !record.state.is_terminal()
        && record.route == route.prefix()
        && record.owner.as_deref() == user
        && record.total == Some(range.total)
        && range.len > 0
        && range.first + range.len == range.total;
    if !same {
        return None;
    }
    tracing::info!("re-sent final fragment while the completion runs: waiting for it");
    if let Err(error) = read_body().await {
        return Some(Err(Failure {
            error,
            received: Some(record.received),
        }));
    }
    shared
        .metrics
        .fragment(crate::metrics::FragmentOutcome::AlreadyHeld, 0);
    Some(wait(rx).await)
}

/// The outcome of a running completion, once it has one.
async fn wait(mut rx: watch::Receiver<Option<Outcome>>) -> Outcome {
    match rx.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone().unwrap_or_else(|| Err(lost())),
        Err(_) => Err(lost()),
    }
}

/// A completion task that ended without an outcome (it panicked): transient for the client,
/// whose re-sent final fragment runs the step again.
fn lost() -> Failure {
    tracing::error!("the completion task ended without an outcome");
    Failure {
        error: BitsError::internal(
            bitsd_protocol::HResult::E_FAIL,
            "the completion step failed unexpectedly; send the final fragment again",
        ),
        received: None,
    }
}

/// The completion step, idempotent (§6.2): commit a plain upload, or produce and store the
/// reply of an upload-reply session once, then Ack with the total (and the reply URL).
async fn complete(
    shared: &Shared,
    route: &Route,
    reply_base: &str,
    record: &mut SessionRecord,
) -> Outcome {
    let id = record.id;
    let total = record.received;
    let at_total = |error: BitsError| Failure {
        error,
        received: Some(total),
    };
    match route.mode() {
        UploadMode::Upload => {
            commit(shared, route, record).await.map_err(at_total)?;
            Ok(Ack::ok().session(&id).received(total))
        }
        UploadMode::UploadReply => {
            if record.reply.is_none() {
                produce_reply(shared, route, reply_base, record)
                    .await
                    .map_err(at_total)?;
            }
            let url = record
                .reply
                .as_ref()
                .map(|r| r.url.as_str())
                .unwrap_or_default();
            let url = HeaderValue::from_str(url).map_err(|_| {
                at_total(BitsError::internal(
                    bitsd_protocol::HResult::E_FAIL,
                    "reply URL is not a header value",
                ))
            })?;
            Ok(Ack::ok().session(&id).received(total).reply_url(url))
        }
    }
}

/// Commits the upload to its destination unless that is done already.
async fn commit(
    shared: &Shared,
    route: &Route,
    record: &mut SessionRecord,
) -> Result<(), BitsError> {
    if record.committed {
        return Ok(());
    }
    let Some(dest) = record.destination.clone() else {
        return Err(BitsError::access_denied(
            "the URL names a directory, not a file",
        ));
    };
    let outcome = shared
        .store
        .publish_upload(&record.id, &dest, route.overwrites_allowed())
        .await
        .map_err(storage_failure)?;
    match outcome {
        CommitOutcome::Committed => {
            record.committed = true;
            record.touch();
            shared.store.save(record).await.map_err(storage_failure)?;
            tracing::info!(destination = %dest, "upload committed");
            Ok(())
        }
        CommitOutcome::DestinationExists => Err(BitsError::access_denied(format!(
            "{dest} exists and overwrites are off"
        ))),
        CommitOutcome::DestinationInvalid => Err(BitsError::access_denied(format!(
            "{dest} is not a file that can be written"
        ))),
    }
}

/// Runs the route's reply handler and stores its reply durably before recording it.
async fn produce_reply(
    shared: &Shared,
    route: &Route,
    reply_base: &str,
    record: &mut SessionRecord,
) -> Result<(), BitsError> {
    let handler = route.handler().ok_or_else(|| {
        BitsError::internal(
            bitsd_protocol::HResult::E_FAIL,
            "upload-reply route without handler",
        )
    })?;
    // Kept until the reply is stored: a handler's reply file may lie in its work directory.
    let local = if handler.reads_upload() {
        shared.store.upload_file(&record.id).await
    } else {
        shared.store.upload_unread(&record.id).await
    }
    .map_err(storage_failure)?;
    let upload = Upload {
        session_id: record.id,
        original_url: record.remote_url.clone(),
        server_url: shared.urls.server_side_url(&record.remote_url),
        content_name: record.content_name.clone(),
        len: record.received,
        path: local.path.clone(),
        session_dir: local.work_dir.clone(),
    };
    let started = std::time::Instant::now();
    // The handler runs in its own task: a panic there fails this attempt, not the server.
    // `reply` itself is called inside the task too, so a panic before the handler returns
    // its future is caught as well.
    let handler = handler.clone();
    // The task carries the request's span, so the handler's log lines (a command's stderr too)
    // name the packet, session and user like every other line.
    let task = async move { handler.reply(upload).await };
    let reply = match tokio::spawn(tracing::Instrument::in_current_span(task)).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "reply handler failed");
            return Err(BitsError::from(e));
        }
        Err(e) => {
            tracing::error!(error = %e, "reply handler panicked or was cancelled");
            return Err(BitsError::backend_status(500));
        }
    };
    shared.metrics.handler_latency(started.elapsed());
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, body = ?reply.body, "reply handler answered");
    if reply.commit_upload {
        commit(shared, route, record).await?;
    }
    let id = record.id;
    let store = &shared.store;
    let kind = match reply.body {
        ReplyBody::StaticUrl(url) => {
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || HeaderValue::from_str(&url).is_err()
            {
                return Err(BitsError::backend_status(500));
            }
            record.reply = Some(ReplyRecord {
                url,
                kind: ReplyKind::Static,
                created_ms: now_millis(),
                delivered: ByteRanges::new(),
            });
            None
        }
        ReplyBody::File(path) => Some(
            store
                .store_reply_file(&id, &path)
                .await
                .map_err(storage_failure)?,
        ),
        ReplyBody::Empty => Some(
            store
                .begin_reply(&id)
                .await
                .map_err(storage_failure)?
                .finish()
                .await
                .map_err(storage_failure)?,
        ),
        ReplyBody::Bytes(bytes) => {
            let mut w = store.begin_reply(&id).await.map_err(storage_failure)?;
            w.write(bytes).await.map_err(storage_failure)?;
            Some(w.finish().await.map_err(storage_failure)?)
        }
        ReplyBody::Stream { len, mut stream } => {
            let mut w = store.begin_reply(&id).await.map_err(storage_failure)?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    tracing::warn!(error = %e, "reply stream failed");
                    BitsError::backend_status(500)
                })?;
                w.write(chunk).await.map_err(storage_failure)?;
            }
            if w.len() != len {
                tracing::warn!(
                    promised = len,
                    got = w.len(),
                    "reply stream length differs from its promise"
                );
                return Err(BitsError::backend_status(500));
            }
            Some(w.finish().await.map_err(storage_failure)?)
        }
    };
    if let Some(kind) = kind {
        let url = format!("{reply_base}{}", route.reply_path(&id.simple()));
        record.reply = Some(ReplyRecord {
            url,
            kind,
            created_ms: now_millis(),
            delivered: ByteRanges::new(),
        });
    }
    record.state = SessionState::ReplyReady;
    record.touch();
    store.save(record).await.map_err(storage_failure)?;
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "reply stored and recorded"
    );
    Ok(())
}
