//! Small fragments merged behind the upload, so that completion does not read one small
//! object per fragment.
//!
//! Every fragment is its own object, durable before its Ack. A client on a slow link sends
//! fragments of a few kilobytes; left alone, assembling 64 MiB of 5 KB fragments would read
//! over 13,000 objects. Instead the upload is cut at every `span` boundary of its offsets:
//! the fragment whose bytes reach a boundary (it "crosses" it) starts, after its Ack and in
//! the background, a merge of the run of small fragments before it: the consecutive fragments
//! shorter than the rule's `small_below` that cross no boundary of the rule, plus the
//! crossing fragment itself when it is short too, when they are enough to be worth it (at
//! most [`MAX_RUN`] fragments, the last ones). Two rules ([`Rule`]):
//!
//! - **tiny** (every upload): spans of [`COALESCE_SPAN`] (1 MiB), fragments under 1 MiB,
//!   runs of at least [`MIN_RUN`] fragments. Completion then reads about one object per MiB
//!   and streams it.
//! - **parts** (uploads of at least `merge_parts_from` bytes, 1 GiB by default, while the
//!   store copies parts itself): spans of `part_size` (at most [`MAX_PART_SPAN`]), fragments
//!   under 5 MiB (tiny-merged objects included), runs of at least 5 MiB. A fragment that
//!   crosses a part boundary starts this merge instead of a tiny one. Completion then copies
//!   every such object server-side (`UploadPartCopy`) and streams at most the last span's
//!   small fragments, so the final Ack of a large upload sent in fragments of a few MiB does
//!   not wait for all its bytes to pass through the node. The bytes pass through a node once
//!   more either way; the merges move that work from the final Ack to while the upload goes
//!   on (and make the store copy them: docs/farm.md says what that costs).
//!
//! Within one rule a merged object contains a crossing fragment or ends where a long one
//! starts, so the same rule never merges it again and two merges of one rule never take the
//! same fragment; a part merge takes the tiny merges' objects of its span. Merges whose runs
//! overlap anyway (a tiny merge still running when the part merge reads the index, nodes
//! configured differently) are settled by the swap: the index must still hold exactly the
//! run, so one wins and the other deletes its object (a part merge that loses that way reads
//! the index once more and tries again, once).
//!
//! The crash-safe order: 1. the merged object's key is recorded as pending (only while the
//! session is still receiving), 2. the run's objects are read, each checked against the
//! length and CRC-32C of its index entry, and written to the merged object (durable on the
//! store's write quorum), 3. one PostgreSQL transaction swaps the run for the merged object
//! in the index and drops its pending row, only if the session is still `receiving` and the
//! index still holds exactly the run ([`PgStateStore::replace_fragments`]), 4. the run's
//! objects are deleted. A crash before 3 leaves the merged object pending for the collector
//! (an object of `part_size` or more is a multipart upload: one cut short leaves parts only
//! the bucket's lifecycle rule removes); after 3, the old objects go with the session's
//! prefix at Close or expiry. A merge that loses (the upload completed, the session ended,
//! another merge won) deletes its object. Nothing reads fragments before the upload is
//! complete, and completing needs the session's row, which the swap holds locked: a reader
//! sees the old index or the new one, never half.

use std::sync::Arc;

use bitsd_protocol::SessionId;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Semaphore;

use super::super::objects::{ObjectKey, Objects, StoredObject, MIN_PART_SIZE};
use super::super::pg::{FragmentObject, PgStateStore};
use crate::{FragmentEntry, StorageError};

/// Fragments shorter than this are merged, in runs that end at a multiple of it (1 MiB).
pub const COALESCE_SPAN: u64 = 1 << 20;

/// Fewest fragments in a run worth merging: a span of 1 MiB in fragments of 32 KiB or more is
/// left as it is (completion reads at most 31 objects per MiB that way), since merging costs
/// a second write of the bytes while the upload goes on. Measured with `bitsd-bench --farm`
/// (docs/performance.md): merging 64 KiB fragments cut an 8 MiB upload's completion from about
/// 200 to 85 ms but added about 1 ms to every fragment's Ack on a shared 2-core machine.
pub const MIN_RUN: usize = 32;

/// Permits of one node's merges: a tiny merge takes one (it holds about 2 MiB), a part merge
/// [`PART_MERGE_PERMITS`] (it holds up to about [`MAX_PART_SPAN`] + 5 MiB written and
/// [`READ_AHEAD_BYTES`] read): at most 4 tiny or 2 part merges of a node at once.
const MERGES_AT_ONCE: u32 = 4;

/// Permits a part merge takes.
const PART_MERGE_PERMITS: u32 = 2;

/// The longest part span, whatever `part_size` is (any object of 5 MiB or more can be copied
/// as a part, so longer spans would only hold more in memory).
pub const MAX_PART_SPAN: u64 = 16 << 20;

/// Most fragments one merge takes (the last ones of its run): what a merge reads from
/// PostgreSQL and the store stays bounded even for a client that sends one-byte fragments.
pub const MAX_RUN: usize = 4096;

/// Fragment reads of one merge in flight at once, at most.
const READ_AHEAD: usize = 32;

/// Bytes of fragment reads of one merge in flight at once, at most (a read of a longer
/// fragment is alone): with the writer's part buffer, what one merge holds in memory.
const READ_AHEAD_BYTES: u64 = 8 << 20;

/// Which fragments one kind of merge takes (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Rule {
    /// Runs end with the fragment that reaches a multiple of this.
    span: u64,
    /// Fragments shorter than this are merged.
    small_below: u64,
    /// Fewest fragments in a run worth merging.
    min_run: usize,
    /// Fewest bytes in a run worth merging.
    min_bytes: u64,
    /// Permits of the node's merge limiter it takes.
    permits: u32,
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
    /// a part merge when the upload takes them and the fragment crosses a part boundary,
    /// else a tiny merge when it crosses a MiB boundary, else none.
    pub(super) fn at(objects: &Objects, total: Option<u64>, start: u64, end: u64) -> Option<Rule> {
        let len = end.saturating_sub(start);
        let parts = total
            .filter(|&t| objects.merges_into_parts(t))
            .map(|_| Rule::parts(objects.part_size() as u64));
        match parts {
            Some(p) if p.crosses(start, len) => Some(p),
            _ if Rule::TINY.crosses(start, len) => Some(Rule::TINY),
            _ => None,
        }
    }

    /// Whether the fragment `offset..offset + len` reaches a multiple of the span: its last
    /// byte is in a later span than its first, or it ends exactly on a boundary.
    fn crosses(&self, offset: u64, len: u64) -> bool {
        len > 0 && offset / self.span != offset.saturating_add(len) / self.span
    }

    /// Whether this is the part rule.
    fn is_parts(&self) -> bool {
        self.small_below == MIN_PART_SIZE
    }

    /// Whether `run` is worth merging.
    fn worth(&self, run: &[FragmentObject]) -> bool {
        let bytes: u64 = run.iter().map(|f| f.entry.len).sum();
        run.len() >= self.min_run.max(2) && bytes >= self.min_bytes
    }
}

/// What [`crate::shared::SharedBackend::coalesce`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coalesced {
    /// `fragments` fragments, `bytes` bytes in all, are one object now.
    Merged {
        /// Fragments replaced.
        fragments: usize,
        /// Their bytes.
        bytes: u64,
    },
    /// No run worth merging ends there (under the tiny rule [`MIN_RUN`] or more fragments,
    /// under the parts rule 5 MiB or more): nothing to do.
    Nothing,
    /// The index or the session changed first (the upload completed or ended, another merge
    /// won): nothing changed, the merged object is deleted.
    Lost,
}

/// Whether the fragment `offset..offset + len` reaches a multiple of [`COALESCE_SPAN`] (the
/// tiny rule's boundaries).
#[cfg(test)]
fn crosses(offset: u64, len: u64) -> bool {
    Rule::TINY.crosses(offset, len)
}

/// The run to merge under `rule` for the crossing fragment `start..end`, from `rows` (the
/// index, in offset order, from at least one span before `start`): the small non-crossing
/// fragments that end at `start` one after another, plus the crossing fragment when it is
/// small.
fn run_ending_at(
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

/// Merges a session's small fragments (see the module docs); one per backend, shared by its
/// fragment sinks.
#[derive(Clone, Debug)]
pub(super) struct Coalescer {
    state: PgStateStore,
    objects: Objects,
    permits: Arc<Semaphore>,
}

impl Coalescer {
    pub(super) fn new(state: PgStateStore, objects: Objects) -> Self {
        Coalescer {
            state,
            objects,
            permits: Arc::new(Semaphore::new(MERGES_AT_ONCE as usize)),
        }
    }

    /// After the commit of the fragment `start..end` of `id`, an upload of `total` bytes:
    /// starts its merge in the background when the fragment crosses a boundary
    /// ([`Rule::at`]). A failed merge changes nothing.
    pub(super) fn after_commit(&self, id: SessionId, start: u64, end: u64, total: Option<u64>) {
        let Some(rule) = Rule::at(&self.objects, total, start, end) else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let Ok(_permit) = Arc::clone(&this.permits)
                .acquire_many_owned(rule.permits)
                .await
            else {
                return;
            };
            // Decided again: the store may have refused a part copy meanwhile.
            if Rule::at(&this.objects, total, start, end) != Some(rule) {
                return;
            }
            match this.merge(&id, &rule, start, end).await {
                Ok(done) => tracing::debug!(session = %id, end, ?done, "fragments merged"),
                Err(e) => {
                    tracing::warn!(session = %id, end, error = %e, "small fragments stay unmerged")
                }
            }
        });
    }

    /// The merge [`Rule::at`] picks for the fragment `start..end` of `id`, an upload of
    /// `total` bytes, now, under this coalescer's limit (at most `MERGES_AT_ONCE` permits of
    /// a node's merges at once, whoever starts them).
    pub(super) async fn merge_now(
        &self,
        id: &SessionId,
        start: u64,
        end: u64,
        total: Option<u64>,
    ) -> Result<Coalesced, StorageError> {
        let Some(rule) = Rule::at(&self.objects, total, start, end) else {
            return Ok(Coalesced::Nothing);
        };
        let _permit = self
            .permits
            .acquire_many(rule.permits)
            .await
            .map_err(|_| StorageError::Task("the merge limiter is closed".into()))?;
        self.merge(id, &rule, start, end).await
    }

    /// Merges the run under `rule` ending with the fragment `start..end` of `id` (see the
    /// module docs); a part merge that loses to a change of the index tries once more.
    async fn merge(
        &self,
        id: &SessionId,
        rule: &Rule,
        start: u64,
        end: u64,
    ) -> Result<Coalesced, StorageError> {
        let tries = if rule.is_parts() { 2 } else { 1 };
        let mut outcome = Coalesced::Nothing;
        for _ in 0..tries {
            outcome = self.merge_once(id, rule, start, end).await?;
            if outcome != Coalesced::Lost {
                break;
            }
        }
        Ok(outcome)
    }

    /// One attempt of [`Coalescer::merge`].
    async fn merge_once(
        &self,
        id: &SessionId,
        rule: &Rule,
        start: u64,
        end: u64,
    ) -> Result<Coalesced, StorageError> {
        let rows = self
            .state
            .fragments_before(id, start.saturating_sub(rule.span), end, MAX_RUN)
            .await?;
        let run = run_ending_at(rule, &rows, start, end);
        if !rule.worth(&run) {
            return Ok(Coalesced::Nothing);
        }
        let first = run[0].entry.offset;
        let key = self.objects.fragment_key(id, first);
        // 1. Pending before the object exists (only while the upload goes on: a merge that
        // starts after the last fragment would only lose at the swap).
        if !self
            .state
            .add_merge_pending_object(id, key.as_str())
            .await?
        {
            return Ok(Coalesced::Lost);
        }
        // 2. The bytes, checked.
        let stored = match self.write_merged(&key, &run).await {
            Ok(stored) => stored,
            Err(e) => {
                self.discard(&key).await;
                return Err(e);
            }
        };
        let merged = FragmentObject {
            entry: FragmentEntry {
                offset: first,
                len: stored.len,
                crc32c: stored.crc32c,
            },
            object_key: key.as_str().to_owned(),
        };
        // 3. The swap. An error here may have committed or not: the merged object stays
        // (referenced, or pending for the collector).
        if !self.state.replace_fragments(id, &run, &merged).await? {
            self.discard(&key).await;
            return Ok(Coalesced::Lost);
        }
        // 4. The old objects; on failure they go with the session's prefix.
        let old: Vec<ObjectKey> = run
            .iter()
            .filter_map(|f| ObjectKey::parse(&f.object_key))
            .collect();
        if let Err(e) = self.objects.delete(&old).await {
            tracing::debug!(session = %id, error = %e, "merged fragments' objects stay until the session ends");
        }
        Ok(Coalesced::Merged {
            fragments: run.len(),
            bytes: stored.len,
        })
    }

    /// Reads the run's objects in order, each checked against its index entry, into one
    /// new object at `key`.
    async fn write_merged(
        &self,
        key: &ObjectKey,
        run: &[FragmentObject],
    ) -> Result<StoredObject, StorageError> {
        let objects = self.objects.clone();
        let longest = run.iter().map(|f| f.entry.len).max().unwrap_or(1).max(1);
        let ahead = usize::try_from(READ_AHEAD_BYTES / longest)
            .unwrap_or(READ_AHEAD)
            .clamp(1, READ_AHEAD);
        let mut reads = futures_util::stream::iter(run.to_vec())
            .map(move |f| {
                let objects = objects.clone();
                async move { read_checked(&objects, &f).await }
            })
            .buffered(ahead);
        let mut writer = self.objects.writer(key.clone());
        while let Some(bytes) = reads.next().await {
            let written = match bytes {
                Ok(bytes) => writer.write_bytes(bytes).await,
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                writer.abort().await;
                return Err(e);
            }
        }
        writer.finish().await
    }

    /// Deletes a merged object that did not go into the index, then its pending row (left
    /// for the collector if either fails).
    async fn discard(&self, key: &ObjectKey) {
        if self.objects.delete(std::slice::from_ref(key)).await.is_ok() {
            let _ = self.state.forget_pending_object(key.as_str()).await;
        }
    }
}

/// One fragment's bytes, refused unless they have its index entry's length and CRC-32C.
async fn read_checked(objects: &Objects, f: &FragmentObject) -> Result<Bytes, StorageError> {
    let corrupt = |why: String| StorageError::Corrupt {
        key: f.object_key.clone(),
        why,
    };
    let key = ObjectKey::parse(&f.object_key)
        .ok_or_else(|| corrupt("the index holds an invalid object key".into()))?;
    let bytes = objects.read(&key, None).await?.bytes().await?;
    if bytes.len() as u64 != f.entry.len {
        return Err(corrupt(format!(
            "fragment object has {} bytes, its index entry says {}",
            bytes.len(),
            f.entry.len
        )));
    }
    let crc = crc32c::crc32c(&bytes);
    if crc != f.entry.crc32c {
        return Err(corrupt(format!(
            "fragment object's CRC-32C is {crc:08x}, its index entry says {:08x}",
            f.entry.crc32c
        )));
    }
    Ok(Bytes::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

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
