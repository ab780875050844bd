//! The test server mode: the bitsd client against a fault-injecting server, for every fault
//! kind of the fault plan. Every run must end with the exact file uploaded and the exact reply
//! downloaded, or, for a fatal fault, with the error a Windows client reports; and the
//! transcript must show the recovery path the client took.
#![allow(clippy::unwrap_used)]

mod fault_support;

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use bitsd::{FaultPlan, FaultRule};
use bitsd_client::{ClientError, ErrorContext};
use futures_util::{FutureExt, StreamExt};

use fault_support::*;

enum Expect {
    /// The job succeeds; then this check.
    Done(fn(&Run)),
    /// The job fails with this HRESULT, name, context and HTTP status; then this check.
    Fails(u32, &'static str, ErrorContext, u16, fn(&Run)),
}

struct Case {
    name: &'static str,
    faults: &'static [&'static str],
    mode: Mode,
    ping_first: bool,
    request_timeout: Duration,
    expect: Expect,
}

fn case(name: &'static str, faults: &'static [&'static str], expect: Expect) -> Case {
    Case {
        name,
        faults,
        mode: Mode::Echo,
        ping_first: false,
        request_timeout: Duration::from_secs(20),
        expect,
    }
}

fn matrix() -> Vec<Case> {
    use ErrorContext::{RemoteApplication, RemoteFile};
    vec![
        case(
            "drop Create-Session",
            &["Create-Session#1:drop"],
            Expect::Done(|r| {
                let cs = r.of("Create-Session");
                assert_eq!(cs.len(), 2);
                assert_eq!((cs[0].status, cs[0].answered), (None, false));
                assert_eq!(cs[1].status, Some(200));
            }),
        ),
        case(
            "drop-after",
            &["Fragment#2:drop-after=1000"],
            Expect::Done(|r| {
                let (_, e) = r.faulted("drop-after");
                assert_eq!((e.status, e.answered), (None, false));
                assert!(e
                    .detail
                    .as_deref()
                    .unwrap()
                    .contains("cut after 1000 bytes"));
                assert_eq!(content_range(e).0, FRAG);
                assert_eq!(r.of("Fragment").len(), 5);
            }),
        ),
        case(
            "lose-ack Fragment",
            &["Fragment#2:lose-ack"],
            Expect::Done(|r| {
                let (i, e) = r.faulted("lose-ack");
                // Stored and acknowledged by the server, but the Ack never left.
                assert_eq!(
                    (e.status, e.received, e.answered),
                    (Some(200), Some(2 * FRAG), false)
                );
                let again = r.after(i);
                assert_eq!((again.status, again.received), (Some(200), Some(2 * FRAG)));
                assert_eq!(r.outcome().restarts, 0);
            }),
        ),
        case(
            "lose-ack Create-Session",
            &["Create-Session#1:lose-ack"],
            Expect::Done(|r| {
                let cs = r.of("Create-Session");
                assert_eq!(cs.len(), 2);
                assert!(!cs[0].answered && cs[1].answered);
                assert_ne!(
                    cs[0].session, cs[1].session,
                    "the lost Ack's session is an orphan"
                );
                assert!(r.of("Fragment").iter().all(|f| f.session == cs[1].session));
            }),
        ),
        case(
            "lose-ack Close-Session",
            &["Close-Session#1:lose-ack"],
            Expect::Done(|r| {
                let cl = r.of("Close-Session");
                assert_eq!(cl.len(), 2, "the client re-sends Close-Session");
                assert_eq!((cl[0].status, cl[0].answered), (Some(200), false));
                // The tombstone answers the repeat with 200 (§4.4).
                assert_eq!((cl[1].status, cl[1].answered), (Some(200), true));
                assert!(r.outcome().closed);
            }),
        ),
        case(
            "lose-ack HEAD",
            &["HEAD#1:lose-ack"],
            Expect::Done(|r| {
                assert_eq!(r.of("HEAD").len(), 2);
            }),
        ),
        case(
            "status 503 Fragment",
            &["Fragment#2:status=503"],
            Expect::Done(|r| {
                let (_, e) = r.faulted("status");
                assert_eq!(
                    (
                        e.status,
                        e.error_code.as_deref(),
                        e.error_context.as_deref()
                    ),
                    (Some(503), Some("0x801901f7"), Some("0x5"))
                );
                assert!(r.outcome().retries >= 1);
            }),
        ),
        case(
            "status 502 without BITS headers",
            &["Fragment#1:status=502,code=none"],
            Expect::Done(|r| {
                let (_, e) = r.faulted("status");
                assert_eq!((e.status, e.error_code.as_deref()), (Some(502), None));
            }),
        ),
        Case {
            ping_first: true,
            ..case(
                "status 503 Ping",
                &["Ping#1:status=503"],
                Expect::Done(|r| {
                    let pings = r.of("Ping");
                    assert_eq!(pings.len(), 2);
                    assert_eq!((pings[0].status, pings[1].status), (Some(503), Some(200)));
                }),
            )
        },
        case(
            "status 503 GET",
            &["GET#1:status=503"],
            Expect::Done(|r| {
                let gets = r.of("GET");
                assert_eq!(gets.len(), 2);
                assert_eq!((gets[0].status, gets[1].status), (Some(503), Some(206)));
            }),
        ),
        case(
            "status 403 Create-Session (fatal)",
            &["Create-Session#1:status=403,code=0x80070005"],
            Expect::Fails(0x8007_0005, "E_ACCESSDENIED", RemoteFile, 403, |r| {
                assert_eq!(r.entries.len(), 1, "nothing after a fatal Create-Session");
            }),
        ),
        case(
            "status 403 Fragment (fatal)",
            &["Fragment#2:status=403,code=0x80070005"],
            Expect::Fails(0x8007_0005, "E_ACCESSDENIED", RemoteFile, 403, |r| {
                let last = r.entries.last().unwrap();
                assert_eq!(
                    (last.packet.as_str(), last.status),
                    ("Cancel-Session", Some(200))
                );
            }),
        ),
        case(
            "status 400 E_INVALIDARG (fatal)",
            &["Fragment#1:status=400,code=0x80070057"],
            Expect::Fails(0x8007_0057, "E_INVALIDARG", RemoteFile, 400, |_| {}),
        ),
        case(
            "too-large",
            &["Fragment:too-large=40000,times=0"],
            Expect::Done(|r| {
                let first = r.of("Fragment")[0];
                assert_eq!(
                    (first.status, first.error_code.as_deref()),
                    (Some(413), Some("0x80200020"))
                );
                assert_eq!(r.outcome().fragment_size, FRAG / 2);
                for f in r.of("Fragment").iter().filter(|f| f.status == Some(200)) {
                    let (a, b, _) = content_range(f);
                    assert!(b - a < 40_000, "{:?}", f.range);
                }
            }),
        ),
        case(
            "too-large above 0 (fatal)",
            &["Fragment:too-large=0,times=0"],
            Expect::Fails(0x8020_0020, "BG_E_TOO_LARGE", RemoteFile, 413, |r| {
                let last_frag = *r.of("Fragment").last().unwrap();
                assert_eq!(
                    content_range(last_frag),
                    (0, 0, SIZE as u64),
                    "halved down to one byte"
                );
            }),
        ),
        case(
            "resync back to 0",
            &["Fragment#3:resync=0"],
            Expect::Done(|r| {
                let (i, e) = r.faulted("resync");
                assert_eq!(
                    (e.status, e.error_code.as_deref(), e.received),
                    (Some(416), Some("0x0"), Some(0))
                );
                let n = r.after(i);
                assert_eq!(content_range(n).0, 0);
                // The server already holds those bytes and says where it really is.
                assert_eq!((n.status, n.received), (Some(200), Some(2 * FRAG)));
                assert_eq!(content_range(r.after(i + 1)).0, 2 * FRAG);
            }),
        ),
        case(
            "resync ahead",
            &["Fragment#2:resync=150000"],
            Expect::Done(|r| {
                let (i, _) = r.faulted("resync");
                let n = r.after(i);
                assert_eq!(content_range(n).0, 150_000);
                // A real gap: the server's own 416 sends the client back.
                assert_eq!(
                    (n.status, n.received, n.fault.as_deref()),
                    (Some(416), Some(FRAG), None)
                );
                assert_eq!(content_range(r.after(i + 1)).0, FRAG);
            }),
        ),
        case(
            "forget-session",
            &["Fragment#3:forget-session"],
            Expect::Done(|r| {
                let (_, e) = r.faulted("forget-session");
                assert_eq!(
                    (e.status, e.error_code.as_deref()),
                    (Some(500), Some("0x8020001f"))
                );
                let cs = r.of("Create-Session");
                assert_eq!(cs.len(), 2, "a second Create-Session");
                assert_eq!(r.outcome().restarts, 1);
                let second: Vec<_> = r
                    .of("Fragment")
                    .into_iter()
                    .filter(|f| f.session == cs[1].session)
                    .collect();
                assert_eq!(content_range(second[0]).0, 0, "the new session starts at 0");
                // The forgotten session is gone from the server.
                let old: bitsd::protocol::SessionId =
                    cs[0].session.as_deref().unwrap().parse().unwrap();
                let svc = r.server.server().service().clone();
                let gone = std::thread::spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(svc.progress(&old))
                        .unwrap()
                })
                .join()
                .unwrap();
                assert!(gone.is_none());
            }),
        ),
        case(
            "delay-ack within the client's patience",
            &["Fragment#2:delay-ack=300"],
            Expect::Done(|r| {
                let (_, e) = r.faulted("delay-ack");
                assert!(e.answered && e.elapsed_ms >= 300, "{e:?}");
                assert_eq!(r.outcome().retries, 0);
                assert_eq!(r.of("Fragment").len(), 4);
            }),
        ),
        Case {
            request_timeout: Duration::from_millis(1500),
            ..case(
                "delay-ack beyond the client's timeout",
                &["Fragment#2:delay-ack=4000"],
                Expect::Done(|r| {
                    let (_, e) = r.faulted("delay-ack");
                    assert_eq!(e.status, Some(200), "processed before the delay");
                    let same: Vec<_> = r
                        .of("Fragment")
                        .into_iter()
                        .filter(|f| f.range == e.range)
                        .collect();
                    assert_eq!(
                        same.len(),
                        2,
                        "the client gave up waiting and sent the fragment again"
                    );
                    assert_eq!(same[1].received, Some(2 * FRAG));
                }),
            )
        },
        case(
            "fail-handler 503 (transient)",
            &["Fragment:fail-handler=503"],
            Expect::Done(|r| {
                let (i, e) = r.faulted("fail-handler");
                assert_eq!(
                    (
                        e.status,
                        e.error_code.as_deref(),
                        e.error_context.as_deref(),
                        e.received,
                        e.reply_url.as_deref()
                    ),
                    (
                        Some(503),
                        Some("0x801901f7"),
                        Some("0x7"),
                        Some(SIZE as u64),
                        None
                    )
                );
                let n = r.after(i);
                assert_eq!(n.range, e.range, "the final fragment is sent again");
                assert_eq!(n.status, Some(200));
                assert!(n.reply_url.is_some());
            }),
        ),
        case(
            "fail-handler 403 (fatal)",
            &["Fragment:fail-handler=403"],
            Expect::Fails(
                0x8019_0193,
                "BG_E_HTTP_ERROR_403",
                RemoteApplication,
                403,
                |r| {
                    let (_, e) = r.faulted("fail-handler");
                    assert_eq!(e.error_context.as_deref(), Some("0x7"));
                    let last = r.entries.last().unwrap();
                    assert_eq!(last.packet, "Cancel-Session");
                    assert!(r.of("GET").is_empty());
                },
            ),
        ),
        case(
            "truncate",
            &["GET#1:truncate=50000"],
            Expect::Done(|r| {
                let gets = r.of("GET");
                assert_eq!(gets.len(), 2);
                assert_eq!(gets[1].range.as_deref(), Some("bytes=50000-199999"));
            }),
        ),
        case(
            "stall within the client's patience",
            &["GET#1:stall=300,after=30000"],
            Expect::Done(|r| {
                assert_eq!(r.of("GET").len(), 1);
                assert_eq!(r.outcome().retries, 0);
            }),
        ),
        Case {
            request_timeout: Duration::from_millis(1500),
            ..case(
                "stall beyond the client's timeout",
                &["GET#1:stall=4000,after=30000"],
                Expect::Done(|r| {
                    let gets = r.of("GET");
                    assert_eq!(gets.len(), 2);
                    assert_eq!(gets[1].range.as_deref(), Some("bytes=30000-199999"));
                }),
            )
        },
        case(
            "expire-session Fragment",
            &["Fragment#2:expire-session"],
            Expect::Done(|r| {
                let (_, e) = r.faulted("expire-session");
                assert_eq!(
                    (e.status, e.error_code.as_deref()),
                    (Some(500), Some("0x8020001f"))
                );
                assert_eq!(r.of("Create-Session").len(), 2);
                assert_eq!(r.outcome().restarts, 1);
            }),
        ),
        case(
            "expire-session Close-Session",
            &["Close-Session#1:expire-session"],
            Expect::Done(|r| {
                let cl = r.of("Close-Session");
                assert_eq!(cl.len(), 1, "session-not-found on Close is not retried");
                assert_eq!(cl[0].error_code.as_deref(), Some("0x8020001f"));
                assert!(r.outcome().closed);
            }),
        ),
        case(
            "expire-session before the reply download (fatal)",
            &["HEAD#1:expire-session"],
            Expect::Fails(0x8019_0194, "BG_E_HTTP_ERROR_404", RemoteFile, 404, |r| {
                assert!(
                    r.of("GET").is_empty(),
                    "a 404 on HEAD ends the job with no GET"
                );
                let last = r.entries.last().unwrap();
                assert_eq!(
                    (last.packet.as_str(), last.error_code.as_deref()),
                    ("Cancel-Session", Some("0x8020001f"))
                );
            }),
        ),
        Case {
            mode: Mode::Upload,
            ..case(
                "lose-ack on a plain upload",
                &["Fragment#4:lose-ack"],
                Expect::Done(|r| {
                    let (_, e) = r.faulted("lose-ack");
                    assert_eq!(
                        e.received,
                        Some(SIZE as u64),
                        "the final fragment was committed"
                    );
                    assert_eq!(r.of("Fragment").len(), 5);
                }),
            )
        },
    ]
}

async fn run_case(c: Case) -> Result<(), String> {
    let plan = FaultPlan::from_specs(7, c.faults).unwrap();
    let labels: Vec<String> = plan.rules.iter().map(FaultRule::to_string).collect();
    let client = uploader(c.request_timeout, c.ping_first, FRAG);
    let name = c.name;
    let check = async move {
        let run = run_job(name, plan, c.mode, client, SIZE, 3).await;
        for label in &labels {
            assert!(
                run.entries.iter().any(|e| e.rule.as_deref() == Some(label)),
                "rule {label} never fired"
            );
        }
        assert_recovery(&run);
        match (&c.expect, &run.result) {
            (Expect::Done(check), Ok(_)) => check(&run),
            (Expect::Done(_), Err(e)) => panic!("the job failed: {e}"),
            (Expect::Fails(code, hname, ctx, status, check), Err(e)) => {
                let ClientError::Bits(f) = e else {
                    panic!("expected a BITS error, got {e}")
                };
                assert_eq!(f.code().0, *code, "{e}");
                assert_eq!(f.name(), *hname, "{e}");
                assert_eq!(f.context(), *ctx, "{e}");
                assert_eq!(f.status(), Some(*status), "{e}");
                assert!(!f.is_transient(), "{e}");
                check(&run);
            }
            (Expect::Fails(..), Ok(_)) => panic!("the job succeeded despite a fatal fault"),
        }
    };
    AssertUnwindSafe(check).catch_unwind().await.map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        format!("{name}: {msg}")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_fault_kind_against_the_client() {
    let cases = matrix();
    let covered: BTreeSet<String> = cases
        .iter()
        .flat_map(|c| c.faults.iter())
        .map(|s| s.parse::<FaultRule>().unwrap().action.kind().to_owned())
        .collect();
    for kind in ALL_KINDS {
        assert!(covered.contains(kind), "the matrix lacks a {kind} case");
    }
    let failures: Vec<String> = futures_util::stream::iter(cases.into_iter().map(run_case))
        .buffer_unordered(8)
        .filter_map(|r| async move { r.err() })
        .collect()
        .await;
    assert!(
        failures.is_empty(),
        "failed cases:\n{}",
        failures.join("\n")
    );
}
