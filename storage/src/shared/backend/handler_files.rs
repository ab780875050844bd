//! What the shared backend gives a reply handler as "the upload": a local copy of it in a
//! scratch directory for a handler that reads it, or only a path for one that does not (the
//! echo handler hands the path back as its reply). That path, handed back with no file at it,
//! means "the upload itself": the reply is then assembled from the fragment objects in the
//! store, as a published upload is (one fragment: a server-side copy), so its bytes never
//! pass through the node. After a publish the handler asked for, the published file is the
//! source.

use std::path::Path;

use bitsd_protocol::SessionId;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::sinks::reply_key;
use super::SharedBackend;
use crate::backend::{LocalUpload, SessionBackend};
use crate::shared::objects::FragmentObject;
use crate::{ReplyKind, StorageError};

/// The name of the upload in its scratch directory.
const UPLOAD: &str = "upload";

impl SharedBackend {
    /// The upload's path for a handler that does not read it: a new scratch directory for
    /// session `id` (`<scratch>/<id>-<nonce>/`, with `work/` for the handler), removed when
    /// the returned upload is dropped; its `path` names `upload` in it, which is not written
    /// (nothing is read from the store).
    pub(super) fn upload_path_only(&self, id: &SessionId) -> Result<LocalUpload, StorageError> {
        let dir = self
            .scratch
            .join(format!("{}-{}", id.simple(), uuid::Uuid::new_v4().simple()));
        let work = dir.join("work");
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(&work)
            .map_err(StorageError::io("make work directory", &work))?;
        // From here on the directory goes when the upload is dropped (also on error).
        Ok(LocalUpload::temporary(dir.join(UPLOAD), work, dir))
    }

    /// The upload of `id` copied into a scratch directory, for a handler that reads it.
    pub(super) async fn upload_copy(&self, id: &SessionId) -> Result<LocalUpload, StorageError> {
        let local = self.upload_path_only(id)?;
        let path = local.path.clone();
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

    /// Whether `src` is an upload path [`SharedBackend::upload_path_only`] gave out for `id`
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
        let key = reply_key(&self.objects, id);
        let assembled = self
            .objects
            .assemble(&key, &fragments, record.received)
            .await?;
        Ok(ReplyKind::Stored {
            len: assembled.len,
            crc32c: assembled.crc32c,
            in_upload: false,
        })
    }
}
