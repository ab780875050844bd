//! Open upload files kept across a session's fragments.
//!
//! Without it every file fragment costs an `lstat`, an `open` and a `close` of the session's
//! upload file. A [`HandleCache`] keeps a bounded number of them open ([`HANDLE_CACHE_SIZE`]
//! by default, least recently used go first), one per session.
//!
//! A handle must never write into a file that was unlinked or replaced: its bytes would be
//! acknowledged and lost. So:
//!
//! - a fragment **checks its session's handle out** (the slot then holds a token, not the
//!   handle) and gives it back only after its commit won, with the same token: a slot that
//!   was forgotten meanwhile (or taken over by another writer) refuses it and the handle is
//!   closed;
//! - everything that unlinks, replaces or hands out the upload file **forgets** the
//!   session's slot first: Close/Cancel ([`crate::SessionStore::end_session`]), purge (the
//!   sweeper's and cleanup's), publish, a handler given the file's path, and recovery
//!   (which forgets every slot).
//!
//! A fragment that finds no idle handle opens the file as before.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};

use bitsd_protocol::SessionId;

/// How many upload files a store keeps open by default.
pub const HANDLE_CACHE_SIZE: usize = 256;

/// A session's slot: its idle handle, or the token of the writer that checked it out.
#[derive(Debug)]
enum Slot {
    Idle(Arc<File>),
    Out(u64),
}

#[derive(Debug, Default)]
struct Inner {
    /// Slot and stamp (its last use) per session.
    slots: HashMap<SessionId, (Slot, u64)>,
    /// Sessions in the order of their last use; an entry whose stamp is not its slot's any
    /// more is stale and skipped.
    order: VecDeque<(SessionId, u64)>,
    /// The last stamp or token handed out.
    next: u64,
}

impl Inner {
    fn stamp(&mut self, id: SessionId) -> u64 {
        self.next += 1;
        self.order.push_back((id, self.next));
        self.next
    }
}

/// A bounded set of open upload files, one per session (see the module documentation).
#[derive(Debug)]
pub(crate) struct HandleCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

/// What [`HandleCache::check_out`] found: the idle handle (if any) and the token to give it
/// back with.
#[derive(Debug)]
pub(crate) struct CheckedOut {
    pub(crate) file: Option<Arc<File>>,
    pub(crate) token: u64,
}

impl HandleCache {
    /// A cache keeping at most `capacity` sessions' slots (0: none, every fragment opens).
    pub(crate) fn new(capacity: usize) -> Self {
        HandleCache {
            inner: Mutex::default(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the idle handle of `id` out, if there is one, and marks the slot as the new
    /// writer's: only this writer's [`HandleCache::give_back`] may fill it again.
    pub(crate) fn check_out(&self, id: &SessionId) -> CheckedOut {
        if self.capacity == 0 {
            return CheckedOut {
                file: None,
                token: 0,
            };
        }
        let mut inner = self.lock();
        let token = inner.stamp(*id);
        let file = match inner.slots.insert(*id, (Slot::Out(token), token)) {
            Some((Slot::Idle(file), _)) => Some(file),
            _ => None,
        };
        let evicted = self.evict(&mut inner);
        drop(inner);
        drop(evicted);
        CheckedOut { file, token }
    }

    /// Keeps `file` as the idle handle of `id` if the slot is still the one `token` checked
    /// out (not forgotten, not taken over by another writer); otherwise closes it.
    pub(crate) fn give_back(&self, id: &SessionId, token: u64, file: Arc<File>) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.lock();
        if !matches!(inner.slots.get(id), Some((Slot::Out(t), _)) if *t == token) {
            drop(inner);
            return;
        }
        let stamp = inner.stamp(*id);
        inner.slots.insert(*id, (Slot::Idle(file), stamp));
        let evicted = self.evict(&mut inner);
        drop(inner);
        drop(evicted);
    }

    /// Forgets the slot of `id`: its idle handle is closed, and a writer that has it checked
    /// out cannot give it back.
    pub(crate) fn forget(&self, id: &SessionId) {
        if self.capacity == 0 {
            return;
        }
        let removed = self.lock().slots.remove(id);
        drop(removed);
    }

    /// Forgets every slot.
    pub(crate) fn forget_all(&self) {
        let removed = std::mem::take(&mut *self.lock());
        drop(removed);
    }

    /// How many idle handles are open (tests, metrics).
    #[cfg(test)]
    pub(crate) fn idle(&self) -> usize {
        self.lock()
            .slots
            .values()
            .filter(|(s, _)| matches!(s, Slot::Idle(_)))
            .count()
    }

    /// Removes the least recently used slots past the capacity and drops stale order
    /// entries; returns the removed slots, to be closed after the lock is released.
    fn evict(&self, inner: &mut Inner) -> Vec<Slot> {
        let mut evicted = Vec::new();
        while inner.slots.len() > self.capacity {
            let Some((id, stamp)) = inner.order.pop_front() else {
                break;
            };
            if inner.slots.get(&id).is_some_and(|(_, s)| *s == stamp) {
                if let Some((slot, _)) = inner.slots.remove(&id) {
                    evicted.push(slot);
                }
            }
        }
        // Stale entries (a slot used again, or forgotten) would pile up: compact now and then.
        if inner.order.len() > 4 * self.capacity.max(16) {
            let slots = &inner.slots;
            inner
                .order
                .retain(|(id, stamp)| slots.get(id).is_some_and(|(_, s)| s == stamp));
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn file() -> Arc<File> {
        Arc::new(tempfile::tempfile().unwrap())
    }

    #[test]
    fn a_forgotten_or_taken_over_slot_refuses_the_handle() {
        let cache = HandleCache::new(4);
        let (a, b) = (SessionId::random(), SessionId::random());
        let out = cache.check_out(&a);
        assert!(out.file.is_none());
        cache.forget(&a);
        cache.give_back(&a, out.token, file());
        assert!(
            cache.check_out(&a).file.is_none(),
            "a forgotten slot took a handle"
        );
        let first = cache.check_out(&b);
        let second = cache.check_out(&b);
        cache.give_back(&b, first.token, file());
        assert_eq!(
            cache.idle(),
            0,
            "a taken-over slot took the old writer's handle"
        );
        cache.give_back(&b, second.token, file());
        assert_eq!(cache.idle(), 1);
        assert!(cache.check_out(&b).file.is_some());
    }

    #[test]
    fn the_least_recently_used_go_past_the_capacity() {
        let cache = HandleCache::new(3);
        let ids: Vec<_> = (0..5).map(|_| SessionId::random()).collect();
        for id in &ids {
            let out = cache.check_out(id);
            cache.give_back(id, out.token, file());
        }
        assert_eq!(cache.idle(), 3);
        assert!(cache.check_out(&ids[0]).file.is_none());
        assert!(cache.check_out(&ids[4]).file.is_some());
        // Many reuses of one slot leave the order queue bounded.
        for _ in 0..1000 {
            let out = cache.check_out(&ids[4]);
            cache.give_back(&ids[4], out.token, file());
        }
        assert!(cache.lock().order.len() <= 4 * 16 + 1);
        cache.forget_all();
        assert_eq!(cache.idle(), 0);
    }
}
