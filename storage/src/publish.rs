//! Publishing a complete plain upload under the files root, in crash-proof order.

use std::fs;
use std::io;
use std::path::{Component, PathBuf};

use bitsd_protocol::SessionId;

use crate::fs_util::{
    blocking, create_dir_synced, create_dirs_synced, private_file, safe_parent, same_inode,
    sync_dir,
};
use crate::session_store::UPLOAD_FILE;
use crate::{SessionStore, StorageError};

/// What happened when a plain upload was committed to its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The file is at its destination.
    Committed,
    /// The destination exists and overwrites are off (§6.3).
    DestinationExists,
    /// The destination is a directory, or its path crosses a symlink or a non-directory.
    DestinationInvalid,
}

/// The temporary name a commit with overwrites links the upload to before its rename.
pub(crate) fn commit_temp_name(id: &SessionId) -> String {
    format!(".bitsd-commit-{}.tmp", id.simple())
}

fn incomplete(path: PathBuf, why: &str) -> StorageError {
    StorageError::io("commit upload", path)(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{why}; the upload is not published (the client resends its last fragment)"),
    ))
}

impl SessionStore {
    /// Commits a complete upload to `destination` (relative to the files root, made only of
    /// normal components) atomically, in this order:
    ///
    /// 0. Bytes the meta store holds (small fragments) are written into the upload file at
    ///    their offsets and the file is synced, with its directory entries.
    /// 1. The session's record, which the caller saved with every byte received
    ///    (`received == total`, after the completing fragment's bytes were synced), is
    ///    **flushed**: from here on recovery knows the upload is complete and never cuts its
    ///    file. The upload file must hold exactly `received` bytes.
    /// 2. Missing parent directories are made one at a time, each fsynced into its parent.
    /// 3. The file is published: without overwrites it is hard-linked into place, so an
    ///    existing file is never replaced; with overwrites it is linked to a temporary name
    ///    and renamed over the destination.
    /// 4. The destination directory is fsynced. The caller then records `committed`.
    ///
    /// The published name is a second link to the session's upload inode (no copy, no extra
    /// space), which stays until the session ends: a retry after a crash finds the
    /// destination already is this inode and counts it as done. Nothing writes to a complete
    /// upload again, and recovery never changes the length of an upload file that has a
    /// second name, so a published file never changes after the final Ack and never exists
    /// partially.
    pub async fn commit_upload(
        &self,
        id: &SessionId,
        destination: &str,
        allow_overwrite: bool,
    ) -> Result<CommitOutcome, StorageError> {
        let rel = PathBuf::from(destination);
        if rel.as_os_str().is_empty()
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Ok(CommitOutcome::DestinationInvalid);
        }
        let (files, dir, temp_name) = (
            self.files_dir.clone(),
            self.session_dir(id),
            commit_temp_name(id),
        );
        let (meta, id, store) = (self.meta.clone(), *id, self.clone());
        // The file is about to become a published file: no kept handle may write into it.
        self.handles.forget(&id);
        blocking(move || {
            let src = dir.join(UPLOAD_FILE);
            let dst = files.join(&rel);
            let record = meta
                .load(&id)?
                .ok_or_else(|| incomplete(src.clone(), "the session has no record"))?;
            if record.state.is_terminal() || record.total != Some(record.received) {
                return Err(incomplete(
                    src,
                    &format!(
                        "the session holds {} of {:?} bytes",
                        record.received, record.total
                    ),
                ));
            }
            // Bytes held in the meta store are written out into the file once and synced
            // (with its directory entries) before anything is published.
            store.write_out_blocking(&id, record.received, true)?;
            match fs::symlink_metadata(&src) {
                Ok(m) if m.len() != record.received => {
                    return Err(incomplete(
                        src,
                        &format!(
                            "the upload file has {} bytes, the session {}",
                            m.len(),
                            record.received
                        ),
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound && record.received == 0 => {
                    // A zero-byte upload never wrote a file.
                    create_dir_synced(&dir)?;
                    let f = private_file()
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&src)
                        .map_err(StorageError::io("create upload", &src))?;
                    f.sync_all()
                        .map_err(StorageError::io("fsync upload", &src))?;
                    sync_dir(&dir)?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(incomplete(src, "the upload file is missing"))
                }
                Err(e) => return Err(StorageError::io("stat upload", &src)(e)),
            }
            // 1. The completion is durable before anything is published.
            meta.flush()?;
            if !safe_parent(&files, &rel)? {
                return Ok(CommitOutcome::DestinationInvalid);
            }
            // 2. Parents, each new one synced into its own parent.
            let parent_rel = rel.parent().unwrap_or(std::path::Path::new(""));
            create_dirs_synced(&files, parent_rel)?;
            let parent = dst.parent().unwrap_or(&files).to_owned();
            if let Ok(m) = fs::symlink_metadata(&dst) {
                if same_inode(&src, &m) {
                    return Ok(CommitOutcome::Committed);
                }
                if !m.is_file() {
                    return Ok(CommitOutcome::DestinationInvalid);
                }
                if !allow_overwrite {
                    return Ok(CommitOutcome::DestinationExists);
                }
            }
            // 3. Publish.
            if allow_overwrite {
                let temp = parent.join(&temp_name);
                let _ = fs::remove_file(&temp);
                fs::hard_link(&src, &temp).map_err(StorageError::io("link upload", &temp))?;
                fs::rename(&temp, &dst).map_err(StorageError::io("commit upload", &dst))?;
            } else {
                match fs::hard_link(&src, &dst) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        return Ok(CommitOutcome::DestinationExists)
                    }
                    Err(e) => return Err(StorageError::io("commit upload", &dst)(e)),
                }
            }
            // 4. The new name survives a crash.
            sync_dir(&parent)?;
            Ok(CommitOutcome::Committed)
        })
        .await
    }

    /// Whether a destination (relative to the files root) exists already.
    pub async fn destination_exists(&self, destination: &str) -> bool {
        tokio::fs::symlink_metadata(self.files_dir.join(destination))
            .await
            .is_ok()
    }
}
