//! What keeps password checks from stalling the server or helping a guesser: argon2 runs on
//! a bounded number of dedicated threads (never on the async workers), successful checks are
//! remembered for a short time, and repeated failures per client address and per user name
//! are refused for a growing back-off period without running argon2 at all.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

/// Failures a client address or a user name may have before back-off starts.
pub(crate) const FREE_FAILURES: u32 = 5;
/// The first back-off period; each further failure doubles it.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// The longest back-off period.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Failures older than this are forgotten.
const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// How long a successful password check is remembered.
pub(crate) const CACHE_TTL: Duration = Duration::from_secs(120);
/// Entries kept per table (cache, failures by address, failures by user) at most.
const MAX_ENTRIES: usize = 10_000;
/// Name of the threads argon2 runs on.
pub(crate) const THREAD_NAME: &str = "bitsd-auth";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Recent failures of one client address or user name.
#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    last: Instant,
}

impl Failures {
    /// Until when new attempts are refused without a check.
    fn blocked_until(&self) -> Option<Instant> {
        let over = self.count.checked_sub(FREE_FAILURES)?;
        let backoff = BACKOFF_BASE
            .saturating_mul(1u32 << over.min(16))
            .min(BACKOFF_MAX);
        Some(self.last + backoff)
    }
}

/// Drops stale entries of a full table; clears it if that is not enough.
fn make_room<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, fresh: impl Fn(&V) -> bool) {
    if map.len() < MAX_ENTRIES {
        return;
    }
    map.retain(|_, v| fresh(v));
    if map.len() >= MAX_ENTRIES {
        map.clear();
    }
}

/// The shared state behind password checks.
pub(crate) struct Throttle {
    /// Keyed hashes of `user:password` that verified, with when.
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    /// The per-process key of those hashes (never stored, never sent).
    cache_key: [u8; 32],
    by_addr: Mutex<HashMap<IpAddr, Failures>>,
    by_user: Mutex<HashMap<String, Failures>>,
    /// Argon2 checks running at once, at most.
    slots: Arc<Semaphore>,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("slots", &self.slots.available_permits())
            .finish_non_exhaustive()
    }
}

impl Throttle {
    /// Half the machine's cores (at least one) check passwords at once.
    pub(crate) fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut cache_key = [0u8; 32];
        cache_key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        cache_key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        Throttle {
            verified: Mutex::new(HashMap::new()),
            cache_key,
            by_addr: Mutex::new(HashMap::new()),
            by_user: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new((cores / 2).max(1))),
        }
    }

    /// The cache key of a user and password.
    pub(crate) fn key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_key);
        h.update((user.len() as u64).to_le_bytes());
        h.update(user.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Whether these credentials verified less than [`CACHE_TTL`] ago.
    pub(crate) fn is_cached(&self, key: &[u8; 32]) -> bool {
        let mut cache = lock(&self.verified);
        match cache.get(key) {
            Some(at) if at.elapsed() < CACHE_TTL => true,
            Some(_) => {
                cache.remove(key);
                false
            }
            None => false,
        }
    }

    /// How long attempts from `addr` or for `user` are still refused, if they are. A bearer
    /// token names no user: `user` is `None` and only the address counts.
    pub(crate) fn blocked(&self, addr: Option<IpAddr>, user: Option<&str>) -> Option<Duration> {
        let now = Instant::now();
        let left = |f: Option<&Failures>| {
            f.and_then(Failures::blocked_until)
                .and_then(|until| until.checked_duration_since(now))
                .filter(|d| !d.is_zero())
        };
        let by_addr = addr.and_then(|a| left(lock(&self.by_addr).get(&a)));
        let by_user = user.and_then(|u| left(lock(&self.by_user).get(u)));
        by_addr.max(by_user)
    }

    /// Records a failed check (`user` is `None` for a bearer token).
    pub(crate) fn failed(&self, addr: Option<IpAddr>, user: Option<&str>) {
        let now = Instant::now();
        let bump = |f: &mut Failures| {
            if now.duration_since(f.last) > FAILURE_WINDOW {
                f.count = 0;
            }
            f.count = f.count.saturating_add(1);
            f.last = now;
        };
        let fresh = |f: &Failures| f.last.elapsed() < FAILURE_WINDOW;
        let new = Failures {
            count: 0,
            last: now,
        };
        if let Some(a) = addr {
            let mut map = lock(&self.by_addr);
            make_room(&mut map, fresh);
            bump(map.entry(a).or_insert(new));
        }
        if let Some(user) = user {
            let mut map = lock(&self.by_user);
            make_room(&mut map, fresh);
            bump(map.entry(user.to_owned()).or_insert(new));
        }
    }

    /// Records a successful check: remembered, and the failures of both keys forgotten.
    pub(crate) fn succeeded(&self, key: [u8; 32], addr: Option<IpAddr>, user: &str) {
        {
            let mut cache = lock(&self.verified);
            make_room(&mut cache, |at| at.elapsed() < CACHE_TTL);
            cache.insert(key, Instant::now());
        }
        if let Some(a) = addr {
            lock(&self.by_addr).remove(&a);
        }
        lock(&self.by_user).remove(user);
    }

    /// Runs `check` on a dedicated thread once one of the bounded slots is free; the async
    /// worker only waits. `None` if the thread could not be started or died.
    pub(crate) async fn run<F>(&self, check: F) -> Option<bool>
    where
        F: FnOnce() -> bool + Send + 'static,
    {
        let permit = Arc::clone(&self.slots).acquire_owned().await.ok()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name(THREAD_NAME.to_owned())
            .spawn(move || {
                // The slot stays taken until the check ends, even if the request is gone.
                let _permit = permit;
                let _ = tx.send(check());
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a password check thread");
            return None;
        }
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_starts_after_the_free_failures_and_success_clears_it() {
        let t = Throttle::new();
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..FREE_FAILURES {
            assert_eq!(t.blocked(Some(addr), Some("alice")), None);
            t.failed(Some(addr), Some("alice"));
        }
        t.failed(Some(addr), Some("alice"));
        let left = t.blocked(Some(addr), Some("alice")).unwrap();
        assert!(left > Duration::from_millis(1500) && left <= Duration::from_secs(2));
        // Another user from the same address, and the same user from another address.
        assert!(t.blocked(Some(addr), Some("bob")).is_some());
        assert!(t
            .blocked(Some("192.0.2.2".parse().unwrap()), Some("alice"))
            .is_some());
        assert!(t
            .blocked(Some("192.0.2.2".parse().unwrap()), Some("bob"))
            .is_none());
        let key = t.key("alice", "pw");
        assert!(!t.is_cached(&key));
        t.succeeded(key, Some(addr), "alice");
        assert!(t.is_cached(&key));
        assert!(t.blocked(Some(addr), Some("alice")).is_none());
        assert_ne!(t.key("alice", "pw"), t.key("alicep", "w"));
    }
}
