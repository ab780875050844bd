//! Assembly as a multipart upload whose parts are either copied by the store from a fragment
//! object (`UploadPartCopy`, see [`super::part_copy`]) or streamed by the node from runs of
//! fragments, as [`super::part_plan`] decides (with nothing to copy: streamed parts of the
//! part size, [`super::part_plan::stream_plan`]).
//!
//! Durable when the CompleteMultipartUpload is answered; nothing is visible at the destination
//! before. With a journal ([`super::resume`]) the upload and each part the store answered are
//! recorded, and an attempt killed midway leaves them for the next one, which sends only the
//! parts missing; a failure that is not transient aborts the upload and forgets it. One
//! attempt at a time works on it (its lease, see [`super::resume`]); another waits. Without
//! one, any failure aborts the upload (the bucket's lifecycle rule covers a node killed
//! midway).

use std::ops::Range;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::multipart::PartId;
use object_store::{ObjectStoreExt, PutPayload};

use super::assemble::{Assembled, FragmentObject};
use super::error::map_err;
use super::part_copy::CopyError;
use super::part_plan::{stream_plan, PlannedPart, MIN_PART_SIZE};
use super::resume::{
    lost_lease, while_held, AssemblyJournal, Claim, DonePart, Journal, LOOK_EVERY, WAIT_FOR_HOLDER,
};
use super::{ObjectKey, Objects};
use crate::StorageError;

/// Parts sent at once when some are copied (each streamed one holds up to about
/// `part_size + 5 MiB` in memory, counted in `fragment_memory`).
const PARTS_AT_ONCE: usize = 4;

/// Parts sent at once when all are streamed: the node holds about two parts, as a writer of
/// one object does.
const STREAMED_AT_ONCE: usize = 2;

/// Fragment reads of one streamed part at once: small objects cost a store round trip each
/// (on Garage about 40 ms on a kept-alive connection, see docs/farm-garage.md), so a part of
/// many small fragments does not read them one after the other. Their bytes are the part's,
/// counted in `fragment_memory` before the first read.
const PIECES_AT_ONCE: usize = 32;

impl Objects {
    /// The plan for `fragments` (in offset order): part copies where the store does them and
    /// they copy something, streamed parts of the part size otherwise.
    pub(super) fn parts_plan(&self, fragments: &[FragmentObject]) -> Vec<PlannedPart> {
        let lens: Vec<u64> = fragments.iter().map(|f| f.len).collect();
        let copy = self.copier.as_ref().filter(|c| !c.refused()).and_then(|_| {
            super::part_plan::plan_parts(&lens, MIN_PART_SIZE, self.part_size as u64)
        });
        copy.unwrap_or_else(|| self.streamed_plan(fragments))
    }

    /// The plan for `fragments` (in offset order) with nothing copied: streamed parts of the
    /// part size.
    fn streamed_plan(&self, fragments: &[FragmentObject]) -> Vec<PlannedPart> {
        let lens: Vec<u64> = fragments.iter().map(|f| f.len).collect();
        stream_plan(&lens, self.part_size as u64)
    }

    /// Assembles `fragments` (in offset order, covering `0..total`) at `dest` as a multipart
    /// upload by `plan` (see [`Objects::parts_plan`]), going on with the one `journal`
    /// recorded if there is one (at the key recorded with it, which is then the returned
    /// [`Assembled::key`]).
    pub(super) async fn assemble_parts(
        &self,
        dest: &ObjectKey,
        fragments: &[FragmentObject],
        mut plan: Vec<PlannedPart>,
        total: u64,
        journal: Option<&dyn AssemblyJournal>,
    ) -> Result<Assembled, StorageError> {
        let (mut upload, mut resumed) = self.take_upload(dest, journal).await?;
        loop {
            // The lease is renewed while the parts go out and the store completes them.
            let sent = while_held(journal, &upload.key, async {
                let parts = self.send_parts(&upload, fragments, &plan, journal).await?;
                tracing::debug!(key = %upload.key, parts = parts.len(), "every part is in: completing the multipart upload");
                Ok(self
                    .multipart
                    .complete_multipart(upload.key.path(), &upload.upload_id, parts)
                    .await
                    .map_err(map_err("complete multipart upload", upload.key.as_str()))?)
            })
            .await;
            match sent {
                Err(CopyError::Refused) => {
                    // The same upload, streamed: parts of the same number are replaced.
                    plan = self.streamed_plan(fragments);
                }
                Ok(_) => {
                    if let Some(j) = journal {
                        if let Err(e) = j.completed(&upload.upload_id).await {
                            tracing::warn!(key = %upload.key, error = %e, "an assembled upload's journal stays until its session ends");
                        }
                    }
                    let (mut copied, mut streamed_gets) = (0u64, 0u64);
                    for part in &plan {
                        match part {
                            PlannedPart::Copy(_) => copied += part.len(),
                            PlannedPart::Stream(pieces) => streamed_gets += pieces.len() as u64,
                        }
                    }
                    tracing::debug!(key = %upload.key, parts = plan.len(), copied, streamed = total - copied, "upload assembled as a multipart upload");
                    return Ok(Assembled {
                        key: upload.key,
                        len: total,
                        crc32c: None,
                        requests: 2 + plan.len() as u64 + streamed_gets,
                        copied_bytes: copied,
                    });
                }
                Err(CopyError::Failed(e)) if resumed && !e.is_transient() => {
                    tracing::info!(key = %upload.key, error = %e, "the recorded upload of an earlier attempt is of no use; starting afresh");
                    self.give_up(&upload, journal).await;
                    // At most once more: a journal that comes back again is another
                    // attempt's, and its failures are for that attempt to handle.
                    let Some(j) = journal else { return Err(e) };
                    match self.start_upload(dest, j).await? {
                        Some(mine) => (upload, resumed) = (mine, false),
                        None => return Err(e),
                    }
                }
                Err(CopyError::Failed(e)) => {
                    match journal {
                        Some(j) if e.is_transient() => j.release().await,
                        _ => self.give_up(&upload, journal).await,
                    }
                    return Err(e);
                }
            }
        }
    }

    /// The upload to assemble `dest` in: the one an earlier attempt recorded (then the second
    /// value is true), else a new one. While another attempt holds the assembly, waits for
    /// it, up to [`WAIT_FOR_HOLDER`]; [`StorageError::Busy`] when it does not end in time or
    /// ends meanwhile (its completion, or its failure, is the answer the client's next
    /// attempt finds).
    async fn take_upload(
        &self,
        dest: &ObjectKey,
        journal: Option<&dyn AssemblyJournal>,
    ) -> Result<(Journal, bool), StorageError> {
        let Some(j) = journal else {
            return Ok((self.new_upload(dest).await?, false));
        };
        let waiting_since = tokio::time::Instant::now();
        let mut waited = false;
        loop {
            let claim = j.claim().await?;
            if !waited && claim == Claim::Held {
                tracing::debug!(key = %dest, "another attempt holds this assembly: waiting for its lease to end");
            }
            match claim {
                Claim::Taken(found) => {
                    tracing::info!(key = %found.key, parts = found.parts.len(), waited_ms = waiting_since.elapsed().as_millis() as u64, "going on with an assembly an earlier attempt started");
                    return Ok((found, true));
                }
                Claim::None if waited => {
                    return Err(StorageError::Busy(format!(
                        "another attempt at assembling {dest} ended while this one waited for \
                         it; the client sends the fragment again"
                    )))
                }
                Claim::None => {
                    if let Some(mine) = self.start_upload(dest, j).await? {
                        tracing::debug!(key = %dest, "started a new multipart upload for this assembly");
                        return Ok((mine, false));
                    }
                    // Another attempt recorded its upload first: wait for it.
                }
                Claim::Held => {}
            }
            if waiting_since.elapsed() >= WAIT_FOR_HOLDER {
                return Err(StorageError::Busy(format!(
                    "another attempt is assembling {dest} (the client's final fragment sent \
                     again, to another node?); the client sends the fragment again"
                )));
            }
            waited = true;
            tokio::time::sleep(LOOK_EVERY).await;
        }
    }

    /// Starts a multipart upload at `dest`.
    async fn new_upload(&self, dest: &ObjectKey) -> Result<Journal, StorageError> {
        let upload_id = self
            .multipart
            .create_multipart(dest.path())
            .await
            .map_err(map_err("start multipart upload", dest.as_str()))?;
        Ok(Journal {
            key: dest.clone(),
            upload_id,
            parts: Vec::new(),
        })
    }

    /// Starts a multipart upload at `dest` and records it in `journal`, held by this
    /// attempt; `None` when another attempt recorded one first (ours is then aborted).
    async fn start_upload(
        &self,
        dest: &ObjectKey,
        journal: &dyn AssemblyJournal,
    ) -> Result<Option<Journal>, StorageError> {
        let mine = self.new_upload(dest).await?;
        let recorded = journal.start(dest, &mine.upload_id).await;
        if !matches!(recorded, Ok(true)) {
            self.abort_upload(&mine.key, &mine.upload_id).await;
        }
        Ok(recorded?.then_some(mine))
    }

    /// Aborts `upload` and forgets it.
    async fn give_up(&self, upload: &Journal, journal: Option<&dyn AssemblyJournal>) {
        if let Some(j) = journal {
            if let Err(e) = j.forget(&upload.upload_id).await {
                tracing::warn!(key = %upload.key, error = %e, "could not forget an assembly's upload; the session's end aborts it");
            }
        }
        self.abort_upload(&upload.key, &upload.upload_id).await;
    }

    /// Aborts the multipart upload `upload_id` at `key` (one the store no longer has is
    /// fine).
    pub(crate) async fn abort_upload(&self, key: &ObjectKey, upload_id: &str) {
        match self
            .multipart
            .abort_multipart(key.path(), &upload_id.to_string())
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "aborting an assembly's multipart upload failed; the bucket's lifecycle rule removes its parts")
            }
        }
    }

    /// Sends the parts of `plan` that `upload` has not recorded, recording each once the
    /// store answered it; returns every part's id in order.
    async fn send_parts(
        &self,
        upload: &Journal,
        fragments: &[FragmentObject],
        plan: &[PlannedPart],
        journal: Option<&dyn AssemblyJournal>,
    ) -> Result<Vec<PartId>, CopyError> {
        let at_once = if plan.iter().any(|p| matches!(p, PlannedPart::Copy(_))) {
            PARTS_AT_ONCE
        } else {
            STREAMED_AT_ONCE
        };
        let mut start = 0u64;
        let numbered: Vec<(u32, Range<u64>, PlannedPart)> = plan
            .iter()
            .enumerate()
            .map(|(index, part)| {
                let range = start..start + part.len();
                start = range.end;
                (index as u32 + 1, range, part.clone())
            })
            .collect();
        futures_util::stream::iter(numbered)
            .map(|(number, range, part)| async move {
                if let Some(done) = upload
                    .parts
                    .iter()
                    .find(|d| d.number == number && d.range == range)
                {
                    return Ok(PartId {
                        content_id: done.etag.clone(),
                    });
                }
                let index = number as usize - 1;
                tracing::debug!(key = %upload.key, part = number, len = range.end - range.start, "sending an assembly's part");
                let id = match &part {
                    PlannedPart::Copy(piece) => {
                        let Some(copier) = self.copier.as_ref() else {
                            return Err(CopyError::Refused);
                        };
                        let source = &fragments[piece.fragment].key;
                        copier
                            .copy_part(
                                upload.key.path(),
                                &upload.upload_id,
                                number as usize,
                                source.path(),
                                piece.range.clone(),
                            )
                            .await?
                    }
                    PlannedPart::Stream(pieces) => self
                        .stream_part(&upload.key, &upload.upload_id, index, fragments, pieces)
                        .await
                        .map_err(CopyError::Failed)?,
                };
                if let Some(j) = journal {
                    let done = DonePart {
                        number,
                        range,
                        etag: id.content_id.clone(),
                    };
                    match j.part_done(&upload.upload_id, &done).await {
                        Ok(true) => {}
                        // Another attempt holds the assembly now: this one stops.
                        Ok(false) => return Err(CopyError::Failed(lost_lease(&upload.key))),
                        // Not fatal: unrecorded, the part is sent again by a later attempt.
                        Err(e) => {
                            tracing::warn!(key = %upload.key, part = number, error = %e, "could not record an assembled part")
                        }
                    }
                }
                Ok(id)
            })
            .buffered(at_once)
            .try_collect()
            .await
    }

    /// Reads `pieces` (ranges of fragment objects, in order) and sends them as part `index`
    /// (0-based) of the multipart upload. A fragment object shorter than its index entry says
    /// is an error.
    async fn stream_part(
        &self,
        dest: &ObjectKey,
        upload_id: &str,
        index: usize,
        fragments: &[FragmentObject],
        pieces: &[super::part_plan::Piece],
    ) -> Result<PartId, StorageError> {
        let len = pieces.iter().map(|p| p.range.end - p.range.start).sum();
        let _held = self.fragment_memory.reserve(len, dest.as_str()).await?;
        tracing::debug!(key = %dest, part = index + 1, len, "reserved an assembly's part's memory; reading it");
        let started = std::time::Instant::now();
        // Owned items: a stream of references makes the future not `Send` for every lifetime.
        let owned: Vec<(usize, Range<u64>)> = pieces
            .iter()
            .map(|p| (p.fragment, p.range.clone()))
            .collect();
        let chunks: Vec<Bytes> = futures_util::stream::iter(owned)
            .map(|(fragment, range)| self.read_piece(&fragments[fragment], range))
            .buffered(PIECES_AT_ONCE)
            .try_collect()
            .await?;
        let read = started.elapsed();
        tracing::debug!(key = %dest, part = index + 1, len, read_ms = read.as_millis() as u64, "read an assembly's part; sending it");
        let id = self
            .multipart
            .put_part(
                dest.path(),
                &upload_id.to_string(),
                index,
                PutPayload::from_iter(chunks),
            )
            .await
            .map_err(map_err("write part", dest.as_str()))?;
        tracing::debug!(
            key = %dest,
            part = index + 1,
            len,
            pieces = pieces.len(),
            read_ms = read.as_millis() as u64,
            sent_ms = (started.elapsed() - read).as_millis() as u64,
            "streamed an assembly's part"
        );
        Ok(id)
    }

    /// Reads `range` of fragment `f`; a fragment object shorter than its index entry says is
    /// an error.
    async fn read_piece(
        &self,
        f: &FragmentObject,
        range: Range<u64>,
    ) -> Result<Bytes, StorageError> {
        let want = range.end - range.start;
        let started = std::time::Instant::now();
        let whole = range.start == 0 && range.end == f.len;
        let bytes = if whole {
            let got = self
                .store
                .get(f.key.path())
                .await
                .map_err(map_err("read fragment", f.key.as_str()))?;
            f.check_size(got.meta.size)?;
            got.bytes()
                .await
                .map_err(map_err("read fragment", f.key.as_str()))?
        } else {
            self.store
                .get_range(f.key.path(), range.clone())
                .await
                .map_err(map_err("read fragment", f.key.as_str()))?
        };
        tracing::trace!(key = %f.key, ?range, whole, elapsed_ms = started.elapsed().as_millis() as u64, "read a piece of a fragment");
        if bytes.len() as u64 != want {
            return Err(StorageError::Corrupt {
                key: f.key.to_string(),
                why: format!("read {} bytes of a {want}-byte piece", bytes.len()),
            });
        }
        Ok(bytes)
    }
}
