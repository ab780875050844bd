//! Assembly of a complete upload from its fragment objects, and reading it as one stream.
//!
//! One fragment: a server-side copy (CopyObject, one request, no bytes through the node).
//! Shorter than the part size, with nothing to copy: the fragments are read in offset order
//! (up to [`READ_AHEAD`] GETs open at once, so many small fragments do not cost one round trip
//! each in sequence) and sent with one PUT. Otherwise a multipart upload (see
//! [`super::assemble_copy`]): the store copies the parts it can from large fragments
//! (`UploadPartCopy`, when `server_side_copy` is on and the store does it) and the node
//! streams the others from runs of fragments (S3 wants at least 5 MiB in every part but the
//! last). Given a journal ([`super::resume`]), an assembly whose node died goes on where it
//! stopped on the next attempt.

use futures_util::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;

use super::error::map_err;
use super::resume::AssemblyJournal;
use super::{ByteStream, ObjectKey, Objects};
use crate::StorageError;

/// Fragment GETs opened ahead of the one being copied. Small objects cost a store round trip
/// each (on Garage about 40 ms on a kept-alive connection, see docs/farm-garage.md), so many
/// are asked for at once; an opened GET whose body is not read yet holds only its socket's
/// buffers.
const READ_AHEAD: usize = 32;

/// One committed fragment of an upload: where its bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FragmentObject {
    /// Offset of its first byte in the upload.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// Its object.
    pub key: ObjectKey,
}

impl FragmentObject {
    /// Refuses an object whose length is not the one the fragment index gives it.
    pub(super) fn check_size(&self, object_len: u64) -> Result<(), StorageError> {
        if object_len == self.len {
            return Ok(());
        }
        Err(StorageError::Corrupt {
            key: self.key.to_string(),
            why: format!(
                "fragment object has {object_len} bytes, its index entry says {}",
                self.len
            ),
        })
    }
}

/// An upload assembled at its destination key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assembled {
    /// The destination key.
    pub key: ObjectKey,
    /// The upload's length.
    pub len: u64,
    /// CRC-32C of the upload's bytes (`None` after a server-side copy, which reads nothing).
    pub crc32c: Option<u32>,
    /// Requests sent to the store (GETs, PUTs, parts, copy), for the metrics and the docs.
    pub requests: u64,
    /// Bytes the store copied itself (CopyObject, UploadPartCopy): they did not pass through
    /// the node. The rest of `len` was read and written by the node.
    pub copied_bytes: u64,
}

/// Sorts `fragments` by offset and checks that they cover `0..total` exactly, without gaps
/// or overlaps.
fn in_order(
    fragments: &[FragmentObject],
    total: u64,
    dest: &ObjectKey,
) -> Result<Vec<FragmentObject>, StorageError> {
    let mut sorted = fragments.to_vec();
    sorted.sort_by_key(|f| f.offset);
    let mut next = 0u64;
    for f in &sorted {
        if f.offset != next {
            return Err(StorageError::Corrupt {
                key: dest.to_string(),
                why: format!("fragment index has a gap or overlap at offset {next} (next fragment starts at {})", f.offset),
            });
        }
        next += f.len;
    }
    if next != total {
        return Err(StorageError::Corrupt {
            key: dest.to_string(),
            why: format!("fragments cover {next} bytes, the upload has {total}"),
        });
    }
    Ok(sorted)
}

impl Objects {
    /// Writes the upload made of `fragments` (any order; they must cover `0..total`) to
    /// `dest`, durable when this returns. The fragment objects stay (the caller deletes them
    /// once the completion is committed, see [`Objects::delete`]). A failure leaves nothing
    /// behind.
    pub async fn assemble(
        &self,
        dest: &ObjectKey,
        fragments: &[FragmentObject],
        total: u64,
    ) -> Result<Assembled, StorageError> {
        self.assemble_with(dest, fragments, total, None).await
    }

    /// As [`Objects::assemble`], recording a multipart upload and its parts in `journal`: a
    /// transient failure (or the node's death) leaves them for the next attempt, which goes
    /// on with that upload, at the key recorded with it (the returned [`Assembled::key`],
    /// which may not be `dest`).
    pub async fn assemble_resumable(
        &self,
        dest: &ObjectKey,
        fragments: &[FragmentObject],
        total: u64,
        journal: &dyn AssemblyJournal,
    ) -> Result<Assembled, StorageError> {
        self.assemble_with(dest, fragments, total, Some(journal))
            .await
    }

    async fn assemble_with(
        &self,
        dest: &ObjectKey,
        fragments: &[FragmentObject],
        total: u64,
        journal: Option<&dyn AssemblyJournal>,
    ) -> Result<Assembled, StorageError> {
        let fragments = in_order(fragments, total, dest)?;
        // CopyObject takes objects up to 5 GiB; a longer single fragment is copied in parts.
        let single = match fragments.as_slice() {
            [only] if only.len <= super::part_plan::MAX_PART_SIZE => Some(only),
            _ => None,
        };
        if let Some(only) = single {
            tracing::debug!(key = %dest, len = total, "assembling: a server-side copy of the one fragment");
            self.store
                .copy(only.key.path(), dest.path())
                .await
                .map_err(map_err("copy", only.key.as_str()))?;
            return Ok(Assembled {
                key: dest.clone(),
                len: total,
                crc32c: None,
                requests: 1,
                copied_bytes: total,
            });
        }
        let plan = self.parts_plan(&fragments);
        let copies = plan
            .iter()
            .any(|p| matches!(p, super::part_plan::PlannedPart::Copy(_)));
        if total >= self.part_size as u64 || copies {
            tracing::debug!(key = %dest, len = total, parts = plan.len(), fragments = fragments.len(), resumable = journal.is_some(), "assembling: a multipart upload");
            return self
                .assemble_parts(dest, &fragments, plan, total, journal)
                .await;
        }
        // One PUT, streamed through the node: its memory counts in the node's budget (a
        // burst of completions waits for room, or answers 503, instead of holding it all at
        // once).
        tracing::debug!(key = %dest, len = total, fragments = fragments.len(), "assembling: one PUT streamed through the node");
        let started = std::time::Instant::now();
        let stored = self
            .put_stream_counted(
                dest.clone(),
                total,
                0,
                self.read_fragments_checked(&fragments),
            )
            .await?;
        tracing::debug!(key = %dest, len = total, elapsed_ms = started.elapsed().as_millis() as u64, "assembled with one PUT");
        Ok(Assembled {
            key: stored.key,
            len: stored.len,
            crc32c: Some(stored.crc32c),
            requests: fragments.len() as u64 + 1,
            copied_bytes: 0,
        })
    }

    /// The upload made of `fragments` (any order; they must cover `0..total`) as one stream,
    /// without assembling it (what a reply handler reads). A fragment shorter or longer
    /// than its index entry is an error in the stream.
    pub fn read_upload(
        &self,
        fragments: &[FragmentObject],
        total: u64,
        name: &ObjectKey,
    ) -> Result<ByteStream, StorageError> {
        let fragments = in_order(fragments, total, name)?;
        Ok(self.read_fragments_checked(&fragments))
    }

    /// Fragments in the given order, each checked against its length.
    fn read_fragments_checked(&self, fragments: &[FragmentObject]) -> ByteStream {
        let store = std::sync::Arc::clone(&self.store);
        let opened = futures_util::stream::iter(fragments.to_vec())
            .map(move |f| {
                let store = std::sync::Arc::clone(&store);
                async move {
                    let got = store
                        .get(f.key.path())
                        .await
                        .map_err(map_err("read fragment", f.key.as_str()))?;
                    f.check_size(got.meta.size)?;
                    let key = f.key.to_string();
                    Ok(got
                        .into_stream()
                        .map_err(move |e| map_err("read fragment", &key)(e)))
                }
            })
            .buffered(READ_AHEAD);
        Box::pin(opened.try_flatten())
    }
}
