//! What the shared backend gives a reply handler as "the upload": a local copy of it in a
//! scratch directory for a handler that reads it, or only a path for one that does not (the
//! echo handler hands the path back as its reply). That path, handed back with no file at it,
//! means "the upload itself": the reply is then assembled from the fragment objects in the
//! store, as a published upload is (one fragment: a server-side copy), so its bytes never
//! pass through the node. After a publish the handler asked for, the published file is the
//! source. A reply a handler wrote to a local file is streamed from there into its object.

use std::path::{Path, PathBuf};

use bitsd_protocol::SessionId;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::journal::{PgJournal, REPLY_SLOT};
use super::SharedBackend;
use crate::backend::{LocalUpload, SessionBackend};
use crate::shared::objects::FragmentObject;
use crate::{ReplyKind, SessionRecord, SessionState, StorageError};

/// The name of the upload in its scratch directory.
const UPLOAD: &str = "upload";

/// Chunk size for reading a local file into the store.
const FILE_CHUNK: usize = 256 * 1024;

impl SharedBackend {
    /// Where session `id`'s upload would be copied for a handler: a directory of its own
    /// (`<scratch>/<id>-<nonce>/`), the upload's path in it and the handler's `work/`.
    fn scratch_names(&self, id: &SessionId) -> (PathBuf, PathBuf, PathBuf) {
        let dir = self
            .scratch
            .join(format!("{}-{}", id.simple(), uuid::Uuid::new_v4().simple()));
        let (path, work) = (dir.join(UPLOAD), dir.join("work"));
        (dir, path, work)
    }

    /// The upload's path for a handler that neither reads it nor uses its work directory
    /// (`reads_upload` false: echo hands the path back, a static reply ignores it). Nothing is
    /// made on disk: the path and the work directory are names under the scratch directory
    /// that nothing creates, so [`SharedBackend::is_the_upload_itself`] knows the path when it
    /// comes back as the reply. (Making the two directories and removing them again cost
    /// about a tenth of a node's CPU on small echo jobs: ext4 allocates a directory's inode
    /// with a search of its block groups.)
    pub(super) fn upload_unmade(&self, id: &SessionId) -> LocalUpload {
        let (_, path, work) = self.scratch_names(id);
        LocalUpload::kept(path, work)
    }

    /// The upload of `id` copied into a scratch directory of its own, with a `work/`
    /// directory for the handler, for a handler that reads it; the directory is removed when
    /// the returned upload is dropped.
    pub(super) async fn upload_copy(&self, id: &SessionId) -> Result<LocalUpload, StorageError> {
        let (dir, path, work) = self.scratch_names(id);
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(&work)
            .map_err(StorageError::io("make work directory", &work))?;
        // From here on the directory goes when the upload is dropped (also on error).
        let local = LocalUpload::temporary(path.clone(), work, dir);
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(StorageError::io("copy upload", &path))?;
        let mut stream = self.read_upload(id).await?;
        while let Some(chunk) = stream.next().await {
            let chunk: Bytes = chunk?;
            file.write_all(&chunk)
                .await
                .map_err(StorageError::io("copy upload", &path))?;
        }
        file.flush()
            .await
            .map_err(StorageError::io("copy upload", &path))?;
        Ok(local)
    }

    /// Whether `src` is an upload path [`SharedBackend::upload_unmade`] gave out for `id`
    /// with no file at it (a handler that wrote its reply there gets that file stored).
    pub(super) async fn is_the_upload_itself(&self, id: &SessionId, src: &Path) -> bool {
        let prefix = format!("{}-", id.simple());
        let ours = src.file_name().is_some_and(|n| n == UPLOAD)
            && src.parent().is_some_and(|dir| {
                dir.parent() == Some(self.scratch.as_path())
                    && dir
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix))
            });
        ours && matches!(tokio::fs::try_exists(src).await, Ok(false))
    }

    /// [`SharedBackend::reply_from_upload`], or the reply of `id` another node stored and
    /// recorded meanwhile (the client's final fragment sent again, to another node, while
    /// this one waited for that node's assembly): that reply is then the answer.
    pub(super) async fn reply_itself(&self, id: &SessionId) -> Result<ReplyKind, StorageError> {
        let failed = match self.reply_from_upload(id).await {
            Ok(kind) => return Ok(kind),
            Err(e) => e,
        };
        match self.record(id).await {
            Ok(SessionRecord {
                state: SessionState::ReplyReady,
                reply: Some(reply),
                ..
            }) if matches!(reply.kind, ReplyKind::Stored { .. }) => Ok(reply.kind),
            _ => Err(failed),
        }
    }

    /// Stores the upload of `id` as its reply, assembled in the store from the fragment
    /// objects (one fragment: a server-side copy; large ones: part copies; else streamed
    /// through the node without a local copy), durable on return.
    pub(super) async fn reply_from_upload(
        &self,
        id: &SessionId,
    ) -> Result<ReplyKind, StorageError> {
        let record = self.record(id).await?;
        let fragments = match (&record.destination, record.committed) {
            // Published already (a handler that asked for the commit): the fragment objects
            // went with the publish, the published file holds the same bytes.
            (Some(dest), true) => vec![FragmentObject {
                offset: 0,
                len: record.received,
                key: self.objects.file_key(dest),
            }],
            _ => self.fragments(id).await?,
        };
        let (key, _) = self.objects.reply_key(id);
        // Journaled: a node killed meanwhile leaves its multipart upload (and its key) to the
        // next attempt. The journal stays until the reply is recorded in the session (`save`):
        // another node's attempt waiting on this one's lease then finds the reply recorded.
        let journal = PgJournal::new(&self.state, *id, REPLY_SLOT).forget_later();
        let assembled = self
            .objects
            .assemble_resumable(&key, &fragments, record.received, &journal)
            .await?;
        if let Some(upload_id) = journal.take_completed() {
            self.reply_journals.keep(*id, upload_id);
        }
        let under = format!("{}/", self.objects.session_prefix(id).as_str());
        let name = match assembled.key.as_str().strip_prefix(&under) {
            Some(name) if !name.contains('/') => name.to_string(),
            _ => {
                return Err(StorageError::Corrupt {
                    key: assembled.key.to_string(),
                    why: format!("a reply of session {id} outside its prefix"),
                })
            }
        };
        Ok(ReplyKind::Stored {
            len: assembled.len,
            crc32c: assembled.crc32c,
            in_upload: false,
            object: Some(name),
        })
    }

    /// Streams the local file `src` into the session's reply object.
    pub(super) async fn put_file(
        &self,
        id: &SessionId,
        src: &Path,
    ) -> Result<ReplyKind, StorageError> {
        let file = tokio::fs::File::open(src)
            .await
            .map_err(StorageError::io("read reply file", src))?;
        let len = file
            .metadata()
            .await
            .map_err(StorageError::io("read reply file", src))?
            .len();
        let path = src.to_path_buf();
        let body = tokio_util::io::ReaderStream::with_capacity(file, FILE_CHUNK)
            .map(move |c| c.map_err(StorageError::io("read reply file", &path)));
        let (key, name) = self.objects.reply_key(id);
        let stored = self.objects.put_stream_counted(key, len, 0, body).await?;
        Ok(ReplyKind::Stored {
            len: stored.len,
            crc32c: Some(stored.crc32c),
            in_upload: false,
            object: Some(name),
        })
    }
}
