//! `BITS_POST` dispatch: parse the packet, then hand it to its module.

mod create_session;
mod end_session;
mod fragment;

use bitsd_protocol::{Ack, BitsError, Packet};
use bitsd_storage::SessionState;
use http::request::Parts;
use http::Response;

use crate::body::ResponseBody;
use crate::routes::Route;
use crate::service::{error_ack, raw_session, BoxError, Shared};

/// Handles one `BITS_POST` request.
pub(crate) async fn handle<B>(
    shared: &Shared,
    route: Option<&Route>,
    parts: Parts,
    body: B,
) -> Response<ResponseBody>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let raw_sid = raw_session(&parts.headers);
    let Some(route) = route else {
        return error_ack(&BitsError::uploads_disabled(), raw_sid.as_ref(), None).into_response();
    };
    let packet = match Packet::parse(&parts.method, &parts.headers) {
        Ok(p) => p,
        Err(e) => return error_ack(&e, raw_sid.as_ref(), None).into_response(),
    };
    let span = tracing::Span::current();
    span.record("packet", packet.packet_type().as_str());
    if let Some(id) = packet.session_id() {
        span.record("session", tracing::field::display(id));
    }
    let ack: Ack = match packet {
        Packet::Ping => Ack::ok(),
        Packet::CreateSession { protocol } => {
            create_session::handle(shared, route, &parts, &protocol)
                .await
                .unwrap_or_else(|e| error_ack(&e, None, None))
        }
        Packet::Fragment(f) => fragment::handle(shared, route, &parts, f, body).await,
        Packet::CloseSession { session_id } => {
            end_session::handle(shared, &session_id, SessionState::Closed).await
        }
        Packet::CancelSession { session_id } => {
            end_session::handle(shared, &session_id, SessionState::Cancelled).await
        }
    };
    let ack = if ack.status().is_success()
        || ack
            .headers()
            .contains_key(bitsd_protocol::header::BITS_SESSION_ID)
    {
        ack
    } else {
        match raw_sid {
            Some(raw) => ack.echo_session(&raw),
            None => ack,
        }
    };
    tracing::debug!(status = ack.status().as_u16(), "ack");
    ack.into_response()
}
