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
//! - **tiny** (every upload): spans of [`COALESCE_SPAN`](super::COALESCE_SPAN) (1 MiB),
//!   fragments under 1 MiB, runs of at least [`MIN_RUN`](super::MIN_RUN) fragments.
//!   Completion then reads about one object per MiB and streams it (more with fragments
//!   under about 256 bytes, since a merge takes at most [`MAX_RUN`] of them).
//! - **parts** (uploads of at least `merge_parts_from` bytes, 1 GiB by default, while the
//!   store copies parts itself): spans of `part_size` (at most
//!   [`MAX_PART_SPAN`](super::MAX_PART_SPAN)), fragments under 5 MiB (tiny-merged objects
//!   included), runs of at least 5 MiB. A fragment that
//!   crosses a part boundary starts this merge instead of a tiny one. Completion then copies
//!   every such object server-side (`UploadPartCopy`) and streams at most the last span's
//!   small fragments, so the final Ack of a large upload sent in fragments of a few MiB does
//!   not wait for all its bytes to pass through the node. The bytes pass through a node once
//!   more either way; the merges move that work from the final Ack to while the upload goes
//!   on (and make the store copy them: docs/farm-internals.md says what that costs).
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
//! the bucket's lifecycle rule removes); 3 also makes the old objects pending, so a crash
//! between 3 and 4 leaves them to the collector too. A merge that loses (the upload completed, the session ended,
//! another merge won) deletes its object. Nothing reads fragments before the upload is
//! complete, and completing needs the session's row, which the swap holds locked: a reader
//! sees the old index or the new one, never half.

use std::sync::Arc;

use bitsd_protocol::SessionId;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Semaphore;

use super::super::objects::{ObjectKey, Objects, StoredObject};
use super::super::pg::{FragmentObject, PgStateStore};
use super::merge_rule::{run_ending_at, Rule, MAX_RUN};
use crate::{FragmentEntry, StorageError};

/// Permits of one node's merges: a tiny merge takes one (it holds about 2 MiB), a part merge
/// [`PART_MERGE_PERMITS`](super::merge_rule::PART_MERGE_PERMITS) (it holds up to about
/// [`MAX_PART_SPAN`](super::MAX_PART_SPAN) + 5 MiB written and [`READ_AHEAD_BYTES`] read):
/// at most 4 tiny or 2 part merges of a node at once.
const MERGES_AT_ONCE: u32 = 4;

/// Fragment reads of one merge in flight at once, at most.
const READ_AHEAD: usize = 32;

/// Bytes of fragment reads of one merge in flight at once, at most (a read of a longer
/// fragment is alone): with the writer's part buffer, what one merge holds in memory.
const READ_AHEAD_BYTES: u64 = 8 << 20;

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
    /// No run worth merging ends there (under the tiny rule [`MIN_RUN`](super::MIN_RUN) or
    /// more fragments, under the parts rule 5 MiB or more): nothing to do.
    Nothing,
    /// The index or the session changed first (the upload completed or ended, another merge
    /// won): nothing changed, and a merged object already written is deleted.
    Lost,
}

impl super::SharedBackend {
    /// Merges the run of small fragments of `id` that ends with its fragment `start..end`
    /// into one object, now, under the rule a node uses for the session's upload: 1 MiB spans
    /// of tiny fragments, or part-sized spans for an upload of `merge_parts_from` bytes or
    /// more (a node does this by itself in the background after the commit of a fragment that
    /// reaches a boundary ([`COALESCE_SPAN`](super::COALESCE_SPAN) or `part_size`), unless `coalesce_fragments` is
    /// off); see [`Coalesced`] for the outcomes. Safe at any time: it changes the index only
    /// while the session is receiving and the run is as it read it.
    pub async fn coalesce(
        &self,
        id: &SessionId,
        start: u64,
        end: u64,
    ) -> Result<Coalesced, StorageError> {
        // The node's own merger when it has one, so that its limit counts this merge too.
        let merger = self
            .coalescer
            .clone()
            .unwrap_or_else(|| Coalescer::new(self.state.clone(), self.objects.clone()));
        let total = self.state.load(id).await?.and_then(|r| r.total);
        merger.merge_now(id, start, end, total).await
    }
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
    /// starts its merge in the background when the fragment starts one
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
            // Decided again: the store may have refused a part copy meanwhile (then the tiny
            // merge this fragment also starts, which needs fewer permits).
            let Some(rule) = Rule::at(&this.objects, total, start, end)
                .filter(|now| now.permits <= rule.permits)
            else {
                return;
            };
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
    /// module docs). A part merge that loses to a change of the index tries once more; one
    /// with no run worth merging falls back to the tiny merge the fragment would start
    /// otherwise (a part boundary is a MiB boundary too).
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
        if outcome == Coalesced::Nothing
            && rule.is_parts()
            && Rule::TINY.starts_merge(start, end.saturating_sub(start))
        {
            outcome = self.merge_once(id, &Rule::TINY, start, end).await?;
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
        // 4. The old objects (pending since the swap), then their rows; on a failure, or
        // should the node die first, the collector deletes them after its grace.
        let old: Vec<ObjectKey> = run
            .iter()
            .filter_map(|f| ObjectKey::parse(&f.object_key))
            .collect();
        match self.objects.delete(&old).await {
            Ok(()) => {
                let keys: Vec<&str> = run.iter().map(|f| f.object_key.as_str()).collect();
                if let Err(e) = self.state.forget_pending_objects(id, &keys).await {
                    tracing::debug!(session = %id, error = %e, "merged fragments' pending rows stay for the collector");
                }
            }
            Err(e) => {
                tracing::debug!(session = %id, error = %e, "merged fragments' objects stay pending for the collector");
            }
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
        let reads = futures_util::stream::iter(run.to_vec())
            .map(move |f| {
                let objects = objects.clone();
                async move { read_checked(&objects, &f).await }
            })
            .buffered(ahead);
        // Counted in the node's fragment memory like a fragment that holds its bytes, with
        // the reads held ahead of the writer (`ahead` objects of at most `longest` bytes, or
        // the run's whole length): with no room within the budget's wait the merge fails
        // (Busy), the run stays as it is.
        let len: u64 = run.iter().map(|f| f.entry.len).sum();
        let held_ahead = (ahead as u64).saturating_mul(longest).min(len);
        self.objects
            .put_stream_counted(key.clone(), len, held_ahead, reads)
            .await
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
