//! How many times each kind of request has been seen: overall for Ping and Create-Session, per
//! session for the rest (the `nth` of a rule). Bounded: the session ids come from clients.

use std::collections::{BTreeMap, HashMap};

use super::plan::FaultPacket;

/// Sessions whose counters are kept at most; past it the least recently seen are forgotten
/// (a rule's `nth` then counts that session from 1 again).
pub(super) const MAX_SESSIONS: usize = 10_000;

/// Ended sessions (answered Close-Session or Cancel-Session) whose counters are kept for a
/// while, so that a client re-sending its Close after a lost Ack is still counted as `#2`.
pub(super) const KEEP_ENDED: usize = 1_000;

const PACKETS: usize = 7;

fn slot(packet: FaultPacket) -> usize {
    match packet {
        FaultPacket::Ping => 0,
        FaultPacket::CreateSession => 1,
        FaultPacket::Fragment => 2,
        FaultPacket::CloseSession => 3,
        FaultPacket::CancelSession => 4,
        FaultPacket::Get => 5,
        FaultPacket::Head => 6,
    }
}

#[derive(Debug)]
struct SessionCounts {
    counts: [u64; PACKETS],
    /// The tick of its last use (its key in `Occurrences::by_use`).
    used: u64,
    /// The tick it ended at (its key in `Occurrences::ended`), if it did.
    ended: Option<u64>,
}

/// The occurrence counters.
#[derive(Debug)]
pub(super) struct Occurrences {
    overall: [u64; PACKETS],
    sessions: HashMap<String, SessionCounts>,
    /// Sessions by last use, oldest first.
    by_use: BTreeMap<u64, String>,
    /// Ended sessions by end, oldest first.
    ended: BTreeMap<u64, String>,
    tick: u64,
    max_sessions: usize,
    keep_ended: usize,
}

impl Default for Occurrences {
    fn default() -> Self {
        Self::with_limits(MAX_SESSIONS, KEEP_ENDED)
    }
}

impl Occurrences {
    /// Counters that keep at most `max_sessions` sessions, of which `keep_ended` ended ones.
    pub(super) fn with_limits(max_sessions: usize, keep_ended: usize) -> Self {
        Occurrences {
            overall: [0; PACKETS],
            sessions: HashMap::new(),
            by_use: BTreeMap::new(),
            ended: BTreeMap::new(),
            tick: 0,
            max_sessions: max_sessions.max(1),
            keep_ended,
        }
    }

    /// Counts one request; its number (from 1) among requests of its kind (in its session).
    pub(super) fn count(&mut self, packet: FaultPacket, session: Option<&str>) -> u64 {
        let Some(key) = session else {
            let c = &mut self.overall[slot(packet)];
            *c += 1;
            return *c;
        };
        self.tick += 1;
        let tick = self.tick;
        let n = match self.sessions.get_mut(key) {
            Some(s) => {
                self.by_use.remove(&s.used);
                s.used = tick;
                s.counts[slot(packet)] += 1;
                s.counts[slot(packet)]
            }
            None => {
                let mut counts = [0; PACKETS];
                counts[slot(packet)] = 1;
                self.sessions.insert(
                    key.to_owned(),
                    SessionCounts {
                        counts,
                        used: tick,
                        ended: None,
                    },
                );
                1
            }
        };
        self.by_use.insert(tick, key.to_owned());
        while self.sessions.len() > self.max_sessions {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            self.forget(&oldest);
        }
        n
    }

    /// The session ended: its counters go once [`KEEP_ENDED`] later sessions ended.
    pub(super) fn ended(&mut self, session: &str) {
        self.tick += 1;
        let tick = self.tick;
        let Some(s) = self.sessions.get_mut(session) else {
            return;
        };
        if let Some(before) = s.ended.replace(tick) {
            self.ended.remove(&before);
        }
        self.ended.insert(tick, session.to_owned());
        while self.ended.len() > self.keep_ended {
            let Some((_, oldest)) = self.ended.pop_first() else {
                break;
            };
            self.forget(&oldest);
        }
    }

    fn forget(&mut self, session: &str) {
        if let Some(s) = self.sessions.remove(session) {
            self.by_use.remove(&s.used);
            if let Some(e) = s.ended {
                self.ended.remove(&e);
            }
        }
    }

    /// Sessions with counters.
    pub(super) fn sessions(&self) -> usize {
        self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_overall_and_per_session() {
        let mut o = Occurrences::default();
        assert_eq!(o.count(FaultPacket::Ping, None), 1);
        assert_eq!(o.count(FaultPacket::Ping, None), 2);
        assert_eq!(o.count(FaultPacket::Fragment, Some("a")), 1);
        assert_eq!(o.count(FaultPacket::Fragment, Some("b")), 1);
        assert_eq!(o.count(FaultPacket::Fragment, Some("a")), 2);
        assert_eq!(o.count(FaultPacket::CloseSession, Some("a")), 1);
    }

    #[test]
    fn client_supplied_ids_cannot_grow_the_counters_without_bound() {
        let mut o = Occurrences::with_limits(100, 10);
        for i in 0..5_000 {
            o.count(
                FaultPacket::Get,
                Some(&format!("{{{i:08x}-0000-0000-0000-000000000000}}")),
            );
            assert!(o.sessions() <= 100);
        }
        assert_eq!(o.sessions(), 100);
        assert_eq!(o.by_use.len(), 100);
        // The defaults bound it too.
        let mut o = Occurrences::default();
        for i in 0..(MAX_SESSIONS + 5_000) {
            o.count(FaultPacket::Head, Some(&i.to_string()));
        }
        assert_eq!(o.sessions(), MAX_SESSIONS);
    }

    #[test]
    fn the_least_recently_seen_session_is_forgotten_first() {
        let mut o = Occurrences::with_limits(2, 10);
        o.count(FaultPacket::Fragment, Some("a"));
        o.count(FaultPacket::Fragment, Some("b"));
        o.count(FaultPacket::Fragment, Some("a"));
        o.count(FaultPacket::Fragment, Some("c"));
        assert_eq!(
            o.count(FaultPacket::Fragment, Some("a")),
            3,
            "a was used last"
        );
        assert_eq!(
            o.count(FaultPacket::Fragment, Some("b")),
            1,
            "b was forgotten"
        );
    }

    #[test]
    fn ended_sessions_are_evicted_after_later_ends_but_survive_a_retry() {
        let mut o = Occurrences::with_limits(1_000, 2);
        o.count(FaultPacket::CloseSession, Some("a"));
        o.ended("a");
        // The client re-sends its Close after a lost Ack: still the second one.
        assert_eq!(o.count(FaultPacket::CloseSession, Some("a")), 2);
        for s in ["b", "c"] {
            o.count(FaultPacket::CloseSession, Some(s));
            o.ended(s);
        }
        assert_eq!(o.sessions(), 2, "a went with the later ends");
        assert_eq!(o.ended.len(), 2);
        assert_eq!(o.count(FaultPacket::CloseSession, Some("a")), 1);
        o.ended("unknown");
        assert_eq!(o.ended.len(), 2);
    }
}
