//! Arbitrary header maps into `Packet::parse`: it must never panic, and an accepted Fragment's
//! Content-Length must equal its range length.
#![no_main]

use bitsd_protocol::Packet;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;

const NAMES: &[&str] = &[
    "bits-packet-type",
    "bits-session-id",
    "bits-supported-protocols",
    "content-range",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "content-name",
];

fuzz_target!(|data: &[u8]| {
    // Split the input into (name index, value) pairs separated by 0xff.
    let mut headers = HeaderMap::new();
    for chunk in data.split(|b| *b == 0xff) {
        let Some((&which, value)) = chunk.split_first() else { continue };
        let name = HeaderName::from_static(NAMES[which as usize % NAMES.len()]);
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(name, v);
        }
    }
    let method = Method::from_bytes(b"BITS_POST").expect("valid method");
    if let Ok(Packet::Fragment(f)) = Packet::parse(&method, &headers) {
        let declared: u64 = headers["content-length"].to_str().expect("ascii").trim().parse().expect("number");
        assert_eq!(declared, f.range.len);
    }
});
