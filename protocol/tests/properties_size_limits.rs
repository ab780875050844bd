//! Property tests for the size limits (BITS-UPLOAD.md §5.5): 400 `BG_E_TOO_LARGE` for the
//! whole upload, 413 for one fragment, and the decision for an arbitrary session state.
#![allow(clippy::unwrap_used)]

use bitsd_protocol::{
    decide_fragment, ContentRange, ErrorContext, FragmentDecision, HResult, UploadLimits,
    UploadProgress,
};
use http::StatusCode;
use proptest::prelude::*;

mod strategies;

use strategies::*;

fn limit() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..=64, 0u64..=(1 << 20), Just(u64::MAX), any::<u64>(),]
}

fn limits() -> impl Strategy<Value = UploadLimits> {
    (limit(), limit()).prop_map(|(max_upload_size, max_fragment_size)| UploadLimits {
        max_upload_size,
        max_fragment_size,
    })
}

/// Smaller ranges than [`valid_range`], so that they fall on both sides of [`limit`]s.
fn limited_range() -> impl Strategy<Value = ContentRange> {
    prop_oneof![
        1 => valid_range(),
        3 => (1u64..=(1 << 21), any::<u64>(), any::<u64>()).prop_filter_map(
            "valid by construction",
            |(total, a, b)| {
                let first = a % total;
                ContentRange::new(first, first + b % (total - first), total)
            },
        ),
        1 => (1u64..=128, any::<u64>(), any::<u64>()).prop_filter_map(
            "valid by construction",
            |(total, a, b)| {
                let first = a % total;
                ContentRange::new(first, first + b % (total - first), total)
            },
        ),
    ]
}

/// A consistent session state for an upload of `total` bytes, or one whose total differs.
#[derive(Clone, Debug)]
enum State {
    New,
    Holding(u64),
    OtherTotal(u64, u64),
}

fn progress_for(state: &State, range: &ContentRange) -> UploadProgress {
    match *state {
        State::New => UploadProgress::new(),
        State::Holding(seed) => UploadProgress {
            received: match seed % 4 {
                0 => range.first,
                1 => range.total,
                _ => seed % range.total.saturating_add(1).max(1),
            }
            .min(range.total),
            total: Some(range.total),
        },
        State::OtherTotal(total, seed) => UploadProgress {
            received: seed % total.saturating_add(1).max(1),
            total: Some(total),
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Nothing over a limit is ever written: the whole upload over `max_upload_size` is 400
    /// `BG_E_TOO_LARGE` (never 413), one fragment over `max_fragment_size` is 413. Everything
    /// within the limits of a consistent session is decided as §5.2–§5.4 say.
    #[test]
    fn limits_are_enforced(
        range in limited_range(),
        limits in limits(),
        near in prop::option::weighted(0.5, (-2i64..=2, -2i64..=2)),
        state in prop_oneof![
            1 => Just(State::New),
            3 => any::<u64>().prop_map(State::Holding),
            1 => (any::<u64>(), any::<u64>()).prop_map(|(t, s)| State::OtherTotal(t, s)),
        ],
    ) {
        // Half the time the limits sit within two bytes of the range, where off-by-ones live.
        let limits = match near {
            None => limits,
            Some((du, df)) => UploadLimits {
                max_upload_size: range.total.saturating_add_signed(du),
                max_fragment_size: range.len.saturating_add_signed(df),
            },
        };
        let progress = progress_for(&state, &range);
        let mismatch = progress.total.is_some_and(|t| t != range.total);
        let upload_too_large = range.total > limits.max_upload_size;
        let fragment_too_large = range.len > limits.max_fragment_size;
        match decide_fragment(&progress, &range, &limits) {
            Ok(decision) => {
                prop_assert!(!upload_too_large, "{} accepted over {:?}: {:?}", range, limits, decision);
                prop_assert!(!fragment_too_large, "{} accepted over {:?}: {:?}", range, limits, decision);
                prop_assert!(!mismatch, "{} accepted at {:?}", range, progress);
                let received = progress.received;
                match decision {
                    FragmentDecision::Gap { received: r } => {
                        prop_assert_eq!(r, received);
                        prop_assert!(range.first > received);
                    }
                    FragmentDecision::AlreadyHeld { received: r, final_resend } => {
                        prop_assert_eq!(r, received);
                        prop_assert!(range.first <= received && range.end() <= received);
                        prop_assert_eq!(final_resend, progress.is_complete());
                    }
                    FragmentDecision::Write(w) => {
                        prop_assert!(range.first <= received && range.end() > received
                            || (range.total == 0 && progress.total.is_none()));
                        prop_assert_eq!(w.write_at, received);
                        prop_assert_eq!(w.skip, received - range.first);
                        prop_assert_eq!(w.skip + w.len, range.len);
                        prop_assert_eq!(w.received_after, range.end());
                        prop_assert_eq!(w.total, range.total);
                        prop_assert_eq!(w.completes, range.is_final());
                    }
                }
            }
            Err(e) => {
                let got = (e.status(), e.code());
                let too_large = (StatusCode::BAD_REQUEST, HResult::BG_E_TOO_LARGE);
                let shrink = (StatusCode::PAYLOAD_TOO_LARGE, HResult::BG_E_TOO_LARGE);
                let invalid = (StatusCode::BAD_REQUEST, HResult::E_INVALIDARG);
                prop_assert_eq!(e.context(), ErrorContext::Server);
                if upload_too_large {
                    // Fatal, and never 413: the client would shrink its fragments forever (§2.1).
                    prop_assert!(got == too_large || (mismatch && got == invalid), "{}: {}", range, e);
                } else if fragment_too_large {
                    prop_assert!(got == shrink || (mismatch && got == invalid), "{}: {}", range, e);
                } else {
                    prop_assert!(mismatch, "{} within {:?} at {:?} refused: {}", range, limits, progress, e);
                    prop_assert_eq!(got, invalid);
                }
            }
        }
    }
}
