//! The storage baseline: plain files written directly, no HTTP. Each upload is one file; each
//! fragment is written at its offset (`pwrite`) and `sync_data`'d before the next one (the
//! same chunk size and fsync policy as bitsd's per-fragment durability; with `--fsync
//! on-close` once after the last fragment, with `never` not at all); the directory is fsynced
//! once when the file is created.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Writes one upload of `total` bytes in fragments of `fragment` bytes to `path`.
fn write_one(path: &Path, total: u64, fragment: usize, payload: &[u8]) -> io::Result<()> {
    let file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    let policy = crate::util::fsync();
    let mut at = 0u64;
    while at < total {
        let len = (fragment as u64).min(total - at) as usize;
        file.write_all_at(&payload[..len], at)?;
        if policy == bitsd::FsyncPolicy::PerFragment {
            file.sync_data()?;
        }
        at += len as u64;
    }
    if policy == bitsd::FsyncPolicy::OnClose {
        file.sync_data()?;
    }
    Ok(())
}

/// `uploads` concurrent uploads (one thread each) of `each` bytes into `dir`; returns the wall
/// time from the first byte to the last `sync_data`. The files are removed afterwards.
pub fn write_uploads(
    dir: &Path,
    uploads: usize,
    each: u64,
    fragment: usize,
    payload: &[u8],
) -> io::Result<Duration> {
    fs::create_dir_all(dir)?;
    let paths: Vec<_> = (0..uploads)
        .map(|i| dir.join(format!("upload-{i}.bin")))
        .collect();
    let started = Instant::now();
    let results: Vec<io::Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .iter()
            .map(|p| s.spawn(move || write_one(p, each, fragment, payload)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed();
    for p in &paths {
        let _ = fs::remove_file(p);
    }
    for r in results {
        r?;
    }
    Ok(elapsed)
}
