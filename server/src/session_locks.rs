//! One async lock per session: a reconnecting client may race its own in-flight fragment.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use bitsd_protocol::SessionId;
use tokio::sync::OwnedMutexGuard;

/// The lock table. Entries live as long as someone holds or waits for them.
#[derive(Default)]
pub(crate) struct SessionLocks {
    table: Mutex<HashMap<SessionId, Weak<tokio::sync::Mutex<()>>>>,
}

/// Held while a packet of the session is processed.
pub(crate) type SessionGuard = OwnedMutexGuard<()>;

impl SessionLocks {
    /// Waits for exclusive use of the session.
    pub(crate) async fn lock(&self, id: SessionId) -> SessionGuard {
        let lock = {
            let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(existing) = table.get(&id).and_then(Weak::upgrade) {
                existing
            } else {
                if table.len() >= 1024 && table.len().is_power_of_two() {
                    table.retain(|_, w| w.strong_count() > 0);
                }
                let fresh = Arc::new(tokio::sync::Mutex::new(()));
                table.insert(id, Arc::downgrade(&fresh));
                fresh
            }
        };
        lock.lock_owned().await
    }
}
