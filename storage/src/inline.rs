//! Small fragments and small replies held in the meta store's log instead of files.
//!
//! A fragment shorter than the store's inline limit ([`INLINE_BELOW`] by default) that lies
//! within the upload's first [`INLINE_UPLOAD_MAX`] bytes is not written to the session's
//! upload file: its bytes go into the meta store (sled's tree
//! `chunks`, keyed by session and offset) **together with the record that carries the new
//! offset**, and one flush of the meta store, the group commit shared by every session with a
//! fragment in flight, makes them durable. No file, directory or inode is created or synced
//! for such a fragment. Larger fragments keep the per-session file; a session may mix both.
//!
//! The crash-safe order, kept here:
//!
//! 1. the bytes are inserted into the log (memory), **then**
//! 2. the record with the new offset (memory; compare-and-set under the session's lock),
//!    **then**
//! 3. the log is flushed (with [`FragmentDurability::Durable`]; the caller's next durable
//!    save with [`FragmentDurability::BytesDurable`]), and only then may the Ack go out.
//!
//! sled recovers a prefix of its log, so a durable record implies durable bytes; bytes whose
//! record was lost lie at or past the recorded offset and recovery removes them. A failed
//! flush leaves the Ack unsent (the client re-sends; the bytes are written again). Before a
//! durable commit of a session whose file holds bytes written without a sync (`on-close`),
//! that file is synced first.
//!
//! Readers never care where a byte lives: an upload is read as its held chunks, with the file
//! filling the gaps (a chunk wins over file bytes at the same offset). A handler that needs a
//! path gets the upload file written out from the chunks (page cache, no sync: the log stays
//! the durable copy); a plain upload is written out once and synced before it is published.
//! A reply shorter than the limit is held in the log too (tree `replies`), written before the
//! record that points at it. Close, Cancel, purge and recovery of a tombstone remove both.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use async_trait::async_trait;
use bitsd_protocol::SessionId;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::fs_util::{blocking, cut_past, make_dir, open_upload, sync_dir};
use crate::session_store::UPLOAD_FILE;
use crate::{
    ByteStream, FragmentCommit, FragmentDurability, FragmentSink, ReplyKind, ReplySink,
    ReplyWriter, SessionRecord, SessionStore, StorageError,
};

/// The default inline limit: fragments and replies shorter than this many bytes are held in
/// the meta store's log (0 turns it off).
pub const INLINE_BELOW: u64 = 64 * 1024;

/// Only an upload's first this many bytes are held in the meta store; fragments past it go to
/// the upload file whatever their size. This bounds what one session keeps in the log (and
/// what a reader of it loads at once) while every small job fits whole.
pub const INLINE_UPLOAD_MAX: u64 = 1024 * 1024;

/// Size of the chunks a file is read in for a [`ByteStream`].
const READ_CHUNK: usize = 256 * 1024;

/// `len` bytes of the file at `path` from `start`, read in chunks off the runtime.
pub(crate) async fn file_stream(
    path: PathBuf,
    op: &'static str,
    start: u64,
    len: u64,
) -> Result<ByteStream, StorageError> {
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(StorageError::io(op, &path))?;
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(StorageError::io(op, &path))?;
    }
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), READ_CHUNK);
    Ok(Box::pin(stream.map(move |chunk| {
        chunk.map_err(StorageError::io(op, &path))
    })))
}

/// A part of a byte range: held bytes, or a range of the file.
#[derive(Debug)]
enum Piece {
    Held(Bytes),
    File { start: u64, len: u64 },
}

/// `[start, end)` split into held chunks (in offset order, not overlapping) and the file
/// ranges between them.
fn pieces(chunks: Vec<(u64, Bytes)>, start: u64, end: u64) -> Vec<Piece> {
    let (mut pos, mut out) = (start, Vec::new());
    for (off, bytes) in chunks {
        let cend = off + bytes.len() as u64;
        if cend <= pos {
            continue;
        }
        if off >= end {
            break;
        }
        if off > pos {
            out.push(Piece::File {
                start: pos,
                len: off - pos,
            });
            pos = off;
        }
        let (from, to) = ((pos - off) as usize, (cend.min(end) - off) as usize);
        out.push(Piece::Held(bytes.slice(from..to)));
        pos = off + to as u64;
    }
    if pos < end {
        out.push(Piece::File {
            start: pos,
            len: end - pos,
        });
    }
    out
}

/// How many bytes from offset 0 are held without a gap, by a file of `file_len` bytes and
/// `chunks` (in offset order).
pub(crate) fn held_len(file_len: u64, chunks: &[(u64, Bytes)]) -> u64 {
    let mut covered = file_len;
    for (off, bytes) in chunks {
        if *off > covered {
            break;
        }
        covered = covered.max(off + bytes.len() as u64);
    }
    covered
}

fn one(item: Result<Bytes, StorageError>) -> ByteStream {
    Box::pin(futures_util::stream::once(std::future::ready(item)))
}

impl SessionStore {
    /// The inline limit: fragments and replies shorter than this are held in the meta store.
    pub fn inline_below(&self) -> u64 {
        self.inline_below
    }

    /// Sets the inline limit (0: every byte goes to files). Set it before the store is
    /// shared; a store opened with another limit reads what an earlier one held either way.
    pub fn with_inline_below(mut self, bytes: u64) -> Self {
        self.inline_below = bytes;
        self
    }

    /// Whether a fragment or reply of `len` bytes is held in the meta store.
    pub(crate) fn inlines(&self, len: u64) -> bool {
        len < self.inline_below && self.meta.holds_bytes()
    }

    /// `len` bytes of the upload of `id` from `start`, wherever each byte lives.
    pub(crate) async fn upload_stream(
        &self,
        id: &SessionId,
        op: &'static str,
        start: u64,
        len: u64,
    ) -> Result<ByteStream, StorageError> {
        let chunks = self.meta.chunks(id)?;
        let path = self.upload_path(id);
        if chunks.is_empty() {
            return file_stream(path, op, start, len).await;
        }
        let parts = pieces(chunks, start, start.saturating_add(len));
        Ok(Box::pin(
            futures_util::stream::iter(parts)
                .then(move |p| {
                    let path = path.clone();
                    async move {
                        match p {
                            Piece::Held(b) => one(Ok(b)),
                            Piece::File { start, len } => file_stream(path, op, start, len)
                                .await
                                .unwrap_or_else(|e| one(Err(e))),
                        }
                    }
                })
                .flatten(),
        ))
    }

    /// Writes the held chunks of `id` below `received` into its upload file, so the file
    /// holds the whole upload (`received` bytes), and syncs it (with the directory entries)
    /// when `sync`. Nothing to do when nothing is held; a published file is never written.
    /// Blocking.
    pub(crate) fn write_out_blocking(
        &self,
        id: &SessionId,
        received: u64,
        sync: bool,
    ) -> Result<(), StorageError> {
        let chunks = self.meta.chunks(id)?;
        if !chunks.iter().any(|(off, _)| *off < received) {
            return Ok(());
        }
        let dir = self.session_dir(id);
        let path = dir.join(UPLOAD_FILE);
        if fs::metadata(&path).is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.nlink() > 1 && m.len() == received
        }) {
            return Ok(());
        }
        let created_dir = make_dir(&dir)?;
        let file = open_upload(&path)?;
        for (off, bytes) in chunks.iter().filter(|(off, _)| *off < received) {
            let n = bytes.len().min((received - off) as usize);
            file.write_all_at(&bytes[..n], *off)
                .map_err(StorageError::io("write upload", &path))?;
        }
        cut_past(&file, received, &path)?;
        if sync {
            file.sync_data()
                .map_err(StorageError::io("fsync upload", &path))?;
            sync_dir(&dir)?;
            if created_dir {
                sync_dir(&self.sessions_dir)?;
            }
        }
        Ok(())
    }

    /// Removes every byte of `id` the meta store holds (chunks and reply), not durably.
    pub(crate) fn remove_held(
        meta: &dyn crate::MetaStore,
        id: &SessionId,
    ) -> Result<(), StorageError> {
        meta.remove_chunks_from(id, 0)?;
        meta.remove_reply(id)
    }
}

/// A small fragment on its way into the meta store's log.
#[derive(Debug)]
pub(crate) struct InlineFragment {
    pub(crate) store: SessionStore,
    pub(crate) id: SessionId,
    pub(crate) write_at: u64,
    pub(crate) limit: u64,
    pub(crate) buf: BytesMut,
    pub(crate) durability: FragmentDurability,
}

#[async_trait]
impl FragmentSink for InlineFragment {
    async fn write(&mut self, bytes: Bytes) -> Result<(), StorageError> {
        if self.buf.len() as u64 + bytes.len() as u64 > self.limit {
            return Err(StorageError::Task(format!(
                "fragment of session {} is longer than its plan ({} bytes)",
                self.id, self.limit
            )));
        }
        self.buf.extend_from_slice(&bytes);
        Ok(())
    }

    fn written(&self) -> u64 {
        self.buf.len() as u64
    }

    async fn commit(
        self: Box<Self>,
        expected: u64,
        record: &SessionRecord,
    ) -> Result<FragmentCommit, StorageError> {
        let InlineFragment {
            store,
            id,
            write_at,
            buf,
            durability,
            ..
        } = *self;
        let synced = matches!(
            durability,
            FragmentDurability::Durable | FragmentDurability::BytesDurable
        );
        // Earlier fragments of the file written without a sync (`on-close`): this commit's
        // durability covers them, so the file is synced first.
        let file_entries = synced && store.meta.last_fragment(&id)?.is_some();
        if file_entries {
            let s = store.clone();
            blocking(move || {
                let path = s.upload_path(&id);
                let file = fs::File::open(&path).map_err(StorageError::io("open upload", &path))?;
                file.sync_all()
                    .map_err(StorageError::io("fsync upload", &path))?;
                sync_dir(&s.session_dir(&id))?;
                sync_dir(&s.sessions_dir)
            })
            .await?;
        }
        // 1. bytes, 2. record: under the session's compare-and-set lock, memory work.
        let outcome = store.save_if(record, Some(expected), |meta| {
            meta.save_with_chunk(record, write_at, &buf, false)
        })?;
        if outcome != FragmentCommit::Committed {
            return Ok(outcome);
        }
        if file_entries {
            store.meta.remove_fragments(&id)?;
        }
        // 3. the group commit (the caller's, for BytesDurable).
        if durability == FragmentDurability::Durable {
            store.flush().await?;
        }
        Ok(FragmentCommit::Committed)
    }
}

/// A reply on its way into the meta store, moved to a reply file once it reaches the limit.
#[derive(Debug)]
pub(crate) struct InlineReply {
    pub(crate) store: SessionStore,
    pub(crate) id: SessionId,
    pub(crate) buf: BytesMut,
    pub(crate) file: Option<ReplyWriter>,
}

#[async_trait]
impl ReplySink for InlineReply {
    async fn write(&mut self, bytes: Bytes) -> Result<(), StorageError> {
        if self.file.is_none()
            && !self
                .store
                .inlines(self.buf.len() as u64 + bytes.len() as u64)
        {
            let mut w = self.store.reply_writer(&self.id).await?;
            w.write(&self.buf).await?;
            self.buf = BytesMut::new();
            self.file = Some(w);
        }
        match &mut self.file {
            Some(w) => w.write(&bytes).await,
            None => {
                self.buf.extend_from_slice(&bytes);
                Ok(())
            }
        }
    }

    fn len(&self) -> u64 {
        match &self.file {
            Some(w) => w.len(),
            None => self.buf.len() as u64,
        }
    }

    async fn finish(self: Box<Self>) -> Result<ReplyKind, StorageError> {
        let InlineReply {
            store,
            id,
            buf,
            file,
        } = *self;
        if let Some(w) = file {
            let (len, crc32c) = w.finish().await?;
            // A reply an earlier attempt held in the log would shadow the file.
            store.meta.remove_reply(&id)?;
            return Ok(ReplyKind::Stored {
                len,
                crc32c: Some(crc32c),
                in_upload: false,
                object: None,
            });
        }
        // Written before the record that points at it: that record's durable save makes it
        // durable too.
        store.meta.put_reply(&id, &buf)?;
        Ok(ReplyKind::Stored {
            len: buf.len() as u64,
            crc32c: Some(crc32c::crc32c(&buf)),
            in_upload: false,
            object: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn pieces_fill_gaps_from_the_file() {
        let chunks = vec![(2, b("cd")), (6, b("gh"))];
        let p = format!("{:?}", pieces(chunks, 1, 9));
        assert_eq!(
            p,
            "[File { start: 1, len: 1 }, Held(b\"cd\"), File { start: 4, len: 2 }, Held(b\"gh\"), File { start: 8, len: 1 }]"
        );
        let p = format!("{:?}", pieces(vec![(0, b("abcd"))], 1, 3));
        assert_eq!(p, "[Held(b\"bc\")]");
    }

    #[test]
    fn held_len_stops_at_the_first_gap() {
        assert_eq!(held_len(0, &[(0, b("ab")), (2, b("cd")), (5, b("x"))]), 4);
        assert_eq!(held_len(3, &[(0, b("ab")), (3, b("cd"))]), 5);
        assert_eq!(held_len(7, &[]), 7);
    }
}
