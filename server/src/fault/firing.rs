//! Which rule fires on a request: occurrence counters, the rules' seeded draws.

use super::facts::Facts;
use super::occurrences::Occurrences;
use super::plan::FaultAction;
use super::service::FaultInjectingService;

/// SplitMix64: small, fast and good enough for fault probabilities; one stream per rule.
#[derive(Debug)]
pub(super) struct SplitMix64(pub(super) u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug)]
pub(super) struct RuleState {
    pub(super) fired: u32,
    pub(super) rng: SplitMix64,
}

/// Occurrence counters and rule state, behind one lock.
#[derive(Debug)]
pub(super) struct PlanState {
    pub(super) counts: Occurrences,
    pub(super) rules: Vec<RuleState>,
}

/// A fault that fired.
#[derive(Clone, Debug)]
pub(super) struct Fired {
    pub(super) label: String,
    pub(super) action: FaultAction,
}

impl FaultInjectingService {
    /// How many times each rule has fired so far, in plan order.
    pub fn fired(&self) -> Vec<u32> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.rules.iter().map(|r| r.fired).collect()
    }

    /// Sessions whose occurrence counters are kept (bounded; see `occurrences.rs`).
    pub fn counted_sessions(&self) -> usize {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.counts.sessions()
    }

    /// The session ended (Close-Session or Cancel-Session answered): its counters may go.
    pub(super) fn session_ended(&self, session: &str) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.counts.ended(session);
    }

    /// Counts the request and picks the fault that fires on it, if any.
    pub(super) fn decide(&self, facts: &Facts) -> Option<Fired> {
        let packet = facts.packet?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let n = st.counts.count(packet, facts.session_key.as_deref());
        for (i, rule) in self.plan.rules.iter().enumerate() {
            if rule.packet != packet
                || rule.nth.is_some_and(|nth| nth != n)
                || rule
                    .path
                    .as_deref()
                    .is_some_and(|p| !facts.path.starts_with(p))
            {
                continue;
            }
            match (&rule.action, facts.fragment) {
                (FaultAction::TooLarge { above }, Some(r)) if r.len <= *above => continue,
                (FaultAction::TooLarge { .. }, None) => continue,
                (FaultAction::FailHandler { .. }, Some(r)) if !r.is_final() => continue,
                (FaultAction::FailHandler { .. }, None) => continue,
                // A 416 naming the very offset the fragment starts at would contradict itself.
                (FaultAction::Resync { offset }, Some(r)) if r.first == *offset => continue,
                _ => {}
            }
            let state = &mut st.rules[i];
            if rule.times != 0 && state.fired >= rule.times {
                continue;
            }
            if let Some(p) = rule.probability {
                if state.rng.next_f64() >= p {
                    continue;
                }
            }
            state.fired += 1;
            return Some(Fired {
                label: rule.label(),
                action: rule.action.clone(),
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_seeded() {
        let draws = |seed: u64| {
            let mut r = SplitMix64(seed);
            (0..8).map(|_| r.next_f64()).collect::<Vec<_>>()
        };
        assert_eq!(draws(42), draws(42));
        assert_ne!(draws(42), draws(43));
        assert!(draws(7).iter().all(|x| (0.0..1.0).contains(x)));
    }
}
