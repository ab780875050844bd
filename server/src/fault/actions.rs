//! What each fault action does to the request it fires on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bitsd_protocol::{header, Ack, BitsError};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;

use super::cut_request::CutBody;
use super::facts::Facts;
use super::firing::Fired;
use super::plan::{FaultAction, FaultPacket};
use super::record::{head, Recorder};
use super::response_body::FaultResponseBody;
use super::service::{ConnectionDropped, FaultInjectingService};
use crate::body::ResponseBody;
use crate::packets::discard_unread;
use crate::service::BoxError;

impl FaultInjectingService {
    /// Does `fired`'s action to the request; `rec` records it.
    pub(super) async fn apply<B>(
        &self,
        fired: Fired,
        req: Request<B>,
        mut rec: Recorder,
    ) -> Result<Response<FaultResponseBody>, ConnectionDropped>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let dropped = || ConnectionDropped {
            rule: fired.label.clone(),
        };
        match fired.action.clone() {
            FaultAction::Drop => {
                drop(req);
                rec.finish(
                    None,
                    false,
                    "connection closed without processing or answering the request".into(),
                );
                Err(dropped())
            }
            FaultAction::DropAfter { bytes } => {
                let cut = Arc::new(AtomicBool::new(false));
                let req = req.map(|b| CutBody::new(b, bytes, cut.clone()));
                let res = self.inner.handle(req).await;
                if cut.load(Ordering::SeqCst) {
                    rec.finish(
                        None,
                        false,
                        format!(
                            "request body cut after {bytes} bytes and the connection closed; nothing acknowledged"
                        ),
                    );
                } else {
                    rec.finish(
                        Some(head(&res)),
                        false,
                        format!(
                            "the body was not longer than {bytes} bytes: processed, then the connection closed without the answer"
                        ),
                    );
                }
                Err(dropped())
            }
            FaultAction::LoseAck => {
                let res = self.inner.handle(req).await;
                rec.finish(
                    Some(head(&res)),
                    false,
                    "processed; the connection closed instead of sending this answer".into(),
                );
                Err(dropped())
            }
            FaultAction::Status {
                status,
                code,
                context,
            } => {
                discard_unread(req.into_body()).await;
                let status_code =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let res = if matches!(rec.facts.packet, Some(FaultPacket::Get | FaultPacket::Head))
                {
                    empty_response(status_code)
                } else {
                    let ack = match code {
                        Some(code) => {
                            Ack::error(&BitsError::new(status_code, code, context, "injected"))
                        }
                        None => Ack::with_status(status_code),
                    };
                    echo(ack, &rec.facts).into_response()
                };
                Ok(rec.answer(res, Some("answered without processing the request".into())))
            }
            FaultAction::TooLarge { above } => {
                discard_unread(req.into_body()).await;
                let len = rec.facts.fragment.map_or(0, |r| r.len);
                let ack = Ack::error(&BitsError::fragment_too_large(len, above));
                let res = echo(ack, &rec.facts).into_response();
                Ok(rec.answer(
                    res,
                    Some(format!(
                        "fragment of {len} bytes refused (above {above}); nothing stored"
                    )),
                ))
            }
            FaultAction::Resync { offset } => {
                discard_unread(req.into_body()).await;
                let ack = Ack::with_status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::BITS_ERROR_CODE, HeaderValue::from_static("0x0"))
                    .header(header::BITS_ERROR_CONTEXT, HeaderValue::from_static("0x5"))
                    .received(offset);
                let res = echo(ack, &rec.facts).into_response();
                Ok(rec.answer(
                    res,
                    Some(format!(
                        "416 asking the client to continue at {offset}; nothing stored"
                    )),
                ))
            }
            FaultAction::ForgetSession => {
                discard_unread(req.into_body()).await;
                let removed = self.remove(&rec.facts).await;
                let ack = Ack::error(&BitsError::session_not_found());
                let res = echo(ack, &rec.facts).into_response();
                let detail = if removed {
                    "session purged; answered session-not-found"
                } else {
                    "no such session to purge; answered session-not-found"
                };
                Ok(rec.answer(res, Some(detail.into())))
            }
            FaultAction::DelayAck { ms } => {
                let res = self.inner.handle(req).await;
                rec.produced = Some((res.status(), res.headers().clone()));
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(rec.answer(res, Some(format!("processed; answer held back {ms} ms"))))
            }
            FaultAction::FailHandler { status } => {
                let res = self.inner.handle(req).await;
                if !res.status().is_success() {
                    return Ok(rec.answer(
                        res,
                        Some(
                            "the server's own answer was not a success; passed through unchanged"
                                .into(),
                        ),
                    ));
                }
                let total = rec.facts.fragment.map_or(0, |r| r.total);
                let ack = Ack::error(&BitsError::backend_status(status)).received(total);
                let res = echo(ack, &rec.facts).into_response();
                Ok(rec.answer(
                    res,
                    Some(format!(
                        "fragment stored; the Ack reports a reply handler failure with status {status}"
                    )),
                ))
            }
            FaultAction::Truncate { bytes } => {
                let res = self.inner.handle(req).await;
                rec.finish(
                    Some(head(&res)),
                    true,
                    format!("body cut after {bytes} bytes, then the connection closed"),
                );
                Ok(res.map(|b| FaultResponseBody::truncate(b, bytes)))
            }
            FaultAction::Stall { ms, after } => {
                let res = self.inner.handle(req).await;
                rec.finish(
                    Some(head(&res)),
                    true,
                    format!("body paused for {ms} ms after {after} bytes"),
                );
                Ok(res.map(|b| FaultResponseBody::stall(b, after, Duration::from_millis(ms))))
            }
            FaultAction::ExpireSession => {
                let removed = self.remove(&rec.facts).await;
                let res = self.inner.handle(req).await;
                let detail = if removed {
                    "session removed as by the session timeout, then the request was served"
                } else {
                    "no such session to remove; the request was served"
                };
                Ok(rec.answer(res, Some(detail.into())))
            }
        }
    }
}

/// Echoes the request's session id on an Ack the fault layer makes.
fn echo(ack: Ack, facts: &Facts) -> Ack {
    match &facts.raw_session {
        Some(raw) => ack.echo_session(raw),
        None => ack,
    }
}

fn empty_response(status: StatusCode) -> Response<ResponseBody> {
    let mut res = Response::new(ResponseBody::empty());
    *res.status_mut() = status;
    res.headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    res
}
