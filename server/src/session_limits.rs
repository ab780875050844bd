//! Limits on sessions and disk use: how many live sessions in total and per user, how much
//! free disk space must remain, how long a body may stall.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

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

/// Refuses with 500 `E_DISK_FULL` when writing `extra` bytes would leave less than the reserve.
pub(crate) fn check_disk(
    data_dir: &Path,
    extra: u64,
    limits: &SessionLimits,
) -> Result<(), BitsError> {
    if limits.min_free_disk == 0 {
        return Ok(());
    }
    let free = match nix::sys::statvfs::statvfs(data_dir) {
        #[allow(clippy::useless_conversion)] // c_ulong and fsblkcnt_t are u64 only on some targets
        Ok(s) => u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size())),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read free disk space");
            return Ok(());
        }
    };
    if free < limits.min_free_disk.saturating_add(extra) {
        tracing::warn!(
            free,
            reserve = limits.min_free_disk,
            extra,
            "disk below the reserve"
        );
        return Err(BitsError::internal(
            HResult::E_DISK_FULL,
            format!(
                "{free} bytes free on disk, below the reserve of {} plus {extra}",
                limits.min_free_disk
            ),
        ));
    }
    Ok(())
}
