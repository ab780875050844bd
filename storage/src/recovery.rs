//! Recovery at open: the files are brought in line with the meta store, which is
//! authoritative, without ever changing a file that is published.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path};

use crate::fs_util::{blocking, remove_dir_all_if_exists};
use crate::inline::held_len;
use crate::publish::commit_temp_name;
use crate::{FragmentEntry, SessionRecord, SessionState, SessionStore, StorageError};

/// Whether `file` holds `entry`'s bytes: its range is there and its CRC-32C matches.
fn fragment_on_disk(file: &fs::File, entry: &FragmentEntry) -> Result<bool, io::Error> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; entry.len.min(1 << 20) as usize];
    let (mut at, end, mut crc) = (entry.offset, entry.offset + entry.len, 0u32);
    while at < end {
        let want = ((end - at) as usize).min(buf.len());
        let n = file.read_at(&mut buf[..want], at)?;
        if n == 0 {
            return Ok(false);
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        at += n as u64;
    }
    Ok(crc == entry.crc32c)
}

/// Removes the temporary files (`*.tmp`: half-written replies of the store and of reply
/// handlers) of a session directory: whatever run made them ended with the crash.
fn remove_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && entry.file_name().to_string_lossy().ends_with(".tmp") {
            let _ = fs::remove_file(entry.path());
        }
    }
}

impl SessionStore {
    /// Brings the files in line with the meta store, which is authoritative: upload bytes past
    /// the acknowledged offset are cut off, fragments written without a sync (`fsync =
    /// "on-close"`) are checked against their CRC-32C, half-written replies are dropped,
    /// files of sessions with no record and leftovers of tombstoned sessions are removed.
    ///
    /// A published upload (its inode also linked under the files root) is never cut: the
    /// completion is durable before anything is published (see
    /// [`SessionStore::commit_upload`]).
    pub async fn recover(&self) -> Result<(), StorageError> {
        let store = self.clone();
        blocking(move || store.recover_blocking()).await
    }

    fn recover_blocking(&self) -> Result<(), StorageError> {
        // Files are cut and removed below: no handle kept open from before may write again.
        self.handles.forget_all();
        let records = self.meta.list()?;
        // One pass over the index and the held chunks instead of three lookups per session
        // (most sessions of a large store have neither).
        let with_entries = self.meta.sessions_with_entries()?;
        let mut known = HashSet::new();
        for mut record in records {
            known.insert(record.id.simple());
            let dir = self.session_dir(&record.id);
            let entries = with_entries
                .as_ref()
                .is_none_or(|ids| ids.contains(record.id.as_uuid().as_bytes()));
            if record.state.is_terminal() {
                remove_dir_all_if_exists(&dir)?;
                if entries {
                    self.meta.remove_fragments(&record.id)?;
                    SessionStore::remove_held(&*self.meta, &record.id)?;
                } else {
                    self.meta.remove_reply(&record.id)?;
                }
                continue;
            }
            remove_temp_files(&dir);
            if self.recover_upload(&mut record, entries)? | self.recover_reply(&mut record) {
                self.meta.save_lazy(&record)?;
            }
        }
        let entries = fs::read_dir(&self.sessions_dir)
            .map_err(StorageError::io("read directory", &self.sessions_dir))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                tracing::debug!(dir = %entry.path().display(), "removing files of a session with no record");
                let path = entry.path();
                if path.is_dir() {
                    remove_dir_all_if_exists(&path)?;
                } else {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        self.meta.flush()
    }

    /// The upload of a live session (its file and the chunks the meta store holds); whether
    /// `record` changed. Chunks at or past the offset kept are leftovers of a fragment that
    /// was never acknowledged and are removed.
    /// `entries`: whether the session may have fragment index entries or held chunks.
    fn recover_upload(
        &self,
        record: &mut SessionRecord,
        entries: bool,
    ) -> Result<bool, StorageError> {
        let changed = self.recover_upload_file(record, entries)?;
        if entries && self.meta.holds_bytes() {
            self.meta.remove_chunks_from(&record.id, record.received)?;
        }
        Ok(changed)
    }

    fn recover_upload_file(
        &self,
        record: &mut SessionRecord,
        entries: bool,
    ) -> Result<bool, StorageError> {
        let upload = self.upload_path(&record.id);
        let plain = |d: &String| {
            Path::new(d)
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        };
        if let (false, Some(dest)) = (
            record.committed,
            record.destination.as_ref().filter(|d| plain(d)),
        ) {
            // The temporary name of a commit with overwrites that a crash interrupted.
            let parent = self.files_dir.join(dest);
            if let Some(parent) = parent.parent() {
                let _ = fs::remove_file(parent.join(commit_temp_name(&record.id)));
            }
        }
        let (index, chunks) = if entries {
            (
                self.meta.fragments(&record.id)?,
                self.meta.chunks(&record.id)?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let acknowledged = record.received;
        let mut changed = false;
        let file = match fs::OpenOptions::new().read(true).write(true).open(&upload) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(StorageError::io("open upload", &upload)(e)),
        };
        let Some(file) = file else {
            let held = held_len(0, &chunks);
            if record.received > held
                && !record.committed
                && record.state != SessionState::ReplyReady
            {
                tracing::warn!(session = %record.id, received = record.received, held, "upload file missing; session resumes from the bytes held");
                record.received = held;
                record.state = SessionState::Receiving;
                changed = true;
            }
            if !index.is_empty() {
                self.meta.remove_fragments(&record.id)?;
            }
            return Ok(changed);
        };
        let stat = file
            .metadata()
            .map_err(StorageError::io("stat upload", &upload))?;
        // A second name: the upload is published under the files root.
        let published = stat.nlink() > 1;
        if record.state == SessionState::Receiving && !record.committed && !published {
            // Fragments written without a sync (their index entries are removed once their
            // bytes are synced): keep the offset only up to the first one whose bytes are
            // not all there, as after an operating-system crash.
            for entry in index.iter().filter(|e| e.offset < record.received) {
                if !fragment_on_disk(&file, entry)
                    .map_err(StorageError::io("read upload", &upload))?
                {
                    tracing::warn!(session = %record.id, offset = entry.offset, len = entry.len, "fragment written without a sync is not on disk; the session resumes before it");
                    record.received = entry.offset;
                    changed = true;
                    break;
                }
            }
        }
        let len = stat.len();
        if len > record.received && published {
            // Published before its completion was durable (a release before the commit order
            // was fixed): its bytes were synced before the link, so it is whole if it has the
            // upload's size. It is never cut.
            if record.total == Some(len) && record.state == SessionState::Receiving {
                tracing::warn!(session = %record.id, len, "published upload found complete; the session resumes as complete");
                record.received = len;
                record.state = SessionState::Complete;
            } else {
                tracing::warn!(session = %record.id, len, received = record.received, "upload file is published but the session is not complete; the session restarts at 0 with a new file");
                fs::remove_file(&upload).map_err(StorageError::io("unlink upload", &upload))?;
                record.received = 0;
                record.state = SessionState::Receiving;
            }
            changed = true;
        } else if len > record.received {
            file.set_len(record.received)
                .map_err(StorageError::io("truncate", &upload))?;
            tracing::debug!(session = %record.id, len, received = record.received, "cut unacknowledged upload bytes");
        } else if held_len(len, &chunks) < record.received && !record.committed {
            let held = held_len(len, &chunks);
            tracing::warn!(session = %record.id, len, held, received = record.received, "upload shorter than acknowledged; resuming from the bytes held");
            record.received = held;
            if record.state == SessionState::Complete {
                record.state = SessionState::Receiving;
            }
            changed = true;
        }
        if !index.is_empty() {
            // What is kept is synced now, so the entries are not needed any more.
            file.sync_all()
                .map_err(StorageError::io("fsync", &upload))?;
            if changed {
                // The new offset before the entries go: a crash in between checks again.
                self.meta.save_lazy(record)?;
            }
            self.meta.remove_fragments(&record.id)?;
        } else if record.received < acknowledged || len > record.received {
            file.sync_all()
                .map_err(StorageError::io("fsync", &upload))?;
        }
        Ok(changed)
    }

    /// A stored reply that is missing or has the wrong size is produced again.
    fn recover_reply(&self, record: &mut SessionRecord) -> bool {
        let Some(reply) = &record.reply else {
            return false;
        };
        let Some(len) = reply.len() else {
            return false;
        };
        let path = self.reply_file(&record.id, &reply.kind);
        let in_upload = matches!(
            reply.kind,
            crate::ReplyKind::Stored {
                in_upload: true,
                ..
            }
        );
        let file_len = fs::metadata(&path).map_or(0, |m| m.len());
        let whole = if in_upload {
            let chunks = self.meta.chunks(&record.id).unwrap_or_default();
            held_len(file_len, &chunks) >= len
        } else {
            match self.meta.reply(&record.id) {
                Ok(Some(held)) => held.len() as u64 == len,
                _ => fs::metadata(&path).is_ok_and(|m| m.len() == len),
            }
        };
        if whole {
            return false;
        }
        tracing::warn!(session = %record.id, "reply file missing or wrong size; the reply will be produced again");
        record.reply = None;
        record.state = SessionState::Complete;
        true
    }
}
