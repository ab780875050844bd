//! A node's memory of the sessions it touched last: what it created or committed a fragment
//! of, so that a later fragment of the session on the same node needs no load from
//! PostgreSQL before its body goes to the store.
//!
//! It is a hint, never the truth. A remembered record is used for a fragment that starts at
//! the `received` it remembers (this node wrote the session last) or past it (other nodes
//! have moved the session on since, as a round-robin balancer does: the client's offset is
//! then taken for the session's); never for one that starts before it (a re-send, which the
//! load sorts out). The fragment's commit advances the offset only if PostgreSQL still has
//! exactly the offset the fragment starts at, the session is still receiving and its total
//! is the one the fragment was checked against (the compare-and-set every fragment's commit
//! makes). So a record gone stale, or a client's offset that is not the session's (a gap),
//! costs one store write that is never referenced (its pending row lets the collector delete
//! it), and the packet is answered from the record that won, as a node without the memory
//! would answer it. Owner, route and mode never change, so a remembered record cannot let a
//! packet through that a loaded one would refuse.

use bitsd_protocol::SessionId;

use super::session_map::SessionMap;
use crate::{SessionRecord, SessionState};

/// Sessions remembered at most; a full memory forgets an arbitrary one per new entry.
const CAPACITY: usize = 4096;

/// See the module docs.
#[derive(Clone, Debug)]
pub(super) struct RecentSessions {
    inner: SessionMap<SessionRecord>,
}

impl Default for RecentSessions {
    fn default() -> Self {
        RecentSessions {
            inner: SessionMap::new(CAPACITY),
        }
    }
}

impl RecentSessions {
    /// The remembered record of `id` for a fragment starting at `first`, with `received` set
    /// to `first`: when the session was receiving and `first` is at or past its remembered
    /// `received` (and before its total, once known). `None` otherwise (the caller loads).
    pub(super) fn for_fragment(&self, id: &SessionId, first: u64) -> Option<SessionRecord> {
        self.inner
            .get_with(id, |r| {
                // A receiving record's `received` is below its total, so `first == received`
                // passes the last test too.
                let continues = r.state == SessionState::Receiving
                    && first >= r.received
                    && r.total.is_none_or(|t| first < t);
                continues.then(|| {
                    let mut r = r.clone();
                    r.received = first;
                    r
                })
            })
            .flatten()
    }

    /// Remembers `record` as this node last wrote it (only while it is receiving: a complete
    /// or ended session takes no more fragments, and is forgotten).
    pub(super) fn remember(&self, record: &SessionRecord) {
        if record.state != SessionState::Receiving {
            self.inner.remove(&record.id);
            return;
        }
        self.inner.insert(record.id, record.clone());
    }

    /// Forgets `id` (its commit lost, it ended, or it is gone).
    pub(super) fn forget(&self, id: &SessionId) {
        self.inner.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::UploadMode;

    fn record(received: u64, state: SessionState) -> SessionRecord {
        let mut r = SessionRecord::new(
            SessionId::random(),
            "/upload".into(),
            UploadMode::Upload,
            "http://h/upload/x".into(),
        );
        r.received = received;
        r.total = Some(100);
        r.state = state;
        r
    }

    #[test]
    fn a_fragment_at_or_past_the_remembered_offset_of_a_receiving_session_uses_it() {
        let recent = RecentSessions::default();
        let r = record(10, SessionState::Receiving);
        recent.remember(&r);
        assert_eq!(recent.for_fragment(&r.id, 10).map(|x| x.received), Some(10));
        assert_eq!(
            recent
                .for_fragment(&r.id, 40)
                .map(|x| (x.received, x.total, x.id)),
            Some((40, Some(100), r.id)),
            "past it: the client's offset, checked by the commit"
        );
        assert!(recent.for_fragment(&r.id, 0).is_none(), "a re-send loads");
        assert!(recent.for_fragment(&r.id, 9).is_none(), "an overlap loads");
        assert!(recent.for_fragment(&r.id, 100).is_none(), "at the total");
        assert!(recent.for_fragment(&r.id, 150).is_none(), "past the total");
        assert!(recent.for_fragment(&SessionId::random(), 10).is_none());
        recent.forget(&r.id);
        assert!(recent.for_fragment(&r.id, 10).is_none());
    }

    #[test]
    fn a_record_remembered_before_its_total_is_known_takes_any_offset_from_its_own() {
        let recent = RecentSessions::default();
        let mut r = record(0, SessionState::Receiving);
        r.total = None;
        recent.remember(&r);
        assert_eq!(recent.for_fragment(&r.id, 0).map(|x| x.received), Some(0));
        assert_eq!(recent.for_fragment(&r.id, 5).map(|x| x.received), Some(5));
    }

    #[test]
    fn a_session_that_is_not_receiving_is_forgotten() {
        let recent = RecentSessions::default();
        let mut r = record(10, SessionState::Receiving);
        recent.remember(&r);
        r.state = SessionState::Complete;
        r.received = 100;
        recent.remember(&r);
        assert!(recent.for_fragment(&r.id, 10).is_none());
        assert!(recent.for_fragment(&r.id, 100).is_none());
    }

    #[test]
    fn the_memory_stays_within_its_capacity() {
        let recent = RecentSessions::default();
        for _ in 0..CAPACITY + 10 {
            recent.remember(&record(0, SessionState::Receiving));
        }
        assert_eq!(recent.inner.len(), CAPACITY);
    }
}
