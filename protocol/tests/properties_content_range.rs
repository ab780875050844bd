//! Property tests for `Content-Range` (BITS-UPLOAD.md §5.1, §5.6): printing and parsing
//! round-trip; parsing never panics and only yields ranges inside the upload.
#![allow(clippy::unwrap_used)]

use bitsd_protocol::ContentRange;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

mod strategies;

use strategies::*;

/// What `bytes first-last/total` must parse to: §5.1 (`first <= last < total`) and §5.6
/// (`bytes 0-0/0` is the zero-byte upload), written out here rather than taken from
/// `ContentRange::new`.
fn expected_range(first: u64, last: u64, total: u64) -> Option<ContentRange> {
    if total == 0 {
        (first == 0 && last == 0).then(ContentRange::empty_upload)
    } else {
        (first <= last && last < total).then(|| ContentRange {
            first,
            len: last - first + 1,
            total,
        })
    }
}

/// Every small `bytes first-last/total` (where the zero-byte and boundary cases are), plus the
/// other zero-byte spellings, checked exhaustively against [`expected_range`].
#[test]
fn content_range_small_numbers_exhaustively() {
    for total in 0..=5u64 {
        for first in 0..=5u64 {
            for last in 0..=5u64 {
                let text = format!("bytes {first}-{last}/{total}");
                assert_eq!(
                    text.parse::<ContentRange>().ok(),
                    expected_range(first, last, total),
                    "{text}"
                );
            }
        }
        let star = format!("bytes */{total}");
        let minus_one = format!("bytes 0--1/{total}");
        let zero = (total == 0).then(ContentRange::empty_upload);
        assert_eq!(star.parse::<ContentRange>().ok(), zero, "{star}");
        assert_eq!(minus_one.parse::<ContentRange>().ok(), zero, "{minus_one}");
    }
}

/// What any successfully parsed range must satisfy.
fn check_parsed(input: &str, r: &ContentRange) -> Result<(), TestCaseError> {
    let end = r.first.checked_add(r.len);
    prop_assert!(
        end.is_some_and(|e| e <= r.total),
        "{:?} parsed to {:?}, which ends past its total",
        input,
        r
    );
    if r.total == 0 {
        prop_assert_eq!(*r, ContentRange::empty_upload(), "from {:?}", input);
    } else {
        prop_assert!(r.len > 0, "{:?} parsed to an empty range {:?}", input, r);
    }
    prop_assert_eq!(
        r.to_string().parse::<ContentRange>(),
        Ok(*r),
        "from {:?}",
        input
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Display then parse gives back every valid range.
    #[test]
    fn content_range_round_trips(r in valid_range()) {
        let text = r.to_string();
        prop_assert_eq!(text.parse::<ContentRange>(), Ok(r), "{}", text);
        check_parsed(&text, &r)?;
        if let Some(last) = r.last() {
            prop_assert_eq!(ContentRange::new(r.first, last, r.total), Some(r));
        }
    }

    /// The spellings §5.1 and §5.6 allow (unit in any case, surrounding blanks, the three
    /// zero-byte forms) all parse to the same range.
    #[test]
    fn content_range_accepts_spelling_variants(
        r in valid_range(),
        unit in prop::sample::select(vec!["bytes", "Bytes", "BYTES", "bYtEs"]),
        sep in prop::sample::select(vec![" ", "\t", "  ", " \t "]),
        pad in prop::sample::select(vec!["", " ", "\t", " \t"]),
        zero_form in prop::sample::select(vec!["*", "0--1", "0-0"]),
    ) {
        let spec = match r.last() {
            Some(last) => format!("{}-{}/{}", r.first, last, r.total),
            None => format!("{zero_form}/0"),
        };
        let text = format!("{pad}{unit}{sep}{spec}{pad}");
        prop_assert_eq!(text.parse::<ContentRange>(), Ok(r), "{:?}", text);
    }

    /// For any three numbers, `bytes first-last/total` parses exactly when `ContentRange::new`
    /// accepts them (total > 0), and to the same range.
    #[test]
    fn content_range_parse_agrees_with_new(
        first in prop_oneof![any::<u64>(), 0u64..=3, 0u64..=32],
        last in prop_oneof![any::<u64>(), 0u64..=3, 0u64..=32],
        total in prop_oneof![any::<u64>(), 0u64..=3, 0u64..=32, (u64::MAX - 2)..=u64::MAX],
    ) {
        let text = format!("bytes {first}-{last}/{total}");
        let parsed = text.parse::<ContentRange>().ok();
        let expected = expected_range(first, last, total);
        prop_assert_eq!(parsed, expected, "{}", text);
        if total > 0 {
            prop_assert_eq!(ContentRange::new(first, last, total), expected, "new({}, {}, {})", first, last, total);
        }
    }

    /// Parsing arbitrary text never panics, and whatever it accepts is a range inside the upload.
    #[test]
    fn content_range_parse_total_on_any_string(s in any::<String>()) {
        if let Ok(r) = s.parse::<ContentRange>() {
            check_parsed(&s, &r)?;
        }
    }

    /// The same for text built from the grammar's own pieces, which reaches the number checks.
    #[test]
    fn content_range_parse_total_on_grammar_pieces(s in grammar_text()) {
        if let Ok(r) = s.parse::<ContentRange>() {
            check_parsed(&s, &r)?;
        }
    }
}
