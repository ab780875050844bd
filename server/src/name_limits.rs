//! Name and path length limits of the files tree, checked when a session is created so that a
//! name the file system cannot hold is refused at once (fatal 400) instead of failing with a
//! transient 500 at the final fragment, which a client would retry forever.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use bitsd_protocol::{BitsError, ErrorContext, HResult};
use http::StatusCode;

/// Linux's `PATH_MAX`: the longest path a system call takes, with its NUL.
const PATH_MAX: usize = 4096;
/// `NAME_MAX` when the file system does not say.
const DEFAULT_NAME_MAX: usize = 255;
/// Room kept for the temporary name a commit creates next to the destination
/// (`.bitsd-commit-<32 hex>.tmp`).
const TEMP_NAME_ROOM: usize = 50;

/// `ERROR_FILENAME_EXCED_RANGE` as an HRESULT.
pub(crate) fn name_too_long(reason: String) -> BitsError {
    BitsError::new(
        StatusCode::BAD_REQUEST,
        HResult::from_win32(206),
        ErrorContext::Server,
        reason,
    )
}

/// The file system's `NAME_MAX` for `files_dir`, read once per directory and kept (a
/// `statfs` per Create-Session otherwise; the limit is the file system's and does not change
/// while it is mounted). Readings are kept for at most [`NAME_MAX_KEPT`] directories.
fn name_max(files_dir: &Path) -> usize {
    static KEPT: OnceLock<Mutex<HashMap<PathBuf, usize>>> = OnceLock::new();
    let kept = KEPT.get_or_init(Mutex::default);
    if let Some(&n) = kept
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(files_dir)
    {
        return n;
    }
    let read = nix::sys::statvfs::statvfs(files_dir)
        .ok()
        .and_then(|s| usize::try_from(s.name_max()).ok())
        .filter(|&n| n > 0);
    let Some(n) = read else {
        // Not kept: the next check asks again.
        return DEFAULT_NAME_MAX;
    };
    let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
    if kept.len() >= NAME_MAX_KEPT {
        kept.clear();
    }
    kept.insert(files_dir.to_path_buf(), n);
    n
}

/// Directories whose `NAME_MAX` is kept at most; past that the map starts over.
const NAME_MAX_KEPT: usize = 64;

/// Refuses `dest` (a destination below `files_dir`, `/`-separated) when a segment is longer
/// than the file system's `NAME_MAX` or the whole path, with room for the commit's temporary
/// name, would reach `PATH_MAX`: 400 with `0x800700ce` (ERROR_FILENAME_EXCED_RANGE).
pub(crate) fn check_name_lengths(files_dir: &Path, dest: &str) -> Result<(), BitsError> {
    let name_max = name_max(files_dir);
    if let Some(long) = dest.split('/').find(|s| s.len() > name_max) {
        return Err(name_too_long(format!(
            "a path segment is {} bytes long; the file system holds names up to {name_max} bytes",
            long.len()
        )));
    }
    let root = std::path::absolute(files_dir).unwrap_or_else(|_| files_dir.to_owned());
    let total = root.as_os_str().len() + 1 + dest.len() + TEMP_NAME_ROOM;
    if total >= PATH_MAX {
        return Err(name_too_long(format!(
            "the destination path would be {} bytes long; the limit is {}",
            root.as_os_str().len() + 1 + dest.len(),
            PATH_MAX - 1 - TEMP_NAME_ROOM
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_segments_and_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_name_lengths(dir.path(), "a/b.bin").is_ok());
        assert!(check_name_lengths(dir.path(), &"n".repeat(255)).is_ok());
        let e = check_name_lengths(dir.path(), &"n".repeat(300)).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.code(), HResult(0x8007_00ce));
        let deep = vec!["d".repeat(200); 41].join("/");
        assert!(check_name_lengths(dir.path(), &deep).is_err());
    }
}
