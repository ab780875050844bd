//! Ack builders: every response to a `BITS_POST` (§1, §4).

use http::header::{HeaderMap, HeaderValue, ACCEPT_ENCODING, CONTENT_LENGTH};
use http::{Response, StatusCode};
use uuid::Uuid;

use crate::header;
use crate::{BitsError, SessionId};

/// A BITS Ack under construction. Every Ack carries `BITS-Packet-Type: Ack` and
/// `Content-Length: 0`, and never a body.
#[derive(Clone, Debug)]
pub struct Ack {
    status: StatusCode,
    headers: HeaderMap,
}

impl Ack {
    /// A success Ack (200).
    pub fn ok() -> Self {
        Self::with_status(StatusCode::OK)
    }

    /// An Ack with any status and no error headers (e.g. 401 with an authentication challenge).
    pub fn with_status(status: StatusCode) -> Self {
        let mut headers = HeaderMap::with_capacity(8);
        headers.insert(header::BITS_PACKET_TYPE, HeaderValue::from_static("Ack"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        Ack { status, headers }
    }

    /// The Ack of a failed packet: its status, `BITS-Error-Code` and `BITS-Error-Context`.
    pub fn error(err: &BitsError) -> Self {
        let mut ack = Self::with_status(err.status());
        ack.set_error_headers(err);
        ack
    }

    fn set_error_headers(&mut self, err: &BitsError) {
        self.headers
            .insert(header::BITS_ERROR_CODE, value(err.code().to_string()));
        self.headers.insert(
            header::BITS_ERROR_CONTEXT,
            HeaderValue::from_static(err.context().as_str()),
        );
    }

    /// The 416 Ack of a fragment that starts past what the server holds (§5.3).
    pub fn gap(session_id: &SessionId, received: u64) -> Self {
        let mut ack = Self::with_status(StatusCode::RANGE_NOT_SATISFIABLE);
        ack.headers
            .insert(header::BITS_ERROR_CODE, HeaderValue::from_static("0x0"));
        ack.headers
            .insert(header::BITS_ERROR_CONTEXT, HeaderValue::from_static("0x5"));
        ack.session(session_id).received(received)
    }

    /// The Create-Session Ack: protocol, session id, `Accept-Encoding: Identity`.
    pub fn session_created(session_id: &SessionId, protocol: &Uuid) -> Self {
        let mut ack = Self::ok().session(session_id);
        ack.headers.insert(
            header::BITS_PROTOCOL,
            value(format!("{{{}}}", protocol.hyphenated())),
        );
        ack.headers
            .insert(ACCEPT_ENCODING, HeaderValue::from_static("Identity"));
        ack
    }

    /// Sets `BITS-Session-Id` to an id this server issued.
    pub fn session(mut self, session_id: &SessionId) -> Self {
        self.headers
            .insert(header::BITS_SESSION_ID, value(session_id.to_string()));
        self
    }

    /// Echoes the request's `BITS-Session-Id` value unchanged (on errors, §3).
    pub fn echo_session(mut self, raw: &HeaderValue) -> Self {
        self.headers.insert(header::BITS_SESSION_ID, raw.clone());
        self
    }

    /// Sets `BITS-Received-Content-Range`: the next offset the server wants.
    pub fn received(mut self, received: u64) -> Self {
        self.headers.insert(
            header::BITS_RECEIVED_CONTENT_RANGE,
            value(received.to_string()),
        );
        self
    }

    /// Sets `BITS-Reply-URL` (final Fragment Ack of an upload-reply session).
    pub fn reply_url(mut self, url: HeaderValue) -> Self {
        self.headers.insert(header::BITS_REPLY_URL, url);
        self
    }

    /// Sets `BITS-Host-Id` and, if given, `BITS-Host-Id-Fallback-Timeout` (§8).
    pub fn host_id(mut self, host_id: HeaderValue, fallback_secs: Option<u32>) -> Self {
        self.headers.insert(header::BITS_HOST_ID, host_id);
        if let Some(secs) = fallback_secs {
            self.headers.insert(
                header::BITS_HOST_ID_FALLBACK_TIMEOUT,
                value(secs.to_string()),
            );
        }
        self
    }

    /// Adds any other header (e.g. `WWW-Authenticate` on a 401).
    pub fn header(mut self, name: http::HeaderName, v: HeaderValue) -> Self {
        self.headers.append(name, v);
        self
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The headers so far.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The finished response, with an empty body of the caller's body type.
    pub fn into_response<B: Default>(self) -> Response<B> {
        let mut res = Response::new(B::default());
        *res.status_mut() = self.status;
        *res.headers_mut() = self.headers;
        res
    }
}

fn value(s: String) -> HeaderValue {
    // Only ever called with ASCII digits, hex and GUID punctuation.
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ack_has_packet_type_and_zero_length() {
        let sid: SessionId = "{0f3a6c2e-9b1d-4e57-a2c8-3d4f5e6a7b8c}".parse().unwrap();
        for ack in [
            Ack::ok(),
            Ack::error(&BitsError::session_not_found()),
            Ack::gap(&sid, 4096),
            Ack::session_created(&sid, &crate::BITS_1_5_UPLOAD_PROTOCOL),
        ] {
            let res: Response<()> = ack.into_response();
            assert_eq!(res.headers()["bits-packet-type"], "Ack");
            assert_eq!(res.headers()["content-length"], "0");
        }
        let res: Response<()> = Ack::gap(&sid, 4096).into_response();
        assert_eq!(res.status(), 416);
        assert_eq!(res.headers()["bits-error-code"], "0x0");
        assert_eq!(res.headers()["bits-received-content-range"], "4096");
        let res: Response<()> =
            Ack::session_created(&sid, &crate::BITS_1_5_UPLOAD_PROTOCOL).into_response();
        assert_eq!(
            res.headers()["bits-protocol"],
            "{7df0354d-249b-430f-820d-3d2a9bef4931}"
        );
        assert_eq!(
            res.headers()["bits-session-id"],
            "{0f3a6c2e-9b1d-4e57-a2c8-3d4f5e6a7b8c}"
        );
        let ok: Response<()> = Ack::ok().into_response();
        assert!(ok.headers().get("bits-error-code").is_none());
    }
}
