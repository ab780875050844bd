//! The parts of an upload assembled with server-side copies: which fragments (or byte ranges
//! of them) the store copies itself (`UploadPartCopy`, no byte through the node) and which runs
//! of small fragments the node streams as one part.
//!
//! S3 wants every part but the last to be at least 5 MiB ([`MIN_PART_SIZE`]) and at most
//! 5 GiB ([`MAX_PART_SIZE`]), and at most [`MAX_PARTS`] parts. The plan keeps to that:
//!
//! - a fragment of at least `min_part` bytes is copied whole (a fragment over 5 GiB in equal
//!   ranges);
//! - smaller fragments are gathered into a streamed part, cut once it holds `stream_part`
//!   bytes;
//! - a run of small fragments shorter than `min_part` followed by a large fragment borrows the
//!   first bytes of the large one to reach `min_part`, and the rest of the large one is
//!   copied. When that rest would be shorter than `min_part`, the run instead takes the last
//!   bytes of the copy before it (if that copy keeps `min_part`), or joins the streamed part
//!   before it, and the large fragment is copied whole; failing both, the rest is streamed
//!   with what follows;
//! - whatever is gathered at the end is the last part, which may be short.
//!
//! Pure: no I/O, property-tested below.

use std::ops::Range;

pub(crate) use super::config::{MAX_PART_SIZE, MIN_PART_SIZE};

/// S3's most parts in one multipart upload.
pub const MAX_PARTS: usize = 10_000;

/// A byte range of one fragment (by its index in the upload's offset order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// The fragment's index.
    pub fragment: usize,
    /// Bytes of that fragment (relative to its start).
    pub range: Range<u64>,
}

/// One part of the multipart upload, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlannedPart {
    /// The store copies this range of one fragment object (`UploadPartCopy`).
    Copy(Piece),
    /// The node reads these pieces in order and sends them as one part.
    Stream(Vec<Piece>),
}

impl PlannedPart {
    /// The part's length in bytes.
    pub(crate) fn len(&self) -> u64 {
        match self {
            PlannedPart::Copy(p) => p.range.end - p.range.start,
            PlannedPart::Stream(pieces) => pieces.iter().map(|p| p.range.end - p.range.start).sum(),
        }
    }
}

/// Plans the parts of an upload made of fragments of `lens` bytes (in offset order, none
/// empty): fragments of at least `min_part` bytes are copied, shorter ones streamed in parts
/// of about `stream_part` bytes (`stream_part >= min_part`). `None` when the plan would copy
/// nothing (stream it all instead) or need more than [`MAX_PARTS`] parts.
pub fn plan_parts(lens: &[u64], min_part: u64, stream_part: u64) -> Option<Vec<PlannedPart>> {
    let min_part = min_part.clamp(1, MAX_PART_SIZE);
    let stream_part = stream_part.clamp(min_part, MAX_PART_SIZE);
    let mut parts = Vec::new();
    let mut gathered: Vec<Piece> = Vec::new();
    let mut gathered_len = 0u64;
    let mut copies = 0usize;
    let mut copy = |parts: &mut Vec<PlannedPart>, fragment: usize, range: Range<u64>| {
        // Equal ranges of at most 5 GiB each (each then at least 2.5 GiB).
        let len = range.end - range.start;
        let n = len.div_ceil(MAX_PART_SIZE).max(1);
        let each = len.div_ceil(n);
        let mut at = range.start;
        while at < range.end {
            let end = (at + each).min(range.end);
            parts.push(PlannedPart::Copy(Piece {
                fragment,
                range: at..end,
            }));
            copies += 1;
            at = end;
        }
    };
    for (fragment, &len) in lens.iter().enumerate() {
        if len == 0 {
            continue;
        }
        if len < min_part {
            gathered.push(Piece {
                fragment,
                range: 0..len,
            });
            gathered_len += len;
            if gathered_len >= stream_part {
                parts.push(PlannedPart::Stream(std::mem::take(&mut gathered)));
                gathered_len = 0;
            }
            continue;
        }
        // A large fragment. What is gathered before it must become a part of its own first.
        let mut from = 0;
        if gathered_len > 0 && gathered_len < min_part {
            let need = min_part - gathered_len; // < min_part <= len
            match parts.last_mut() {
                // This fragment would keep too little to be copied, but the copy before the
                // gathered run can spare its last `need` bytes: they go first into the run.
                Some(PlannedPart::Copy(prev))
                    if len - need < min_part
                        && prev.range.end - prev.range.start - need >= min_part =>
                {
                    prev.range.end -= need;
                    gathered.insert(
                        0,
                        Piece {
                            fragment: prev.fragment,
                            range: prev.range.end..prev.range.end + need,
                        },
                    );
                }
                // A streamed part before the run: the run joins it.
                Some(PlannedPart::Stream(prev))
                    if len - need < min_part
                        && prev
                            .iter()
                            .map(|p| p.range.end - p.range.start)
                            .sum::<u64>()
                            + gathered_len
                            <= MAX_PART_SIZE =>
                {
                    prev.append(&mut gathered);
                    gathered_len = 0;
                }
                // Otherwise this fragment lends its first bytes to the run.
                _ => {
                    from = need;
                    gathered.push(Piece {
                        fragment,
                        range: 0..from,
                    });
                }
            }
            if gathered_len > 0 {
                gathered_len = min_part;
            }
        }
        if gathered_len > 0 {
            parts.push(PlannedPart::Stream(std::mem::take(&mut gathered)));
            gathered_len = 0;
        }
        if len - from >= min_part {
            copy(&mut parts, fragment, from..len);
        } else {
            // Too short to be a part in the middle: streamed with what follows.
            gathered.push(Piece {
                fragment,
                range: from..len,
            });
            gathered_len = len - from;
        }
    }
    if gathered_len > 0 {
        parts.push(PlannedPart::Stream(gathered));
    }
    if copies == 0 || parts.len() > MAX_PARTS {
        return None;
    }
    Some(parts)
}

/// Plans an upload made of fragments of `lens` bytes (in offset order) as streamed parts
/// only, each `part_size` long but the last (longer when the upload would need more than
/// [`MAX_PARTS`] parts): the plan of an assembly with nothing to copy. Part `k` always
/// covers the same bytes of the upload, whichever fragments hold them, so an attempt that
/// resumes another's multipart upload knows which of its parts it can keep.
pub fn stream_plan(lens: &[u64], part_size: u64) -> Vec<PlannedPart> {
    let total: u64 = lens.iter().sum();
    let part_size = part_size
        .max(total.div_ceil(MAX_PARTS as u64))
        .clamp(1, MAX_PART_SIZE);
    let mut parts = Vec::new();
    let mut gathered: Vec<Piece> = Vec::new();
    let mut gathered_len = 0u64;
    for (fragment, &len) in lens.iter().enumerate() {
        let mut at = 0;
        while at < len {
            let take = (len - at).min(part_size - gathered_len);
            gathered.push(Piece {
                fragment,
                range: at..at + take,
            });
            gathered_len += take;
            at += take;
            if gathered_len == part_size {
                parts.push(PlannedPart::Stream(std::mem::take(&mut gathered)));
                gathered_len = 0;
            }
        }
    }
    if gathered_len > 0 {
        parts.push(PlannedPart::Stream(gathered));
    }
    parts
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1024 * 1024;

    fn shape(parts: &[PlannedPart]) -> Vec<(char, u64)> {
        parts
            .iter()
            .map(|p| match p {
                PlannedPart::Copy(_) => ('c', p.len() / MIB),
                PlannedPart::Stream(_) => ('s', p.len() / MIB),
            })
            .collect()
    }

    #[test]
    fn a_stream_plan_cuts_the_upload_at_multiples_of_the_part_size() {
        let plan = stream_plan(&[3 * MIB, 4 * MIB, MIB, 6 * MIB], 5 * MIB);
        assert_eq!(shape(&plan), vec![('s', 5), ('s', 5), ('s', 4)]);
        assert_eq!(
            plan[0],
            PlannedPart::Stream(vec![
                Piece {
                    fragment: 0,
                    range: 0..3 * MIB
                },
                Piece {
                    fragment: 1,
                    range: 0..2 * MIB
                },
            ])
        );
        assert_eq!(
            plan[1],
            PlannedPart::Stream(vec![
                Piece {
                    fragment: 1,
                    range: 2 * MIB..4 * MIB
                },
                Piece {
                    fragment: 2,
                    range: 0..MIB
                },
                Piece {
                    fragment: 3,
                    range: 0..2 * MIB
                },
            ])
        );
        // One fragment of many parts; an exact multiple leaves no short part.
        assert_eq!(shape(&stream_plan(&[15 * MIB], 5 * MIB)), vec![('s', 5); 3]);
        assert!(stream_plan(&[], 5 * MIB).is_empty());
    }

    proptest! {
        #[test]
        fn stream_plans_cover_the_upload_in_order_at_fixed_boundaries(
            lens in proptest::collection::vec(1u64..20_000, 1..40),
            part in 1u64..30_000,
        ) {
            let plan = stream_plan(&lens, part);
            let total: u64 = lens.iter().sum();
            // The part size grows so that no upload needs more than S3's 10,000 parts.
            let part = part.max(total.div_ceil(MAX_PARTS as u64));
            prop_assert!(plan.len() <= MAX_PARTS);
            let mut next = (0usize, 0u64);
            for (i, p) in plan.iter().enumerate() {
                if i + 1 < plan.len() {
                    prop_assert_eq!(p.len(), part);
                } else {
                    prop_assert!(p.len() > 0 && p.len() <= part);
                }
                let PlannedPart::Stream(pieces) = p else { panic!("a copy in a stream plan") };
                for piece in pieces {
                    if piece.fragment != next.0 {
                        prop_assert_eq!(next.1, lens[next.0]);
                        prop_assert_eq!(piece.fragment, next.0 + 1);
                        next = (piece.fragment, 0);
                    }
                    prop_assert_eq!(piece.range.start, next.1);
                    prop_assert!(piece.range.end > piece.range.start);
                    next.1 = piece.range.end;
                }
            }
            prop_assert_eq!(next, (lens.len() - 1, lens[lens.len() - 1]));
            prop_assert_eq!(plan.iter().map(PlannedPart::len).sum::<u64>(), total);
        }
    }

    #[test]
    fn large_fragments_are_copied_and_small_ones_streamed_in_parts() {
        // Eight 8 MiB fragments: eight copies.
        let plan = plan_parts(&[8 * MIB; 8], 5 * MIB, 8 * MIB).unwrap();
        assert_eq!(shape(&plan), vec![('c', 8); 8]);
        // Small fragments only: nothing to copy, streamed as today.
        assert_eq!(plan_parts(&[MIB; 64], 5 * MIB, 8 * MIB), None);
        // 3 MiB of small ones, then a 16 MiB fragment: it lends 2 MiB, the rest is copied.
        let plan = plan_parts(&[MIB, MIB, MIB, 16 * MIB, MIB], 5 * MIB, 8 * MIB).unwrap();
        assert_eq!(shape(&plan), vec![('s', 5), ('c', 14), ('s', 1)]);
        assert_eq!(
            plan[0],
            PlannedPart::Stream(vec![
                Piece {
                    fragment: 0,
                    range: 0..MIB
                },
                Piece {
                    fragment: 1,
                    range: 0..MIB
                },
                Piece {
                    fragment: 2,
                    range: 0..MIB
                },
                Piece {
                    fragment: 3,
                    range: 0..2 * MIB
                },
            ])
        );
        // A large fragment whose rest after lending would be too short, with nothing before
        // the run to take from: the rest goes with what follows.
        let plan = plan_parts(&[4 * MIB, 5 * MIB + MIB / 2, 10 * MIB], 5 * MIB, 8 * MIB).unwrap();
        assert_eq!(shape(&plan), vec![('s', 5), ('s', 5), ('c', 9)]);
        // The same after a copy that can spare bytes: the run takes the copy's last bytes and
        // the 6 MiB fragment is copied whole.
        let plan = plan_parts(&[12 * MIB, MIB, 6 * MIB], 5 * MIB, 8 * MIB).unwrap();
        assert_eq!(shape(&plan), vec![('c', 8), ('s', 5), ('c', 6)]);
        assert_eq!(
            plan[1],
            PlannedPart::Stream(vec![
                Piece {
                    fragment: 0,
                    range: 8 * MIB..12 * MIB
                },
                Piece {
                    fragment: 1,
                    range: 0..MIB
                },
            ])
        );
        // After a streamed part: the run joins it.
        let plan = plan_parts(
            &[MIB; 9]
                .iter()
                .copied()
                .chain([6 * MIB])
                .collect::<Vec<_>>(),
            5 * MIB,
            8 * MIB,
        )
        .unwrap();
        assert_eq!(shape(&plan), vec![('s', 9), ('c', 6)]);
    }

    #[test]
    fn a_fragment_over_five_gib_is_copied_in_equal_ranges() {
        let plan = plan_parts(&[11 * 1024 * MIB], 5 * MIB, 8 * MIB).unwrap();
        assert_eq!(plan.len(), 3);
        assert!(plan.iter().all(|p| p.len() <= MAX_PART_SIZE));
    }

    proptest! {
        #[test]
        fn plans_cover_every_byte_once_in_order_with_valid_part_sizes(
            lens in proptest::collection::vec(
                prop_oneof![1u64..200_000, 1u64..(3 * MIB), (4 * MIB)..(20 * MIB)],
                1..40,
            ),
            stream_extra in 0u64..(4 * MIB),
        ) {
            let (min_part, stream_part) = (5 * MIB, 5 * MIB + stream_extra);
            let Some(plan) = plan_parts(&lens, min_part, stream_part) else {
                // Only when nothing is large enough to copy (a fragment that lends bytes to
                // the part before it may be left too short for a part of its own).
                prop_assert!(lens.iter().all(|&l| l < 2 * min_part));
                return Ok(());
            };
            // Every byte once, in order.
            let mut next = (0usize, 0u64);
            for part in &plan {
                let pieces = match part {
                    PlannedPart::Copy(p) => vec![p.clone()],
                    PlannedPart::Stream(ps) => ps.clone(),
                };
                for p in pieces {
                    if next.1 == lens[next.0] {
                        next = (next.0 + 1, 0);
                    }
                    prop_assert_eq!((p.fragment, p.range.start), next);
                    prop_assert!(p.range.end > p.range.start && p.range.end <= lens[p.fragment]);
                    next = (p.fragment, p.range.end);
                }
            }
            prop_assert_eq!(next, (lens.len() - 1, lens[lens.len() - 1]));
            // Every part but the last at least min_part; none over 5 GiB; copies are large.
            for (i, part) in plan.iter().enumerate() {
                prop_assert!(part.len() <= MAX_PART_SIZE);
                if i + 1 < plan.len() {
                    prop_assert!(part.len() >= min_part, "part {} of {:?}", i, shape(&plan));
                }
                if let PlannedPart::Copy(p) = part {
                    prop_assert!(p.range.end - p.range.start >= min_part);
                }
            }
            // Every fragment of at least 2 × min_part is copied at least in part.
            for (i, &len) in lens.iter().enumerate() {
                if len >= 2 * min_part {
                    let copied = plan.iter().any(|p| matches!(p, PlannedPart::Copy(c) if c.fragment == i));
                    prop_assert!(copied, "fragment {} of {} bytes not copied", i, len);
                }
            }
        }
    }
}
