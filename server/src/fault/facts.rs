//! What the fault layer knows about a request before it is served.

use std::time::Instant;

use bitsd_protocol::{header, ContentRange, PacketType, SessionId};
use http::{HeaderValue, Method, Request};

use super::plan::FaultPacket;
use super::service::now_ms;
use crate::transcript::header_map;

pub(super) struct Facts {
    pub(super) seq: u64,
    pub(super) arrived: Instant,
    pub(super) time_ms: u64,
    pub(super) method: String,
    pub(super) path_and_query: String,
    pub(super) path: String,
    pub(super) packet: Option<FaultPacket>,
    pub(super) label: String,
    pub(super) session_text: Option<String>,
    pub(super) session_key: Option<String>,
    pub(super) session_id: Option<SessionId>,
    pub(super) raw_session: Option<HeaderValue>,
    pub(super) range_text: Option<String>,
    pub(super) fragment: Option<ContentRange>,
    pub(super) headers: Option<std::collections::BTreeMap<String, String>>,
}

/// The session named by a reply URL path (`…/BITS-Sessions/{id}/response`).
fn reply_session(path: &str) -> Option<&str> {
    let rest = &path[path.find("/BITS-Sessions/")? + "/BITS-Sessions/".len()..];
    rest.strip_suffix("/response")
}

impl Facts {
    pub(super) fn of<B>(req: &Request<B>, seq: u64, with_headers: bool) -> Self {
        let method = req.method().clone();
        let headers = req.headers();
        let path = req.uri().path().to_owned();
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or_else(|| path.clone(), |p| p.as_str().to_owned());
        let text = |name: &http::HeaderName| {
            headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let raw_session = headers.get(header::BITS_SESSION_ID).cloned();
        let (packet, label, session_text) = if method.as_str() == "BITS_POST" {
            let packet = text(&header::BITS_PACKET_TYPE)
                .and_then(|t| t.parse::<PacketType>().ok())
                .map(FaultPacket::of_packet_type);
            let label = packet.map_or("invalid".to_owned(), |p| p.as_str().to_owned());
            (packet, label, text(&header::BITS_SESSION_ID))
        } else if method == Method::GET || method == Method::HEAD {
            let packet = if method == Method::GET {
                FaultPacket::Get
            } else {
                FaultPacket::Head
            };
            let session = reply_session(&path).map(|s| {
                s.parse::<SessionId>()
                    .map_or_else(|_| s.to_owned(), |id| id.to_string())
            });
            (Some(packet), packet.as_str().to_owned(), session)
        } else {
            (None, method.as_str().to_owned(), None)
        };
        let session_id = session_text
            .as_deref()
            .and_then(|s| s.parse::<SessionId>().ok());
        let session_key = match packet {
            // Anything that is not a session id shares one counter: the text is the client's.
            Some(p) if p.per_session() => {
                Some(session_id.map(|id| id.to_string()).unwrap_or_default())
            }
            _ => None,
        };
        let (range_text, fragment) = match packet {
            Some(FaultPacket::Fragment) => {
                let r = text(&http::header::CONTENT_RANGE);
                let parsed = r.as_deref().and_then(|v| v.parse::<ContentRange>().ok());
                (r, parsed)
            }
            Some(FaultPacket::Get | FaultPacket::Head) => (text(&http::header::RANGE), None),
            _ => (None, None),
        };
        Facts {
            seq,
            arrived: Instant::now(),
            time_ms: now_ms(),
            method: method.as_str().to_owned(),
            path_and_query,
            path,
            packet,
            label,
            session_text,
            session_key,
            session_id,
            raw_session,
            range_text,
            fragment,
            headers: with_headers.then(|| header_map(headers, true)),
        }
    }
}
