//! `Content-Range` of a Fragment: `bytes <first>-<last>/<total>` (§5.1, §5.6).

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
