//! [`SessionMap`]: what a node keeps in memory per session (`recent.rs`, the reply journals
//! of `journal.rs`), bounded so that sessions this node never hears the end of cannot grow it
//! for the node's life.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bitsd_protocol::SessionId;

/// A map from sessions to `V`, shared by its clones, holding at most `capacity` entries: a
/// full map forgets an arbitrary entry for each new one.
#[derive(Debug)]
pub(super) struct SessionMap<V> {
    inner: Arc<Mutex<HashMap<SessionId, V>>>,
    capacity: usize,
}

impl<V> Clone for SessionMap<V> {
    fn clone(&self) -> Self {
        SessionMap {
            inner: Arc::clone(&self.inner),
            capacity: self.capacity,
        }
    }
}

impl<V> SessionMap<V> {
    /// An empty map of at most `capacity` entries.
    pub(super) fn new(capacity: usize) -> Self {
        SessionMap {
            inner: Arc::default(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SessionId, V>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `f` makes of the entry of `id`, if there is one.
    pub(super) fn get_with<R>(&self, id: &SessionId, f: impl FnOnce(&V) -> R) -> Option<R> {
        self.lock().get(id).map(f)
    }

    /// Sets the entry of `id` to `value` (a full map first forgets another entry).
    pub(super) fn insert(&self, id: SessionId, value: V) {
        let mut map = self.lock();
        if map.len() >= self.capacity && !map.contains_key(&id) {
            if let Some(any) = map.keys().next().copied() {
                map.remove(&any);
            }
        }
        map.insert(id, value);
    }

    /// Takes the entry of `id` out, if there is one.
    pub(super) fn remove(&self, id: &SessionId) -> Option<V> {
        self.lock().remove(id)
    }

    /// How many entries there are.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    /// The sessions that have an entry.
    #[cfg(test)]
    pub(super) fn ids(&self) -> Vec<SessionId> {
        self.lock().keys().copied().collect()
    }
}
