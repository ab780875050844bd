//! Property tests for `bitsd-protocol` (BITS-UPLOAD.md §5).
//!
//! * The fragment state machine: a simulated server (an [`UploadProgress`] plus an in-memory
//!   "disk") fed arbitrary client schedules (random sizes, duplicates, overlaps, gaps, lost Acks,
//!   re-sent final fragments), then finished the way a BITS client resumes from
//!   `BITS-Received-Content-Range`.
//! * `Content-Range`: printing and parsing round-trip; parsing never panics and only yields
//!   ranges inside the upload.
//! * `Packet::parse`: never panics on arbitrary heads, and an accepted Fragment's
//!   `Content-Length` is its range length.
//! * Size limits (§5.5): 400 `BG_E_TOO_LARGE` for the whole upload, 413 for one fragment.
#![allow(clippy::unwrap_used)]

use bitsd_protocol::{
    decide_fragment, ContentRange, ErrorContext, FragmentDecision, HResult, Packet, SessionId,
    UploadLimits, UploadProgress, MAX_HEADER_VALUE_LEN,
};
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

// ---------------------------------------------------------------------------------------------
// 1. Fragment state machine, simulated end to end
// ---------------------------------------------------------------------------------------------

/// `len` pseudo-random bytes from `seed` (xorshift64*). A seed plus a length shrinks far better
/// than a 20 000-element `Vec<u8>` strategy and still gives every offset a distinct-looking byte.
fn file_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// Where a client fragment starts, relative to the state of the simulation.
#[derive(Clone, Debug)]
enum Start {
    /// At the last offset the client saw acknowledged: the normal in-order send. After a lost
    /// Ack this is an overlap with bytes the server already holds.
    Next,
    /// Before the server's `received` (overlap / duplicate of held bytes).
    Overlap(u64),
    /// Past the server's `received` (out of order).
    Gap(u64),
    /// Exactly a fragment sent earlier (a duplicate).
    Duplicate(usize),
    /// A fragment ending at the end of the file (a final fragment, possibly re-sent).
    Final,
    /// Anywhere in the file.
    Anywhere(u64),
}

/// One fragment of a client schedule.
#[derive(Clone, Debug)]
struct Step {
    start: Start,
    /// Wanted length; clipped to the end of the file.
    len: u64,
    /// The Ack never reaches the client, so it does not learn the new offset.
    ack_lost: bool,
}

fn fragment_len() -> impl Strategy<Value = u64> {
    prop_oneof![3 => 1u64..=16, 4 => 1u64..=2048, 3 => 1u64..=25_000]
}

fn step() -> impl Strategy<Value = Step> {
    let start = prop_oneof![
        4 => Just(Start::Next),
        2 => any::<u64>().prop_map(Start::Overlap),
        2 => any::<u64>().prop_map(Start::Gap),
        1 => any::<usize>().prop_map(Start::Duplicate),
        1 => Just(Start::Final),
        1 => any::<u64>().prop_map(Start::Anywhere),
    ];
    (start, fragment_len(), prop::bool::weighted(0.25)).prop_map(|(start, len, ack_lost)| Step {
        start,
        len,
        ack_lost,
    })
}

fn file_len() -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(0usize), 3 => 1usize..=64, 6 => 0usize..=20_000]
}

/// `len` bytes from `first` in an upload of `total` (> 0) bytes; `len` is clipped to the end.
fn clipped(first: u64, len: u64, total: u64) -> Result<ContentRange, TestCaseError> {
    let len = len.clamp(1, total - first);
    ContentRange::new(first, first + len - 1, total)
        .ok_or_else(|| TestCaseError::fail(format!("bad simulated range {first}+{len}/{total}")))
}

/// The server side of the simulation.
struct Server<'f> {
    file: &'f [u8],
    progress: UploadProgress,
    disk: Vec<u8>,
    last_ack: u64,
    /// How many writes said they completed the upload.
    completions: u32,
}

impl Server<'_> {
    fn total(&self) -> u64 {
        self.file.len() as u64
    }

    /// Handles one fragment whose body is the file's bytes at `range`; checks every §5
    /// invariant and returns the decision and the Ack's `BITS-Received-Content-Range`.
    fn fragment(&mut self, range: &ContentRange) -> Result<(FragmentDecision, u64), TestCaseError> {
        let total = self.total();
        let before = self.progress;
        let decision = decide_fragment(&before, range, &UploadLimits::default())
            .map_err(|e| TestCaseError::fail(format!("{range} refused at {before:?}: {e}")))?;
        let body = usize::try_from(range.first)
            .ok()
            .zip(usize::try_from(range.end()).ok())
            .and_then(|(a, b)| self.file.get(a..b))
            .ok_or_else(|| TestCaseError::fail(format!("{range} outside the file")))?;

        prop_assert_eq!(
            matches!(decision, FragmentDecision::Gap { .. }),
            range.first > before.received,
            "Gap exactly when first > received: {} at {:?} gave {:?}",
            range,
            before,
            decision
        );
        if before.is_complete() && range.is_final() {
            prop_assert!(
                matches!(
                    decision,
                    FragmentDecision::AlreadyHeld {
                        final_resend: true,
                        ..
                    }
                ),
                "re-sent final fragment {} of a complete upload gave {:?}",
                range,
                decision
            );
        }

        let ack = match decision {
            FragmentDecision::Write(w) => {
                prop_assert_eq!(
                    w.write_at,
                    self.disk.len() as u64,
                    "not append-only: {:?}",
                    w
                );
                prop_assert_eq!(w.write_at, before.received);
                prop_assert_eq!(w.skip, before.received - range.first);
                prop_assert_eq!(w.skip.checked_add(w.len), Some(range.len), "{:?}", w);
                prop_assert!(w.len > 0 || total == 0, "empty write {:?}", w);
                prop_assert_eq!(w.total, total);
                prop_assert_eq!(Some(w.received_after), w.write_at.checked_add(w.len));
                prop_assert_eq!(w.completes, w.received_after == total);
                let skip =
                    usize::try_from(w.skip).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let len = usize::try_from(w.len).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let new = body
                    .get(skip..skip + len)
                    .ok_or_else(|| TestCaseError::fail(format!("{w:?} outside the body")))?;
                self.disk.extend_from_slice(new);
                self.progress = w.progress_after();
                self.completions += u32::from(w.completes);
                w.received_after
            }
            FragmentDecision::AlreadyHeld {
                received,
                final_resend,
            } => {
                prop_assert_eq!(received, before.received);
                prop_assert!(
                    range.end() <= received,
                    "{} not held at {:?}",
                    range,
                    before
                );
                prop_assert_eq!(
                    final_resend,
                    before.is_complete(),
                    "final_resend flag for {} at {:?}",
                    range,
                    before
                );
                received
            }
            FragmentDecision::Gap { received } => {
                prop_assert_eq!(received, before.received);
                received
            }
        };

        let held = self.disk.len();
        prop_assert_eq!(
            ack,
            held as u64,
            "Ack offset is not the contiguous prefix held"
        );
        prop_assert_eq!(self.progress.received, held as u64);
        prop_assert!(held <= self.file.len());
        if let Some(i) = self.disk.iter().zip(self.file).position(|(d, f)| d != f) {
            prop_assert!(
                false,
                "disk differs from the file at byte {} after {}",
                i,
                range
            );
        }
        prop_assert!(
            ack >= self.last_ack,
            "Ack went backwards: {} then {}",
            self.last_ack,
            ack
        );
        self.last_ack = ack;
        if let Some(t) = self.progress.total {
            prop_assert_eq!(t, total);
        }
        prop_assert_eq!(
            self.progress.is_complete(),
            self.progress.total.is_some() && held == self.file.len()
        );
        Ok((decision, ack))
    }
}

/// The concrete range a step sends, given the server's and the client's view.
fn step_range(
    step: &Step,
    total: u64,
    received: u64,
    client_ack: u64,
    sent: &[ContentRange],
) -> Result<ContentRange, TestCaseError> {
    if total == 0 {
        return Ok(ContentRange::empty_upload());
    }
    let first = match step.start {
        Start::Next => client_ack.min(total - 1),
        Start::Overlap(back) if received > 0 => received - 1 - back % received,
        Start::Overlap(_) => 0,
        Start::Gap(ahead) if total - received >= 2 => received + 1 + ahead % (total - received - 1),
        Start::Gap(ahead) => ahead % total,
        Start::Duplicate(pick) if !sent.is_empty() => return Ok(sent[pick % sent.len()]),
        Start::Duplicate(_) => client_ack.min(total - 1),
        Start::Final => total - step.len.min(total),
        Start::Anywhere(at) => at % total,
    };
    clipped(first, step.len, total)
}

fn simulate(file: &[u8], steps: &[Step], finish_len: u64) -> Result<(), TestCaseError> {
    let total = file.len() as u64;
    let mut server = Server {
        file,
        progress: UploadProgress::new(),
        disk: Vec::new(),
        last_ack: 0,
        completions: 0,
    };
    let mut client_ack = 0u64;
    let mut sent = Vec::new();

    for step in steps {
        let range = step_range(step, total, server.progress.received, client_ack, &sent)?;
        sent.push(range);
        let (_, ack) = server.fragment(&range)?;
        if !step.ack_lost {
            client_ack = ack;
        }
    }

    // The client finishes: it resumes from the last BITS-Received-Content-Range it saw (on a
    // 200 and a 416 alike) until the server acknowledges the whole file.
    if total == 0 {
        let (decision, ack) = server.fragment(&ContentRange::empty_upload())?;
        prop_assert!(
            matches!(
                decision,
                FragmentDecision::Write(w) if w.completes && w.len == 0
            ) || matches!(
                decision,
                FragmentDecision::AlreadyHeld {
                    final_resend: true,
                    ..
                }
            ),
            "zero-byte upload finished with {:?}",
            decision
        );
        prop_assert_eq!(ack, 0);
    } else {
        let mut offset = client_ack;
        let mut rounds = 0u64;
        while offset < total {
            rounds += 1;
            prop_assert!(rounds <= total, "client made no progress from {}", offset);
            let range = clipped(offset, finish_len, total)?;
            let (_, ack) = server.fragment(&range)?;
            prop_assert!(
                ack > offset,
                "resume from {} with {} gave Ack {}",
                offset,
                range,
                ack
            );
            offset = ack;
        }
    }
    // Completion (§5.7) is decided by exactly one write; every later fragment ending at the end
    // of the file is flagged as a re-sent final fragment instead (checked in `fragment`).
    prop_assert_eq!(server.completions, 1, "writes that completed the upload");
    prop_assert!(server.progress.is_complete(), "{:?}", server.progress);
    prop_assert_eq!(server.progress.total, Some(total));
    prop_assert!(
        server.disk == file,
        "assembled upload differs from the file"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any schedule of fragments leaves an append-only, byte-exact prefix of the file on disk,
    /// Acks exactly that prefix, and a client resuming from its last Ack completes the upload.
    #[test]
    fn fragment_schedules_assemble_the_file(
        len in file_len(),
        seed in any::<u64>(),
        steps in prop::collection::vec(step(), 0..48),
        finish_len in fragment_len(),
    ) {
        let file = file_bytes(len, seed);
        simulate(&file, &steps, finish_len)?;
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Content-Range
// ---------------------------------------------------------------------------------------------

fn total_size() -> impl Strategy<Value = u64> {
    prop_oneof![
        1u64..=16,
        1u64..=(1 << 40),
        (u64::MAX - 16)..=u64::MAX,
        1u64..=u64::MAX,
    ]
}

/// Any valid range, with extra weight on the edges (first byte, last byte, one-byte ranges).
fn valid_range() -> impl Strategy<Value = ContentRange> {
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

fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..=20).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        "[0-9]{1,25}",
        Just("18446744073709551615".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("00000000000000000000001".to_owned()),
    ]
}

fn pick(choices: &[&'static str]) -> impl Strategy<Value = String> {
    prop::sample::select(choices.to_vec()).prop_map(str::to_owned)
}

fn small_number() -> impl Strategy<Value = String> {
    prop_oneof![3 => (0u64..=8).prop_map(|n| n.to_string()), 1 => number_text()]
}

/// Strings built from the pieces of the Content-Range grammar: either the pieces in grammar
/// order, each slot usually right but sometimes wrong, missing or doubled, or the pieces in any
/// order.
fn grammar_text() -> impl Strategy<Value = String> {
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

// ---------------------------------------------------------------------------------------------
// 3. Packet::parse
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// 4. Size limits (§5.5) and the decision for an arbitrary session state
// ---------------------------------------------------------------------------------------------

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
