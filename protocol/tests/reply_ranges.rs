//! Properties of the reply download's `Range` handling ([`ReplyRange`]), against a model
//! written from RFC 9110 §14.1–14.2.
#![allow(clippy::unwrap_used)]

use bitsd_protocol::ReplyRange;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Spec {
    Closed(u64, u64),
    Open(u64),
    Suffix(u64),
}

impl Spec {
    fn text(&self) -> String {
        match self {
            Spec::Closed(a, b) => format!("{a}-{b}"),
            Spec::Open(a) => format!("{a}-"),
            Spec::Suffix(n) => format!("-{n}"),
        }
    }

    /// The model: the bytes this spec selects of a `len`-byte reply.
    fn select(&self, len: u64) -> Option<(u64, u64)> {
        if len == 0 {
            return None;
        }
        match *self {
            Spec::Closed(a, b) if a < len => Some((a, b.min(len - 1))),
            Spec::Open(a) if a < len => Some((a, len - 1)),
            Spec::Suffix(n) if n > 0 => Some((len.saturating_sub(n), len - 1)),
            _ => None,
        }
    }
}

fn spec(max: u64) -> impl Strategy<Value = Spec> {
    prop_oneof![
        (0..max, 0..max).prop_map(|(a, b)| Spec::Closed(a.min(b), a.max(b))),
        (0..max).prop_map(Spec::Open),
        (0..max).prop_map(Spec::Suffix),
        // Ends far past the reply, up to u64::MAX.
        (0..max, any::<u64>()).prop_map(|(a, b)| Spec::Closed(a, b.max(a))),
    ]
}

proptest! {
    /// The first satisfiable spec is served, clamped to the reply; 416 only when no spec is
    /// satisfiable; what is served always lies inside the reply.
    #[test]
    fn first_satisfiable_range_is_served(
        len in 0u64..5000,
        specs in prop::collection::vec(spec(6000), 1..5),
        spaces in prop::collection::vec(prop::sample::select(vec!["", " ", "\t", "  "]), 5),
    ) {
        let value = format!(
            "bytes={}",
            specs
                .iter()
                .enumerate()
                .map(|(i, s)| format!("{}{}", spaces[i % spaces.len()], s.text()))
                .collect::<Vec<_>>()
                .join(",")
        );
        let got = ReplyRange::parse(&value, len);
        let want = specs
            .iter()
            .find_map(|s| s.select(len))
            .map_or(ReplyRange::Unsatisfiable, |(start, end)| ReplyRange::Partial { start, end });
        prop_assert_eq!(got, want, "{}", value);
        if let ReplyRange::Partial { start, end } = got {
            prop_assert!(start <= end && end < len);
        }
    }

    /// An end written with more digits than `u64` holds is clamped like any end past the
    /// reply, never turned into a full answer.
    #[test]
    fn huge_ends_are_clamped(len in 1u64..1_000_000, start in 0u64..1_000_000, extra in "[0-9]{1,30}") {
        let value = format!("bytes={start}-99999999999999999999{extra}");
        let got = ReplyRange::parse(&value, len);
        if start < len {
            prop_assert_eq!(got, ReplyRange::Partial { start, end: len - 1 });
        } else {
            prop_assert_eq!(got, ReplyRange::Unsatisfiable);
        }
    }

    /// Anything that is not a well-formed byte range set gets the whole reply (RFC 9110 lets a
    /// server ignore it), and nothing panics.
    #[test]
    fn arbitrary_values_never_panic(value in ".{0,80}", len in 0u64..10_000) {
        match ReplyRange::parse(&value, len) {
            ReplyRange::Partial { start, end } => prop_assert!(start <= end && end < len),
            ReplyRange::Full | ReplyRange::Unsatisfiable => {}
        }
    }

    /// A first byte after the last (`5-1`) makes the header malformed: the whole reply.
    #[test]
    fn reversed_ranges_are_ignored(a in 1u64..10_000, d in 1u64..10_000, len in 0u64..20_000) {
        let value = format!("bytes={}-{}", a + d, a);
        prop_assert_eq!(ReplyRange::parse(&value, len), ReplyRange::Full);
    }
}
