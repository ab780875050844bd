//! Which fragments a merge takes (see the `coalesce` module for why and how): the two rules,
//! where a run ends and whether it is worth merging. Pure: no I/O, tested below.

use super::super::objects::{Objects, MIN_PART_SIZE};
use super::super::pg::FragmentObject;

/// Fragments shorter than this are merged, in runs that end at a multiple of it (1 MiB).
pub const COALESCE_SPAN: u64 = 1 << 20;

/// Fewest fragments in a run worth merging: a span of 1 MiB in fragments of 32 KiB or more is
/// left as it is (completion reads at most 31 objects per MiB that way), since merging costs
/// a second write of the bytes while the upload goes on. Measured with `bitsd-bench --farm`
/// (docs/farm-performance-log.md): merging 64 KiB fragments cut an 8 MiB upload's completion from about
/// 200 to 85 ms but added about 1 ms to every fragment's Ack on a shared 2-core machine.
pub const MIN_RUN: usize = 32;

/// Permits a part merge takes.
pub(super) const PART_MERGE_PERMITS: u32 = 2;

/// The longest part span, whatever `part_size` is (any object of 5 MiB or more can be copied
/// as a part, so longer spans would only hold more in memory).
pub const MAX_PART_SPAN: u64 = 16 << 20;

/// Most fragments one merge takes (the last ones of its run): what a merge reads from
/// PostgreSQL and the store stays bounded even for a client that sends one-byte fragments.
pub const MAX_RUN: usize = 4096;

/// Which fragments one kind of merge takes (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Rule {
    /// Runs end with the fragment that reaches a multiple of this.
    pub(super) span: u64,
    /// Fragments shorter than this are merged.
    small_below: u64,
    /// Fewest fragments in a run worth merging.
    min_run: usize,
    /// Fewest bytes in a run worth merging.
    min_bytes: u64,
    /// Permits of the node's merge limiter it takes.
    pub(super) permits: u32,
}

impl Rule {
    /// 1 MiB spans of fragments under 1 MiB, runs of [`MIN_RUN`] or more.
    pub(super) const TINY: Rule = Rule {
        span: COALESCE_SPAN,
        small_below: COALESCE_SPAN,
        min_run: MIN_RUN,
        min_bytes: 0,
        permits: 1,
    };

    /// Spans of `part_size` (at least 5 MiB, at most [`MAX_PART_SPAN`]) of fragments under
    /// 5 MiB, runs of 5 MiB or more: objects the assembly copies as parts.
    pub(super) fn parts(part_size: u64) -> Rule {
        Rule {
            span: part_size.clamp(MIN_PART_SIZE, MAX_PART_SPAN),
            small_below: MIN_PART_SIZE,
            min_run: 2,
            min_bytes: MIN_PART_SIZE,
            permits: PART_MERGE_PERMITS,
        }
    }

    /// The merge the fragment `start..end` of an upload of `total` bytes on `objects` starts:
    /// a part merge when the upload takes them and the fragment [starts
    /// one](Rule::starts_merge) under the part rule, else a tiny merge when it starts one
    /// under the tiny rule, else none.
    pub(super) fn at(objects: &Objects, total: Option<u64>, start: u64, end: u64) -> Option<Rule> {
        let len = end.saturating_sub(start);
        let parts = total
            .filter(|&t| objects.merges_into_parts(t))
            .map(|_| Rule::parts(objects.part_size() as u64));
        match parts {
            Some(p) if p.starts_merge(start, len) => Some(p),
            _ if Rule::TINY.starts_merge(start, len) => Some(Rule::TINY),
            _ => None,
        }
    }

    /// Whether the fragment `start..start + len` starts a merge under this rule: it crosses a
    /// boundary and [may end a run worth merging](Rule::may_merge_at).
    pub(super) fn starts_merge(&self, start: u64, len: u64) -> bool {
        self.crosses(start, len) && self.may_merge_at(start)
    }

    /// Whether the fragment `offset..offset + len` reaches a multiple of the span: its last
    /// byte is in a later span than its first, or it ends exactly on a boundary.
    pub(super) fn crosses(&self, offset: u64, len: u64) -> bool {
        len > 0 && offset / self.span != offset.saturating_add(len) / self.span
    }

    /// Whether this is the part rule.
    pub(super) fn is_parts(&self) -> bool {
        self.small_below == MIN_PART_SIZE
    }

    /// Whether a fragment starting at `start` can end a run worth merging; `false` without
    /// reading the index when `start` is a multiple of the span: the fragment before it then
    /// ends on a boundary, so it reaches one and ends the run ([`run_ending_at`]), which
    /// holds at most the fragment itself, and one fragment is never worth merging. Aligned
    /// fragments of the span or longer (1 MiB fragments, under the tiny rule) are all such.
    pub(super) fn may_merge_at(&self, start: u64) -> bool {
        !start.is_multiple_of(self.span)
    }

    /// Whether `run` is worth merging.
    pub(super) fn worth(&self, run: &[FragmentObject]) -> bool {
        let bytes: u64 = run.iter().map(|f| f.entry.len).sum();
        run.len() >= self.min_run.max(2) && bytes >= self.min_bytes
    }
}

/// Whether the fragment `offset..offset + len` reaches a multiple of [`COALESCE_SPAN`] (the
/// tiny rule's boundaries).
#[cfg(test)]
fn crosses(offset: u64, len: u64) -> bool {
    Rule::TINY.crosses(offset, len)
}

/// The run to merge under `rule` for the crossing fragment `start..end`, from `rows` (the
/// index in offset order, from one span before `start` or its last [`MAX_RUN`] rows up to
/// the crossing fragment): the small non-crossing fragments that end at `start` one after
/// another, plus the crossing fragment when it is small.
pub(super) fn run_ending_at(
    rule: &Rule,
    rows: &[FragmentObject],
    start: u64,
    end: u64,
) -> Vec<FragmentObject> {
    let Some(pos) = rows
        .iter()
        .position(|r| r.entry.offset == start && r.entry.offset + r.entry.len == end)
    else {
        return Vec::new();
    };
    let mut run = Vec::new();
    if end - start < rule.small_below {
        run.push(rows[pos].clone());
    }
    let mut at = start;
    for r in rows[..pos].iter().rev() {
        let e = r.entry;
        if e.offset + e.len != at || e.len >= rule.small_below || rule.crosses(e.offset, e.len) {
            break;
        }
        run.push(r.clone());
        at = e.offset;
    }
    run.reverse();
    run
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FragmentEntry;

    fn row(offset: u64, len: u64) -> FragmentObject {
        FragmentObject {
            entry: FragmentEntry {
                offset,
                len,
                crc32c: 0,
            },
            object_key: format!("k{offset}"),
        }
    }

    /// The index of consecutive fragments of these lengths from offset 0.
    fn index(lens: &[u64]) -> Vec<FragmentObject> {
        let mut at = 0;
        lens.iter()
            .map(|&l| {
                let r = row(at, l);
                at += l;
                r
            })
            .collect()
    }

    fn offsets(run: &[FragmentObject]) -> Vec<u64> {
        run.iter().map(|r| r.entry.offset).collect()
    }

    const K: u64 = 1024;

    #[test]
    fn a_boundary_belongs_to_the_one_fragment_that_reaches_it() {
        assert!(!crosses(0, 1));
        assert!(!crosses(0, COALESCE_SPAN - 1));
        assert!(crosses(0, COALESCE_SPAN));
        assert!(crosses(COALESCE_SPAN - 1, 1));
        assert!(!crosses(COALESCE_SPAN, 1));
        assert!(!crosses(5, 0));
        // The last offsets do not overflow.
        assert!(!crosses(u64::MAX - 1, 1));
    }

    #[test]
    fn the_run_is_the_small_fragments_since_the_last_crossing_one() {
        // 300 KiB fragments: the 4th (900..1200 KiB) crosses 1 MiB and takes the 3 before.
        let rows = index(&[300 * K; 8]);
        let run = run_ending_at(&Rule::TINY, &rows, 900 * K, 1200 * K);
        assert_eq!(offsets(&run), vec![0, 300 * K, 600 * K, 900 * K]);
        // The 7th (1800..2100 KiB) crosses 2 MiB and stops at the 4th (which crossed 1 MiB).
        let run = run_ending_at(&Rule::TINY, &rows, 1800 * K, 2100 * K);
        assert_eq!(offsets(&run), vec![1200 * K, 1500 * K, 1800 * K]);
    }

    /// `may_merge_at` is false only where `run_ending_at` could not find a run worth merging,
    /// whatever the index before the fragment: every split of the span before `start` into
    /// fragments of 1 KiB multiples (small and large ones), under both rules.
    #[test]
    fn a_fragment_at_a_boundary_never_ends_a_run_worth_merging() {
        let part = Rule::parts(5 * COALESCE_SPAN);
        for rule in [Rule::TINY, part] {
            for before in [1, 7, 64, 300, 1024, 5 * 1024 - 1] {
                for len in [1, 64 * K, COALESCE_SPAN, 6 * COALESCE_SPAN] {
                    // Fragments of `before` KiB up to the boundary, then the fragment.
                    let start = rule.span * 2;
                    let mut lens = Vec::new();
                    let mut at = 0;
                    while at + before * K <= start {
                        lens.push(before * K);
                        at += before * K;
                    }
                    if at < start {
                        lens.push(start - at);
                    }
                    lens.push(len);
                    let rows = index(&lens);
                    let run = run_ending_at(&rule, &rows, start, start + len);
                    assert!(!rule.may_merge_at(start));
                    assert!(!rule.starts_merge(start, len));
                    assert!(!rule.worth(&run), "{before} KiB then {len} at {start}");
                }
            }
            // Off a boundary it may: 32 fragments of 32 KiB end at 1 MiB, the last starts
            // at 992 KiB.
            assert!(Rule::TINY.may_merge_at(992 * K));
        }
    }

    #[test]
    fn a_long_fragment_ends_a_run_without_joining_it() {
        let rows = index(&[100 * K, 100 * K, 100 * K, 2 * COALESCE_SPAN, 100 * K]);
        let run = run_ending_at(&Rule::TINY, &rows, 300 * K, 300 * K + 2 * COALESCE_SPAN);
        assert_eq!(offsets(&run), vec![0, 100 * K, 200 * K]);
        // A run after a long fragment starts after it (2 MiB + 300 KiB + 900 KiB crosses 3 MiB).
        let end = 300 * K + 2 * COALESCE_SPAN;
        let rows = index(&[
            100 * K,
            100 * K,
            100 * K,
            2 * COALESCE_SPAN,
            100 * K,
            100 * K,
            700 * K,
        ]);
        let run = run_ending_at(&Rule::TINY, &rows, end + 200 * K, end + 900 * K);
        assert_eq!(offsets(&run), vec![end, end + 100 * K, end + 200 * K]);
    }

    #[test]
    fn a_merged_object_is_never_merged_again() {
        // After a merge of 0..1200 KiB the index has one row there: it crosses, so the next
        // run stops at it.
        let mut rows = vec![row(0, 1200 * K)];
        rows.extend(index(&[300 * K; 3]).into_iter().map(|mut r| {
            r.entry.offset += 1200 * K;
            r
        }));
        let run = run_ending_at(&Rule::TINY, &rows, 1800 * K, 2100 * K);
        assert_eq!(offsets(&run), vec![1200 * K, 1500 * K, 1800 * K]);
    }

    #[test]
    fn a_gap_or_a_missing_trigger_means_nothing() {
        let rows = index(&[300 * K; 4]);
        assert!(run_ending_at(&Rule::TINY, &rows, 900 * K, 1100 * K).is_empty());
        let mut gapped = rows.clone();
        gapped.remove(1);
        assert_eq!(
            offsets(&run_ending_at(&Rule::TINY, &gapped, 900 * K, 1200 * K)),
            vec![600 * K, 900 * K]
        );
    }

    const M: u64 = 1024 * 1024;

    #[test]
    fn part_merges_take_the_fragments_under_5_mib_of_one_part_span() {
        let rule = Rule::parts(8 * M);
        // 1 MiB fragments: the 8th ends on 8 MiB and takes all eight; the 16th takes 8..16.
        let rows = index(&[M; 20]);
        assert!(!rule.crosses(6 * M, M));
        assert!(rule.crosses(7 * M, M));
        let run = run_ending_at(&rule, &rows, 7 * M, 8 * M);
        assert_eq!(run.len(), 8);
        assert!(rule.worth(&run));
        // After that merge the index holds 0..8 MiB as one object, which crosses: never again.
        let mut merged = vec![row(0, 8 * M)];
        merged.extend(rows[8..].iter().cloned());
        let run = run_ending_at(&rule, &merged, 15 * M, 16 * M);
        assert_eq!(offsets(&run), (8..16).map(|i| i * M).collect::<Vec<_>>());
        // 3 MiB fragments: the one over 8 MiB (6..9) joins the two before it.
        let rows = index(&[3 * M; 4]);
        assert_eq!(
            offsets(&run_ending_at(&rule, &rows, 6 * M, 9 * M)),
            vec![0, 3 * M, 6 * M]
        );
    }

    #[test]
    fn part_merges_leave_fragments_of_5_mib_and_runs_under_5_mib_alone() {
        let rule = Rule::parts(8 * M);
        // A 6 MiB fragment is a part of its own and ends the run before it.
        let rows = index(&[M, 6 * M, M]);
        let run = run_ending_at(&rule, &rows, 7 * M, 8 * M);
        assert_eq!(offsets(&run), vec![7 * M]);
        assert!(!rule.worth(&run), "one fragment");
        // 2.5 MiB of small fragments after it: too short to be a part (the assembly lends).
        let rows = index(&[5 * M + M / 2, M / 2, M, M, M]);
        let run = run_ending_at(&rule, &rows, 7 * M, 8 * M);
        assert_eq!(run.len(), 3);
        assert!(!rule.worth(&run), "2.5 MiB");
        // The crossing fragment itself is long: the run is the small ones before it.
        let rows = index(&[2 * M, 2 * M, 2 * M, 5 * M]);
        let run = run_ending_at(&rule, &rows, 6 * M, 11 * M);
        assert_eq!(offsets(&run), vec![0, 2 * M, 4 * M]);
        assert!(rule.worth(&run));
    }

    #[test]
    fn the_part_span_is_never_under_s3s_smallest_part() {
        assert_eq!(Rule::parts(1).span, MIN_PART_SIZE);
        assert_eq!(Rule::parts(16 * M).span, 16 * M);
        assert_eq!(
            Rule::parts(1 << 30).span,
            MAX_PART_SPAN,
            "nor over its longest"
        );
    }
}
