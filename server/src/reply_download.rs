//! The reply download (§10): GET and HEAD on `{prefix}BITS-Sessions/{id}/response`, with
//! single byte ranges (the first satisfiable one of a multi-range request), a stable `ETag` and `Last-Modified`, and reply progress counting.
//! A backend that hands downloads to its store (`presigned_reply_secs`) gets a `307` to a
//! presigned URL instead, after the same checks ([`redirect`]).

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bitsd_protocol::{ReplyRange as RangeRequest, SessionId};
use bitsd_storage::{ReplyKind, ReplyRecord, SessionState};
use http::header::{
    ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_RANGE,
    LAST_MODIFIED, LOCATION, RANGE,
};
use http::request::Parts;
use http::{HeaderValue, Method, Response, StatusCode};

use crate::body::ResponseBody;
use crate::conn_send::ConnSend;
use crate::routes::Route;
use crate::service::{plain, Shared};

/// Serves the reply if `req` addresses one on `route`; `None` if the path is not a reply path.
pub(crate) async fn handle(
    shared: &Arc<Shared>,
    route: &Route,
    user: Option<&str>,
    req: &Parts,
) -> Option<Response<ResponseBody>> {
    let rest = req
        .uri
        .path()
        .strip_prefix(route.prefix())?
        .strip_prefix("BITS-Sessions/")?;
    let id_text = rest.strip_suffix("/response")?;
    Some(serve(shared, route, user, req, id_text).await)
}

async fn serve(
    shared: &Arc<Shared>,
    route: &Route,
    user: Option<&str>,
    req: &Parts,
    id_text: &str,
) -> Response<ResponseBody> {
    let not_found = || plain(StatusCode::NOT_FOUND, "no such reply\n");
    let Ok(id) = id_text.parse::<SessionId>() else {
        return not_found();
    };
    tracing::Span::current().record("session", tracing::field::display(id));
    let record = match shared.store.load(&id).await {
        Ok(Some(r)) => r,
        Ok(None) => return not_found(),
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, "reply lookup failed for now");
            return unavailable();
        }
        Err(e) => {
            tracing::error!(error = %e, "reply lookup failed");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "storage failure\n");
        }
    };
    // Only the session's owner sees its reply; to anyone else it does not exist.
    if record.state != SessionState::ReplyReady
        || record.route != route.prefix()
        || record.owner.as_deref() != user
    {
        return not_found();
    }
    let Some(reply) = record.reply else {
        return not_found();
    };
    let ReplyKind::Stored { len, .. } = reply.kind else {
        return not_found();
    };
    // Stable for the reply's whole life: it never changes once stored (§10).
    let etag = format!("\"{}-{:x}-{len}\"", id.simple(), reply.created_ms);
    let modified = UNIX_EPOCH + Duration::from_millis(reply.created_ms);
    let mut range = match req.headers.get(RANGE).and_then(|v| v.to_str().ok()) {
        Some(v) => RangeRequest::parse(v, len),
        None => RangeRequest::Full,
    };
    if let Some(res) = redirect(shared, &id, &reply, len, req, &range).await {
        return res;
    }
    if let Some(cond) = req.headers.get(IF_RANGE).and_then(|v| v.to_str().ok()) {
        if cond.trim() != etag && cond.trim() != httpdate::fmt_http_date(modified) {
            range = RangeRequest::Full;
        }
    }
    let mut res = Response::new(ResponseBody::empty());
    let h = res.headers_mut();
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(modified)) {
        h.insert(LAST_MODIFIED, v);
    }
    let (status, start, count) = match range {
        RangeRequest::Full => (StatusCode::OK, 0, len),
        RangeRequest::Partial { start, end } => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
                h.insert(CONTENT_RANGE, v);
            }
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        RangeRequest::Unsatisfiable => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                h.insert(CONTENT_RANGE, v);
            }
            h.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
            *res.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            return res;
        }
    };
    h.insert(CONTENT_LENGTH, HeaderValue::from(count));
    *res.status_mut() = status;
    if req.method == Method::HEAD || count == 0 {
        return res;
    }
    // One trip off the runtime opens the file and reads the first chunk (for a small reply,
    // all of it); later chunks are read ahead while the connection sends (see `ResponseBody`).
    let Some(path) = shared.store.reply_local_path(&id, &reply.kind) else {
        // A backend that keeps no local reply file streams the range itself.
        return match shared
            .store
            .read_reply(&id, &reply.kind, start, count)
            .await
        {
            Ok(stream) => {
                let report = delivery_report(shared, id, reply.created_ms, start);
                let conn = req.extensions.get::<ConnSend>().cloned();
                *res.body_mut() = ResponseBody::stream(stream, count, report, conn);
                res
            }
            Err(e) => {
                if !still_served(shared, &id, reply.created_ms).await {
                    return not_found();
                }
                if e.is_transient() {
                    tracing::warn!(error = %e, "reply unreadable for now");
                    return unavailable();
                }
                tracing::error!(error = %e, backend = shared.store.kind(), "reply unreadable");
                plain(StatusCode::INTERNAL_SERVER_ERROR, "reply unreadable\n")
            }
        };
    };
    let first_len = count.min(crate::body::FILE_CHUNK as u64) as usize;
    let opened = tokio::task::spawn_blocking(move || {
        let file =
            std::fs::File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        let first = crate::body::read_chunk(&file, start, first_len)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        Ok::<_, String>((file, first))
    })
    .await;
    let (file, first) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => {
            // The record was read without the session lock: a Close, Cancel or the sweeper
            // may have removed the reply since. Then the reply is gone, not broken.
            if !still_served(shared, &id, reply.created_ms).await {
                return not_found();
            }
            tracing::error!(error = %e, "reply file unreadable");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "reply unreadable\n");
        }
        Err(e) => {
            tracing::error!(error = %e, "reply read task failed");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "reply unreadable\n");
        }
    };
    let report = delivery_report(shared, id, reply.created_ms, start);
    let conn = req.extensions.get::<ConnSend>().cloned();
    *res.body_mut() = ResponseBody::file(file, start, count, first, report, conn);
    res
}

/// `307 Temporary Redirect` to a presigned URL of the stored reply (`len` bytes) in the
/// backend's store, when the backend hands reply downloads off (`presigned_reply_secs`) and
/// there are bytes to send: the client then sends the same request (its `Range` included) to
/// the store, which answers with the store's own `ETag` and `Last-Modified` (HEAD is
/// redirected too, so a client sees one kind). An unsatisfiable range, a multi-range request,
/// a `Range` not in plain form ([`RangeRequest::is_plain_single`]) and an empty reply are answered here. A GET's range is counted as delivered now, since no
/// node sees the bytes: the whole reply when the request is conditional (`If-Range`: the
/// store decides whether the range holds). A URL that cannot be signed (credentials
/// unavailable) falls back to serving the reply here.
async fn redirect(
    shared: &Arc<Shared>,
    id: &SessionId,
    reply: &ReplyRecord,
    len: u64,
    req: &Parts,
    range: &RangeRequest,
) -> Option<Response<ResponseBody>> {
    // Only a plain single range goes to the store: a multi-range request, or one the store
    // may read otherwise than this node (Garage answers 416 to numbers past u64, `BYTES=`,
    // spaces around `=`), is answered here, so that the count matches what the client got.
    let plain = req
        .headers
        .get(RANGE)
        .is_none_or(|v| v.to_str().is_ok_and(RangeRequest::is_plain_single));
    if len == 0 || !plain || matches!(range, RangeRequest::Unsatisfiable) {
        return None;
    }
    let url = match shared
        .store
        .reply_redirect(id, &reply.kind, &req.method)
        .await
    {
        Ok(Some(url)) => url,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "could not presign the reply's URL; serving it here");
            return None;
        }
    };
    let location = match HeaderValue::from_str(&url) {
        Ok(v) => v,
        Err(_) => {
            tracing::warn!("the presigned reply URL is not a header value; serving it here");
            return None;
        }
    };
    if req.method == Method::GET {
        let (start, end) = match range {
            RangeRequest::Partial { start, end } if !req.headers.contains_key(IF_RANGE) => {
                (*start, end + 1)
            }
            _ => (0, len),
        };
        tokio::spawn(record_delivery(
            shared.clone(),
            *id,
            reply.created_ms,
            start,
            end,
        ));
    }
    let mut res = Response::new(ResponseBody::empty());
    *res.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    let h = res.headers_mut();
    h.insert(LOCATION, location);
    // The URL expires: no cache may keep this answer.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    Some(res)
}

/// Records, once the body is done, the bytes from `start` that the connection took.
fn delivery_report(
    shared: &Arc<Shared>,
    id: SessionId,
    created_ms: u64,
    start: u64,
) -> crate::body::DeliveryReport {
    let shared = shared.clone();
    Box::new(move |taken: u64| {
        if taken == 0 {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(record_delivery(
            shared,
            id,
            created_ms,
            start,
            start + taken,
        ));
    })
}

/// Whether the reply created at `created_ms` is still the session's reply, ready to serve.
/// 503 for a reply that cannot be read right now (PostgreSQL or the object store
/// unreachable): a transient answer the client retries; nothing was lost.
fn unavailable() -> Response<ResponseBody> {
    plain(
        StatusCode::SERVICE_UNAVAILABLE,
        "storage temporarily unavailable, retry later\n",
    )
}

async fn still_served(shared: &Shared, id: &SessionId, created_ms: u64) -> bool {
    match shared.store.load(id).await {
        Ok(Some(r)) => {
            r.state == SessionState::ReplyReady
                && r.reply.is_some_and(|reply| reply.created_ms == created_ms)
        }
        Ok(None) => false,
        // Cannot tell: report the read failure as it is.
        Err(_) => true,
    }
}

/// Adds `[start, end)` to the reply's delivered ranges (progress; not flushed on its own).
async fn record_delivery(
    shared: Arc<Shared>,
    id: SessionId,
    created_ms: u64,
    start: u64,
    end: u64,
) {
    let _guard = shared.locks.lock(id).await;
    match shared
        .store
        .record_reply_delivered(&id, created_ms, start, end)
        .await
    {
        Ok(Some(record)) => {
            shared.metrics.reply_served(end - start);
            let transferred = record.reply.map_or(0, |r| r.delivered.covered());
            tracing::debug!(session = %id, start, end, transferred, "reply bytes delivered");
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "could not record reply progress"),
    }
}
