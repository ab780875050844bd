//! `BITS_POST` dispatch: parse the packet, then hand it to its module.

mod completion;
mod create_session;
mod end_session;
mod fragment;

use std::sync::Arc;

use bitsd_protocol::{Ack, BitsError, Packet};
use bitsd_storage::SessionState;
pub(crate) use completion::Completions;
use http::request::Parts;
use http::Response;

use crate::body::ResponseBody;
use crate::routes::Route;
use crate::service::{error_ack, raw_session, BoxError, Shared};

/// Handles one `BITS_POST` request.
pub(crate) async fn handle<B>(
    shared: &Arc<Shared>,
    route: Option<&Route>,
    user: Option<&str>,
    parts: Parts,
    body: B,
) -> Response<ResponseBody>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let started = std::time::Instant::now();
    let raw_sid = raw_session(&parts.headers);
    let mut body = Some(body);
    let ack = dispatch(shared, route, user, &parts, raw_sid.as_ref(), &mut body).await;
    if let Some(unread) = body.take() {
        discard_unread(unread).await;
    }
    tracing::debug!(status = ack.status().as_u16(), "ack");
    let kind = parts
        .headers
        .get(bitsd_protocol::header::BITS_PACKET_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<bitsd_protocol::PacketType>().ok())
        .map_or("invalid", |t| t.as_str());
    let code = ack
        .headers()
        .get(bitsd_protocol::header::BITS_ERROR_CODE)
        .and_then(|v| v.to_str().ok());
    shared.metrics.packet(kind, ack.status().as_u16(), code);
    shared.metrics.packet_latency(kind, started.elapsed());
    ack.into_response()
}

/// How much of an unread request body is read and thrown away before an error Ack goes out.
const DISCARD_MAX_BYTES: u64 = 128 * 1024 * 1024;
/// How long that may take.
const DISCARD_MAX_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and drops what the client is still sending (bounded in bytes and time). Answering
/// while the client still writes makes the kernel reset the connection, and a reset client
/// may never see the Ack: a 413 it never sees is a fragment size it never shrinks.
pub(crate) async fn discard_unread<B>(body: B)
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    use bytes::Buf;
    use http_body_util::BodyExt;
    let work = async {
        let mut body = std::pin::pin!(body);
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body
            .frame()
            .await
            .map(|r| r.map_err(Into::<BoxError>::into))
        {
            if let Ok(data) = frame.into_data() {
                seen += data.remaining() as u64;
            }
            if seen > DISCARD_MAX_BYTES {
                break;
            }
        }
        seen
    };
    match tokio::time::timeout(DISCARD_MAX_TIME, work).await {
        Ok(seen) if seen > 0 => tracing::debug!(bytes = seen, "discarded an unread request body"),
        Ok(_) => {}
        Err(_) => tracing::debug!("gave up discarding a slow request body"),
    }
}

async fn dispatch<B>(
    shared: &Arc<Shared>,
    route: Option<&Route>,
    user: Option<&str>,
    parts: &Parts,
    raw_sid: Option<&http::HeaderValue>,
    body: &mut Option<B>,
) -> Ack
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let Some(route) = route else {
        return error_ack(&BitsError::uploads_disabled(), raw_sid, None);
    };
    let packet = match Packet::parse(&parts.method, &parts.headers) {
        Ok(p) => p,
        Err(e) => return error_ack(&e, raw_sid, None),
    };
    let span = tracing::Span::current();
    span.record("packet", packet.packet_type().as_str());
    if let Some(id) = packet.session_id() {
        span.record("session", tracing::field::display(id));
    }
    let ack: Ack = match packet {
        Packet::Ping => Ack::ok(),
        Packet::CreateSession { protocol } => {
            create_session::handle(shared, route, user, parts, &protocol)
                .await
                .unwrap_or_else(|e| error_ack(&e, None, None))
        }
        Packet::Fragment(f) => fragment::handle(shared, route, user, parts, f, body).await,
        Packet::CloseSession { session_id } => {
            end_session::handle(shared, route, user, &session_id, SessionState::Closed).await
        }
        Packet::CancelSession { session_id } => {
            end_session::handle(shared, route, user, &session_id, SessionState::Cancelled).await
        }
    };
    if ack.status().is_success()
        || ack
            .headers()
            .contains_key(bitsd_protocol::header::BITS_SESSION_ID)
    {
        ack
    } else {
        match raw_sid {
            Some(raw) => ack.echo_session(raw),
            None => ack,
        }
    }
}
