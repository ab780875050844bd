//! Arbitrary text into the `Content-Range` parser: no panic, and every accepted range lies
//! inside its upload and prints back to something that parses to the same range.
#![no_main]

use bitsd_protocol::ContentRange;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(r) = text.parse::<ContentRange>() {
        assert!(r.first + r.len <= r.total);
        assert!(r.len > 0 || r.total == 0);
        assert_eq!(r.to_string().parse::<ContentRange>().ok(), Some(r));
    }
});
