//! The transcript line of every request the fault layer sees.

use http::{HeaderMap, Response, StatusCode};

use bitsd_protocol::header;

use super::facts::Facts;
use super::firing::Fired;
use super::plan::FaultPacket;
use super::response_body::FaultResponseBody;
use super::service::FaultInjectingService;
use crate::body::ResponseBody;
use crate::transcript::{header_map, rfc3339, TranscriptEntry};

impl FaultInjectingService {
    pub(super) fn record(
        &self,
        facts: &Facts,
        res: Option<(StatusCode, &HeaderMap)>,
        fired: Option<&Fired>,
        answered: bool,
        detail: Option<String>,
    ) {
        let Some(transcript) = &self.transcript else {
            return;
        };
        let get = |name: &http::HeaderName| {
            res.and_then(|(_, h)| h.get(name))
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let session = facts.session_text.clone().or_else(|| {
            (facts.packet == Some(FaultPacket::CreateSession))
                .then(|| get(&header::BITS_SESSION_ID))
                .flatten()
        });
        let entry = TranscriptEntry {
            seq: facts.seq,
            time: rfc3339(facts.time_ms),
            time_ms: facts.time_ms,
            elapsed_ms: u64::try_from(facts.arrived.elapsed().as_millis()).unwrap_or(u64::MAX),
            method: facts.method.clone(),
            path: facts.path_and_query.clone(),
            packet: facts.label.clone(),
            session,
            request_headers: facts.headers.clone().unwrap_or_default(),
            range: facts.range_text.clone(),
            status: res.map(|(s, _)| s.as_u16()),
            error_code: get(&header::BITS_ERROR_CODE),
            error_context: get(&header::BITS_ERROR_CONTEXT),
            received: get(&header::BITS_RECEIVED_CONTENT_RANGE).and_then(|v| v.trim().parse().ok()),
            reply_url: get(&header::BITS_REPLY_URL),
            response_headers: res.map(|(_, h)| header_map(h, false)).unwrap_or_default(),
            fault: fired.map(|f| f.action.kind().to_owned()),
            rule: fired.map(|f| f.label.clone()),
            answered,
            detail,
        };
        transcript.record(&entry);
    }
}

/// Writes a request's transcript line exactly once: when it is answered, or when hyper drops
/// the request's future because the client went away first.
pub(super) struct Recorder {
    pub(super) svc: FaultInjectingService,
    pub(super) facts: Facts,
    pub(super) fired: Option<Fired>,
    /// The answer the server produced but has not sent yet (`delay-ack`).
    pub(super) produced: Option<(StatusCode, HeaderMap)>,
    pub(super) armed: bool,
}

impl Recorder {
    pub(super) fn finish(
        &mut self,
        res: Option<(StatusCode, &HeaderMap)>,
        answered: bool,
        detail: String,
    ) {
        self.armed = false;
        self.svc.record(
            &self.facts,
            res,
            self.fired.as_ref(),
            answered,
            Some(detail),
        );
    }

    /// Records an answer that goes out whole and hands it to hyper.
    pub(super) fn answer(
        &mut self,
        res: Response<ResponseBody>,
        detail: Option<String>,
    ) -> Response<FaultResponseBody> {
        self.armed = false;
        self.svc.record(
            &self.facts,
            Some(head(&res)),
            self.fired.as_ref(),
            true,
            detail,
        );
        res.map(FaultResponseBody::pass)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if self.armed {
            let produced = self.produced.take();
            self.svc.record(
                &self.facts,
                produced.as_ref().map(|(s, h)| (*s, h)),
                self.fired.as_ref(),
                false,
                Some("the client closed the connection before the answer was sent".into()),
            );
        }
    }
}

pub(super) fn head<B>(res: &Response<B>) -> (StatusCode, &HeaderMap) {
    (res.status(), res.headers())
}
