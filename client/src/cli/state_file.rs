//! The state file of a suspended `bitsd upload`: `<file>.bitsd-resume` beside the source, as
//! the Windows client keeps its job. It names the session, the offset the server had
//! acknowledged, the URL, and the source's size and modification time, so `--resume` continues
//! only the same upload of the same, unchanged file.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// What a suspended upload needs to continue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ResumeState {
    pub(crate) url: String,
    pub(crate) session_id: String,
    pub(crate) offset: u64,
    pub(crate) size: u64,
    /// Modification time as `seconds.nanoseconds` since the Unix epoch.
    pub(crate) mtime: String,
}

/// `<file>.bitsd-resume`.
pub(crate) fn path_for(source: &Path) -> PathBuf {
    let mut name = source.file_name().unwrap_or_default().to_os_string();
    name.push(".bitsd-resume");
    source.with_file_name(name)
}

/// Size and modification time of the source, as the state file records them.
pub(crate) fn fingerprint(source: &Path) -> std::io::Result<(u64, String)> {
    let meta = std::fs::metadata(source)?;
    let mtime = meta
        .modified()?
        .duration_since(UNIX_EPOCH)
        .map(|d| format!("{}.{:09}", d.as_secs(), d.subsec_nanos()))
        .unwrap_or_else(|_| "0.0".to_owned());
    Ok((meta.len(), mtime))
}

impl ResumeState {
    /// Writes the state file (through a temporary file renamed into place).
    pub(crate) fn save(&self, source: &Path) -> std::io::Result<()> {
        let path = path_for(source);
        let text = format!(
            "# bitsd upload state: `bitsd upload --resume URL FILE` continues this upload\n\
             version=1\nurl={}\nsession={}\noffset={}\nsize={}\nmtime={}\n",
            self.url, self.session_id, self.offset, self.size, self.mtime
        );
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".bitsd-resume.")
            .tempfile_in(dir)?;
        std::io::Write::write_all(&mut tmp, text.as_bytes())?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(())
    }

    /// Reads the state file of `source`; `Ok(None)` if there is none.
    pub(crate) fn load(source: &Path) -> std::io::Result<Option<ResumeState>> {
        let path = path_for(source);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        let bad = || {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not a bitsd upload state file", path.display()),
            )
        };
        Ok(Some(ResumeState {
            url: get("url").ok_or_else(bad)?,
            session_id: get("session").ok_or_else(bad)?,
            offset: get("offset").and_then(|v| v.parse().ok()).ok_or_else(bad)?,
            size: get("size").and_then(|v| v.parse().ok()).ok_or_else(bad)?,
            mtime: get("mtime").ok_or_else(bad)?,
        }))
    }

    /// Removes the state file of `source`, if any.
    pub(crate) fn remove(source: &Path) {
        let _ = std::fs::remove_file(path_for(source));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().expect("dir");
        let src = dir.path().join("a.bin");
        std::fs::write(&src, b"abc").expect("write");
        assert_eq!(ResumeState::load(&src).expect("load"), None);
        let (size, mtime) = fingerprint(&src).expect("stat");
        let st = ResumeState {
            url: "http://h:1/upload/a.bin".into(),
            session_id: "{s-1}".into(),
            offset: 2,
            size,
            mtime,
        };
        st.save(&src).expect("save");
        assert_eq!(path_for(&src), dir.path().join("a.bin.bitsd-resume"));
        assert_eq!(ResumeState::load(&src).expect("load"), Some(st));
        ResumeState::remove(&src);
        assert_eq!(ResumeState::load(&src).expect("load"), None);
    }
}
