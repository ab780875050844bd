//! The farm scenario's results: medians over the rounds, the per-fragment overhead over a bare
//! PUT, CPU per GiB of every process, the concurrency sweep with what PostgreSQL waited on;
//! serialized as JSON, or printed as markdown (`farm_markdown`).

use serde::Serialize;

use crate::farm::{own_cpu, Case, FarmArgs, Target};
use crate::farm_env::{CpuSnapshot, FarmEnv, S3Counts};
use crate::farm_load::Run;
use crate::farm_pg::PgSeen;
use crate::util::MIB;

const GIB: f64 = (1024 * MIB) as f64;

/// One round's figures of one target and case.
#[derive(Clone, Debug, Serialize)]
pub struct RoundFigures {
    /// MiB/s (fragment cases) or jobs/s.
    pub rate: f64,
    /// Fragment Ack (or PUT) latency p50, ms.
    pub p50_ms: f64,
    /// p99, ms.
    pub p99_ms: f64,
    /// The last Fragment Ack of an upload (its completion included) p50, ms (fragment cases).
    pub last_p50_ms: f64,
    /// Whole-job latency p50, ms (job cases).
    pub job_p50_ms: f64,
    /// Whole-job latency p99, ms (job cases).
    pub job_p99_ms: f64,
    /// Job cases: p50 of Create-Session, GET of the reply, Close-Session, ms.
    pub packet_p50_ms: [f64; 3],
}

/// Everything measured of one target and case over the rounds.
#[derive(Clone, Debug, Serialize)]
pub struct Measured {
    /// Where the bytes went.
    pub target: &'static str,
    /// The workload.
    pub case: String,
    #[serde(skip)]
    pub(crate) kind: Option<(Target, Case)>,
    /// Each round.
    pub rounds: Vec<RoundFigures>,
    /// CPU seconds summed over the rounds.
    pub cpu: CpuSnapshot,
    /// Bytes uploaded over the rounds.
    pub bytes: u64,
    /// Jobs over the rounds.
    pub jobs: u64,
    /// Fragments (or bare PUTs) over the rounds.
    pub fragments: u64,
    /// S3 requests Garage counted over the rounds, by endpoint.
    pub s3: S3Counts,
}

impl Measured {
    pub(crate) fn median(&self, f: impl Fn(&RoundFigures) -> f64) -> f64 {
        median(self.rounds.iter().map(f).collect())
    }

    /// S3 requests per job (job cases) or per fragment.
    pub(crate) fn s3_per_unit(&self) -> String {
        let units = if self.jobs > 0 {
            self.jobs
        } else {
            self.fragments
        };
        per_unit(&self.s3, units)
    }

    /// CPU seconds per GiB (fragment cases) or ms per job (job cases) of `secs`.
    pub(crate) fn per_unit(&self, secs: f64) -> f64 {
        if self.jobs > 0 {
            secs * 1000.0 / self.jobs as f64
        } else {
            secs * GIB / self.bytes.max(1) as f64
        }
    }
}

/// The per-fragment overhead of `farm` over `bare` at p50, ms: the median over the rounds of
/// each round's difference (the two ran seconds apart, so a round's load is on both sides),
/// and, beside it, the difference of the two medians over the rounds (rounds unpaired).
fn overhead(farm: &Measured, bare: &Measured) -> (f64, f64) {
    let paired = farm
        .rounds
        .iter()
        .zip(&bare.rounds)
        .map(|(f, b)| f.p50_ms - b.p50_ms)
        .collect();
    (
        median(paired),
        farm.median(|r| r.p50_ms) - bare.median(|r| r.p50_ms),
    )
}

/// The middle value (the upper one of an even count); 0 for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One point of the concurrency sweep.
#[derive(Clone, Debug, Serialize)]
pub struct SweepRow {
    /// Where the jobs went.
    pub target: &'static str,
    /// Concurrent clients.
    pub clients: usize,
    /// Jobs per second.
    pub jobs_per_sec: f64,
    /// Job latency p50, ms.
    pub job_p50_ms: f64,
    /// Job latency p99, ms.
    pub job_p99_ms: f64,
    /// PostgreSQL write transactions per job.
    pub txns_per_job: f64,
    /// PostgreSQL write transactions per second.
    pub txns_per_sec: f64,
    /// WAL bytes per job.
    pub wal_per_job: f64,
    /// What the sampler saw.
    pub pg_samples: u64,
    /// Active backend-samples.
    pub pg_active: u64,
    /// Backend-samples waiting on a heavyweight lock.
    pub pg_lock_waits: u64,
    /// Ungranted `pg_locks` rows over all samples.
    pub pg_ungranted: u64,
    /// The most frequent wait events of active backends.
    pub pg_top_waits: String,
    /// Lock waits by waiting statement and the statement it waited for, with counts.
    pub pg_lock_statements: Vec<(String, u64)>,
    /// S3 requests per job, by endpoint.
    pub s3_per_job: String,
    /// CPU ms per job: the target's own processes, PostgreSQL, Garage.
    pub cpu_ms_per_job: [f64; 3],
}

/// The farm scenario's report.
#[derive(Clone, Debug, Serialize)]
pub struct FarmReport {
    /// Machine, load, plan, servers.
    pub context: Vec<(String, String)>,
    /// Targets × cases over the rounds.
    pub measured: Vec<Measured>,
    /// The concurrency sweep.
    pub sweep: Vec<SweepRow>,
    /// The per-fragment overhead measured fragment by fragment (empty when not run).
    pub paired: Vec<crate::farm_paired::PairedRow>,
    /// The per-fragment overheads over the rounds when they are not the checks (the
    /// fragment-by-fragment measurement ran): (what, figure).
    pub rounds_overhead: Vec<(String, String)>,
    /// Three nodes against one in paired rounds.
    pub scale: Option<crate::farm_scale::Scale>,
    /// Targets with PASS/MISS: (what, figure, pass).
    pub checks: Vec<(String, String, bool)>,
    #[serde(skip)]
    pub(crate) rounds: usize,
}

/// `PutObject 2.00, GetObject 1.00` per unit.
fn per_unit(counts: &S3Counts, units: u64) -> String {
    let mut v: Vec<_> = counts.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    v.iter()
        .map(|(k, n)| format!("{k} {:.2}", **n as f64 / units.max(1) as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn case_label(case: Case) -> String {
    match case {
        Case::Fragments(f) => format!("{} fragments", crate::util::size_label(f as u64)),
        Case::Jobs => "4 KiB echo jobs".into(),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

impl FarmReport {
    /// An empty report with the machine and plan.
    pub fn new(a: &FarmArgs, env: &FarmEnv) -> Self {
        let mut context = crate::machine();
        context.push(("load average at start".into(), loadavg()));
        context.push((
            "plan".into(),
            format!(
                "{} interleaved rounds; fragment cases {} concurrent upload(s) of {} MiB (1 MiB \
                 fragments) and {} MiB (64 KiB fragments); jobs {} clients × {} s; sweep {:?} \
                 clients; {} paired rounds of three nodes against one at {} clients",
                a.farm_rounds,
                a.farm_sessions,
                a.farm_mib.max(1),
                a.farm_mib.max(4) / 4,
                a.farm_job_clients,
                a.farm_job_secs,
                a.farm_sweep,
                a.farm_scale_rounds,
                a.farm_scale_clients
            ),
        ));
        context.push((
            "servers".into(),
            format!(
                "PostgreSQL 15 on 127.0.0.1:{} (fsync, synchronous_commit, full_page_writes on); \
                 {} (data_fsync, metadata_fsync on); {} bitsd farm nodes and \
                 one single-node bitsd (local backend, fsync per-fragment) as child processes; \
                 nginx round robin over the nodes with upstream keepalive (up to {} idle connections, as production balancers run); each node's PostgreSQL pool {} connections and runtime worker threads {}; merge_parts_from {}; sign_payloads {}; nginx client_body_buffer_size {}{}",
                env.pg.port(),
                env.garage.describe(),
                env.nodes.len(),
                a.farm_balancer_keepalive,
                a.farm_pool.map_or("16 (default)".to_string(), |n| n.to_string()),
                a.farm_node_threads
                    .map_or("one per core (default)".to_string(), |n| n.to_string()),
                a.farm_merge_parts_from.map_or(
                    format!(
                        "{} bytes (default)",
                        bitsd_storage::shared::objects::DEFAULT_MERGE_PARTS_FROM
                    ),
                    |n| format!("{n} bytes")
                ),
                a.farm_sign_payloads,
                a.farm_balancer_body_buffer,
                if env.store_proxy.is_some() {
                    "; the store reached through an nginx of its own (--farm-store-proxy)"
                } else {
                    ""
                }
            ),
        ));
        FarmReport {
            context,
            measured: Vec::new(),
            sweep: Vec::new(),
            paired: Vec::new(),
            rounds_overhead: Vec::new(),
            scale: None,
            checks: Vec::new(),
            rounds: a.farm_rounds,
        }
    }

    /// Adds one round's run of `target` on `case`.
    pub fn add(&mut self, target: Target, case: Case, run: Run, cpu: &CpuSnapshot, s3: &S3Counts) {
        let secs = run.elapsed.as_secs_f64().max(1e-9);
        let rate = if run.jobs > 0 {
            run.jobs as f64 / secs
        } else {
            run.bytes as f64 / MIB as f64 / secs
        };
        let fig = RoundFigures {
            rate,
            p50_ms: run.fragment.ms(0.5),
            p99_ms: run.fragment.ms(0.99),
            last_p50_ms: run.last.ms(0.5),
            job_p50_ms: run.job.ms(0.5),
            job_p99_ms: run.job.ms(0.99),
            packet_p50_ms: [
                run.packets[0].ms(0.5),
                run.packets[1].ms(0.5),
                run.packets[2].ms(0.5),
            ],
        };
        let m = match self
            .measured
            .iter_mut()
            .position(|m| m.kind == Some((target, case)))
        {
            Some(i) => &mut self.measured[i],
            None => {
                self.measured.push(Measured {
                    target: target.name(),
                    case: case_label(case),
                    kind: Some((target, case)),
                    rounds: Vec::new(),
                    cpu: CpuSnapshot::default(),
                    bytes: 0,
                    jobs: 0,
                    fragments: 0,
                    s3: S3Counts::new(),
                });
                let last = self.measured.len() - 1;
                &mut self.measured[last]
            }
        };
        m.rounds.push(fig);
        m.cpu.add(cpu);
        m.bytes += run.bytes;
        m.jobs += run.jobs;
        if let Case::Fragments(f) = case {
            m.fragments += run.bytes.div_ceil(f as u64);
        }
        for (k, v) in s3 {
            *m.s3.entry(k.clone()).or_default() += v;
        }
    }

    /// Adds one point of the sweep.
    pub fn add_sweep(
        &mut self,
        target: Target,
        clients: usize,
        run: &Run,
        cpu: &CpuSnapshot,
        seen: PgSeen,
        s3: &S3Counts,
    ) {
        let secs = run.elapsed.as_secs_f64().max(1e-9);
        let jobs = run.jobs.max(1) as f64;
        self.sweep.push(SweepRow {
            target: target.name(),
            clients,
            jobs_per_sec: run.jobs as f64 / secs,
            job_p50_ms: run.job.ms(0.5),
            job_p99_ms: run.job.ms(0.99),
            txns_per_job: seen.commits as f64 / jobs,
            txns_per_sec: seen.commits as f64 / secs,
            wal_per_job: seen.wal_bytes as f64 / jobs,
            pg_samples: seen.samples,
            pg_active: seen.active,
            pg_lock_waits: seen.lock_waits,
            pg_ungranted: seen.ungranted,
            pg_top_waits: seen.top_waits(4),
            pg_lock_statements: {
                let mut v: Vec<_> = seen
                    .lock_statements
                    .iter()
                    .map(|(k, n)| (k.clone(), *n))
                    .collect();
                v.sort_by_key(|e| std::cmp::Reverse(e.1));
                v
            },
            s3_per_job: per_unit(s3, run.jobs),
            cpu_ms_per_job: [
                own_cpu(target, cpu) * 1000.0 / jobs,
                cpu.postgres * 1000.0 / jobs,
                cpu.garage * 1000.0 / jobs,
            ],
        });
    }

    pub(crate) fn get(&self, target: Target, case: Case) -> Option<&Measured> {
        self.measured
            .iter()
            .find(|m| m.kind == Some((target, case)))
    }

    /// Computes the targets' checks and the end-of-run load.
    pub fn finish(&mut self) {
        self.context.push(("load average at end".into(), loadavg()));
        let (mut checks, mut rounds_overhead) = (Vec::new(), Vec::new());
        for f in [MIB as usize, 64 * 1024] {
            let case = Case::Fragments(f);
            let (Some(bare), Some(farm), Some(local)) = (
                self.get(Target::Bare, case),
                self.get(Target::Farm1, case),
                self.get(Target::Local, case),
            ) else {
                continue;
            };
            let size = crate::util::size_label(f as u64);
            for target in [Target::Farm1Lb, Target::Farm3, Target::Farm1] {
                let what = target.check_phrase();
                if let Some(m) = self.get(target, case) {
                    let (over, apart) = overhead(m, bare);
                    // Behind nginx: also over bare PUTs through the same kind of nginx (what
                    // of the overhead is the balancer's hop; the check stays the one above).
                    let hop = match (target, self.get(Target::BareLb, case)) {
                        (Target::Farm1Lb | Target::Farm3, Some(lb)) => format!(
                            "; over a bare PUT through the same nginx {:.2} ms",
                            overhead(m, lb).0
                        ),
                        _ => String::new(),
                    };
                    let check = (
                        format!("per-fragment overhead of {what} over a bare PUT, p50, {size}"),
                        format!(
                            "{over:.2} ms (target < 2 ms; difference of the medians \
                             {apart:.2} ms{hop})"
                        ),
                        over < 2.0,
                    );
                    // Measured fragment by fragment too: that is the check, the rounds'
                    // figure is shown beside it.
                    if self.paired.is_empty() {
                        checks.push(check);
                    } else {
                        rounds_overhead.push((check.0, check.1));
                    }
                }
            }
            let node = farm.per_unit(own_cpu(Target::Farm1, &farm.cpu));
            let single = local.per_unit(own_cpu(Target::Local, &local.cpu));
            let client = bare.per_unit(own_cpu(Target::Bare, &bare.cpu));
            let limit = 1.5 * single + client;
            let cpu = (
                format!("CPU per GiB of a farm node, {size} fragments"),
                format!(
                    "{node:.2} s/GiB; limit 1.5 × {single:.2} (single node) + {client:.2} \
                     (object-store client) = {limit:.2} s/GiB"
                ),
                node <= limit,
            );
            checks.push(cpu);
        }
        self.rounds_overhead = rounds_overhead;
        checks.extend(self.paired.iter().map(|p| p.check()));
        checks.extend(self.scale.as_ref().and_then(|s| s.check()));
        self.checks.extend(checks);
    }
}
