//! Scenario 2: small upload-reply jobs (4 KiB upload to `/echo/`: Create-Session, one
//! Fragment, GET of the reply URL, Close-Session) per second, and per-packet latency.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinSet;

use crate::client::{url_path, BoxError, Conn, Result};
use crate::report::{LatencyRow, Report, Row, Samples, Value};
use crate::util::{pattern, settle, start_bitsd};
use crate::{sink::Sink, Plan};

/// Size of each job's upload.
const JOB_BYTES: usize = 4096;

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

    /// p99 over every Ack (Create-Session, Fragment, Close-Session).
    fn ack_p99_ms(&self) -> f64 {
        let mut all = Samples::default();
        for i in [0, 1, 3] {
            all.extend(&self.latency[i]);
        }
        all.quantile_ms(0.99)
    }
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
                let t = Instant::now();
                let sid = conn.create_session(&path).await?;
                latency[0].push(t.elapsed());
                let t = Instant::now();
                let ack = conn
                    .fragment(&path, &sid, 0, &body, JOB_BYTES as u64)
                    .await?;
                latency[1].push(t.elapsed());
                let reply = url_path(
                    ack.header("bits-reply-url")
                        .ok_or("final Ack without BITS-Reply-URL")?,
                );
                let t = Instant::now();
                let res = conn.get(&reply).await?;
                latency[2].push(t.elapsed());
                if res.status != 200 || res.body_len != JOB_BYTES as u64 {
                    return Err(format!(
                        "reply GET {reply}: HTTP {} with {} bytes",
                        res.status, res.body_len
                    )
                    .into());
                }
                let t = Instant::now();
                conn.close_session(&path, &sid).await?;
                latency[3].push(t.elapsed());
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

/// Runs the job scenario at every client count.
pub async fn run(plan: &Plan, work: &Path, report: &mut Report) -> Result<()> {
    let dir = work.join("jobs-bitsd");
    let (server, _) = start_bitsd(&dir).await?;
    let sink = Sink::start(None).await?;
    let result = async {
        // Warm both up (connections, first sled writes) before measuring.
        run_jobs(sink.addr(), 4, 0.3, "warm").await?;
        run_jobs(server.addr(), 4, 0.3, "warm").await?;
        for &clients in &plan.job_clients {
            eprintln!(
                "bench: upload-reply jobs, {clients} clients, {} s each",
                plan.job_secs
            );
            let mut s = run_jobs(sink.addr(), clients, plan.job_secs, "sink").await?;
            settle().await;
            let mut b = run_jobs(server.addr(), clients, plan.job_secs, "bitsd").await?;
            let mut row = Row::new(
                "jobs",
                format!("upload-reply jobs (4 KiB, echo), {clients} clients"),
                Value::PerSec(b.rate()),
            )
            .baseline("sink", Value::PerSec(s.rate()));
            if clients == 32 {
                let rate = b.rate();
                row = row.target("≥ 2000/s", rate >= 2000.0);
            }
            report.rows.push(row);
            let (bp99, sp99) = (b.ack_p99_ms(), s.ack_p99_ms());
            let mut row = Row::new(
                "jobs",
                format!("p99 Ack latency (Create/Fragment/Close), {clients} clients"),
                Value::Millis(bp99),
            )
            .baseline("sink", Value::Millis(sp99));
            if clients == 32 {
                row = row.target("< 10 ms", bp99 < 10.0);
            }
            report.rows.push(row);
            for (i, packet) in PACKETS.iter().enumerate() {
                report.latencies.push(LatencyRow {
                    clients,
                    packet,
                    bitsd_p50_ms: b.latency[i].quantile_ms(0.5),
                    bitsd_p99_ms: b.latency[i].quantile_ms(0.99),
                    bitsd_max_ms: b.latency[i].quantile_ms(1.0),
                    sink_p50_ms: s.latency[i].quantile_ms(0.5),
                    sink_p99_ms: s.latency[i].quantile_ms(0.99),
                });
            }
        }
        Ok::<_, BoxError>(())
    }
    .await;
    sink.stop();
    server.shutdown().await?;
    let _ = std::fs::remove_dir_all(&dir);
    result
}
