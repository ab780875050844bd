//! Proptest strategies shared by the property test files (properties_*.rs): valid
//! `Content-Range`s and number texts.
#![allow(dead_code)]

use bitsd_protocol::ContentRange;
use proptest::prelude::*;

pub fn total_size() -> impl Strategy<Value = u64> {
    prop_oneof![
        1u64..=16,
        1u64..=(1 << 40),
        (u64::MAX - 16)..=u64::MAX,
        1u64..=u64::MAX,
    ]
}

/// Any valid range, with extra weight on the edges (first byte, last byte, one-byte ranges).
pub fn valid_range() -> impl Strategy<Value = ContentRange> {
    let non_empty = (total_size(), any::<u64>(), any::<u64>(), 0u8..4).prop_filter_map(
        "valid by construction",
        |(total, a, b, shape)| {
            let first = match shape {
                0 => 0,
                _ => a % total,
            };
            let last = match shape {
                1 => total - 1,
                2 => first,
                _ => first + b % (total - first),
            };
            ContentRange::new(first, last, total)
        },
    );
    prop_oneof![1 => Just(ContentRange::empty_upload()), 15 => non_empty]
}

pub fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..=20).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        "[0-9]{1,25}",
        Just("18446744073709551615".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("00000000000000000000001".to_owned()),
    ]
}

pub fn pick(choices: &[&'static str]) -> impl Strategy<Value = String> {
    prop::sample::select(choices.to_vec()).prop_map(str::to_owned)
}

pub fn small_number() -> impl Strategy<Value = String> {
    prop_oneof![3 => (0u64..=8).prop_map(|n| n.to_string()), 1 => number_text()]
}

/// Strings built from the pieces of the Content-Range grammar: either the pieces in grammar
/// order, each slot usually right but sometimes wrong, missing or doubled, or the pieces in any
/// order.
pub fn grammar_text() -> impl Strategy<Value = String> {
    let slotted = (
        prop_oneof![8 => pick(&["bytes", "Bytes", "BYTES"]), 1 => pick(&["", "byte", "bytes=", "bytes bytes"])],
        prop_oneof![8 => pick(&[" "]), 1 => pick(&["", "\t", "  ", "\u{a0}", "-"])],
        prop_oneof![8 => small_number(), 1 => pick(&["", "*", "-1", " 0", "+1"])],
        prop_oneof![10 => pick(&["-"]), 1 => pick(&["", "--", "+", " - ", "/"])],
        prop_oneof![8 => small_number(), 1 => pick(&["", "*", "-1", "1 ", "0-0"])],
        prop_oneof![10 => pick(&["/"]), 1 => pick(&["", "//", " / ", "-"])],
        prop_oneof![8 => small_number(), 1 => pick(&["", "*", "0", "-0", " 1"])],
        prop_oneof![10 => pick(&[""]), 1 => pick(&[" ", "/", "-", "*", "\t", "x"])],
    )
        .prop_map(|(a, b, c, d, e, f, g, h)| [a, b, c, d, e, f, g, h].concat());
    let piece = prop_oneof![
        3 => pick(&["bytes", "Bytes", "BYTES", "bytes=", "byte"]),
        6 => number_text(),
        4 => pick(&["-", "/", "*", " ", "\t", "  ", "+", "-1", ",", "\u{a0}"]),
    ];
    let shuffled = prop::collection::vec(piece, 0..10).prop_map(|pieces| pieces.concat());
    prop_oneof![3 => slotted, 1 => shuffled]
}
