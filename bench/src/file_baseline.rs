//! The storage baseline: plain files written directly, no HTTP. Each upload is one file; each
//! fragment is written at its offset (`pwrite`) and `sync_data`'d before the next one (the
//! same chunk size and fsync policy as bitsd's per-fragment durability; with `--fsync
//! on-close` once after the last fragment, with `never` not at all); the directory is fsynced
//! once when the file is created. Each writer thread measures its own CPU time
//! (`getrusage(RUSAGE_THREAD)`), so the file writer's CPU per GiB sits next to bitsd's.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// CPU seconds (user + system) the calling thread has used so far.
fn thread_cpu_secs() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_THREAD).map_or(0.0, |u| {
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        secs(u.user_time()) + secs(u.system_time())
    })
}

/// Writes one upload of `total` bytes in fragments of `fragment` bytes to `path`; returns the
/// CPU seconds the writing thread spent on it.
fn write_one(
    path: &Path,
    total: u64,
    fragment: usize,
    payload: &[u8],
    policy: bitsd::FsyncPolicy,
) -> io::Result<f64> {
    let cpu = thread_cpu_secs();
    let file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
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
    Ok(thread_cpu_secs() - cpu)
}

/// `uploads` concurrent uploads (one thread each) of `each` bytes into `dir`, synced as
/// `policy` says; returns the wall time from the first byte to the last `sync_data` and the
/// CPU seconds of the writer threads. The files are removed afterwards.
pub fn write_uploads(
    dir: &Path,
    uploads: usize,
    each: u64,
    fragment: usize,
    payload: &[u8],
    policy: bitsd::FsyncPolicy,
) -> io::Result<(Duration, f64)> {
    fs::create_dir_all(dir)?;
    let paths: Vec<_> = (0..uploads)
        .map(|i| dir.join(format!("upload-{i}.bin")))
        .collect();
    let started = Instant::now();
    let results: Vec<io::Result<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .iter()
            .map(|p| s.spawn(move || write_one(p, each, fragment, payload, policy)))
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
    let mut cpu = 0.0;
    for r in results {
        cpu += r?;
    }
    Ok((elapsed, cpu))
}
