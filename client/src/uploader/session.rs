//! One server session: its id, where its packets go, and Host-Id redirection (§8).

use std::time::{Duration, Instant};

use http::header::HeaderValue;

use crate::target::Target;

/// Host-Id redirection state of a session (§8).
pub(crate) struct HostId {
    pub(crate) fallback: Option<Duration>,
    pub(crate) first_failure: Option<Instant>,
}

pub(crate) struct Session {
    pub(crate) id: String,
    pub(crate) id_header: HeaderValue,
    pub(crate) original: Target,
    pub(crate) target: Target,
    pub(crate) host_id: Option<HostId>,
    pub(crate) needs_ping: bool,
    pub(crate) acked: u64,
}

impl Session {
    pub(crate) fn new(id: String, original: Target) -> Self {
        Session {
            id,
            id_header: HeaderValue::from_static(""),
            target: original.clone(),
            original,
            host_id: None,
            needs_ping: false,
            acked: 0,
        }
    }

    /// An HTTP response came back from the current target: the fallback timer resets.
    pub(crate) fn reachable(&mut self) {
        if let Some(hid) = self.host_id.as_mut() {
            hid.first_failure = None;
        }
    }

    /// The current target could not be reached. Returns true when the client fell back to the
    /// original URL.
    pub(crate) fn unreachable(&mut self) -> bool {
        let Some(hid) = self.host_id.as_mut() else {
            return false;
        };
        let first = *hid.first_failure.get_or_insert_with(Instant::now);
        match hid.fallback {
            Some(t) if first.elapsed() >= t => {
                self.target = self.original.clone();
                self.host_id = None;
                self.needs_ping = false;
                true
            }
            _ => false,
        }
    }
}
