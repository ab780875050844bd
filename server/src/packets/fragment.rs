//! Fragment (§4.3, §5): the body goes to the session's upload file as it arrives, then the
//! new offset is committed, then the Ack. The last byte runs the completion step (§6).

use std::pin::pin;
use std::sync::Arc;

use bitsd_protocol::{decide_fragment, Ack, BitsError, FragmentDecision, FragmentPacket};
use bitsd_storage::{FragmentCommit, FragmentPlan, FragmentSink, SessionState};
use bytes::Buf;
use http::request::Parts;
use http_body_util::BodyExt;

use super::completion;
use crate::metrics::FragmentOutcome;
use crate::routes::Route;
use crate::service::{error_ack, storage_failure, BoxError, Shared};
use crate::session_limits::{check_disk, FsyncPolicy};
use bitsd_storage::FragmentDurability;

/// A failed fragment: the error and, when it is known, the offset to report with it.
#[derive(Clone)]
pub(super) struct Failure {
    pub(super) error: BitsError,
    pub(super) received: Option<u64>,
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
    shared: &Arc<Shared>,
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
    shared: &Arc<Shared>,
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
    let (unread, len) = (&mut *body, packet.range.len);
    let read_held = move || async move {
        let body = unread
            .take()
            .ok_or_else(|| BitsError::invalid_arg("body already read"))?;
        let pace = BodyPace::start(&shared.session_limits);
        stream_body(body, len, 0, 0, pace, None).await
    };
    if let Some(outcome) = completion::join(shared, route, user, &packet, read_held).await {
        return outcome;
    }
    let guard = shared.locks.lock(id).await;
    // The backend may prepare this fragment's write in the same step (the shared backend
    // records its object key as pending in the load's round trip).
    let (loaded, slot) = shared
        .store
        .load_for_fragment(&id, packet.range.first)
        .await
        .map_err(storage_failure)?;
    let mut record = loaded
        .filter(|r| {
            !r.state.is_terminal() && r.route == route.prefix() && r.owner.as_deref() == user
        })
        .ok_or_else(BitsError::session_not_found)?;
    let decision = match decide_fragment(&record.progress(), &packet.range, &shared.limits) {
        Ok(decision) => decision,
        Err(error) => return Err(refusal(shared, &id, error).await),
    };
    // The body's idle timeout and minimum rate, counted from here: time spent waiting for
    // the session lock is not the client's.
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
                return completion::complete_detached(shared, route, parts, record, guard, false)
                    .await;
            }
            shared.store.touch(&record).await.map_err(storage_failure)?;
            Ok(Ack::ok().session(&id).received(received))
        }
        FragmentDecision::Write(write) => {
            if let Some(root) = shared.store.files_root() {
                check_disk(root, write.len, &shared.session_limits).map_err(|error| Failure {
                    error,
                    received: Some(record.received),
                })?;
            }
            // The offset this node read: the commit advances it only from here.
            let expected = record.received;
            let plan = FragmentPlan {
                write_at: write.write_at,
                len: write.len,
                durability: durability(shared.fsync, write.completes),
            };
            let mut sink = match slot {
                Some(slot) => shared.store.begin_reserved_fragment(&id, plan, slot).await,
                None => shared.store.begin_fragment(&id, plan).await,
            }
            .map_err(storage_failure)?;
            let body = body
                .take()
                .ok_or_else(|| BitsError::invalid_arg("body already read"))?;
            stream_body(
                body,
                packet.range.len,
                write.skip,
                write.len,
                idle,
                Some(&mut *sink),
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
            let committed = sink.commit(expected, &record).await.map_err(|e| Failure {
                error: storage_failure(e),
                received: None,
            })?;
            if let FragmentCommit::Lost { current } = committed {
                // Another request (on another node of a farm) advanced the offset first, or
                // the record this node remembered was stale: nothing of this fragment counts.
                return lost_race(shared, route, parts, &packet, current.map(|c| *c), guard).await;
            }
            shared.metrics.fragment(FragmentOutcome::Stored, write.len);
            tracing::debug!(
                received = record.received,
                total = write.total,
                "fragment stored"
            );
            if write.completes {
                tracing::info!(total = write.total, "upload complete");
                // A failed completion's Ack reports the whole upload as held: the completion
                // makes that durable first (`flush_on_error`).
                return completion::complete_detached(shared, route, parts, record, guard, true)
                    .await;
            }
            Ok(Ack::ok().session(&id).received(record.received))
        }
    }
}

/// A fragment refused before anything was written, answered from the session as stored: the
/// record the decision used may be a farm node's memory of the session, whose offset is then
/// the client's own claim, and another node may have ended the session since (the shared
/// backend's `recent.rs`). The stored offset, or session-not-found; without the store, no
/// offset.
async fn refusal(shared: &Shared, id: &bitsd_protocol::SessionId, error: BitsError) -> Failure {
    match shared.store.load(id).await {
        Ok(Some(stored)) if !stored.state.is_terminal() => Failure {
            error,
            received: Some(stored.received),
        },
        Ok(_) => BitsError::session_not_found().into(),
        Err(_) => Failure {
            error,
            received: None,
        },
    }
}

/// The answer to a fragment whose commit lost the race for the session's offset (to another
/// request, perhaps on another node of a farm, or because the record it started from was a
/// node's stale memory): the packet is decided again against the record that won, and gets
/// the answer it would have got from that record, except that bytes it could still add are
/// not taken (the client re-sends them from the offset that won): a gap, an error (a total
/// other than the upload's), the completion's answer to a re-sent final fragment (reply URL
/// included), the offset that won, or session-not-found when the session ended.
async fn lost_race(
    shared: &Arc<Shared>,
    route: &Route,
    parts: &Parts,
    packet: &FragmentPacket,
    current: Option<bitsd_storage::SessionRecord>,
    guard: crate::session_locks::SessionGuard,
) -> Result<Ack, Failure> {
    shared.metrics.fragment(FragmentOutcome::AlreadyHeld, 0);
    let id = packet.session_id;
    let Some(mut c) = current.filter(|c| !c.state.is_terminal()) else {
        return Err(BitsError::session_not_found().into());
    };
    let decision =
        decide_fragment(&c.progress(), &packet.range, &shared.limits).map_err(|error| Failure {
            error,
            received: Some(c.received),
        })?;
    match decision {
        FragmentDecision::Gap { received } => Ok(Ack::gap(&id, received)),
        FragmentDecision::AlreadyHeld {
            final_resend: true, ..
        } => {
            tracing::info!("re-sent final fragment of an upload completed meanwhile");
            c.touch();
            completion::complete_detached(shared, route, parts, c, guard, false).await
        }
        FragmentDecision::AlreadyHeld { .. } | FragmentDecision::Write(_) => {
            drop(guard);
            tracing::info!(
                received = c.received,
                "the session's offset had moved when this fragment came to commit (another \
                 request committed first, an earlier attempt of this fragment whose Ack was \
                 lost, or this node remembered an older record); answered with the offset held"
            );
            Ok(Ack::ok().session(&id).received(c.received))
        }
    }
}

/// How durable a fragment must be before its Ack under the fsync policy: per-fragment syncs
/// every fragment's bytes before its offset is committed and flushed; on-close syncs the whole
/// file with the completing fragment and, before that, records each fragment's CRC-32C so
/// recovery can check the unsynced bytes; never syncs nothing.
fn durability(policy: FsyncPolicy, completes: bool) -> FragmentDurability {
    match (policy, completes) {
        (FsyncPolicy::PerFragment, false) => FragmentDurability::Durable,
        (FsyncPolicy::PerFragment | FsyncPolicy::OnClose, true) => FragmentDurability::BytesDurable,
        (FsyncPolicy::OnClose, false) => FragmentDurability::Deferred,
        (FsyncPolicy::Never, _) => FragmentDurability::Unsynced,
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
    mut writer: Option<&mut dyn FragmentSink>,
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
            w.write(chunk.slice((from - start) as usize..(to - start) as usize))
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
