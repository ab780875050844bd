//! File-system steps shared by the store: private modes, synced directory entries, a
//! blocking-thread hand-off.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path};

use crate::StorageError;

/// Mode of every directory the store creates: only the server's user may enter it.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of every file the store creates: only the server's user may read it.
pub(crate) const FILE_MODE: u32 = 0o600;

/// Runs `f` on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Task(e.to_string()))?
}

/// fsyncs a directory so that entries created or renamed in it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StorageError::io("fsync directory", dir))
}

/// `mkdir` with [`DIR_MODE`]; whether it was made (false: it existed).
pub(crate) fn make_dir(dir: &Path) -> Result<bool, StorageError> {
    match fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(StorageError::io("create directory", dir)(e)),
    }
}

/// Makes `dir` (its parent must exist) and fsyncs the parent when it was new.
pub(crate) fn create_dir_synced(dir: &Path) -> Result<(), StorageError> {
    if make_dir(dir)? {
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Makes every missing directory of `rel` under `root` (which exists), one level at a time,
/// each with [`DIR_MODE`], fsyncing the parent of each new one so the whole chain survives a
/// crash (`create_dir_all` would leave new ancestors' entries unsynced). `rel` must be made
/// of normal components only.
pub(crate) fn create_dirs_synced(root: &Path, rel: &Path) -> Result<(), StorageError> {
    let mut at = root.to_owned();
    for c in rel.components() {
        let Component::Normal(name) = c else {
            return Err(StorageError::io("create directory", root.join(rel))(
                io::Error::new(io::ErrorKind::InvalidInput, "not a plain relative path"),
            ));
        };
        at.push(name);
        create_dir_synced(&at)?;
    }
    Ok(())
}

/// Makes `dir` and its missing ancestors with [`DIR_MODE`] (store layout at open: nothing is
/// in them yet, the meta store's first flush follows).
pub(crate) fn create_dir_all_private(dir: &Path) -> Result<(), StorageError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(StorageError::io("create directory", dir))
}

/// Options to open (creating if missing) a file with [`FILE_MODE`].
pub(crate) fn private_file() -> fs::OpenOptions {
    let mut o = fs::OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Opens a session's upload file at `path` for writing at any offset, creating it (with
/// [`FILE_MODE`]) if missing and keeping what it holds.
pub(crate) fn open_upload(path: &Path) -> Result<fs::File, StorageError> {
    private_file()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(StorageError::io("open upload", path))
}

/// Takes group and other permissions away from `path` and, for a directory, everything in it
/// (the meta store's own files, which its library creates with the process umask).
pub(crate) fn make_private(path: &Path) -> Result<(), StorageError> {
    let meta = fs::symlink_metadata(path).map_err(StorageError::io("stat", path))?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & !0o077))
            .map_err(StorageError::io("chmod", path))?;
    }
    if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(StorageError::io("read directory", path))? {
            let entry = entry.map_err(StorageError::io("read directory", path))?;
            make_private(&entry.path())?;
        }
    }
    Ok(())
}

/// Cuts bytes of an earlier, unacknowledged attempt that lie past `end`.
pub(crate) fn cut_past(file: &fs::File, end: u64, path: &Path) -> Result<(), StorageError> {
    let len = file
        .metadata()
        .map_err(StorageError::io("stat upload", path))?
        .len();
    if len > end {
        file.set_len(end)
            .map_err(StorageError::io("truncate upload", path))?;
    }
    Ok(())
}

/// Removes `dir` and everything in it; a missing directory is fine.
///
/// A fragment racing the removal (begun before its session ended) may create the upload file
/// in `dir` after its listing: the removal is tried again (that fragment's commit loses, so
/// the file it made holds nothing acknowledged).
pub(crate) fn remove_dir_all_if_exists(dir: &Path) -> Result<(), StorageError> {
    let mut tries = 0;
    loop {
        match fs::remove_dir_all(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty && tries < 8 => tries += 1,
            Err(e) => return Err(StorageError::io("remove directory", dir)(e)),
        }
    }
}

/// Whether `dir` may exist: `false` only when `lstat` says it does not (any other answer
/// leaves the removal to [`remove_dir_all_if_exists`], which reports real errors). One
/// `statx`, cheap enough for the runtime.
pub(crate) fn dir_exists(dir: &Path) -> bool {
    !matches!(fs::symlink_metadata(dir), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

/// Whether `src` is the inode `dst` describes.
pub(crate) fn same_inode(src: &Path, dst: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(src).is_ok_and(|m| m.ino() == dst.ino() && m.dev() == dst.dev())
}

/// Every existing ancestor of `rel` under `root` is a real directory, not a symlink or a file.
pub(crate) fn safe_parent(root: &Path, rel: &Path) -> Result<bool, StorageError> {
    let mut at = root.to_owned();
    let comps: Vec<_> = rel.components().collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(StorageError::io("inspect", &at)(e)),
        }
    }
    Ok(true)
}
