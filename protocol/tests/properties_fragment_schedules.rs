//! Property tests for the fragment state machine of `bitsd-protocol` (BITS-UPLOAD.md §5): a
//! simulated server (an [`UploadProgress`] plus an in-memory "disk") fed arbitrary client
//! schedules (random sizes, duplicates, overlaps, gaps, lost Acks, re-sent final fragments),
//! then finished the way a BITS client resumes from `BITS-Received-Content-Range`.
#![allow(clippy::unwrap_used)]

use bitsd_protocol::{
    decide_fragment, ContentRange, FragmentDecision, UploadLimits, UploadProgress,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// `len` pseudo-random bytes from `seed` (xorshift64*). A seed plus a length shrinks far better
/// than a 20 000-element `Vec<u8>` strategy and still gives every offset a distinct-looking byte.
fn file_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// Where a client fragment starts, relative to the state of the simulation.
#[derive(Clone, Debug)]
enum Start {
    /// At the last offset the client saw acknowledged: the normal in-order send. After a lost
    /// Ack this is an overlap with bytes the server already holds.
    Next,
    /// Before the server's `received` (overlap / duplicate of held bytes).
    Overlap(u64),
    /// Past the server's `received` (out of order).
    Gap(u64),
    /// Exactly a fragment sent earlier (a duplicate).
    Duplicate(usize),
    /// A fragment ending at the end of the file (a final fragment, possibly re-sent).
    Final,
    /// Anywhere in the file.
    Anywhere(u64),
}

/// One fragment of a client schedule.
#[derive(Clone, Debug)]
struct Step {
    start: Start,
    /// Wanted length; clipped to the end of the file.
    len: u64,
    /// The Ack never reaches the client, so it does not learn the new offset.
    ack_lost: bool,
}

fn fragment_len() -> impl Strategy<Value = u64> {
    prop_oneof![3 => 1u64..=16, 4 => 1u64..=2048, 3 => 1u64..=25_000]
}

fn step() -> impl Strategy<Value = Step> {
    let start = prop_oneof![
        4 => Just(Start::Next),
        2 => any::<u64>().prop_map(Start::Overlap),
        2 => any::<u64>().prop_map(Start::Gap),
        1 => any::<usize>().prop_map(Start::Duplicate),
        1 => Just(Start::Final),
        1 => any::<u64>().prop_map(Start::Anywhere),
    ];
    (start, fragment_len(), prop::bool::weighted(0.25)).prop_map(|(start, len, ack_lost)| Step {
        start,
        len,
        ack_lost,
    })
}

fn file_len() -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(0usize), 3 => 1usize..=64, 6 => 0usize..=20_000]
}

/// `len` bytes from `first` in an upload of `total` (> 0) bytes; `len` is clipped to the end.
fn clipped(first: u64, len: u64, total: u64) -> Result<ContentRange, TestCaseError> {
    let len = len.clamp(1, total - first);
    ContentRange::new(first, first + len - 1, total)
        .ok_or_else(|| TestCaseError::fail(format!("bad simulated range {first}+{len}/{total}")))
}

/// The server side of the simulation.
struct Server<'f> {
    file: &'f [u8],
    progress: UploadProgress,
    disk: Vec<u8>,
    last_ack: u64,
    /// How many writes said they completed the upload.
    completions: u32,
}

impl Server<'_> {
    fn total(&self) -> u64 {
        self.file.len() as u64
    }

    /// Handles one fragment whose body is the file's bytes at `range`; checks every §5
    /// invariant and returns the decision and the Ack's `BITS-Received-Content-Range`.
    fn fragment(&mut self, range: &ContentRange) -> Result<(FragmentDecision, u64), TestCaseError> {
        let total = self.total();
        let before = self.progress;
        let decision = decide_fragment(&before, range, &UploadLimits::default())
            .map_err(|e| TestCaseError::fail(format!("{range} refused at {before:?}: {e}")))?;
        let body = usize::try_from(range.first)
            .ok()
            .zip(usize::try_from(range.end()).ok())
            .and_then(|(a, b)| self.file.get(a..b))
            .ok_or_else(|| TestCaseError::fail(format!("{range} outside the file")))?;

        prop_assert_eq!(
            matches!(decision, FragmentDecision::Gap { .. }),
            range.first > before.received,
            "Gap exactly when first > received: {} at {:?} gave {:?}",
            range,
            before,
            decision
        );
        if before.is_complete() && range.is_final() {
            prop_assert!(
                matches!(
                    decision,
                    FragmentDecision::AlreadyHeld {
                        final_resend: true,
                        ..
                    }
                ),
                "re-sent final fragment {} of a complete upload gave {:?}",
                range,
                decision
            );
        }

        let ack = match decision {
            FragmentDecision::Write(w) => {
                prop_assert_eq!(
                    w.write_at,
                    self.disk.len() as u64,
                    "not append-only: {:?}",
                    w
                );
                prop_assert_eq!(w.write_at, before.received);
                prop_assert_eq!(w.skip, before.received - range.first);
                prop_assert_eq!(w.skip.checked_add(w.len), Some(range.len), "{:?}", w);
                prop_assert!(w.len > 0 || total == 0, "empty write {:?}", w);
                prop_assert_eq!(w.total, total);
                prop_assert_eq!(Some(w.received_after), w.write_at.checked_add(w.len));
                prop_assert_eq!(w.completes, w.received_after == total);
                let skip =
                    usize::try_from(w.skip).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let len = usize::try_from(w.len).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let new = body
                    .get(skip..skip + len)
                    .ok_or_else(|| TestCaseError::fail(format!("{w:?} outside the body")))?;
                self.disk.extend_from_slice(new);
                self.progress = w.progress_after();
                self.completions += u32::from(w.completes);
                w.received_after
            }
            FragmentDecision::AlreadyHeld {
                received,
                final_resend,
            } => {
                prop_assert_eq!(received, before.received);
                prop_assert!(
                    range.end() <= received,
                    "{} not held at {:?}",
                    range,
                    before
                );
                prop_assert_eq!(
                    final_resend,
                    before.is_complete(),
                    "final_resend flag for {} at {:?}",
                    range,
                    before
                );
                received
            }
            FragmentDecision::Gap { received } => {
                prop_assert_eq!(received, before.received);
                received
            }
        };

        let held = self.disk.len();
        prop_assert_eq!(
            ack,
            held as u64,
            "Ack offset is not the contiguous prefix held"
        );
        prop_assert_eq!(self.progress.received, held as u64);
        prop_assert!(held <= self.file.len());
        if let Some(i) = self.disk.iter().zip(self.file).position(|(d, f)| d != f) {
            prop_assert!(
                false,
                "disk differs from the file at byte {} after {}",
                i,
                range
            );
        }
        prop_assert!(
            ack >= self.last_ack,
            "Ack went backwards: {} then {}",
            self.last_ack,
            ack
        );
        self.last_ack = ack;
        if let Some(t) = self.progress.total {
            prop_assert_eq!(t, total);
        }
        prop_assert_eq!(
            self.progress.is_complete(),
            self.progress.total.is_some() && held == self.file.len()
        );
        Ok((decision, ack))
    }
}

/// The concrete range a step sends, given the server's and the client's view.
fn step_range(
    step: &Step,
    total: u64,
    received: u64,
    client_ack: u64,
    sent: &[ContentRange],
) -> Result<ContentRange, TestCaseError> {
    if total == 0 {
        return Ok(ContentRange::empty_upload());
    }
    let first = match step.start {
        Start::Next => client_ack.min(total - 1),
        Start::Overlap(back) if received > 0 => received - 1 - back % received,
        Start::Overlap(_) => 0,
        Start::Gap(ahead) if total - received >= 2 => received + 1 + ahead % (total - received - 1),
        Start::Gap(ahead) => ahead % total,
        Start::Duplicate(pick) if !sent.is_empty() => return Ok(sent[pick % sent.len()]),
        Start::Duplicate(_) => client_ack.min(total - 1),
        Start::Final => total - step.len.min(total),
        Start::Anywhere(at) => at % total,
    };
    clipped(first, step.len, total)
}

fn simulate(file: &[u8], steps: &[Step], finish_len: u64) -> Result<(), TestCaseError> {
    let total = file.len() as u64;
    let mut server = Server {
        file,
        progress: UploadProgress::new(),
        disk: Vec::new(),
        last_ack: 0,
        completions: 0,
    };
    let mut client_ack = 0u64;
    let mut sent = Vec::new();

    for step in steps {
        let range = step_range(step, total, server.progress.received, client_ack, &sent)?;
        sent.push(range);
        let (_, ack) = server.fragment(&range)?;
        if !step.ack_lost {
            client_ack = ack;
        }
    }

    // The client finishes: it resumes from the last BITS-Received-Content-Range it saw (on a
    // 200 and a 416 alike) until the server acknowledges the whole file.
    if total == 0 {
        let (decision, ack) = server.fragment(&ContentRange::empty_upload())?;
        prop_assert!(
            matches!(
                decision,
                FragmentDecision::Write(w) if w.completes && w.len == 0
            ) || matches!(
                decision,
                FragmentDecision::AlreadyHeld {
                    final_resend: true,
                    ..
                }
            ),
            "zero-byte upload finished with {:?}",
            decision
        );
        prop_assert_eq!(ack, 0);
    } else {
        let mut offset = client_ack;
        let mut rounds = 0u64;
        while offset < total {
            rounds += 1;
            prop_assert!(rounds <= total, "client made no progress from {}", offset);
            let range = clipped(offset, finish_len, total)?;
            let (_, ack) = server.fragment(&range)?;
            prop_assert!(
                ack > offset,
                "resume from {} with {} gave Ack {}",
                offset,
                range,
                ack
            );
            offset = ack;
        }
    }
    // Completion (§5.7) is decided by exactly one write; every later fragment ending at the end
    // of the file is flagged as a re-sent final fragment instead (checked in `fragment`).
    prop_assert_eq!(server.completions, 1, "writes that completed the upload");
    prop_assert!(server.progress.is_complete(), "{:?}", server.progress);
    prop_assert_eq!(server.progress.total, Some(total));
    prop_assert!(
        server.disk == file,
        "assembled upload differs from the file"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any schedule of fragments leaves an append-only, byte-exact prefix of the file on disk,
    /// Acks exactly that prefix, and a client resuming from its last Ack completes the upload.
    #[test]
    fn fragment_schedules_assemble_the_file(
        len in file_len(),
        seed in any::<u64>(),
        steps in prop::collection::vec(step(), 0..48),
        finish_len in fragment_len(),
    ) {
        let file = file_bytes(len, seed);
        simulate(&file, &steps, finish_len)?;
    }
}
