//! Scenario 2: small upload-reply jobs (4 KiB upload to `/echo/`: Create-Session, one
//! Fragment, GET of the reply URL, Close-Session) per second, and per-packet latency.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinSet;

use crate::client::{url_path, BoxError, Conn, Result};
use crate::report::{LatencyRow, Report, Samples};
use crate::rounds::{fsync_name, Comparison, Cpu, Spread};
use crate::upload::{finish_servers, start_servers};
use crate::util::{pattern, settle};
use crate::{attach, sink::Sink, Plan};

/// Size of each job's upload.
pub const JOB_BYTES: usize = 4096;

/// The packets of one job, in order.
const PACKETS: [&str; 4] = ["Create-Session", "Fragment", "GET reply", "Close-Session"];

/// What one measurement produced.
struct JobRun {
    jobs: u64,
    elapsed: Duration,
    latency: [Samples; 4],
}

impl JobRun {
    fn rate(&self) -> f64 {
        self.jobs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One 4 KiB echo job at `path` on `conn`: Create-Session, one Fragment, GET of the reply URL
/// (checked: HTTP 200 with the job's length), Close-Session. Returns each packet's latency,
/// in the order of [`PACKETS`]. The farm scenario runs the same job.
pub async fn echo_job(conn: &mut Conn, path: &str, body: &Bytes) -> Result<[Duration; 4]> {
    let mut took = [Duration::ZERO; 4];
    let t = Instant::now();
    let sid = conn.create_session(path).await?;
    took[0] = t.elapsed();
    let t = Instant::now();
    let ack = conn
        .fragment(path, &sid, 0, body, body.len() as u64)
        .await?;
    took[1] = t.elapsed();
    let reply = url_path(
        ack.header("bits-reply-url")
            .ok_or("final Ack without BITS-Reply-URL")?,
    );
    let t = Instant::now();
    let res = conn.get(&reply).await?;
    took[2] = t.elapsed();
    if res.status != 200 || res.body_len != body.len() as u64 {
        return Err(format!(
            "reply GET {reply}: HTTP {} with {} bytes",
            res.status, res.body_len
        )
        .into());
    }
    let t = Instant::now();
    conn.close_session(path, &sid).await?;
    took[3] = t.elapsed();
    Ok(took)
}

/// `clients` connections each running jobs back to back for `secs`.
async fn run_jobs(addr: SocketAddr, clients: usize, secs: f64, tag: &str) -> Result<JobRun> {
    let body = Bytes::from(pattern(JOB_BYTES, 7));
    let conns = Conn::connect_many(addr, clients).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let mut set = JoinSet::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let (body, tag) = (body.clone(), tag.to_owned());
        set.spawn(async move {
            let mut latency: [Samples; 4] = Default::default();
            let mut jobs = 0u64;
            while Instant::now() < deadline {
                let path = format!("/echo/jobs/{tag}-{i}-{jobs}.bin");
                let took = echo_job(&mut conn, &path, &body).await?;
                for (samples, d) in latency.iter_mut().zip(took) {
                    samples.push(d);
                }
                jobs += 1;
            }
            Ok::<_, BoxError>((jobs, latency))
        });
    }
    let mut run = JobRun {
        jobs: 0,
        elapsed: Duration::ZERO,
        latency: Default::default(),
    };
    while let Some(r) = set.join_next().await {
        let (jobs, latency) = r??;
        run.jobs += jobs;
        for (all, one) in run.latency.iter_mut().zip(&latency) {
            all.extend(one);
        }
    }
    run.elapsed = started.elapsed();
    Ok(run)
}

/// Runs the job scenario at every client count: `plan.rounds` interleaved rounds of the sink
/// and of every bitsd process (one per fsync policy), each `plan.job_secs` long.
pub async fn run(plan: &Plan, bin: &Path, work: &Path, report: &mut Report) -> Result<()> {
    let servers = start_servers(plan, bin, work, "jobs-bitsd")?;
    let sink = Sink::start(None).await?;
    let result = async {
        // Warm both up (connections, first sled writes) before measuring.
        run_jobs(sink.addr(), 4, 0.3, "warm").await?;
        for s in &servers {
            run_jobs(s.child.addr, 4, 0.3, "warm").await?;
        }
        for &clients in &plan.job_clients {
            eprintln!(
                "bench: upload-reply jobs, {clients} clients, {} rounds of {} s",
                plan.rounds, plan.job_secs
            );
            let mut sink_rate = Vec::new();
            let mut sink_lat: [Samples; 4] = Default::default();
            let mut rate: Vec<Vec<f64>> = servers.iter().map(|_| Vec::new()).collect();
            let mut cpu: Vec<Vec<f64>> = servers.iter().map(|_| Vec::new()).collect();
            let mut lat: Vec<[Samples; 4]> = servers.iter().map(|_| Default::default()).collect();
            for round in 0..plan.rounds {
                settle().await;
                let s = run_jobs(sink.addr(), clients, plan.job_secs, "sink").await?;
                sink_rate.push(s.rate());
                for (all, one) in sink_lat.iter_mut().zip(&s.latency) {
                    all.extend(one);
                }
                for (k, server) in servers.iter().enumerate() {
                    settle().await;
                    let case = format!("jobs {clients} clients {}", fsync_name(server.policy));
                    let prof =
                        attach::maybe(plan.attach.as_deref(), server.child.pid(), &case).await;
                    let cpu0 = server.child.cpu_secs();
                    let b = run_jobs(
                        server.child.addr,
                        clients,
                        plan.job_secs,
                        &format!("bitsd-c{clients}-r{round}"),
                    )
                    .await;
                    let cpu1 = server.child.cpu_secs();
                    if let Some(p) = prof {
                        p.stop();
                    }
                    let b = b?;
                    rate[k].push(b.rate());
                    if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
                        cpu[k].push((c1 - c0) * 1000.0 / b.jobs.max(1) as f64);
                    }
                    for (all, one) in lat[k].iter_mut().zip(&b.latency) {
                        all.extend(one);
                    }
                }
            }
            for (k, server) in servers.iter().enumerate() {
                let durable = server.policy == bitsd::FsyncPolicy::PerFragment;
                let bitsd = Spread::of(&rate[k]);
                let fragment_p99 = lat[k][1].quantile_ms(0.99);
                let (target, pass) = if clients == 32 && durable {
                    (
                        "≥ 5000/s, Fragment Ack p99 < 5 ms".to_owned(),
                        Some(bitsd.median >= 5000.0 && fragment_p99 < 5.0),
                    )
                } else if clients == 256 && durable {
                    (
                        "≥ 5000/s (as many as at 32 clients)".to_owned(),
                        Some(bitsd.median >= 5000.0),
                    )
                } else {
                    ("—".to_owned(), None)
                };
                report.comparisons.push(Comparison {
                    group: "jobs",
                    scenario: format!("upload-reply jobs (4 KiB, echo), {clients} clients"),
                    fsync: fsync_name(server.policy),
                    unit: "jobs/s",
                    rounds: plan.rounds,
                    ratio: Spread::ratios(&rate[k], &sink_rate),
                    bitsd,
                    baseline_name: "sink",
                    baseline: Spread::of(&sink_rate),
                    sink: None,
                    cpu: (!cpu[k].is_empty()).then(|| Cpu {
                        unit: "ms/job",
                        bitsd: Spread::of(&cpu[k]),
                        baseline: None,
                        ratio: None,
                    }),
                    target,
                    pass,
                });
                for (i, packet) in PACKETS.iter().enumerate() {
                    let (b, s) = (&mut lat[k][i], &mut sink_lat[i]);
                    report.latencies.push(LatencyRow {
                        clients,
                        fsync: fsync_name(server.policy),
                        packet,
                        samples: b.count(),
                        bitsd_p50_ms: b.quantile_ms(0.5),
                        bitsd_p99_ms: b.quantile_ms(0.99),
                        bitsd_p999_ms: b.quantile_ms(0.999),
                        bitsd_max_ms: b.quantile_ms(1.0),
                        sink_p50_ms: s.quantile_ms(0.5),
                        sink_p99_ms: s.quantile_ms(0.99),
                        sink_p999_ms: s.quantile_ms(0.999),
                    });
                }
            }
        }
        Ok::<_, BoxError>(())
    }
    .await;
    sink.stop();
    finish_servers(servers, "job rounds", report);
    result
}
