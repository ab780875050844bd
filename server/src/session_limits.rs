//! Limits on sessions and disk use: how many live sessions in total and per user, how much
//! free disk space must remain, how long a body may stall.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use bitsd_protocol::{BitsError, HResult};
use bitsd_storage::LiveCounts;
use http::StatusCode;

/// `HRESULT_FROM_WIN32(ERROR_TOO_MANY_SESS)`: sent with 503 when a session limit is reached.
pub const E_TOO_MANY_SESSIONS: HResult = HResult(0x8007_0045);

/// When fragment bytes are synced to disk (`fsync` in the configuration).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsyncPolicy {
    /// Every fragment's bytes and offset are durable before its Ack (the default; what the
    /// protocol's resume logic assumes).
    #[default]
    PerFragment,
    /// Fragments are synced once, when the upload completes (before the final Ack). A crash
    /// mid-upload can lose acknowledged bytes; the client then resends from what is held.
    OnClose,
    /// Never sync fragment bytes (tests, throwaway data).
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "per-fragment" => Ok(FsyncPolicy::PerFragment),
            "on-close" => Ok(FsyncPolicy::OnClose),
            "never" => Ok(FsyncPolicy::Never),
            other => Err(format!(
                "fsync must be per-fragment, on-close or never, not {other:?}"
            )),
        }
    }
}

/// Limits that protect the server (all configurable; see docs/configuration.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// Live (not closed, not cancelled) sessions in total; `None`: unlimited.
    pub max_sessions: Option<usize>,
    /// Live sessions of one authenticated user (BITSNumberOfSessionsLimit, IIS default 50);
    /// anonymous sessions count only toward the total.
    pub max_sessions_per_user: Option<usize>,
    /// Create-Session and Fragment are refused while free space on the data directory's
    /// file system would fall below this many bytes.
    pub min_free_disk: u64,
    /// How long a request body may send nothing before the request is abandoned (and the
    /// session lock released).
    pub body_idle_timeout: Duration,
    /// The slowest a Fragment's body may arrive, in bytes per second, once its grace period
    /// is over (IIS `minBytesPerSecond`); 0: no minimum.
    pub min_body_rate: u64,
    /// How long a Fragment's body may arrive slower than [`SessionLimits::min_body_rate`]
    /// before the rate is held against it.
    pub min_body_rate_grace: Duration,
}

impl Default for SessionLimits {
    /// 100,000 sessions, 50 per user, 64 MiB disk reserve, 60 s body idle timeout, a minimum
    /// body rate of 240 bytes/s after 10 s.
    fn default() -> Self {
        SessionLimits {
            max_sessions: Some(100_000),
            max_sessions_per_user: Some(50),
            min_free_disk: 64 * 1024 * 1024,
            body_idle_timeout: Duration::from_secs(60),
            min_body_rate: 240,
            min_body_rate_grace: Duration::from_secs(10),
        }
    }
}

/// Live session counts, kept in memory (rebuilt from the store at start).
#[derive(Debug, Default)]
pub(crate) struct SessionCounts {
    inner: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_user: HashMap<String, usize>,
}

impl SessionCounts {
    pub(crate) fn from_live(live: LiveCounts) -> Self {
        let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let c = Counts {
            total: to_usize(live.total),
            per_user: live
                .per_user
                .into_iter()
                .map(|(user, n)| (user, to_usize(n)))
                .collect(),
        };
        SessionCounts {
            inner: Mutex::new(c),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for a new session of `owner`, or refuses with 503.
    pub(crate) fn reserve(
        &self,
        owner: Option<&str>,
        limits: &SessionLimits,
    ) -> Result<(), BitsError> {
        let mut c = self.lock();
        if limits.max_sessions.is_some_and(|max| c.total >= max) {
            return Err(too_many_sessions(limits, None));
        }
        if let (Some(owner), Some(max)) = (owner, limits.max_sessions_per_user) {
            let n = c.per_user.get(owner).copied().unwrap_or(0);
            if n >= max {
                return Err(too_many_sessions(limits, Some(owner)));
            }
        }
        c.total += 1;
        if let Some(owner) = owner {
            *c.per_user.entry(owner.to_owned()).or_default() += 1;
        }
        Ok(())
    }

    /// Gives a live session's slot back (ended, expired, or never created).
    pub(crate) fn release(&self, owner: Option<&str>) {
        let mut c = self.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(owner) = owner {
            if let Some(n) = c.per_user.get_mut(owner) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.per_user.remove(owner);
                }
            }
        }
    }
}

/// The answer to a Create-Session over a session limit: 503 with
/// [`E_TOO_MANY_SESSIONS`]; `owner` when the user's limit is the one reached, else the total.
pub(crate) fn too_many_sessions(limits: &SessionLimits, owner: Option<&str>) -> BitsError {
    let why = match (owner, limits.max_sessions_per_user) {
        (Some(owner), Some(max)) => {
            format!("user {owner} holds its maximum of {max} live sessions")
        }
        _ => format!(
            "the server holds its maximum of {} live sessions",
            limits.max_sessions.unwrap_or(usize::MAX)
        ),
    };
    BitsError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        E_TOO_MANY_SESSIONS,
        bitsd_protocol::ErrorContext::Server,
        why,
    )
}

/// How long a free-space reading of a data directory is trusted before `statvfs` is asked
/// again (one `statfs` per Fragment cost a system call and a lock of the file system's
/// counters per request).
pub(crate) const DISK_READING_MAX_AGE: Duration = Duration::from_millis(100);

/// How many bytes checks may reserve against one reading before `statvfs` is asked again.
pub(crate) const DISK_READING_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// A free-space reading of one data directory and what was reserved against it since.
#[derive(Clone, Copy, Debug)]
struct DiskReading {
    at: Instant,
    free: u64,
    /// Bytes checks let through since the reading (counted as used: an estimate that only
    /// errs toward less free space).
    reserved: u64,
}

/// Free-space readings per data directory (a process may serve several, e.g. in tests).
#[derive(Debug, Default)]
pub(crate) struct DiskGauge {
    readings: Mutex<HashMap<PathBuf, DiskReading>>,
}

/// Data directories whose readings are kept at most; past that the map starts over.
const DISK_READINGS_MAX: usize = 64;

impl DiskGauge {
    /// Whether `extra` more bytes leave at least `reserve` free on `dir`'s file system.
    ///
    /// A pass may be answered from a reading younger than [`DISK_READING_MAX_AGE`] with less
    /// than [`DISK_READING_MAX_BYTES`] reserved against it (the bytes let through since count
    /// as used); anything else, and **every refusal**, is decided on a fresh `read` (so a
    /// disk that filled is refused within that bound, and a disk that was freed is accepted at
    /// once). `Err` carries the free bytes the refusal saw; a failed `read` lets the request
    /// through (as before: free space that cannot be read does not stop uploads).
    fn check(
        &self,
        dir: &Path,
        extra: u64,
        reserve: u64,
        now: Instant,
        read: impl FnOnce() -> std::io::Result<u64>,
    ) -> Result<(), u64> {
        let need = reserve.saturating_add(extra);
        {
            let mut readings = self.readings.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = readings.get_mut(dir) {
                let reserved = r.reserved.saturating_add(extra);
                if now.saturating_duration_since(r.at) < DISK_READING_MAX_AGE
                    && reserved <= DISK_READING_MAX_BYTES
                    && r.free.saturating_sub(r.reserved) >= need
                {
                    r.reserved = reserved;
                    return Ok(());
                }
            }
        }
        let free = match read() {
            Ok(free) => free,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read free disk space");
                return Ok(());
            }
        };
        let mut readings = self.readings.lock().unwrap_or_else(|p| p.into_inner());
        if free < need {
            readings.remove(dir);
            return Err(free);
        }
        if readings.len() >= DISK_READINGS_MAX && !readings.contains_key(dir) {
            readings.clear();
        }
        readings.insert(
            dir.to_path_buf(),
            DiskReading {
                at: now,
                free,
                reserved: extra,
            },
        );
        Ok(())
    }
}

/// The process's readings, shared by every check.
fn gauge() -> &'static DiskGauge {
    static GAUGE: OnceLock<DiskGauge> = OnceLock::new();
    GAUGE.get_or_init(DiskGauge::default)
}

/// Free bytes on `dir`'s file system for an unprivileged writer.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(dir)?;
    #[allow(clippy::useless_conversion)] // c_ulong and fsblkcnt_t are u64 only on some targets
    Ok(u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size())))
}

/// Refuses with 500 `E_DISK_FULL` when writing `extra` bytes would leave less than the
/// reserve. Passes may come from a recent reading (see [`DiskGauge`]); refusals never do.
pub(crate) fn check_disk(
    data_dir: &Path,
    extra: u64,
    limits: &SessionLimits,
) -> Result<(), BitsError> {
    if limits.min_free_disk == 0 {
        return Ok(());
    }
    let Err(free) = gauge().check(
        data_dir,
        extra,
        limits.min_free_disk,
        Instant::now(),
        || free_bytes(data_dir),
    ) else {
        return Ok(());
    };
    tracing::warn!(
        free,
        reserve = limits.min_free_disk,
        extra,
        "disk below the reserve"
    );
    Err(BitsError::internal(
        HResult::E_DISK_FULL,
        format!(
            "{free} bytes free on disk, below the reserve of {} plus {extra}",
            limits.min_free_disk
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const MIB: u64 = 1024 * 1024;

    /// A reader that counts its calls and returns whatever `free` holds.
    fn reader<'a>(
        free: &'a Cell<u64>,
        calls: &'a Cell<u32>,
    ) -> impl FnOnce() -> std::io::Result<u64> + 'a {
        move || {
            calls.set(calls.get() + 1);
            Ok(free.get())
        }
    }

    #[test]
    fn passes_are_answered_from_a_young_reading_and_count_what_they_let_through() {
        let gauge = DiskGauge::default();
        let dir = Path::new("/data");
        let (free, calls) = (Cell::new(1000 * MIB), Cell::new(0));
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(
                gauge.check(dir, MIB, 100 * MIB, t0, reader(&free, &calls)),
                Ok(())
            );
        }
        assert_eq!(calls.get(), 1, "one reading for ten small checks");
        // The disk filled meanwhile (another writer): the reading's age bounds how long that
        // goes unseen, and the refusal is decided on a fresh reading.
        free.set(50 * MIB);
        assert_eq!(
            gauge.check(
                dir,
                MIB,
                100 * MIB,
                t0 + DISK_READING_MAX_AGE,
                reader(&free, &calls)
            ),
            Err(50 * MIB)
        );
        assert_eq!(calls.get(), 2);
        // A refusal keeps no reading: the next check reads again, and sees the freed disk.
        free.set(1000 * MIB);
        assert_eq!(
            gauge.check(
                dir,
                MIB,
                100 * MIB,
                t0 + DISK_READING_MAX_AGE,
                reader(&free, &calls)
            ),
            Ok(())
        );
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn a_reading_is_asked_again_after_enough_bytes_and_never_trusted_for_a_refusal() {
        let gauge = DiskGauge::default();
        let dir = Path::new("/data");
        let (free, calls) = (Cell::new(10_000 * MIB), Cell::new(0));
        let t0 = Instant::now();
        let per = DISK_READING_MAX_BYTES / 4;
        for _ in 0..4 {
            assert_eq!(gauge.check(dir, per, 0, t0, reader(&free, &calls)), Ok(()));
        }
        assert_eq!(calls.get(), 1);
        assert_eq!(gauge.check(dir, per, 0, t0, reader(&free, &calls)), Ok(()));
        assert_eq!(calls.get(), 2, "the byte budget of one reading is spent");
        // Reserve and reservations add up to more than the reading: a fresh read decides,
        // and it passes because the bytes counted as used were not in fact written.
        let gauge = DiskGauge::default();
        let (free, calls) = (Cell::new(100 * MIB), Cell::new(0));
        assert_eq!(
            gauge.check(dir, 30 * MIB, 60 * MIB, t0, reader(&free, &calls)),
            Ok(())
        );
        assert_eq!(
            gauge.check(dir, 30 * MIB, 60 * MIB, t0, reader(&free, &calls)),
            Ok(())
        );
        assert_eq!(calls.get(), 2);
        // Too big for what is free: refused on a fresh reading, though a young one exists.
        assert_eq!(
            gauge.check(dir, 50 * MIB, 60 * MIB, t0, reader(&free, &calls)),
            Err(100 * MIB)
        );
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn directories_have_their_own_readings_and_a_failed_read_lets_through() {
        let gauge = DiskGauge::default();
        let (full, roomy) = (Cell::new(MIB), Cell::new(1000 * MIB));
        let calls = Cell::new(0);
        let t0 = Instant::now();
        assert_eq!(
            gauge.check(Path::new("/a"), 0, 10 * MIB, t0, reader(&roomy, &calls)),
            Ok(())
        );
        assert_eq!(
            gauge.check(Path::new("/b"), 0, 10 * MIB, t0, reader(&full, &calls)),
            Err(MIB)
        );
        assert_eq!(
            gauge.check(Path::new("/c"), 0, 10 * MIB, t0, || {
                Err(std::io::Error::other("EIO"))
            }),
            Ok(())
        );
    }

    #[test]
    fn the_real_data_directory_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut limits = SessionLimits {
            min_free_disk: u64::MAX / 4,
            ..SessionLimits::default()
        };
        let e = check_disk(dir.path(), 0, &limits).unwrap_err();
        assert!(e.to_string().contains("below the reserve"), "{e}");
        limits.min_free_disk = 1;
        check_disk(dir.path(), 0, &limits).unwrap();
        // Right after a pass, a request for more than the disk holds is still refused.
        limits.min_free_disk = u64::MAX / 4;
        check_disk(dir.path(), 0, &limits).unwrap_err();
    }
}
