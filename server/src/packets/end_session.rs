//! Close-Session and Cancel-Session (§4.4, §4.5): release everything, keep a tombstone.

use bitsd_protocol::{Ack, BitsError, SessionId};
use bitsd_storage::SessionState;

use crate::routes::Route;
use crate::service::{error_ack, storage_failure, Shared};

/// Ends the session in `state` (Closed or Cancelled). Incomplete uploads are deleted; a
/// committed file stays; the reply is freed. A repeated Close or Cancel finds the tombstone
/// and answers 200 again. A session of another route or another user is not found, as for
/// a Fragment. Waits for a running completion of the session (it holds the session lock).
pub(super) async fn handle(
    shared: &Shared,
    route: &Route,
    user: Option<&str>,
    id: &SessionId,
    state: SessionState,
) -> Ack {
    let _guard = shared.locks.lock(*id).await;
    let record = match shared.store.load(id).await {
        Ok(r) => r,
        Err(e) => return error_ack(&storage_failure(e), None, None).session(id),
    };
    // Another user's session, or one created on another route, is to this caller no session
    // at all.
    let Some(mut record) =
        record.filter(|r| r.owner.as_deref() == user && r.route == route.prefix())
    else {
        return error_ack(&BitsError::session_not_found(), None, None).session(id);
    };
    if record.state.is_terminal() {
        tracing::debug!(previous = record.state.as_str(), "repeated end of session");
        return Ack::ok().session(id);
    }
    let before = record.state;
    if let Err(e) = shared.store.end_session(&mut record, state).await {
        // The tombstone may be saved already (the files went wrong after it): then the session
        // is over whatever the client hears, a repeated Close answers 200 from the tombstone,
        // and its slot in the session limits must be given back now or never.
        let ended = matches!(shared.store.load(id).await, Ok(Some(r)) if r.state.is_terminal());
        if ended {
            shared.counts().release(record.owner.as_deref());
        }
        return error_ack(&storage_failure(e), None, None).session(id);
    }
    shared.counts().release(record.owner.as_deref());
    tracing::info!(
        from = before.as_str(),
        to = state.as_str(),
        received = record.received,
        "session ended"
    );
    Ack::ok().session(id)
}
