//! A session's stored reply: written under a temporary name, synced, renamed into place.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bitsd_protocol::SessionId;
use tokio::io::AsyncWriteExt;

use crate::fs_util::{blocking, create_dir_synced, sync_dir, FILE_MODE};
use crate::session_store::{reply_temp_name, REPLY_FILE, UPLOAD_FILE};
use crate::{ReplyKind, SessionStore, StorageError};

/// A reply on its way to the session's reply file (temp name, `sync_data`, rename, fsync dir).
#[derive(Debug)]
pub struct ReplyWriter {
    file: tokio::fs::File,
    temp: PathBuf,
    dir: PathBuf,
    len: u64,
    crc32c: u32,
}

impl ReplyWriter {
    /// Appends reply bytes.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        self.file
            .write_all(bytes)
            .await
            .map_err(StorageError::io("write reply", &self.temp))?;
        self.crc32c = crc32c::crc32c_append(self.crc32c, bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes the reply durable under its final name; returns its length and CRC-32C.
    pub async fn finish(mut self) -> Result<(u64, u32), StorageError> {
        self.file
            .flush()
            .await
            .map_err(StorageError::io("write reply", &self.temp))?;
        self.file
            .sync_data()
            .await
            .map_err(StorageError::io("fsync reply", &self.temp))?;
        drop(self.file);
        let (temp, dir) = (self.temp, self.dir);
        blocking(move || {
            let dst = dir.join(REPLY_FILE);
            fs::rename(&temp, &dst).map_err(StorageError::io("rename reply", &dst))?;
            sync_dir(&dir)
        })
        .await?;
        Ok((self.len, self.crc32c))
    }
}

impl SessionStore {
    /// Opens a temporary reply file for the session (mode 0600, in a 0700 directory).
    pub async fn reply_writer(&self, id: &SessionId) -> Result<ReplyWriter, StorageError> {
        let dir = self.session_dir(id);
        let d = dir.clone();
        blocking(move || create_dir_synced(&d)).await?;
        let temp = dir.join(reply_temp_name());
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&temp)
            .await
            .map_err(StorageError::io("create reply", &temp))?;
        Ok(ReplyWriter {
            file,
            temp,
            dir,
            len: 0,
            crc32c: 0,
        })
    }

    /// Makes a file a reply handler produced the session's reply, crash-safely, and says how
    /// it is held. The session's own upload (the echo handler) is complete and never written
    /// again, and its completing fragment synced its bytes and its name: the reply is served
    /// from it, with no file work at all (`in_upload`). Any other file is copied under a
    /// temporary name (mode 0600), synced, renamed into place, and the directory is fsynced.
    pub async fn reply_from_file(
        &self,
        id: &SessionId,
        src: &Path,
    ) -> Result<ReplyKind, StorageError> {
        let dir = self.session_dir(id);
        if src == dir.join(UPLOAD_FILE) {
            let len = fs::metadata(src)
                .map_err(StorageError::io("stat upload", src))?
                .len();
            return Ok(ReplyKind::Stored {
                len,
                crc32c: None,
                in_upload: true,
                object: None,
            });
        }
        let src = src.to_owned();
        blocking(move || {
            create_dir_synced(&dir)?;
            let temp = dir.join(reply_temp_name());
            if let Err(e) = fs::copy(&src, &temp) {
                let _ = fs::remove_file(&temp);
                return Err(StorageError::io("copy into reply", &src)(e));
            }
            // `copy` gives the copy the source's mode.
            fs::set_permissions(&temp, fs::Permissions::from_mode(FILE_MODE))
                .map_err(StorageError::io("chmod reply", &temp))?;
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&temp)
                .map_err(StorageError::io("open", &temp))?;
            f.sync_data()
                .map_err(StorageError::io("fsync reply", &temp))?;
            let len = fs::metadata(&temp)
                .map_err(StorageError::io("stat reply", &temp))?
                .len();
            let dst = dir.join(REPLY_FILE);
            fs::rename(&temp, &dst).map_err(StorageError::io("rename reply", &dst))?;
            sync_dir(&dir)?;
            Ok(ReplyKind::Stored {
                len,
                crc32c: None,
                in_upload: false,
                object: None,
            })
        })
        .await
    }
}
