//! Helpers shared by the scenarios: payloads, an in-process bitsd, disk usage, settling.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::client::Result;

/// One MiB.
pub const MIB: u64 = 1024 * 1024;

/// Deterministic pseudo-random bytes (xorshift), so payloads need no files and do not compress.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

static FSYNC: std::sync::OnceLock<bitsd::FsyncPolicy> = std::sync::OnceLock::new();

/// Sets the fsync policy of every bitsd this run starts (and of the file baseline).
pub fn set_fsync(policy: bitsd::FsyncPolicy) {
    let _ = FSYNC.set(policy);
}

/// The fsync policy of this run.
pub fn fsync() -> bitsd::FsyncPolicy {
    FSYNC.get().copied().unwrap_or_default()
}

/// The bitsd configuration the in-process scenarios use: ephemeral loopback port, no admin
/// listener, the default routes (`/upload/`, `/echo/`) and every other default.
pub fn bitsd_config(data_dir: &Path) -> bitsd::ServerConfig {
    bitsd::ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_listen: None,
        data_dir: data_dir.to_owned(),
        shutdown_grace: Duration::from_secs(5),
        fsync: fsync(),
        ..Default::default()
    }
}

/// Starts bitsd in this process on `data_dir`; retries for a few seconds while an earlier
/// server on the same directory may still hold the sled lock. Returns the server and how long
/// the successful `bitsd::start` call took.
pub async fn start_bitsd(data_dir: &Path) -> Result<(bitsd::RunningServer, Duration)> {
    let mut tries = 0;
    loop {
        let t = Instant::now();
        match bitsd::start(bitsd_config(data_dir)).await {
            Ok(s) => return Ok((s, t.elapsed())),
            Err(e) if tries < 50 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(format!("bitsd failed to start: {e}").into()),
        }
    }
}

/// Space a directory tree takes on disk: the sum of `st_blocks × 512` of every file and
/// directory, each inode counted once (a committed upload and the session file it was linked
/// from are one inode). Also returns the apparent size (sum of `st_size` of regular files).
pub fn disk_usage(root: &Path) -> std::io::Result<(u64, u64)> {
    let mut seen = HashSet::new();
    let (mut allocated, mut apparent) = (0u64, 0u64);
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        allocated += meta.blocks() * 512;
        if meta.is_file() {
            apparent += meta.len();
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&p)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok((allocated, apparent))
}

/// Lets the disk settle between measurements: `sync`, then a short pause.
pub async fn settle() {
    let _ = tokio::task::spawn_blocking(|| std::process::Command::new("sync").status()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// MiB/s of `bytes` in `d`.
pub fn mib_per_sec(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64().max(1e-9)
}

/// `64 KiB`, `1 MiB`, `16 MiB`.
pub fn size_label(bytes: u64) -> String {
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}
