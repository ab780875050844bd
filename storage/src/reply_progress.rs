//! Distinct byte ranges delivered to clients, so a re-download never counts twice.

use serde::{Deserialize, Serialize};

/// A set of disjoint, sorted, half-open byte ranges `[start, end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRanges(Vec<(u64, u64)>);

impl ByteRanges {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `[start, end)`, merging with what touches or overlaps it.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        let mut out = Vec::with_capacity(self.0.len() + 1);
        let mut placed = false;
        for &(a, b) in &self.0 {
            if b < s {
                out.push((a, b));
            } else if a > e {
                if !placed {
                    out.push((s, e));
                    placed = true;
                }
                out.push((a, b));
            } else {
                s = s.min(a);
                e = e.max(b);
            }
        }
        if !placed {
            out.push((s, e));
        }
        self.0 = out;
    }

    /// Total bytes covered.
    pub fn covered(&self) -> u64 {
        self.0.iter().map(|(a, b)| b - a).sum()
    }

    /// The ranges.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_and_counts_once() {
        let mut r = ByteRanges::new();
        r.insert(0, 10);
        r.insert(5, 15);
        r.insert(20, 30);
        assert_eq!(r.covered(), 25);
        r.insert(0, 37);
        assert_eq!(r.covered(), 37);
        assert_eq!(r.ranges(), &[(0, 37)]);
        r.insert(0, 37);
        assert_eq!(r.covered(), 37);
        let mut r = ByteRanges::new();
        r.insert(10, 20);
        r.insert(0, 5);
        r.insert(5, 10);
        assert_eq!(r.ranges(), &[(0, 20)]);
    }
}
