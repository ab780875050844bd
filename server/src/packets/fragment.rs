//! Fragment (§4.3, §5): the body goes to the session's upload file as it arrives, then the
//! new offset is committed, then the Ack. The last byte runs the completion step (§6).

use std::sync::Arc;

use bitsd_protocol::{decide_fragment, Ack, BitsError, FragmentDecision, FragmentPacket};
use bitsd_storage::{FragmentCommit, FragmentPlan, SessionState};
use http::request::Parts;

use super::completion;
use super::fragment_body::{BodyPace, FragmentBody};
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
    let mut parked = None;
    let ack = match process(shared, route, user, parts, packet, body, &mut parked).await {
        Ok(ack) => ack,
        Err(f) => {
            shared.metrics.fragment(FragmentOutcome::Failed, 0);
            error_ack(&f.error, None, f.received).session(&id)
        }
    };
    // A body read in part (fed to an early write) and then not needed: the rest is read and
    // dropped before the Ack goes out, as the caller does with a body never touched.
    if let Some(rest) = parked {
        rest.discard().await;
    }
    ack
}

async fn process<B>(
    shared: &Arc<Shared>,
    route: &Route,
    user: Option<&str>,
    parts: &Parts,
    packet: FragmentPacket,
    body: &mut Option<B>,
    parked: &mut Option<FragmentBody<B>>,
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
        FragmentBody::new(body)
            .stream(len, 0, 0, pace, None, false)
            .await
    };
    if let Some(outcome) = completion::join(shared, route, user, &packet, read_held).await {
        return outcome;
    }
    let guard = shared.locks.lock(id).await;
    // The body's idle timeout and minimum rate count from the session lock's taking (time
    // spent waiting for it is not the client's).
    let pace = BodyPace::start(&shared.session_limits);
    // The shared backend opens the fragment's write at once and streams the body to it
    // during the session's load (`early_fragment`); that write is kept only if the load
    // makes the fragment exactly those new bytes at that offset. Otherwise the backend may
    // prepare the write with the load (the shared backend records its object key as pending
    // in the same round trip).
    let (loaded, slot, mut early) =
        match shared
            .store
            .early_fragment(&id, packet.range.first, packet.range.len)
        {
            Some(early) => {
                let read = parked.insert(FragmentBody::new(take(body)?));
                let fed = read.feed_early(early, packet.range.len, pace).await?;
                let (loaded, slot) = fed.loaded.map_err(storage_failure)?;
                (loaded, slot, Some((fed.sink, fed.whole)))
            }
            None => {
                let (loaded, slot) = shared
                    .store
                    .load_for_fragment(&id, packet.range.first)
                    .await
                    .map_err(storage_failure)?;
                (loaded, slot, None)
            }
        };
    let mut record = loaded
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
    let idle = pace;
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
            drop(early.take());
            let read = match parked.take() {
                Some(read) => read,
                None => FragmentBody::new(take(body)?),
            };
            read.stream(packet.range.len, 0, 0, idle, None, false)
                .await?;
            shared.metrics.fragment(FragmentOutcome::AlreadyHeld, 0);
            record.touch();
            if final_resend {
                tracing::info!("re-sent final fragment");
                return completion::complete_detached(shared, route, parts, record, guard, false)
                    .await;
            }
            shared
                .store
                .save_lazy(&record)
                .await
                .map_err(storage_failure)?;
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
            // The early write is kept when the fragment is all new bytes from where the
            // session stands; otherwise it is dropped (it stores nothing) and the body read
            // so far is read again into the usual write.
            let exact = write.write_at == packet.range.first
                && write.skip == 0
                && write.len == packet.range.len;
            let (mut sink, early_written) = match early.take() {
                Some((sink, true)) if exact => (sink, true),
                unused => {
                    drop(unused);
                    let sink = match slot {
                        Some(slot) => shared.store.begin_reserved_fragment(&id, plan, slot).await,
                        None => shared.store.begin_fragment(&id, plan).await,
                    }
                    .map_err(storage_failure)?;
                    (sink, false)
                }
            };
            let read = match parked.take() {
                Some(read) => read,
                None => FragmentBody::new(take(body)?),
            };
            read.stream(
                packet.range.len,
                write.skip,
                write.len,
                idle,
                Some(&mut *sink),
                early_written,
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
                // Another request (on another node of a farm) advanced the offset first:
                // nothing of this fragment counts; the client goes on from the winner's.
                return lost_race(shared, &id, current.as_deref(), guard);
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

/// The answer to a fragment whose commit lost the race for the session's offset: the offset
/// that won (the client re-sends from there), or session-not-found when the session ended.
fn lost_race(
    shared: &Shared,
    id: &bitsd_protocol::SessionId,
    current: Option<&bitsd_storage::SessionRecord>,
    guard: crate::session_locks::SessionGuard,
) -> Result<Ack, Failure> {
    drop(guard);
    shared.metrics.fragment(FragmentOutcome::AlreadyHeld, 0);
    match current {
        Some(c) if !c.state.is_terminal() => {
            tracing::info!(
                received = c.received,
                "fragment lost the race for the offset"
            );
            Ok(Ack::ok().session(id).received(c.received))
        }
        _ => Err(BitsError::session_not_found().into()),
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

/// The request's body, taken out of the caller's slot (it is read once).
fn take<B>(body: &mut Option<B>) -> Result<B, BitsError> {
    body.take()
        .ok_or_else(|| BitsError::invalid_arg("body already read"))
}
