//! `Content-Range` of a Fragment: `bytes <first>-<last>/<total>` (§5.1, §5.6), and the `Range`
//! of a reply download (§10, RFC 9110 §14.2): [`ReplyRange::parse`].

use std::fmt;
use std::str::FromStr;

/// The byte range a Fragment carries. `len` is zero only for a zero-byte upload (`total == 0`),
/// which the client may write as `bytes 0--1/0`, `bytes */0` or `bytes 0-0/0` (§5.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContentRange {
    /// Offset of the first byte.
    pub first: u64,
    /// Number of bytes (`last - first + 1`).
    pub len: u64,
    /// Size of the whole upload.
    pub total: u64,
}

/// Why a `Content-Range` value was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContentRangeError {
    /// Not of the form `bytes <first>-<last>/<total>`.
    #[error("malformed Content-Range {0:?}")]
    Malformed(String),
    /// Numbers that do not describe a range inside the upload (`first > last`, `last >= total`).
    #[error("Content-Range {0:?} is not a range inside the upload")]
    OutOfBounds(String),
}

impl ContentRange {
    /// A non-empty range `first..=last` of an upload of `total` bytes.
    pub fn new(first: u64, last: u64, total: u64) -> Option<Self> {
        if first <= last && last < total {
            Some(ContentRange {
                first,
                len: last - first + 1,
                total,
            })
        } else {
            None
        }
    }

    /// The range of a zero-byte upload.
    pub fn empty_upload() -> Self {
        ContentRange {
            first: 0,
            len: 0,
            total: 0,
        }
    }

    /// Offset just past the last byte.
    pub fn end(&self) -> u64 {
        self.first + self.len
    }

    /// Offset of the last byte (`None` for a zero-byte upload).
    pub fn last(&self) -> Option<u64> {
        self.end().checked_sub(1)
    }

    /// Whether this fragment ends at the end of the upload.
    pub fn is_final(&self) -> bool {
        self.end() == self.total
    }
}

fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl FromStr for ContentRange {
    type Err = ContentRangeError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let malformed = || ContentRangeError::Malformed(value.to_owned());
        let out = || ContentRangeError::OutOfBounds(value.to_owned());
        let v = value.trim();
        let (unit, spec) = v.split_once([' ', '\t']).ok_or_else(malformed)?;
        if !unit.eq_ignore_ascii_case("bytes") {
            return Err(malformed());
        }
        let (range, total) = spec.trim().rsplit_once('/').ok_or_else(malformed)?;
        let total = digits(total.trim()).ok_or_else(malformed)?;
        let range = range.trim();
        if total == 0 {
            return match range {
                "*" | "0--1" | "0-0" => Ok(ContentRange::empty_upload()),
                _ => Err(out()),
            };
        }
        let (first, last) = range.split_once('-').ok_or_else(malformed)?;
        let first = digits(first).ok_or_else(malformed)?;
        let last = digits(last).ok_or_else(malformed)?;
        ContentRange::new(first, last, total).ok_or_else(out)
    }
}

impl fmt::Display for ContentRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.last() {
            Some(last) => write!(f, "bytes {}-{}/{}", self.first, last, self.total),
            None => write!(f, "bytes */{}", self.total),
        }
    }
}

/// What a `Range` request header asks of a reply of known length (RFC 9110 §14.2).
///
/// Multi-range requests get one range: the first that is satisfiable, in the order the
/// client wrote them (a BITS client never asks for more than one; §10 advises against
/// multipart answers). 416 is only for a request none of whose ranges is satisfiable. Numbers
/// too large for `u64` are read as "past any end": a last byte beyond the reply is clamped to
/// its end like any other, a first byte beyond it is unsatisfiable, a suffix longer than the
/// reply asks for all of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyRange {
    /// The whole reply: no byte range asked for (another unit, or a header that is not
    /// well formed, which RFC 9110 lets a server ignore).
    Full,
    /// Bytes `start..=end` of the reply (`start <= end < len`).
    Partial {
        /// First byte.
        start: u64,
        /// Last byte (inclusive).
        end: u64,
    },
    /// None of the ranges lies inside the reply: 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// A decimal number of a range spec; `None` for anything but digits. Values past `u64` are
/// [`Num::Huge`] rather than an error (RFC 9110 sets no limit on the digits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Num {
    Small(u64),
    Huge,
}

fn range_number(s: &str) -> Option<(Num, &str)> {
    let s = s.trim_matches([' ', '\t']);
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = s.parse::<u64>().map_or(Num::Huge, Num::Small);
    Some((n, s.trim_start_matches('0')))
}

/// One `range-spec` of a `Range` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spec {
    /// `first-` or `first-last`.
    From { first: Num, last: Option<Num> },
    /// `-n`: the last n bytes.
    Suffix(Num),
}

fn parse_spec(spec: &str) -> Option<Spec> {
    let (a, b) = spec.split_once('-')?;
    if a.trim_matches([' ', '\t']).is_empty() {
        return Some(Spec::Suffix(range_number(b)?.0));
    }
    let (first, first_digits) = range_number(a)?;
    if b.trim_matches([' ', '\t']).is_empty() {
        return Some(Spec::From { first, last: None });
    }
    let (last, last_digits) = range_number(b)?;
    // first <= last, compared on the digits so that numbers past u64 compare too.
    let ordered = (first_digits.len(), first_digits) <= (last_digits.len(), last_digits);
    ordered.then_some(Spec::From {
        first,
        last: Some(last),
    })
}

impl Spec {
    /// The bytes of a reply of `len` bytes this spec selects, if any.
    fn within(self, len: u64) -> Option<(u64, u64)> {
        let last_byte = len.checked_sub(1)?;
        match self {
            Spec::Suffix(Num::Small(0)) => None,
            Spec::Suffix(Num::Small(n)) => Some((len.saturating_sub(n), last_byte)),
            Spec::Suffix(Num::Huge) => Some((0, last_byte)),
            Spec::From {
                first: Num::Small(first),
                last,
            } if first < len => {
                let end = match last {
                    Some(Num::Small(last)) => last.min(last_byte),
                    Some(Num::Huge) | None => last_byte,
                };
                Some((first, end))
            }
            Spec::From { .. } => None,
        }
    }
}

impl ReplyRange {
    /// Reads a `Range` header value against a reply of `len` bytes.
    pub fn parse(value: &str, len: u64) -> ReplyRange {
        let v = value.trim();
        let Some((unit, set)) = v.split_once('=') else {
            return ReplyRange::Full;
        };
        if !unit.trim().eq_ignore_ascii_case("bytes") {
            return ReplyRange::Full;
        }
        let mut specs = Vec::new();
        for part in set.split(',') {
            if part.trim_matches([' ', '\t']).is_empty() {
                continue;
            }
            match parse_spec(part) {
                Some(spec) => specs.push(spec),
                None => return ReplyRange::Full,
            }
        }
        if specs.is_empty() {
            return ReplyRange::Full;
        }
        specs
            .into_iter()
            .find_map(|s| s.within(len))
            .map_or(ReplyRange::Unsatisfiable, |(start, end)| {
                ReplyRange::Partial { start, end }
            })
    }

    /// Whether `value` is one range in the strict form every reader takes alike:
    /// `bytes=first-`, `bytes=first-last` (first <= last) or `bytes=-suffix`, with decimal
    /// numbers that fit a `u64` and nothing else (no other case, no spaces, no second range).
    /// [`ReplyRange::parse`] is lenient on all of these; a server handing a request on to
    /// another reader (an object store) may want only what both read the same way.
    pub fn is_plain_single(value: &str) -> bool {
        let Some(set) = value.strip_prefix("bytes=") else {
            return false;
        };
        set.bytes().all(|b| b.is_ascii_digit() || b == b'-')
            && matches!(
                parse_spec(set),
                Some(
                    Spec::Suffix(Num::Small(_))
                        | Spec::From {
                            first: Num::Small(_),
                            last: None | Some(Num::Small(_)),
                        }
                )
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_single_ranges_are_plain() {
        for good in [
            "bytes=0-9",
            "bytes=5000-",
            "bytes=-10",
            "bytes=0-18446744073709551615",
        ] {
            assert!(ReplyRange::is_plain_single(good), "{good}");
        }
        for bad in [
            "bytes=0-99999999999999999999999",
            "bytes=-99999999999999999999999",
            "BYTES=0-9",
            "bytes = 0-9",
            "bytes=0-9 ",
            "bytes=0-1,5-6",
            "bytes=9-0",
            "bytes=-",
            "bytes=a-b",
            "items=0-9",
            "bytes=0-1-2",
        ] {
            assert!(!ReplyRange::is_plain_single(bad), "{bad}");
        }
    }

    #[test]
    fn parses_normal_ranges() {
        let r: ContentRange = "bytes 0-4095/10000".parse().unwrap();
        assert_eq!(
            r,
            ContentRange {
                first: 0,
                len: 4096,
                total: 10000
            }
        );
        let r: ContentRange = "Bytes 8192-9999/10000".parse().unwrap();
        assert!(r.is_final());
        assert_eq!(r.last(), Some(9999));
        assert_eq!(r.to_string(), "bytes 8192-9999/10000");
    }

    #[test]
    fn zero_length_forms() {
        for v in ["bytes 0--1/0", "bytes */0", "bytes 0-0/0"] {
            let r: ContentRange = v.parse().unwrap();
            assert_eq!(r, ContentRange::empty_upload(), "{v}");
            assert!(r.is_final());
        }
    }

    #[test]
    fn rejects_bad_ranges() {
        for v in [
            "",
            "bytes",
            "bytes 0-10",
            "items 0-1/2",
            "bytes 5-4/10",
            "bytes 0-10/10",
            "bytes */10",
            "bytes 0-1/*",
            "bytes +0-1/2",
            "bytes 0-+1/2",
            "bytes -1-2/3",
            "bytes 1-1/0",
            "bytes 0-99999999999999999999999/5",
            "bytes=0-1/2",
            "bytes 0x0-1/2",
        ] {
            assert!(
                v.parse::<ContentRange>().is_err(),
                "{v:?} should be refused"
            );
        }
    }

    #[test]
    fn reply_ranges() {
        let p = ReplyRange::parse;
        let part = |start, end| ReplyRange::Partial { start, end };
        assert_eq!(p("bytes=0-36", 37), part(0, 36));
        assert_eq!(p("bytes=10-", 37), part(10, 36));
        assert_eq!(p("bytes=-5", 37), part(32, 36));
        assert_eq!(p("bytes=-500", 37), part(0, 36));
        assert_eq!(p("bytes=0-100", 37), part(0, 36));
        assert_eq!(p("bytes=50-60", 37), ReplyRange::Unsatisfiable);
        assert_eq!(p("bytes=0-1,5-6", 37), part(0, 1));
        assert_eq!(p("bytes=5-1", 37), ReplyRange::Full);
        assert_eq!(p("items=0-1", 37), ReplyRange::Full);
        assert_eq!(p("bytes=0-0", 0), ReplyRange::Unsatisfiable);
        assert_eq!(p("bytes=-0", 37), ReplyRange::Unsatisfiable);
        // The first satisfiable range is served; 416 only when none is.
        assert_eq!(p("bytes=2000000-3000000,0-9", 1_000_000), part(0, 9));
        assert_eq!(p("bytes=40-50, -3", 37), part(34, 36));
        assert_eq!(p("bytes=40-50,60-", 37), ReplyRange::Unsatisfiable);
        // Numbers past u64.
        assert_eq!(p("bytes=0-99999999999999999999999", 37), part(0, 36));
        assert_eq!(p("bytes=5-18446744073709551616", 37), part(5, 36));
        assert_eq!(p("bytes=-99999999999999999999999", 37), part(0, 36));
        assert_eq!(
            p("bytes=99999999999999999999999-", 37),
            ReplyRange::Unsatisfiable
        );
        assert_eq!(
            p("bytes=99999999999999999999999-99999999999999999999998", 37),
            ReplyRange::Full
        );
        assert_eq!(p("bytes=0010-0020", 37), part(10, 20));
        assert_eq!(p("Bytes = 1-2", 37), part(1, 2));
        assert_eq!(p("bytes=", 37), ReplyRange::Full);
        assert_eq!(p("bytes=1-2,x", 37), ReplyRange::Full);
        assert_eq!(p("bytes=+1-2", 37), ReplyRange::Full);
    }
}
