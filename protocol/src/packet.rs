//! Typed `BITS_POST` packets, parsed from a request head (§1.1, §4, §5.1).

use std::fmt;
use std::str::FromStr;

use http::header::{HeaderMap, CONTENT_ENCODING, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::Method;
use uuid::Uuid;

use crate::header;
use crate::{BitsError, ContentRange, SessionId};

/// The one upload protocol there is: "BITS 1.5 Upload Protocol".
pub const BITS_1_5_UPLOAD_PROTOCOL: Uuid = Uuid::from_u128(0x7df0354d_249b_430f_820d_3d2a9bef4931);

/// Header values longer than this are refused with 400 (MC-BUP 2.2.1 says they SHOULD NOT exceed 4 KB).
pub const MAX_HEADER_VALUE_LEN: usize = 4096;

/// The value of `BITS-Packet-Type`, matched case-insensitively.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PacketType {
    /// `Ping`: no state; sets up the connection and authentication.
    Ping,
    /// `Create-Session`: starts a session and negotiates the protocol.
    CreateSession,
    /// `Fragment`: a range of the upload.
    Fragment,
    /// `Close-Session`: the client is finished.
    CloseSession,
    /// `Cancel-Session`: the client abandons the job.
    CancelSession,
}

impl PacketType {
    /// The canonical spelling (SDK mixed case).
    pub fn as_str(self) -> &'static str {
        match self {
            PacketType::Ping => "Ping",
            PacketType::CreateSession => "Create-Session",
            PacketType::Fragment => "Fragment",
            PacketType::CloseSession => "Close-Session",
            PacketType::CancelSession => "Cancel-Session",
        }
    }
}

impl fmt::Display for PacketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PacketType {
    type Err = BitsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        [
            PacketType::Ping,
            PacketType::CreateSession,
            PacketType::Fragment,
            PacketType::CloseSession,
            PacketType::CancelSession,
        ]
        .into_iter()
        .find(|t| t.as_str().eq_ignore_ascii_case(s))
        .ok_or_else(|| BitsError::invalid_arg(format!("unknown BITS-Packet-Type {s:?}")))
    }
}

/// A Fragment packet's head: which session, which bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FragmentPacket {
    /// The session the bytes belong to.
    pub session_id: SessionId,
    /// Where the body's bytes go in the upload.
    pub range: ContentRange,
    /// The client's local file name, if it sent one (informational).
    pub content_name: Option<String>,
}

/// A parsed `BITS_POST` packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    /// Ping.
    Ping,
    /// Create-Session, with the protocol chosen from the client's list.
    CreateSession {
        /// The negotiated protocol GUID.
        protocol: Uuid,
    },
    /// Fragment.
    Fragment(FragmentPacket),
    /// Close-Session.
    CloseSession {
        /// The session to close.
        session_id: SessionId,
    },
    /// Cancel-Session.
    CancelSession {
        /// The session to cancel.
        session_id: SessionId,
    },
}

impl Packet {
    /// The packet's type.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Ping => PacketType::Ping,
            Packet::CreateSession { .. } => PacketType::CreateSession,
            Packet::Fragment(_) => PacketType::Fragment,
            Packet::CloseSession { .. } => PacketType::CloseSession,
            Packet::CancelSession { .. } => PacketType::CancelSession,
        }
    }

    /// The session the packet names, if any.
    pub fn session_id(&self) -> Option<SessionId> {
        match self {
            Packet::Ping | Packet::CreateSession { .. } => None,
            Packet::Fragment(f) => Some(f.session_id),
            Packet::CloseSession { session_id } | Packet::CancelSession { session_id } => {
                Some(*session_id)
            }
        }
    }

    /// Parses a request head. `method` must be `BITS_POST`. Every rule of the packet's headers
    /// is checked here, including that the declared body length fits the packet; the caller only
    /// has to read exactly `Content-Length` body bytes.
    pub fn parse(method: &Method, headers: &HeaderMap) -> Result<Packet, BitsError> {
        if method.as_str() != "BITS_POST" {
            return Err(BitsError::invalid_arg(format!(
                "method {method} is not BITS_POST"
            )));
        }
        for (name, value) in headers {
            if value.len() > MAX_HEADER_VALUE_LEN {
                return Err(BitsError::invalid_arg(format!(
                    "header {name} is {} bytes long; the limit is {MAX_HEADER_VALUE_LEN}",
                    value.len()
                )));
            }
        }
        let packet_type: PacketType = text(headers, &header::BITS_PACKET_TYPE)?
            .ok_or_else(|| BitsError::invalid_arg("missing BITS-Packet-Type"))?
            .parse()?;
        if headers.contains_key(TRANSFER_ENCODING) {
            return Err(BitsError::invalid_arg(format!(
                "{packet_type} with Transfer-Encoding; BITS packets need Content-Length"
            )));
        }
        let content_length = content_length(headers)?;
        if packet_type != PacketType::Fragment && content_length.unwrap_or(0) != 0 {
            return Err(BitsError::invalid_arg(format!(
                "{packet_type} must not carry a body"
            )));
        }
        match packet_type {
            PacketType::Ping => Ok(Packet::Ping),
            PacketType::CreateSession => {
                let offered = text(headers, &header::BITS_SUPPORTED_PROTOCOLS)?
                    .ok_or_else(|| BitsError::invalid_arg("missing BITS-Supported-Protocols"))?;
                Ok(Packet::CreateSession {
                    protocol: negotiate_protocol(offered)?,
                })
            }
            PacketType::Fragment => {
                let session_id = session_id(headers)?;
                let range_text = text(headers, &http::header::CONTENT_RANGE)?
                    .ok_or_else(|| BitsError::invalid_arg("Fragment without Content-Range"))?;
                let range: ContentRange = range_text
                    .parse()
                    .map_err(|e| BitsError::invalid_arg(format!("{e}")))?;
                match content_length {
                    None => return Err(BitsError::invalid_arg("Fragment without Content-Length")),
                    Some(n) if n != range.len => {
                        return Err(BitsError::invalid_arg(format!(
                            "Content-Length {n} does not match Content-Range {range} ({} bytes)",
                            range.len
                        )))
                    }
                    Some(_) => {}
                }
                if let Some(enc) = text(headers, &CONTENT_ENCODING)? {
                    if !enc.trim().eq_ignore_ascii_case("identity") {
                        return Err(BitsError::invalid_arg(format!(
                            "Content-Encoding {enc:?} is not supported; only identity"
                        )));
                    }
                }
                let content_name = text(headers, &header::CONTENT_NAME)?.map(str::to_owned);
                Ok(Packet::Fragment(FragmentPacket {
                    session_id,
                    range,
                    content_name,
                }))
            }
            PacketType::CloseSession => Ok(Packet::CloseSession {
                session_id: session_id(headers)?,
            }),
            PacketType::CancelSession => Ok(Packet::CancelSession {
                session_id: session_id(headers)?,
            }),
        }
    }
}

/// Picks the protocol from a `BITS-Supported-Protocols` value: GUIDs separated by spaces and/or
/// commas, braces optional, compared case-insensitively; the first one the server speaks wins.
pub fn negotiate_protocol(offered: &str) -> Result<Uuid, BitsError> {
    offered
        .split([' ', ',', '\t'])
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .filter_map(|t| {
            let inner = t
                .strip_prefix('{')
                .and_then(|x| x.strip_suffix('}'))
                .unwrap_or(t);
            Uuid::try_parse(inner).ok()
        })
        .find(|g| *g == BITS_1_5_UPLOAD_PROTOCOL)
        .ok_or_else(|| {
            BitsError::invalid_arg(format!(
                "no supported protocol in BITS-Supported-Protocols {offered:?}"
            ))
        })
}

fn text<'h>(headers: &'h HeaderMap, name: &http::HeaderName) -> Result<Option<&'h str>, BitsError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| BitsError::invalid_arg(format!("header {name} is not visible ASCII"))),
    }
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>, BitsError> {
    let mut values = headers.get_all(CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    let bad = || BitsError::invalid_arg("malformed Content-Length");
    let s = first.to_str().map_err(|_| bad())?.trim();
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = s.parse().map_err(|_| bad())?;
    if values.any(|v| v != first) {
        return Err(bad());
    }
    Ok(Some(n))
}

fn session_id(headers: &HeaderMap) -> Result<SessionId, BitsError> {
    let raw = text(headers, &header::BITS_SESSION_ID)?
        .ok_or_else(|| BitsError::invalid_arg("missing BITS-Session-Id"))?;
    if raw.trim().is_empty() {
        return Err(BitsError::invalid_arg("empty BITS-Session-Id"));
    }
    // Every id this server issues is a GUID: anything else names no session of ours.
    raw.parse().map_err(|_| BitsError::session_not_found())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HResult;
    use http::{HeaderValue, StatusCode};

    fn method() -> Method {
        Method::from_bytes(b"BITS_POST").unwrap()
    }

    fn head(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const SID: &str = "{0f3a6c2e-9b1d-4e57-a2c8-3d4f5e6a7b8c}";

    #[test]
    fn packet_type_is_case_insensitive() {
        for t in ["CREATE-SESSION", "create-session", "Create-Session"] {
            let p = Packet::parse(
                &method(),
                &head(&[
                    ("BITS-Packet-Type", t),
                    (
                        "BITS-Supported-Protocols",
                        "{7DF0354D-249B-430F-820D-3D2A9BEF4931}",
                    ),
                ]),
            )
            .unwrap();
            assert_eq!(
                p,
                Packet::CreateSession {
                    protocol: BITS_1_5_UPLOAD_PROTOCOL
                }
            );
        }
    }

    #[test]
    fn protocols_split_on_spaces_and_commas() {
        let list = "{11111111-1111-1111-1111-111111111111},{7df0354d-249b-430f-820d-3d2a9bef4931}";
        assert_eq!(negotiate_protocol(list).unwrap(), BITS_1_5_UPLOAD_PROTOCOL);
        let list =
            "{11111111-1111-1111-1111-111111111111} , {7df0354d-249b-430f-820d-3d2a9bef4931}";
        assert_eq!(negotiate_protocol(list).unwrap(), BITS_1_5_UPLOAD_PROTOCOL);
        assert!(negotiate_protocol("{00000000-0000-0000-0000-000000000001}").is_err());
        assert!(negotiate_protocol("").is_err());
    }

    #[test]
    fn fragment_rules() {
        let ok = Packet::parse(
            &method(),
            &head(&[
                ("BITS-Packet-Type", "Fragment"),
                ("BITS-Session-Id", SID),
                ("Content-Range", "bytes 0-4095/10000"),
                ("Content-Length", "4096"),
                ("Content-Name", "report.bin"),
            ]),
        )
        .unwrap();
        let Packet::Fragment(f) = ok else { panic!() };
        assert_eq!(f.range.len, 4096);
        assert_eq!(f.content_name.as_deref(), Some("report.bin"));

        type Case<'a> = (&'a [(&'a str, &'a str)], StatusCode, HResult);
        let cases: &[Case] = &[
            (
                &[
                    ("BITS-Packet-Type", "Fragment"),
                    ("BITS-Session-Id", SID),
                    ("Content-Length", "1"),
                ],
                StatusCode::BAD_REQUEST,
                HResult::E_INVALIDARG,
            ),
            (
                &[
                    ("BITS-Packet-Type", "Fragment"),
                    ("BITS-Session-Id", SID),
                    ("Content-Range", "bytes 0-4095/10000"),
                    ("Content-Length", "4000"),
                ],
                StatusCode::BAD_REQUEST,
                HResult::E_INVALIDARG,
            ),
            (
                &[
                    ("BITS-Packet-Type", "Fragment"),
                    ("BITS-Session-Id", SID),
                    ("Content-Range", "bytes 0-4095/10000"),
                    ("Transfer-Encoding", "chunked"),
                ],
                StatusCode::BAD_REQUEST,
                HResult::E_INVALIDARG,
            ),
            (
                &[
                    ("BITS-Packet-Type", "Fragment"),
                    ("BITS-Session-Id", SID),
                    ("Content-Range", "bytes 0-10000/10000"),
                    ("Content-Length", "10001"),
                ],
                StatusCode::BAD_REQUEST,
                HResult::E_INVALIDARG,
            ),
            (
                &[
                    ("BITS-Packet-Type", "Fragment"),
                    ("Content-Range", "bytes 0-4095/10000"),
                    ("Content-Length", "4096"),
                ],
                StatusCode::BAD_REQUEST,
                HResult::E_INVALIDARG,
            ),
            (
                &[
                    ("BITS-Packet-Type", "Fragment"),
                    ("BITS-Session-Id", "not-a-guid"),
                    ("Content-Range", "bytes 0-4095/10000"),
                    ("Content-Length", "4096"),
                ],
                StatusCode::INTERNAL_SERVER_ERROR,
                HResult::BG_E_SESSION_NOT_FOUND,
            ),
            (
                &[
                    ("BITS-Packet-Type", "Fragment"),
                    ("BITS-Session-Id", SID),
                    ("Content-Range", "bytes 0-4095/10000"),
                    ("Content-Length", "4096"),
                    ("Content-Encoding", "gzip"),
                ],
                StatusCode::BAD_REQUEST,
                HResult::E_INVALIDARG,
            ),
            (
                &[
                    ("BITS-Packet-Type", "Close-Session"),
                    ("BITS-Session-Id", SID),
                    ("Content-Length", "8"),
                ],
                StatusCode::BAD_REQUEST,
                HResult::E_INVALIDARG,
            ),
            (
                &[
                    ("BITS-Packet-Type", "Cancel-Session"),
                    ("Content-Length", "0"),
                ],
                StatusCode::BAD_REQUEST,
                HResult::E_INVALIDARG,
            ),
            (
                &[("BITS-Packet-Type", "FAILURE-MESSAGE")],
                StatusCode::BAD_REQUEST,
                HResult::E_INVALIDARG,
            ),
            (
                &[("Content-Length", "0")],
                StatusCode::BAD_REQUEST,
                HResult::E_INVALIDARG,
            ),
            (
                &[("BITS-Packet-Type", "Create-Session")],
                StatusCode::BAD_REQUEST,
                HResult::E_INVALIDARG,
            ),
            (
                &[("BITS-Packet-Type", "Ping"), ("Content-Length", "x")],
                StatusCode::BAD_REQUEST,
                HResult::E_INVALIDARG,
            ),
        ];
        for (headers, status, code) in cases {
            let err = Packet::parse(&method(), &head(headers)).unwrap_err();
            assert_eq!((err.status(), err.code()), (*status, *code), "{headers:?}");
        }
    }

    #[test]
    fn long_header_values_are_refused() {
        let long = "x".repeat(MAX_HEADER_VALUE_LEN + 1);
        let err = Packet::parse(
            &method(),
            &head(&[("BITS-Packet-Type", "Ping"), ("X-Long", &long)]),
        )
        .unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }
}
