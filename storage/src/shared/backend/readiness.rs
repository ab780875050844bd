//! Whether the object store takes this node's key, for `/readyz`.
//!
//! A node whose store refuses its key, secret or bucket fails every fragment (500): taken out
//! of the balancer, it no longer gets them, while nodes with a working configuration (in a
//! rolling change, say) go on. So readiness repeats the start-up check
//! ([`Objects::access`]: a listing, a small write and its delete) at most every
//! [`RECHECK_EVERY`], and a refusal makes the node not ready until a check passes. A store
//! that does not answer leaves the node ready: an outage hits every node alike, and taking
//! them all out of the balancer would not help (the clients retry their 503s).

use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::super::objects::{Access, Objects};
use crate::StorageError;

/// How long a check's answer stands before the next `/readyz` asks the store again.
pub(super) const RECHECK_EVERY: Duration = Duration::from_secs(5);

/// How long one check may take; longer counts as the store not answering.
const CHECK_WITHIN: Duration = Duration::from_secs(3);

/// A refusal, kept for the callers until the next check: what [`StorageError::ObjectStore`]
/// carries (the error itself is not `Clone`).
#[derive(Clone, Debug)]
struct Refusal {
    op: &'static str,
    key: String,
    why: String,
}

impl From<StorageError> for Refusal {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::ObjectStore { op, key, why } => Refusal { op, key, why },
            // Whatever else the store's answer was, its text says it.
            other => Refusal {
                op: "check access",
                key: String::new(),
                why: other.to_string(),
            },
        }
    }
}

impl Refusal {
    /// The error callers get while this refusal stands.
    fn error(self) -> StorageError {
        let Refusal { op, key, why } = self;
        StorageError::ObjectStore { op, key, why }
    }
}

/// The last check and when it ran (see the module docs).
#[derive(Debug, Default)]
pub(super) struct StoreAccess {
    last: Mutex<Option<(Instant, Option<Refusal>)>>,
}

impl StoreAccess {
    /// `Err` when the store refused the last check, run now if the one before is older than
    /// [`RECHECK_EVERY`] (one check at a time: concurrent callers wait for it).
    pub(super) async fn check(&self, objects: &Objects) -> Result<(), StorageError> {
        let mut last = self.last.lock().await;
        let refusal = match &*last {
            Some((at, refusal)) if at.elapsed() < RECHECK_EVERY => refusal.clone(),
            _ => {
                let refusal = match tokio::time::timeout(CHECK_WITHIN, objects.access()).await {
                    Ok(Access::Refused(e)) => Some(Refusal::from(e)),
                    // Granted, or no answer in time or at all: ready (see the module docs).
                    Ok(Access::Granted | Access::NoAnswer(_)) | Err(_) => None,
                };
                *last = Some((Instant::now(), refusal.clone()));
                refusal
            }
        };
        refusal.map_or(Ok(()), |refused| Err(refused.error()))
    }
}
