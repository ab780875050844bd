//! The node's budget for fragment bytes held in memory (`[object_store] fragment_memory`).
//!
//! A fragment on its way to the store holds bytes in memory: a fragment sent with one PUT
//! after its last byte holds all of them, a multipart one up to two parts, and a streamed one
//! (`stream_fragments`) keeps its bytes only for a second try should its stream break. Per
//! connection that is bounded (at most twice the part size), but without a budget a node's
//! memory would be the sum over every fragment in flight: clients on slow links that each
//! trickle a large fragment in would hold `max_connections` × that.
//!
//! - A fragment that **must** hold its bytes (not streamed, or long enough for a multipart
//!   upload) reserves the most it can hold, `min(length, 2 × part_size)`, before its body is
//!   read. All or nothing, so fragments never hold part of the budget while waiting for the
//!   rest (no fragment can starve another into a deadlock). When the budget has no room it
//!   waits at most `fragment_memory_wait_secs` (10 s by default), then fails with a transient error (503: the
//!   client retries later) before it has read a byte.
//! - A **streamed** fragment never waits: it keeps its bytes while the budget has room for
//!   them, a frame at a time, and when it has not, lets go of what it kept and goes on
//!   streaming without a second try (should that stream break, the fragment fails with a
//!   transient error instead of being sent again from memory).
//!
//! An upload's assembly streamed through the node, and a merge of fragments into one object
//! (`merge_parts_from`, `coalesce_fragments`), reserve like a fragment that must hold its
//! bytes ([`Objects::counted_writer`](super::Objects::counted_writer)), a merge with the
//! fragment objects it reads ahead of its writer
//! ([`Objects::put_stream_counted`](super::Objects::put_stream_counted)); a merge without
//! room fails and leaves its fragments as they are. A reply, whose length is not known
//! before it ends, is counted once past its first 64 KiB
//! ([`Objects::reply_writer`](super::Objects::reply_writer)): it then reserves the most it
//! can hold, 2 × the part size, the same way; a reply stored from a file reserves what it
//! will hold before its first byte.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::StorageError;

/// The budget counts in units of this many bytes (a semaphore's permits are counted in
/// `u32` per acquisition).
const UNIT: u64 = 1024;

/// Default of `fragment_memory`: 1 GiB.
pub const DEFAULT_FRAGMENT_MEMORY: u64 = 1 << 30;

/// How long a fragment that must hold its bytes waits for room by default
/// (`fragment_memory_wait_secs`).
pub(super) const DEFAULT_WAIT: Duration = Duration::from_secs(10);

/// Units for `bytes`, rounded up.
fn units(bytes: u64) -> u64 {
    bytes.div_ceil(UNIT)
}

/// One node's budget for fragment bytes in memory (cheap to clone: one shared count).
#[derive(Clone, Debug)]
pub struct FragmentMemory {
    room: Arc<Semaphore>,
    units: u64,
    wait: Duration,
}

impl FragmentMemory {
    /// A budget of `bytes` (at least one unit; at most what a semaphore counts).
    pub fn new(bytes: u64) -> Self {
        Self::with_wait(bytes, DEFAULT_WAIT)
    }

    /// As [`FragmentMemory::new`], waiting at most `wait` for room.
    pub fn with_wait(bytes: u64, wait: Duration) -> Self {
        let units = units(bytes).clamp(1, Semaphore::MAX_PERMITS as u64);
        FragmentMemory {
            room: Arc::new(Semaphore::new(units as usize)),
            units,
            wait,
        }
    }

    /// The budget in bytes.
    pub fn bytes(&self) -> u64 {
        self.units * UNIT
    }

    /// Bytes free now.
    pub fn free(&self) -> u64 {
        self.room.available_permits() as u64 * UNIT
    }

    /// The budget and the bytes reserved or held now.
    pub fn budget(&self) -> crate::MemoryBudget {
        crate::MemoryBudget {
            limit: self.bytes(),
            used: self.bytes().saturating_sub(self.free()),
        }
    }

    /// Reserves `bytes` (at most the whole budget), waiting up to the budget's wait (10 s by
    /// default) for room; a transient error when there is none by then. `key` names the fragment in
    /// the error.
    pub(crate) async fn reserve(&self, bytes: u64, key: &str) -> Result<Held, StorageError> {
        let want = units(bytes).min(self.units);
        let Ok(want32) = u32::try_from(want) else {
            // More than a semaphore hands out at once: only a budget of over 4 TiB.
            return Ok(Held::none());
        };
        match tokio::time::timeout(self.wait, Arc::clone(&self.room).acquire_many_owned(want32))
            .await
        {
            Ok(Ok(permit)) => Ok(Held {
                permit: Some(permit),
                bytes,
            }),
            // The semaphore is never closed; a timeout is the node being full.
            Ok(Err(_)) | Err(_) => Err(StorageError::Busy(format!(
                "fragment {key}: {bytes} bytes would not fit in the node's fragment memory \
                 ({} of {} bytes free after {} s); the client retries later. Raise \
                 [object_store] fragment_memory if the node has the memory",
                self.free(),
                self.bytes(),
                self.wait.as_secs()
            ))),
        }
    }

    /// Grows `held` to cover `bytes` if the budget has room now; `false` (and `held`
    /// unchanged) when it has not.
    pub(crate) fn try_grow(&self, held: &mut Held, bytes: u64) -> bool {
        let more = units(bytes).saturating_sub(units(held.bytes));
        if more == 0 {
            held.bytes = held.bytes.max(bytes);
            return true;
        }
        let Ok(more32) = u32::try_from(more) else {
            return false;
        };
        match Arc::clone(&self.room).try_acquire_many_owned(more32) {
            Ok(permit) => {
                match held.permit.as_mut() {
                    Some(p) => p.merge(permit),
                    None => held.permit = Some(permit),
                }
                held.bytes = bytes;
                true
            }
            Err(_) => false,
        }
    }
}

/// Budget held by one fragment; given back when dropped.
#[derive(Debug)]
pub(crate) struct Held {
    permit: Option<OwnedSemaphorePermit>,
    /// The bytes the permit covers.
    bytes: u64,
}

impl Held {
    /// Nothing held.
    pub(crate) fn none() -> Self {
        Held {
            permit: None,
            bytes: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_are_all_or_nothing_and_come_back_when_dropped() {
        let budget = FragmentMemory::with_wait(10 * 1024, Duration::from_millis(50));
        let a = budget.reserve(6 * 1024, "a").await.unwrap();
        assert_eq!(budget.free(), 4 * 1024);
        let refused = budget.reserve(6 * 1024, "b").await.unwrap_err();
        assert!(refused.is_transient(), "{refused}");
        assert!(refused.to_string().contains("fragment_memory"), "{refused}");
        // The refused reservation took nothing.
        assert_eq!(budget.free(), 4 * 1024);
        drop(a);
        assert_eq!(budget.free(), 10 * 1024);
        let b = budget.reserve(6 * 1024, "b").await.unwrap();
        drop(b);
        // More than the budget reserves the whole budget (it fits alone).
        let all = budget.reserve(1 << 40, "huge").await.unwrap();
        assert_eq!(budget.free(), 0);
        drop(all);
    }

    #[tokio::test]
    async fn a_waiting_reservation_gets_room_when_it_frees() {
        let budget = FragmentMemory::with_wait(8 * 1024, Duration::from_secs(5));
        let a = budget.reserve(8 * 1024, "a").await.unwrap();
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve(4 * 1024, "b").await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(a);
        waiter.await.unwrap().unwrap();
    }

    #[test]
    fn growing_takes_only_what_is_free_and_never_waits() {
        let budget = FragmentMemory::new(4 * 1024);
        let mut held = Held::none();
        assert!(budget.try_grow(&mut held, 1));
        assert!(budget.try_grow(&mut held, 1024));
        assert_eq!(budget.free(), 3 * 1024);
        assert!(budget.try_grow(&mut held, 4 * 1024));
        assert!(!budget.try_grow(&mut held, 4 * 1024 + 1));
        assert_eq!(budget.free(), 0);
        drop(held);
        assert_eq!(budget.free(), 4 * 1024);
    }
}
