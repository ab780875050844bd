//! The test server mode: the bitsd client against a fault-injecting server, for every fault
//! kind of the fault plan and for seeded combinations. Every run must end with the exact file
//! uploaded and the exact reply downloaded, or, for a fatal fault, with the error a Windows
//! client reports; and the transcript must show the recovery path the client took.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use bitsd::{FaultPlan, FaultRule, TranscriptEntry, TranscriptOptions};
use bitsd_client::{
    is_transient_status, BitsUploader, ClientError, ErrorContext, ReplyDestination, RetryPolicy,
    UploadJob, UploadOutcome,
};
use bitsd_tests::{pattern, BitsdProcess, RawClient, TestServer};
use futures_util::{FutureExt, StreamExt};

/// Upload size of the matrix: four fragments of 64 KiB (the last one short).
const SIZE: usize = 200_000;
const FRAG: u64 = 65_536;
/// No run may take longer.
const RUN_LIMIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Upload-reply on `/echo/`: the reply must equal the upload.
    Echo,
    /// Plain upload on `/upload/`: the committed file must equal the upload.
    Upload,
}

/// A run's evidence: the transcript (in arrival order) and the job's result.
struct Run {
    entries: Vec<TranscriptEntry>,
    result: Result<UploadOutcome, ClientError>,
    data: Vec<u8>,
    server: TestServer,
    name: String,
}

impl Run {
    fn outcome(&self) -> &UploadOutcome {
        self.result.as_ref().unwrap()
    }

    fn of(&self, packet: &str) -> Vec<&TranscriptEntry> {
        self.entries.iter().filter(|e| e.packet == packet).collect()
    }

    /// The one entry where `kind` fired, and its index.
    fn faulted(&self, kind: &str) -> (usize, &TranscriptEntry) {
        let hits: Vec<_> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.fault.as_deref() == Some(kind))
            .collect();
        assert_eq!(hits.len(), 1, "{kind} fired {} times", hits.len());
        hits[0]
    }

    /// The request after entry `i`.
    fn after(&self, i: usize) -> &TranscriptEntry {
        self.entries
            .get(i + 1)
            .unwrap_or_else(|| panic!("nothing after entry {i}"))
    }
}

/// `bytes a-b/t` → (a, b, t).
fn content_range(e: &TranscriptEntry) -> (u64, u64, u64) {
    let v = e.range.as_deref().unwrap();
    let (range, total) = v.trim_start_matches("bytes ").split_once('/').unwrap();
    let (a, b) = range.split_once('-').unwrap();
    (
        a.parse().unwrap(),
        b.parse().unwrap(),
        total.parse().unwrap(),
    )
}

fn uploader(request_timeout: Duration, ping_first: bool, fragment: u64) -> BitsUploader {
    BitsUploader::builder()
        .fragment_size(fragment)
        .retry_policy(RetryPolicy {
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
            max_retries: 10,
        })
        .connect_timeout(Duration::from_secs(5))
        .request_timeout(request_timeout)
        .ping_first(ping_first)
        .build()
}

/// The transcript once every request that arrived has its line (a held-back answer may
/// finish after the job).
async fn settled_entries(server: &TestServer) -> Vec<TranscriptEntry> {
    let transcript = server.server().transcript().unwrap().clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut entries = transcript.entries();
        entries.sort_by_key(|e| e.seq);
        let contiguous = entries
            .iter()
            .enumerate()
            .all(|(i, e)| e.seq == i as u64 + 1);
        if contiguous || tokio::time::Instant::now() > deadline {
            return entries;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a fault server with `plan` and runs one job against it.
async fn run_job(
    name: &str,
    plan: FaultPlan,
    mode: Mode,
    client: BitsUploader,
    size: usize,
    seed: u64,
) -> Run {
    let server = TestServer::start_with(|c| {
        c.fault_plan = Some(plan);
        c.transcript = Some(TranscriptOptions::default());
    })
    .await;
    let files = tempfile::tempdir().unwrap();
    let data = pattern(size, seed);
    let path = files.path().join("in.bin");
    std::fs::write(&path, &data).unwrap();
    let file_name = format!("{}.bin", name.replace([' ', '/', '#', ':'], "-"));
    let prefix = match mode {
        Mode::Echo => "echo",
        Mode::Upload => "upload",
    };
    let url = format!("http://{}/{prefix}/{file_name}", server.addr());
    let mut job = UploadJob::new(url, &path);
    if mode == Mode::Echo {
        job = job.reply_to(ReplyDestination::Memory);
    }
    let result = tokio::time::timeout(RUN_LIMIT, client.run(job))
        .await
        .unwrap_or_else(|_| panic!("{name}: the job did not end within {RUN_LIMIT:?}"));
    let entries = settled_entries(&server).await;
    let run = Run {
        entries,
        result,
        data,
        server,
        name: name.to_owned(),
    };
    if let Ok(out) = &run.result {
        assert_eq!(out.bytes_uploaded, size as u64);
        match mode {
            Mode::Echo => {
                let reply = out.reply.as_ref().expect("an upload-reply job has a reply");
                assert_eq!(reply.size, size as u64);
                assert!(
                    reply.bytes.as_deref() == Some(&run.data[..]),
                    "{name}: the reply differs from the upload"
                );
            }
            Mode::Upload => {
                let landed =
                    std::fs::read(run.server.data_dir().join("files").join(&file_name)).unwrap();
                assert!(landed == run.data, "{name}: the committed file differs");
            }
        }
    }
    run
}

/// The recovery a conforming client shows after each fault, checked on every faulted entry.
fn assert_recovery(run: &Run) {
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

/// Every fault kind the plan knows.
const ALL_KINDS: [&str; 12] = [
    "drop",
    "drop-after",
    "lose-ack",
    "status",
    "too-large",
    "resync",
    "forget-session",
    "delay-ack",
    "fail-handler",
    "truncate",
    "stall",
    "expire-session",
];

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

/// What a run looked like on the wire, without the random session ids.
fn signature(run: &Run) -> Vec<String> {
    run.entries
        .iter()
        .map(|e| {
            format!(
                "{} {} -> {:?} {:?} {}",
                e.packet,
                e.range.as_deref().unwrap_or("-"),
                e.status,
                e.fault,
                e.answered
            )
        })
        .collect()
}

const COMBINATION: &[&str] = &[
    "Fragment:lose-ack,p=0.3,times=3",
    "Fragment:drop-after=3000,p=0.2,times=2",
    "Fragment:status=500,code=0x80004005,p=0.15,times=2",
    "Fragment:resync=0,p=0.1",
    "Fragment:forget-session,p=0.1",
    "Fragment:fail-handler=504,p=0.5",
    "HEAD:status=503,p=0.3",
    "GET:truncate=7000,p=0.5,times=2",
    "Close-Session:lose-ack,p=0.5",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeded_combinations_recover_and_replay_exactly() {
    let mut fired_total = 0;
    for seed in [1u64, 2, 3, 42] {
        let runs = futures_util::future::join_all((0..2).map(|attempt| async move {
            let plan = FaultPlan::from_specs(seed, COMBINATION).unwrap();
            let name = format!("seed {seed} run {attempt}");
            run_job(
                &name,
                plan,
                Mode::Echo,
                uploader(Duration::from_secs(20), false, 16_384),
                150_000,
                seed,
            )
            .await
        }))
        .await;
        for run in &runs {
            if let Err(e) = &run.result {
                panic!("{}: {e}", run.name);
            }
            assert_recovery(run);
        }
        assert_eq!(
            signature(&runs[0]),
            signature(&runs[1]),
            "seed {seed}: the same seed must inject the same faults at the same packets"
        );
        let fired = runs[0].entries.iter().filter(|e| e.fault.is_some()).count();
        eprintln!("seed {seed}: {fired} faults");
        fired_total += fired;
    }
    assert!(
        fired_total >= 8,
        "the combinations injected only {fired_total} faults"
    );
}

/// `GET /transcript` on the admin listener: status, content type and body.
async fn admin_transcript(admin: std::net::SocketAddr) -> (u16, Option<String>, String) {
    let mut c = RawClient::connect(admin).await;
    let res = c
        .send(b"GET /transcript HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await;
    (
        res.status,
        res.header("content-type").map(str::to_owned),
        String::from_utf8(res.body).unwrap(),
    )
}

#[tokio::test]
async fn the_binary_takes_fault_flags_and_writes_the_transcript() {
    let dir = tempfile::tempdir().unwrap();
    let transcript = dir.path().join("transcript.jsonl");
    let proc = BitsdProcess::start(
        &dir.path().join("data"),
        &[
            "--fault",
            "Fragment#2:lose-ack",
            "--fault",
            "GET#1:truncate=1000",
            "--fault-seed",
            "9",
            "--transcript",
            transcript.to_str().unwrap(),
        ],
    );
    let data = pattern(100_000, 5);
    let input = dir.path().join("in.bin");
    std::fs::write(&input, &data).unwrap();
    let out = tokio::time::timeout(
        RUN_LIMIT,
        uploader(Duration::from_secs(20), false, 32_768).upload_reply(
            &format!("http://{}/echo/flags.bin", proc.addr),
            &input,
            ReplyDestination::Memory,
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.reply.unwrap().bytes.as_deref() == Some(&data[..]));
    // Close-Session's line is written before its Ack goes out.
    let file = std::fs::read_to_string(&transcript).unwrap();
    let entries: Vec<TranscriptEntry> = file
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let faults: Vec<_> = entries.iter().filter_map(|e| e.fault.as_deref()).collect();
    assert_eq!(faults, ["lose-ack", "truncate"]);
    let lost = entries
        .iter()
        .position(|e| e.fault.as_deref() == Some("lose-ack"))
        .unwrap();
    assert_eq!(entries[lost + 1].range, entries[lost].range);
    assert_eq!(
        entries[lost]
            .request_headers
            .get("bits-packet-type")
            .map(String::as_str),
        Some("Fragment")
    );
    let gets: Vec<_> = entries.iter().filter(|e| e.packet == "GET").collect();
    assert_eq!(gets[1].range.as_deref(), Some("bytes=1000-99999"));
    assert_eq!(entries.last().unwrap().packet, "Close-Session");
    // The admin listener serves the same lines.
    let (status, ctype, body) = admin_transcript(proc.admin_addr.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(ctype.as_deref(), Some("application/x-ndjson"));
    assert_eq!(body, file);
}

#[tokio::test]
async fn transcript_without_faults_and_none_when_off() {
    let server =
        TestServer::start_with(|c| c.transcript = Some(TranscriptOptions::default())).await;
    let mut c = server.connect().await;
    let (sid, _) = c.upload("/upload/plain.bin", &pattern(1000, 1), 600).await;
    let entries = settled_entries(&server).await;
    let summary: Vec<_> = entries
        .iter()
        .map(|e| (e.packet.as_str(), e.range.as_deref(), e.status, e.received))
        .collect();
    assert_eq!(
        summary,
        [
            ("Create-Session", None, Some(200), None),
            ("Fragment", Some("bytes 0-599/1000"), Some(200), Some(600)),
            (
                "Fragment",
                Some("bytes 600-999/1000"),
                Some(200),
                Some(1000)
            ),
        ]
    );
    assert!(entries.iter().all(|e| e.fault.is_none() && e.answered));
    assert_eq!(entries[0].session.as_deref(), Some(sid.as_str()));
    assert_eq!(entries[1].session.as_deref(), Some(sid.as_str()));
    assert!(entries[0].time.ends_with('Z'));
    let (status, _, body) = admin_transcript(server.admin_addr()).await;
    assert_eq!(status, 200);
    assert_eq!(body.lines().count(), 3);

    let plain = TestServer::start().await;
    assert!(plain.server().transcript().is_none());
    let (status, _, _) = admin_transcript(plain.admin_addr()).await;
    assert_eq!(status, 404);
}

#[test]
fn config_keys_and_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("faults.toml");
    std::fs::write(
        &plan,
        "seed = 42\n\n[[rule]]\npacket = \"Fragment\"\nnth = 3\naction = \"drop-after\"\nbytes = 1000\n",
    )
    .unwrap();
    let config = dir.path().join("bitsd.toml");
    std::fs::write(
        &config,
        format!(
            "fault_plan = {:?}\ntranscript = {:?}\n",
            plan.to_str().unwrap(),
            dir.path().join("t.jsonl").to_str().unwrap()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bitsd_tests::bitsd_binary())
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 rule(s), seed 42"), "{text}");
    assert!(text.contains("Fragment#3:drop-after=1000"), "{text}");
    assert!(text.contains("t.jsonl"), "{text}");
    // A bad plan is refused with its file and line.
    std::fs::write(
        &plan,
        "seed = 1\n[[rule]]\npacket = \"Ping\"\naction = \"truncate\"\nbytes = 1\n",
    )
    .unwrap();
    let out = std::process::Command::new(bitsd_tests::bitsd_binary())
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("faults.toml:2:") && err.contains("only to GET"),
        "{err}"
    );
}

/// The plan and every `--fault` example of docs/testing-your-bits-client.md parse.
#[test]
fn the_readme_recipes_parse() {
    let section = std::fs::read_to_string(
        bitsd_tests::fixtures_dir().join("../docs/testing-your-bits-client.md"),
    )
    .unwrap();
    let section = section.as_str();
    let mut blocks = 0;
    for block in section.split("```toml\n").skip(1) {
        let toml = &block[..block.find("```").unwrap()];
        let plan = FaultPlan::parse(toml, "testing-your-bits-client.md")
            .unwrap_or_else(|e| panic!("{e}\n{toml}"));
        assert!(!plan.rules.is_empty());
        blocks += 1;
    }
    assert!(blocks >= 1);
    let mut flags = 0;
    for piece in section.split("--fault \"").skip(1) {
        let spec = &piece[..piece.find('"').unwrap()];
        spec.parse::<FaultRule>()
            .unwrap_or_else(|e| panic!("docs --fault {spec:?}: {e}"));
        flags += 1;
    }
    assert!(flags >= ALL_KINDS.len(), "one --fault recipe per kind");
}

/// The test server mode's state stays bounded however many distinct ids clients send: the
/// fault counters and the transcript in memory (the file keeps every line).
#[tokio::test]
async fn client_supplied_ids_do_not_grow_the_test_server_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let store = bitsd::SessionStore::open(&dir.path().join("data"))
        .await
        .unwrap();
    let service = bitsd::BitsService::builder(store)
        .route(bitsd::Route::upload_reply("/echo/", bitsd::EchoHandler))
        .build()
        .unwrap();
    let transcript_file = dir.path().join("t.jsonl");
    let transcript = bitsd::Transcript::with_file(&transcript_file).unwrap();
    let plan = FaultPlan::from_specs(1, &["GET#2:status=503"]).unwrap();
    let svc = bitsd::FaultInjectingService::new(service, plan, Some(transcript.clone())).unwrap();
    let requests = 12_000u32;
    for i in 0..requests {
        let req = http::Request::get(format!(
            "/echo/BITS-Sessions/{{{i:08x}-0000-4000-8000-000000000000}}/response"
        ))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
        let res = svc.handle(req).await.unwrap();
        assert_eq!(res.status(), 404);
    }
    // Ids that are not session ids at all share one counter.
    for i in 0..1_000u32 {
        let req = http::Request::get(format!("/echo/BITS-Sessions/not-an-id-{i}/response"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        svc.handle(req).await.unwrap();
    }
    assert!(
        svc.counted_sessions() <= 10_001,
        "{} sessions counted",
        svc.counted_sessions()
    );
    assert_eq!(transcript.len(), bitsd::Transcript::MEMORY_LINES);
    assert_eq!(transcript.recorded(), u64::from(requests) + 1_000);
    transcript.written().await;
    let lines = std::fs::read_to_string(&transcript_file)
        .unwrap()
        .lines()
        .count();
    assert_eq!(
        lines as u64,
        u64::from(requests) + 1_000,
        "the file keeps every line"
    );
}
