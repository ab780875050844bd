//! Assembly with server-side copies: a multipart upload whose parts are either copied by the
//! store from a fragment object (`UploadPartCopy`, see [`super::part_copy`]) or streamed by
//! the node from runs of small fragments, as [`super::part_plan`] decides.
//!
//! Durable when the CompleteMultipartUpload is answered; any failure aborts the multipart
//! upload (no part is left behind; the bucket's lifecycle rule covers a node killed
//! midway), and nothing is visible at the destination before the completion.

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::{ObjectStoreExt, PutPayload};

use super::assemble::{Assembled, FragmentObject};
use super::error::map_err;
use super::part_copy::CopyError;
use super::part_plan::{PlannedPart, MIN_PART_SIZE};
use super::{ObjectKey, Objects};
use crate::StorageError;

/// Parts sent at once (each streamed one holds up to about `part_size + 5 MiB` in memory).
const PARTS_AT_ONCE: usize = 4;

/// What an assembly with part copies came to.
pub(super) enum CopyAssembly {
    /// The upload is at its destination.
    Done(Assembled),
    /// The store does not do part copies: stream instead (nothing was written).
    Refused,
}

impl Objects {
    /// The plan for `fragments` (in offset order), or `None` when part copies are off,
    /// refused before, or would copy nothing.
    pub(super) fn copy_plan(&self, fragments: &[FragmentObject]) -> Option<Vec<PlannedPart>> {
        let copier = self.copier.as_ref()?;
        if copier.refused() {
            return None;
        }
        let lens: Vec<u64> = fragments.iter().map(|f| f.len).collect();
        super::part_plan::plan_parts(&lens, MIN_PART_SIZE, self.part_size as u64)
    }

    /// Assembles `fragments` (in offset order, covering `0..total`) at `dest` by `plan`.
    pub(super) async fn assemble_with_copies(
        &self,
        dest: &ObjectKey,
        fragments: &[FragmentObject],
        plan: Vec<PlannedPart>,
        total: u64,
    ) -> Result<CopyAssembly, StorageError> {
        let Some(copier) = self.copier.clone() else {
            return Ok(CopyAssembly::Refused);
        };
        let upload_id = self
            .s3
            .create_multipart(dest.path())
            .await
            .map_err(map_err("start multipart upload", dest.as_str()))?;
        let count = plan.len();
        let (mut copied, mut streamed_gets) = (0u64, 0u64);
        for part in &plan {
            match part {
                PlannedPart::Copy(_) => copied += part.len(),
                PlannedPart::Stream(pieces) => streamed_gets += pieces.len() as u64,
            }
        }
        let sent = futures_util::stream::iter(plan.into_iter().enumerate())
            .map(|(index, part)| {
                let (copier, upload_id) = (copier.clone(), upload_id.clone());
                async move {
                    match part {
                        PlannedPart::Copy(piece) => {
                            let source = &fragments[piece.fragment].key;
                            copier
                                .copy_part(
                                    dest.path(),
                                    &upload_id,
                                    index + 1,
                                    source.path(),
                                    piece.range,
                                )
                                .await
                        }
                        PlannedPart::Stream(pieces) => self
                            .stream_part(dest, &upload_id, index, fragments, &pieces)
                            .await
                            .map_err(CopyError::Failed),
                    }
                }
            })
            .buffered(PARTS_AT_ONCE)
            .try_collect::<Vec<PartId>>()
            .await;
        let parts = match sent {
            Ok(parts) => parts,
            Err(e) => {
                if let Err(abort) = self.s3.abort_multipart(dest.path(), &upload_id).await {
                    tracing::warn!(key = %dest, error = %abort, "aborting a failed assembly's multipart upload failed; the bucket's lifecycle rule removes its parts");
                }
                return match e {
                    CopyError::Refused => Ok(CopyAssembly::Refused),
                    CopyError::Failed(e) => Err(e),
                };
            }
        };
        if let Err(e) = self
            .s3
            .complete_multipart(dest.path(), &upload_id, parts)
            .await
        {
            let _ = self.s3.abort_multipart(dest.path(), &upload_id).await;
            return Err(map_err("complete multipart upload", dest.as_str())(e));
        }
        tracing::debug!(key = %dest, parts = count, copied, streamed = total - copied, "upload assembled with part copies");
        Ok(CopyAssembly::Done(Assembled {
            key: dest.clone(),
            len: total,
            crc32c: None,
            requests: 2 + count as u64 + streamed_gets,
            copied_bytes: copied,
        }))
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
        let mut chunks: Vec<Bytes> = Vec::with_capacity(pieces.len());
        for piece in pieces {
            let f = &fragments[piece.fragment];
            let want = piece.range.end - piece.range.start;
            let bytes = if piece.range.start == 0 && piece.range.end == f.len {
                let got = self
                    .store
                    .get(f.key.path())
                    .await
                    .map_err(map_err("read fragment", f.key.as_str()))?;
                if got.meta.size != f.len {
                    return Err(StorageError::Corrupt {
                        key: f.key.to_string(),
                        why: format!(
                            "fragment object has {} bytes, its index entry says {}",
                            got.meta.size, f.len
                        ),
                    });
                }
                got.bytes()
                    .await
                    .map_err(map_err("read fragment", f.key.as_str()))?
            } else {
                self.store
                    .get_range(f.key.path(), piece.range.clone())
                    .await
                    .map_err(map_err("read fragment", f.key.as_str()))?
            };
            if bytes.len() as u64 != want {
                return Err(StorageError::Corrupt {
                    key: f.key.to_string(),
                    why: format!("read {} bytes of a {want}-byte piece", bytes.len()),
                });
            }
            chunks.push(bytes);
        }
        self.s3
            .put_part(
                dest.path(),
                &upload_id.to_string(),
                index,
                PutPayload::from_iter(chunks),
            )
            .await
            .map_err(map_err("write part", dest.as_str()))
    }
}
