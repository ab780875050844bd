//! The recovery a conforming client shows after each fault, read off the transcript.

use bitsd::TranscriptEntry;
use bitsd_client::{is_transient_status, ErrorContext};

use super::{content_range, Run};

/// The recovery a conforming client shows after each fault, checked on every faulted entry.
pub fn assert_recovery(run: &Run) {
    for (i, e) in run.entries.iter().enumerate() {
        let Some(kind) = e.fault.as_deref() else {
            continue;
        };
        let next = run.entries.get(i + 1);
        let ctx = |e: &TranscriptEntry| {
            e.error_context
                .as_deref()
                .and_then(|c| u32::from_str_radix(c.trim_start_matches("0x"), 16).ok())
                .map_or(ErrorContext::RemoteFile, ErrorContext::from_value)
        };
        let same_again = |why: &str| {
            let n = next.unwrap_or_else(|| panic!("{}: nothing after {kind} ({why})", run.name));
            // A new Create-Session has no session yet; every other packet names its session.
            let session = |x: &TranscriptEntry| {
                (x.packet != "Create-Session")
                    .then(|| x.session.clone())
                    .flatten()
            };
            assert_eq!(
                (n.packet.as_str(), n.range.as_deref(), session(n)),
                (e.packet.as_str(), e.range.as_deref(), session(e)),
                "{}: after {kind} ({why}) the client must send the same request again",
                run.name
            );
        };
        // A request the client got no answer to is sent again (Fragment: the same range).
        if !e.answered {
            same_again("no answer");
            continue;
        }
        match (kind, e.status) {
            ("forget-session" | "expire-session", _) if e.packet == "Fragment" => {
                let n = next.unwrap();
                assert_eq!(
                    n.packet, "Create-Session",
                    "{}: session-not-found must restart with Create-Session",
                    run.name
                );
            }
            ("resync", _) => {
                let n = next.unwrap();
                assert_eq!(n.packet, "Fragment", "{}", run.name);
                assert_eq!(
                    Some(content_range(n).0),
                    e.received,
                    "{}: after 416 the client continues at BITS-Received-Content-Range",
                    run.name
                );
            }
            ("too-large", _) if content_range(e).1 > content_range(e).0 => {
                let n = next.unwrap();
                let (a, b, _) = content_range(e);
                let (na, nb, _) = content_range(n);
                let len = b - a + 1;
                assert_eq!(
                    (na, nb - na + 1),
                    (a, len / 2),
                    "{}: after 413 the same offset with half the fragment",
                    run.name
                );
            }
            ("truncate", _) => {
                let n = next.unwrap();
                assert_eq!(n.packet, "GET", "{}", run.name);
                let cut: u64 = e
                    .rule
                    .as_deref()
                    .and_then(|r| r.split("truncate=").nth(1))
                    .and_then(|r| r.split(',').next())
                    .unwrap()
                    .parse()
                    .unwrap();
                let start = |x: &TranscriptEntry| -> u64 {
                    x.range.as_deref().map_or(0, |r| {
                        r.trim_start_matches("bytes=")
                            .split('-')
                            .next()
                            .unwrap()
                            .parse()
                            .unwrap()
                    })
                };
                assert_eq!(
                    start(n),
                    start(e) + cut,
                    "{}: the reply download resumes where the cut left it",
                    run.name
                );
            }
            (_, Some(status)) if status >= 300 && e.packet != "Close-Session" => {
                if is_transient_status(status, ctx(e)) {
                    same_again("transient error");
                } else if e.packet != "Create-Session" && e.packet != "Cancel-Session" {
                    let n = next.unwrap();
                    assert_eq!(
                        n.packet, "Cancel-Session",
                        "{}: after a fatal error the client cancels its session",
                        run.name
                    );
                }
            }
            _ => {}
        }
    }
}
