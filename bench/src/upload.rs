//! Scenario 1: upload throughput and CPU per GiB, bitsd (the real binary, one process per
//! fsync policy) against the plain-file writer and the HTTP sink, in interleaved rounds.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinSet;

use crate::child::BitsdChild;
use crate::client::{BoxError, Conn, Result};
use crate::report::{Report, Row, Value};
use crate::rounds::{fsync_name, Comparison, Cpu, Spread};
use crate::util::{mib_per_sec, settle, size_label, MIB};
use crate::{attach, file_baseline, sink::Sink, Plan};

/// One GiB, for CPU seconds per GiB.
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// `uploads` concurrent uploads (one connection each) of `each` bytes in `fragment`-byte
/// fragments to `{prefix}{i}.bin`, each closed at the end; the wall time of all of them.
pub async fn http_uploads(
    addr: std::net::SocketAddr,
    prefix: &str,
    uploads: usize,
    each: u64,
    fragment: usize,
    payload: &Bytes,
) -> Result<Duration> {
    let conns = Conn::connect_many(addr, uploads).await?;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let path = format!("{prefix}{i}.bin");
        let payload = payload.clone();
        set.spawn(async move {
            let (sid, _) = conn.upload(&path, each, fragment, &payload).await?;
            conn.close_session(&path, &sid).await?;
            Ok::<_, BoxError>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(started.elapsed())
}

/// A bitsd server process with one fsync policy, and its data directory.
pub struct Server {
    /// The policy it runs with (`--fsync`).
    pub policy: bitsd::FsyncPolicy,
    /// The process.
    pub child: BitsdChild,
    /// Its data directory.
    pub dir: PathBuf,
}

/// Starts one bitsd process per fsync policy of the plan, each on its own data directory
/// under `work` named `{what}-{policy}`.
pub fn start_servers(plan: &Plan, bin: &Path, work: &Path, what: &str) -> Result<Vec<Server>> {
    plan.fsync
        .iter()
        .map(|&policy| {
            let name = format!("{what}-{}", fsync_name(policy));
            let dir = work.join(&name);
            let child = BitsdChild::spawn_args(
                bin,
                &dir,
                &work.join(format!("{name}.log")),
                Duration::from_secs(60),
                &["--fsync", fsync_name(policy)],
            )?;
            Ok(Server { policy, child, dir })
        })
        .collect()
}

/// One side's figures over the rounds.
#[derive(Default)]
struct Side {
    rate: Vec<f64>,
    cpu: Vec<f64>,
}

/// Runs every fragment size × concurrency case, `plan.rounds` interleaved rounds each, and
/// adds one comparison per case and fsync policy.
pub async fn run(
    plan: &Plan,
    bin: &Path,
    work: &Path,
    payload: &Bytes,
    report: &mut Report,
) -> Result<()> {
    let servers = start_servers(plan, bin, work, "upload-bitsd")?;
    let sink = Sink::start(None).await?;
    let file_dir = work.join("upload-file");
    let result = async {
        for &fragment in &plan.fragments {
            for &uploads in &plan.concurrency {
                let each = if uploads == 1 { plan.single } else { plan.each }.max(fragment as u64);
                let total = each * uploads as u64;
                let gib = total as f64 / GIB;
                let label = format!(
                    "upload {uploads} × {}, {} fragments",
                    size_label(each),
                    size_label(fragment as u64)
                );
                eprintln!("bench: {label}, {} rounds", plan.rounds);
                let mut sink_rate = Vec::new();
                let mut file: Vec<Side> = servers.iter().map(|_| Side::default()).collect();
                let mut bitsd: Vec<Side> = servers.iter().map(|_| Side::default()).collect();
                for round in 0..plan.rounds {
                    settle().await;
                    let t = http_uploads(
                        sink.addr(),
                        "/upload/sink/",
                        uploads,
                        each,
                        fragment,
                        payload,
                    )
                    .await?;
                    sink_rate.push(mib_per_sec(total, t));
                    for (k, server) in servers.iter().enumerate() {
                        // A B, then B A: whichever side runs first in a round (fresh page
                        // cache, a neighbour's burst) alternates.
                        let file_first = round % 2 == 0;
                        for step in 0..2 {
                            settle().await;
                            if (step == 0) == file_first {
                                let (dir, payload, policy) =
                                    (file_dir.clone(), payload.clone(), server.policy);
                                let (t, cpu) = tokio::task::spawn_blocking(move || {
                                    file_baseline::write_uploads(
                                        &dir, uploads, each, fragment, &payload, policy,
                                    )
                                })
                                .await??;
                                file[k].rate.push(mib_per_sec(total, t));
                                file[k].cpu.push(cpu / gib);
                            } else {
                                let tag = format!("f{}-c{uploads}-r{round}-", fragment / 1024);
                                let case = format!("{label} {}", fsync_name(server.policy));
                                let prof = attach::maybe(
                                    plan.attach.as_deref(),
                                    server.child.pid(),
                                    &case,
                                )
                                .await;
                                let cpu0 = server.child.cpu_secs();
                                let t = http_uploads(
                                    server.child.addr,
                                    &format!("/upload/bench/{tag}"),
                                    uploads,
                                    each,
                                    fragment,
                                    payload,
                                )
                                .await;
                                let cpu1 = server.child.cpu_secs();
                                if let Some(p) = prof {
                                    p.stop();
                                }
                                bitsd[k].rate.push(mib_per_sec(total, t?));
                                if let (Some(a), Some(b)) = (cpu0, cpu1) {
                                    bitsd[k].cpu.push((b - a) / gib);
                                }
                                // Committed uploads stay in files/ (plain-upload semantics);
                                // free the space.
                                let _ =
                                    std::fs::remove_dir_all(server.dir.join("files").join("bench"));
                            }
                        }
                    }
                }
                for (k, server) in servers.iter().enumerate() {
                    let cpu = (!bitsd[k].cpu.is_empty()).then(|| Cpu {
                        unit: "s/GiB",
                        bitsd: Spread::of(&bitsd[k].cpu),
                        baseline: Some(Spread::of(&file[k].cpu)),
                        ratio: (bitsd[k].cpu.len() == file[k].cpu.len())
                            .then(|| Spread::ratios(&bitsd[k].cpu, &file[k].cpu)),
                    });
                    let ratio = Spread::ratios(&bitsd[k].rate, &file[k].rate);
                    let durable = server.policy == bitsd::FsyncPolicy::PerFragment;
                    let min = match fragment as u64 {
                        MIB => Some(0.85),
                        f if f == 64 * 1024 => Some(0.70),
                        _ => None,
                    }
                    .filter(|_| durable);
                    let cpu_ok = cpu
                        .as_ref()
                        .and_then(|c| c.ratio.as_ref())
                        .map(|r| r.median <= 1.5);
                    let (target, pass) = match (min, durable) {
                        (Some(min), _) => (
                            format!("≥ {:.0}% of file; CPU ≤ 1.5× file", min * 100.0),
                            Some(ratio.median >= min && cpu_ok.unwrap_or(false)),
                        ),
                        (None, true) => ("CPU ≤ 1.5× file".into(), cpu_ok),
                        (None, false) => ("—".into(), None),
                    };
                    report.comparisons.push(Comparison {
                        group: "upload",
                        scenario: label.clone(),
                        fsync: fsync_name(server.policy),
                        unit: "MiB/s",
                        rounds: plan.rounds,
                        bitsd: Spread::of(&bitsd[k].rate),
                        baseline_name: "file",
                        baseline: Spread::of(&file[k].rate),
                        ratio,
                        sink: Some(Spread::of(&sink_rate)),
                        cpu,
                        target,
                        pass,
                    });
                }
            }
        }
        Ok::<_, BoxError>(())
    }
    .await;
    sink.stop();
    finish_servers(servers, "upload rounds", report);
    result
}

/// Adds a peak-RSS row for every server, stops them and removes their data directories.
pub fn finish_servers(servers: Vec<Server>, during: &str, report: &mut Report) {
    for s in servers {
        if let Some(peak) = s.child.status_bytes("VmHWM") {
            report.rows.push(Row::new(
                "rss",
                format!(
                    "peak RSS (VmHWM) of the bitsd process over the {during}, fsync {}",
                    fsync_name(s.policy)
                ),
                Value::Bytes(peak),
            ));
        }
        s.child.stop();
        let _ = std::fs::remove_dir_all(&s.dir);
    }
}
