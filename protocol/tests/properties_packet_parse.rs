//! Property tests for `Packet::parse`: it never panics on arbitrary heads, and an accepted
//! Fragment's `Content-Length` is its range length.
#![allow(clippy::unwrap_used)]

use bitsd_protocol::{
    ContentRange, ErrorContext, HResult, Packet, SessionId, MAX_HEADER_VALUE_LEN,
};
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

mod strategies;

use strategies::*;

/// Visible ASCII plus space (what `HeaderValue::to_str` accepts).
fn visible() -> impl Strategy<Value = String> {
    "[ -~]{0,40}"
}

fn maybe(s: impl Strategy<Value = String>) -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(0.8, s)
}

fn packet_type_text() -> impl Strategy<Value = String> {
    let known = prop::sample::select(vec![
        "Ping",
        "Create-Session",
        "Fragment",
        "Close-Session",
        "Cancel-Session",
        "FRAGMENT",
        "fragment",
        " Fragment ",
        "CREATE-SESSION",
        "Ack",
        "",
    ])
    .prop_map(str::to_owned);
    prop_oneof![
        4 => Just("Fragment".to_owned()),
        6 => known,
        1 => visible(),
    ]
}

fn session_id_text() -> impl Strategy<Value = String> {
    let guid = (any::<u128>(), 0u8..4).prop_map(|(n, style)| {
        let id = SessionId::from_uuid(uuid::Uuid::from_u128(n)).to_string();
        match style {
            0 => id,
            1 => id.to_uppercase(),
            2 => id.trim_matches(|c| c == '{' || c == '}').to_owned(),
            _ => format!(" {id} "),
        }
    });
    prop_oneof![6 => guid, 1 => visible(), 1 => "[0-9a-fA-F{}-]{30,40}"]
}

fn protocols_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("{7df0354d-249b-430f-820d-3d2a9bef4931}".to_owned()),
        Just(
            "{11111111-1111-1111-1111-111111111111} {7DF0354D-249B-430F-820D-3D2A9BEF4931}"
                .to_owned()
        ),
        visible(),
    ]
}

fn range_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => valid_range().prop_map(|r| r.to_string()),
        2 => grammar_text(),
        1 => visible(),
    ]
}

/// How the head gives `Content-Length`.
#[derive(Clone, Debug)]
enum LengthHeader {
    Absent,
    /// The length the `Content-Range` value implies (or `0` if it does not parse).
    Matching,
    /// The matching length written twice (a legal repeated header).
    MatchingTwice,
    Text(String),
    Twice(String, String),
}

fn length_header() -> impl Strategy<Value = LengthHeader> {
    prop_oneof![
        1 => Just(LengthHeader::Absent),
        6 => Just(LengthHeader::Matching),
        1 => Just(LengthHeader::MatchingTwice),
        2 => prop_oneof![number_text(), visible(), Just(" 0 ".to_owned())].prop_map(LengthHeader::Text),
        1 => (number_text(), number_text()).prop_map(|(a, b)| LengthHeader::Twice(a, b)),
    ]
}

fn transfer_encoding() -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(
        0.15,
        prop_oneof![
            Just("chunked".to_owned()),
            Just("identity".to_owned()),
            visible()
        ],
    )
}

fn content_encoding() -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(
        0.3,
        prop_oneof![
            Just("identity".to_owned()),
            Just(" Identity ".to_owned()),
            Just("gzip".to_owned()),
            visible(),
        ],
    )
}

/// A head: the method, the headers as text, and optionally one header made non-ASCII or oversized.
#[derive(Clone, Debug)]
struct Head {
    bits_post: bool,
    packet_type: Option<String>,
    session_id: Option<String>,
    protocols: Option<String>,
    range: Option<String>,
    length: LengthHeader,
    transfer_encoding: Option<String>,
    content_encoding: Option<String>,
    content_name: Option<String>,
    /// Replace the value of header `n % count` with these bytes (0x80.. obs-text, or a long value).
    mangle: Option<(usize, Vec<u8>)>,
}

fn mangled_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(prop_oneof![0x20u8..=0x7e, 0x80u8..=0xff], 1..20),
        (MAX_HEADER_VALUE_LEN - 2..MAX_HEADER_VALUE_LEN + 3).prop_map(|n| vec![b'1'; n]),
    ]
}

fn head() -> impl Strategy<Value = Head> {
    (
        prop::bool::weighted(0.95),
        maybe(packet_type_text()),
        maybe(session_id_text()),
        maybe(protocols_text()),
        maybe(range_text()),
        length_header(),
        transfer_encoding(),
        content_encoding(),
        prop::option::weighted(0.3, visible()),
        prop::option::weighted(0.1, (any::<usize>(), mangled_value())),
    )
        .prop_map(
            |(
                bits_post,
                packet_type,
                session_id,
                protocols,
                range,
                length,
                transfer_encoding,
                content_encoding,
                content_name,
                mangle,
            )| Head {
                bits_post,
                packet_type,
                session_id,
                protocols,
                range,
                length,
                transfer_encoding,
                content_encoding,
                content_name,
                mangle,
            },
        )
}

fn build_head(h: &Head) -> Result<(Method, HeaderMap), TestCaseError> {
    let method = Method::from_bytes(if h.bits_post { b"BITS_POST" } else { b"POST" })
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let matching = h
        .range
        .as_deref()
        .and_then(|r| r.parse::<ContentRange>().ok())
        .map_or(0, |r| r.len)
        .to_string();
    let mut pairs: Vec<(HeaderName, Vec<u8>)> = Vec::new();
    let mut put = |name: HeaderName, value: &Option<String>| {
        if let Some(v) = value {
            pairs.push((name, v.clone().into_bytes()));
        }
    };
    put(bitsd_protocol::header::BITS_PACKET_TYPE, &h.packet_type);
    put(bitsd_protocol::header::BITS_SESSION_ID, &h.session_id);
    put(
        bitsd_protocol::header::BITS_SUPPORTED_PROTOCOLS,
        &h.protocols,
    );
    put(CONTENT_RANGE, &h.range);
    put(TRANSFER_ENCODING, &h.transfer_encoding);
    put(CONTENT_ENCODING, &h.content_encoding);
    put(bitsd_protocol::header::CONTENT_NAME, &h.content_name);
    match &h.length {
        LengthHeader::Absent => {}
        LengthHeader::Matching => pairs.push((CONTENT_LENGTH, matching.into_bytes())),
        LengthHeader::MatchingTwice => {
            pairs.push((CONTENT_LENGTH, matching.clone().into_bytes()));
            pairs.push((CONTENT_LENGTH, matching.into_bytes()));
        }
        LengthHeader::Text(t) => pairs.push((CONTENT_LENGTH, t.clone().into_bytes())),
        LengthHeader::Twice(a, b) => {
            pairs.push((CONTENT_LENGTH, a.clone().into_bytes()));
            pairs.push((CONTENT_LENGTH, b.clone().into_bytes()));
        }
    }
    if let Some((n, bytes)) = &h.mangle {
        if !pairs.is_empty() {
            let i = n % pairs.len();
            pairs[i].1 = bytes.clone();
        }
    }
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        let value = HeaderValue::from_bytes(&value)
            .map_err(|_| TestCaseError::fail(format!("strategy made a bad {name} value")))?;
        headers.append(name, value);
    }
    Ok((method, headers))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// `Packet::parse` never panics; a Fragment it accepts has `Content-Length` equal to its
    /// range length, no `Transfer-Encoding`, and the range and session id of its headers; every
    /// refusal is 400 `E_INVALIDARG` or 500 `BG_E_SESSION_NOT_FOUND`.
    #[test]
    fn packet_parse_is_total(h in head()) {
        let (method, headers) = build_head(&h)?;
        match Packet::parse(&method, &headers) {
            Ok(packet) => {
                prop_assert!(h.bits_post);
                for (name, value) in &headers {
                    prop_assert!(value.len() <= MAX_HEADER_VALUE_LEN, "accepted a long {}", name);
                }
                let lengths: Vec<Option<u64>> = headers
                    .get_all(CONTENT_LENGTH)
                    .iter()
                    .map(|v| v.to_str().ok().and_then(|s| s.trim().parse().ok()))
                    .collect();
                match &packet {
                    Packet::Fragment(f) => {
                        prop_assert!(!lengths.is_empty(), "Fragment without Content-Length");
                        for l in &lengths {
                            prop_assert_eq!(*l, Some(f.range.len), "Content-Length vs {}", f.range);
                        }
                        prop_assert!(!headers.contains_key(TRANSFER_ENCODING));
                        let range = headers
                            .get(CONTENT_RANGE)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|s| s.parse::<ContentRange>().ok());
                        prop_assert_eq!(range, Some(f.range));
                        let sid = headers
                            .get(bitsd_protocol::header::BITS_SESSION_ID)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|s| s.parse::<SessionId>().ok());
                        prop_assert_eq!(sid, Some(f.session_id));
                    }
                    other => {
                        for l in &lengths {
                            prop_assert_eq!(*l, Some(0), "{:?} with a body", other);
                        }
                    }
                }
            }
            Err(e) => {
                let status = e.status();
                prop_assert!(
                    (status == StatusCode::BAD_REQUEST && e.code() == HResult::E_INVALIDARG)
                        || (status == StatusCode::INTERNAL_SERVER_ERROR
                            && e.code() == HResult::BG_E_SESSION_NOT_FOUND),
                    "unexpected refusal {}",
                    e
                );
                prop_assert_eq!(e.context(), ErrorContext::Server);
            }
        }
    }
}
