//! Fragment (§4.3, §5): the body goes to the session's upload file as it arrives, then the
//! new offset is committed, then the Ack. The last byte runs the completion step (§6).

use std::pin::pin;

use bitsd_protocol::{decide_fragment, Ack, BitsError, FragmentDecision, FragmentPacket};
use bitsd_reply_handlers::{ReplyBody, Upload};
use bitsd_storage::{
    now_millis, ByteRanges, CommitOutcome, FragmentWriter, ReplyKind, ReplyRecord, SessionRecord,
    SessionState, UploadMode,
};
use bytes::Buf;
use futures_util::StreamExt;
use http::request::Parts;
use http::HeaderValue;
use http_body_util::BodyExt;

use crate::metrics::FragmentOutcome;
use crate::request_url::RequestOrigin;
use crate::routes::Route;
use crate::service::{error_ack, storage_failure, BoxError, Shared};
use crate::session_limits::{check_disk, FsyncPolicy};
use bitsd_storage::FragmentDurability;

/// A failed fragment: the error and, when it is known, the offset to report with it.
struct Failure {
    error: BitsError,
    received: Option<u64>,
}

impl From<BitsError> for Failure {
    fn from(error: BitsError) -> Self {
        Failure {
            error,
            received: None,
        }
    }
}

/// Handles a Fragment. The body is taken out of `body` only when it is read; an error answered
/// before that leaves it for the caller to discard.
pub(super) async fn handle<B>(
    shared: &Shared,
    route: &Route,
    user: Option<&str>,
    parts: &Parts,
    packet: FragmentPacket,
    body: &mut Option<B>,
) -> Ack
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let id = packet.session_id;
    match process(shared, route, user, parts, packet, body).await {
        Ok(ack) => ack,
        Err(f) => {
            shared.metrics.fragment(FragmentOutcome::Failed, 0);
            error_ack(&f.error, None, f.received).session(&id)
        }
    }
}

async fn process<B>(
    shared: &Shared,
    route: &Route,
    user: Option<&str>,
    parts: &Parts,
    packet: FragmentPacket,
    body: &mut Option<B>,
) -> Result<Ack, Failure>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let id = packet.session_id;
    let _guard = shared.locks.lock(id).await;
    let mut record = shared
        .store
        .load(&id)
        .await
        .map_err(storage_failure)?
        .filter(|r| {
            !r.state.is_terminal() && r.route == route.prefix() && r.owner.as_deref() == user
        })
        .ok_or_else(BitsError::session_not_found)?;
    let decision =
        decide_fragment(&record.progress(), &packet.range, &shared.limits).map_err(|error| {
            Failure {
                error,
                received: Some(record.received),
            }
        })?;
    // The body's idle timeout and minimum rate.
    let idle = BodyPace::start(&shared.session_limits);
    match decision {
        FragmentDecision::Gap { received } => {
            shared.metrics.fragment(FragmentOutcome::Gap, 0);
            tracing::info!(
                first = packet.range.first,
                received,
                "fragment past the held bytes"
            );
            Ok(Ack::gap(&id, received))
        }
        FragmentDecision::AlreadyHeld {
            received,
            final_resend,
        } => {
            let body = body
                .take()
                .ok_or_else(|| BitsError::invalid_arg("body already read"))?;
            stream_body(body, packet.range.len, 0, 0, idle, None).await?;
            shared.metrics.fragment(FragmentOutcome::AlreadyHeld, 0);
            record.touch();
            if final_resend {
                tracing::info!("re-sent final fragment");
                return complete(shared, route, parts, &mut record).await;
            }
            shared
                .store
                .save_lazy(&record)
                .await
                .map_err(storage_failure)?;
            Ok(Ack::ok().session(&id).received(received))
        }
        FragmentDecision::Write(write) => {
            check_disk(shared.store.files_dir(), write.len, &shared.session_limits).map_err(
                |error| Failure {
                    error,
                    received: Some(record.received),
                },
            )?;
            let mut writer = shared
                .store
                .fragment_writer(&id, write.write_at)
                .await
                .map_err(storage_failure)?;
            if shared.fsync != FsyncPolicy::Never && write.len >= WRITEBACK_FROM {
                writer.start_writeback_every(WRITEBACK_EVERY);
            }
            let body = body
                .take()
                .ok_or_else(|| BitsError::invalid_arg("body already read"))?;
            stream_body(
                body,
                packet.range.len,
                write.skip,
                write.len,
                idle,
                Some(&mut writer),
            )
            .await
            .map_err(|error| Failure {
                error,
                received: Some(record.received),
            })?;
            record.received = write.received_after;
            record.total = Some(write.total);
            if record.content_name.is_none() {
                record.content_name = packet.content_name.clone();
            }
            if write.completes {
                record.state = SessionState::Complete;
            }
            record.touch();
            // The completing fragment is flushed with the completion's own durable save (or
            // explicitly below when completion fails): its Ack waits for that anyway.
            shared
                .store
                .commit_fragment(writer, &record, durability(shared.fsync, write.completes))
                .await
                .map_err(|e| Failure {
                    error: storage_failure(e),
                    received: None,
                })?;
            shared.metrics.fragment(FragmentOutcome::Stored, write.len);
            tracing::debug!(
                received = record.received,
                total = write.total,
                "fragment stored"
            );
            if write.completes {
                tracing::info!(total = write.total, "upload complete");
                let result = complete(shared, route, parts, &mut record).await;
                if result.is_err() {
                    // The error Ack reports the whole upload as held: make that durable first.
                    shared.store.flush().await.map_err(|e| Failure {
                        error: storage_failure(e),
                        received: None,
                    })?;
                }
                return result;
            }
            Ok(Ack::ok().session(&id).received(record.received))
        }
    }
}

/// The bytes of a fragment of at least [`WRITEBACK_FROM`] bytes start going to disk every this
/// many bytes while its body arrives, so the sync before the Ack waits only for the tail.
/// It matches the writer's gathered writes ([`bitsd_storage::GATHER_BYTES`]): each one is
/// handed to the disk once it is in the page cache.
const WRITEBACK_EVERY: u64 = bitsd_storage::GATHER_BYTES as u64;

/// Fragments smaller than this are synced whole at commit: on the 2-core machine of the
/// benchmark, starting writeback for a 64 KiB fragment cost as much CPU as it saved waiting,
/// while 1 MiB fragments gained 5–7% (README, Performance).
const WRITEBACK_FROM: u64 = 1024 * 1024;

/// How durable a fragment must be before its Ack under the fsync policy.
fn durability(policy: FsyncPolicy, completes: bool) -> FragmentDurability {
    match (policy, completes) {
        (FsyncPolicy::PerFragment, false) => FragmentDurability::Durable,
        (FsyncPolicy::PerFragment | FsyncPolicy::OnClose, true) => FragmentDurability::BytesDurable,
        (FsyncPolicy::OnClose, false) | (FsyncPolicy::Never, _) => FragmentDurability::Deferred,
    }
}

/// Reads the body, discards the first `skip` bytes, writes the next `len` bytes (to `writer`;
/// with none, the whole body is read and dropped: a fragment the server already holds); the
/// body must be exactly `expected` bytes long. Memory use is bounded: the writer holds at most
/// [`bitsd_storage::GATHER_BYTES`] of frames before it writes them.
async fn stream_body<B>(
    body: B,
    expected: u64,
    skip: u64,
    len: u64,
    pace: BodyPace,
    mut writer: Option<&mut FragmentWriter>,
) -> Result<(), BitsError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let mut body = pin!(body);
    let mut seen = 0u64;
    while let Some(frame) = next_frame(&mut body, pace, seen).await? {
        let frame = frame.map_err(|e| body_error(e, seen, expected))?;
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        // Zero-copy for hyper's own body type (its frames are `Bytes`).
        let chunk = data.copy_to_bytes(data.remaining());
        let n = chunk.len() as u64;
        let (start, end) = (seen, seen + n);
        if end > expected {
            return Err(BitsError::invalid_arg(format!(
                "body longer than its Content-Length {expected}"
            )));
        }
        // The part of [start, end) that falls in [skip, skip + len).
        let from = skip.clamp(start, end);
        let to = (skip + len).clamp(start, end);
        if let (Some(w), true) = (writer.as_deref_mut(), from < to) {
            w.write_bytes(chunk.slice((from - start) as usize..(to - start) as usize))
                .await
                .map_err(storage_failure)?;
        }
        seen = end;
    }
    if seen != expected {
        return Err(BitsError::invalid_arg(format!(
            "body ended after {seen} of {expected} bytes"
        )));
    }
    Ok(())
}

/// How long a fragment's body may take: it may send nothing for `idle`, and after `grace` it
/// must keep up `min_rate` bytes per second on average since it started (IIS
/// `minBytesPerSecond`), so a body that trickles is cut off however often it sends a byte.
#[derive(Clone, Copy, Debug)]
struct BodyPace {
    started: tokio::time::Instant,
    idle: std::time::Duration,
    min_rate: u64,
    grace: std::time::Duration,
}

impl BodyPace {
    fn start(limits: &crate::session_limits::SessionLimits) -> Self {
        BodyPace {
            started: tokio::time::Instant::now(),
            idle: limits.body_idle_timeout,
            min_rate: limits.min_body_rate,
            grace: limits.min_body_rate_grace,
        }
    }

    /// When a body that has sent `seen` bytes must have sent more: the earlier of the idle
    /// deadline and the time the minimum rate makes `seen` bytes due; whether it is the rate's.
    fn deadline(&self, seen: u64) -> (tokio::time::Instant, bool) {
        let idle = tokio::time::Instant::now() + self.idle;
        if self.min_rate == 0 {
            return (idle, false);
        }
        let due = self.started
            + self.grace
            + std::time::Duration::from_secs_f64(seen as f64 / self.min_rate as f64);
        if due < idle {
            (due, true)
        } else {
            (idle, false)
        }
    }
}

/// The next frame, with the body's error already boxed (so no non-`Send` error is held);
/// a body that sends nothing for the idle timeout, or falls below the minimum rate after its
/// grace period, is abandoned (500, transient for the client; the session lock is released
/// with the request).
async fn next_frame<B>(
    body: &mut std::pin::Pin<&mut B>,
    pace: BodyPace,
    seen: u64,
) -> Result<Option<Result<http_body::Frame<B::Data>, BoxError>>, BitsError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let (deadline, by_rate) = pace.deadline(seen);
    match tokio::time::timeout_at(deadline, body.frame()).await {
        Ok(next) => Ok(next.map(|r| r.map_err(Into::into))),
        Err(_) if by_rate => Err(BitsError::internal(
            bitsd_protocol::HResult::E_FAIL,
            format!(
                "request body slower than {} bytes/s ({seen} bytes in {} s)",
                pace.min_rate,
                pace.started.elapsed().as_secs()
            ),
        )),
        Err(_) => Err(BitsError::internal(
            bitsd_protocol::HResult::E_FAIL,
            format!("request body idle for {} s", pace.idle.as_secs()),
        )),
    }
}

fn body_error(e: BoxError, seen: u64, expected: u64) -> BitsError {
    BitsError::invalid_arg(format!(
        "body read failed after {seen} of {expected} bytes: {e}"
    ))
}

/// The completion step, idempotent (§6.2): commit a plain upload, or produce and store the
/// reply of an upload-reply session once, then Ack with the total (and the reply URL).
async fn complete(
    shared: &Shared,
    route: &Route,
    parts: &Parts,
    record: &mut SessionRecord,
) -> Result<Ack, Failure> {
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
                produce_reply(shared, route, parts, record)
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
        .commit_upload(&record.id, &dest, route.overwrites_allowed())
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
    parts: &Parts,
    record: &mut SessionRecord,
) -> Result<(), BitsError> {
    let handler = route.handler().ok_or_else(|| {
        BitsError::internal(
            bitsd_protocol::HResult::E_FAIL,
            "upload-reply route without handler",
        )
    })?;
    let upload = Upload {
        session_id: record.id,
        original_url: record.remote_url.clone(),
        content_name: record.content_name.clone(),
        len: record.received,
        path: shared.store.upload_path(&record.id),
        session_dir: shared.store.session_dir(&record.id),
    };
    let started = std::time::Instant::now();
    // The handler runs in its own task: a panic there fails this attempt, not the server.
    // `reply` itself is called inside the task too, so a panic before the handler returns
    // its future is caught as well.
    let handler = handler.clone();
    let reply = match tokio::spawn(async move { handler.reply(upload).await }).await {
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
                .reply_from_file(&id, &path)
                .await
                .map_err(storage_failure)?,
        ),
        ReplyBody::Empty => {
            let (len, crc32c) = store
                .reply_writer(&id)
                .await
                .map_err(storage_failure)?
                .finish()
                .await
                .map_err(storage_failure)?;
            Some(ReplyKind::Stored {
                len,
                crc32c: Some(crc32c),
                in_upload: false,
            })
        }
        ReplyBody::Bytes(bytes) => {
            let mut w = store.reply_writer(&id).await.map_err(storage_failure)?;
            w.write(&bytes).await.map_err(storage_failure)?;
            let (len, crc32c) = w.finish().await.map_err(storage_failure)?;
            Some(ReplyKind::Stored {
                len,
                crc32c: Some(crc32c),
                in_upload: false,
            })
        }
        ReplyBody::Stream { len, mut stream } => {
            let mut w = store.reply_writer(&id).await.map_err(storage_failure)?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    tracing::warn!(error = %e, "reply stream failed");
                    BitsError::backend_status(500)
                })?;
                w.write(&chunk).await.map_err(storage_failure)?;
            }
            if w.len() != len {
                tracing::warn!(
                    promised = len,
                    got = w.len(),
                    "reply stream length differs from its promise"
                );
                return Err(BitsError::backend_status(500));
            }
            let (len, crc32c) = w.finish().await.map_err(storage_failure)?;
            Some(ReplyKind::Stored {
                len,
                crc32c: Some(crc32c),
                in_upload: false,
            })
        }
    };
    if let Some(kind) = kind {
        let base = RequestOrigin::of(parts, &shared.urls).reply_base(&shared.urls);
        let url = format!("{base}{}", route.reply_path(&id.simple()));
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
    Ok(())
}
