//! Machine facts the bench measures itself for the report header: what one small synced write
//! costs on the disk under the work directory, and how loaded the machine is.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

/// Writes and `fdatasync`s `count` × 4 KiB at successive offsets of a fresh file in `dir`;
/// returns `median µs, p90 µs, total ms` as one line.
pub fn fsync_cost(dir: &Path, count: usize) -> std::io::Result<String> {
    let path = dir.join("fsync-probe.bin");
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)?;
    let block = vec![0xa5u8; 4096];
    let mut us = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        let t = Instant::now();
        file.write_all_at(&block, i as u64 * 4096)?;
        file.sync_data()?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let total = started.elapsed();
    drop(file);
    let _ = std::fs::remove_file(&path);
    us.sort_by(f64::total_cmp);
    let at = |p: f64| us[((p * us.len() as f64) as usize).min(us.len() - 1)];
    Ok(format!(
        "{count} × 4 KiB write + fdatasync: median {:.0} µs, p90 {:.0} µs, {:.1} ms in all",
        at(0.5),
        at(0.9),
        total.as_secs_f64() * 1000.0
    ))
}

/// `/proc/loadavg`'s three load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}
