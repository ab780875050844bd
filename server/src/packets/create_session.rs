//! Create-Session (§4.2): a new session with a fresh random id.

use bitsd_protocol::{Ack, BitsError, SessionId};
use bitsd_storage::{CreateLimits, LimitedCreate, SessionRecord, UploadMode};
use http::request::Parts;
use uuid::Uuid;

use crate::destination::destination_for;
use crate::request_url::RequestOrigin;
use crate::routes::Route;
use crate::service::{storage_failure, Shared};
use crate::session_limits::{check_disk, too_many_sessions};

pub(super) async fn handle(
    shared: &Shared,
    route: &Route,
    user: Option<&str>,
    parts: &Parts,
    protocol: &Uuid,
) -> Result<Ack, BitsError> {
    let root = shared.store.files_root();
    if let Some(root) = root {
        check_disk(root, 0, &shared.session_limits)?;
    }
    let destination = destination_for(route.prefix(), parts.uri.path())?;
    if let (Some(dest), Some(root)) = (&destination, root) {
        crate::name_limits::check_name_lengths(root, dest)?;
    }
    if let Some(why) = destination
        .as_deref()
        .and_then(|dest| shared.store.destination_too_long(dest))
    {
        return Err(crate::name_limits::name_too_long(why));
    }
    if route.mode() == UploadMode::Upload {
        let Some(dest) = &destination else {
            return Err(BitsError::access_denied(
                "the URL names a directory, not a file",
            ));
        };
        // Settled again at commit time; refusing early spares the client a useless upload.
        if !route.overwrites_allowed() && shared.store.destination_exists(dest).await {
            return Err(BitsError::access_denied(format!(
                "{dest} exists and overwrites are off"
            )));
        }
    }
    let id = SessionId::random();
    tracing::Span::current().record("session", tracing::field::display(id));
    let origin = RequestOrigin::of(parts, &shared.urls);
    let mut record = SessionRecord::new(
        id,
        route.prefix().to_owned(),
        route.mode(),
        origin.url_of(parts),
    );
    record.destination = destination;
    record.owner = user.map(str::to_owned);
    create_counted(shared, &record, user).await?;
    tracing::info!(url = %record.remote_url, "session created");
    let mut ack = Ack::session_created(&id, protocol);
    if let Some((host, fallback)) = &shared.host_id {
        ack = ack.host_id(host.clone(), *fallback);
    }
    Ok(ack)
}

/// Creates the session within the live-session limits: counted by the backend when it counts
/// sessions itself (a shared backend counts every node's in PostgreSQL), else by this node's
/// counters.
async fn create_counted(
    shared: &Shared,
    record: &SessionRecord,
    user: Option<&str>,
) -> Result<(), BitsError> {
    let limits = &shared.session_limits;
    let as_u64 = |n: Option<usize>| n.map(|n| u64::try_from(n).unwrap_or(u64::MAX));
    let caps = CreateLimits {
        total: as_u64(limits.max_sessions),
        // Anonymous sessions count only toward the total.
        per_user: as_u64(limits.max_sessions_per_user),
    };
    match shared.store.create_within(record, caps).await {
        Ok(LimitedCreate::Created) => return Ok(()),
        Ok(LimitedCreate::TotalLimit) => return Err(too_many_sessions(limits, None)),
        Ok(LimitedCreate::UserLimit) => return Err(too_many_sessions(limits, user)),
        Ok(LimitedCreate::NotCounted) => {}
        Err(e) => return Err(storage_failure(e)),
    }
    let counts = shared.counts();
    counts.reserve(user, limits)?;
    if let Err(e) = shared.store.create(record).await {
        counts.release(user);
        return Err(storage_failure(e));
    }
    Ok(())
}
