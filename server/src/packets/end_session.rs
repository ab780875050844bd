//! Close-Session and Cancel-Session (§4.4, §4.5): release everything, keep a tombstone.

use bitsd_protocol::{Ack, BitsError, SessionId};
use bitsd_storage::SessionState;

use crate::service::{error_ack, storage_failure, Shared};

/// Ends the session in `state` (Closed or Cancelled). Incomplete uploads are deleted; a
/// committed file stays; the reply is freed. A repeated Close or Cancel finds the tombstone
/// and answers 200 again.
pub(super) async fn handle(
    shared: &Shared,
    user: Option<&str>,
    id: &SessionId,
    state: SessionState,
) -> Ack {
    let _guard = shared.locks.lock(*id).await;
    let record = match shared.store.load(id).await {
        Ok(r) => r,
        Err(e) => return error_ack(&storage_failure(e), None, None).session(id),
    };
    // Another user's session is, to this caller, no session at all.
    let Some(mut record) = record.filter(|r| r.owner.as_deref() == user) else {
        return error_ack(&BitsError::session_not_found(), None, None).session(id);
    };
    if record.state.is_terminal() {
        tracing::debug!(previous = record.state.as_str(), "repeated end of session");
        return Ack::ok().session(id);
    }
    let before = record.state;
    if let Err(e) = shared.store.end_session(&mut record, state).await {
        return error_ack(&storage_failure(e), None, None).session(id);
    }
    if let Ok(counts) = shared.counts().await {
        counts.release(record.owner.as_deref());
    }
    tracing::info!(
        from = before.as_str(),
        to = state.as_str(),
        received = record.received,
        "session ended"
    );
    Ack::ok().session(id)
}
