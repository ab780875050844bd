//! The farm scenario (`--farm`): the same workloads sent (a) straight to the object store as
//! bare PUTs through bitsd's own object-store client, (b) to one farm node (PostgreSQL 15 and
//! a single-node Garage, both syncing to disk), (c) to three farm nodes behind nginx, and (d)
//! to a single-node bitsd on the default local backend; in interleaved rounds (a b c d, a b c
//! d, ...), medians over the rounds. Then a concurrency sweep of small jobs at 1, 8, 64
//! clients with PostgreSQL watched for lock waits, and CPU seconds of every process; last,
//! paired rounds of three nodes against one behind nginx (the `farm_scale` module).
//!
//! ```sh
//! cargo build --release -p bitsd -p bitsd-bench
//! target/release/bitsd-bench --farm
//! target/release/bitsd-bench --farm --farm-rounds 5 --farm-sweep 1,8,64,128 --json
//! ```

use std::path::Path;

use bytes::Bytes;
use clap::Args as ClapArgs;

use crate::client::Result;
use crate::farm_env::{s3_since, CpuSnapshot, FarmEnv, FarmSettings};
use crate::farm_load::{self as load, Run};
use crate::farm_pg::{PgSeen, PgWatch};
use crate::farm_report::FarmReport;
use crate::util::{pattern, MIB};

/// The farm scenario's switches.
#[derive(Debug, Clone, ClapArgs)]
pub struct FarmArgs {
    /// Run the farm scenario (alone): bare object PUTs, one farm node, three behind nginx,
    /// and a single-node bitsd, with real PostgreSQL, Garage and nginx.
    #[arg(long)]
    pub farm: bool,
    /// Interleaved rounds (medians over them; 0: none, for a run of the sweep or the scale
    /// comparison alone).
    #[arg(long, default_value_t = 5)]
    pub farm_rounds: usize,
    /// Concurrent uploads in the fragment cases.
    #[arg(long, default_value_t = 1)]
    pub farm_sessions: usize,
    /// MiB per upload in the 1 MiB-fragment case (the 64 KiB case sends a quarter of it, the
    /// 8 KiB case an eighth).
    #[arg(long, default_value_t = 64)]
    pub farm_mib: u64,
    /// Clients of the small-job case in the rounds.
    #[arg(long, default_value_t = 8)]
    pub farm_job_clients: usize,
    /// Seconds of each small-job measurement.
    #[arg(long, default_value_t = 3.0)]
    pub farm_job_secs: f64,
    /// Reach Garage through an nginx of its own (nodes and bare PUTs alike).
    #[arg(long)]
    pub farm_store_proxy: bool,
    /// Nodes run with `coalesce_fragments = false` (small fragments stay one object each).
    #[arg(long)]
    pub farm_no_coalesce: bool,
    /// Each node's PostgreSQL pool (`postgres_max_connections`; bitsd's default is 16).
    #[arg(long)]
    pub farm_pool: Option<usize>,
    /// The nodes' `merge_parts_from` in bytes (uploads from this length have their
    /// fragments under 5 MiB merged into part-sized objects; 0: never; unset: bitsd's
    /// default, 1 GiB).
    #[arg(long)]
    pub farm_merge_parts_from: Option<u64>,
    /// nginx's `client_body_buffer_size` in front of the nodes: how much of a fragment's body
    /// it reads from the client per write to a node. The default is `1m`, what docs/farm.md
    /// advises for large fragments; `16k` is nginx's own default (the benchmark's until the
    /// section "Part merges for large uploads" of docs/farm-performance-log-2.md).
    #[arg(long, default_value = "1m")]
    pub farm_balancer_body_buffer: String,
    /// Idle upstream connections nginx keeps in front of the nodes (its `keepalive`, for the
    /// whole group of nodes).
    #[arg(long, default_value_t = bitsd_tests::nginx::KEEPALIVE)]
    pub farm_balancer_keepalive: usize,
    /// Each farm node's async runtime threads (`TOKIO_WORKER_THREADS`; by default one per
    /// core): three nodes sharing two cores run six worker threads otherwise.
    #[arg(long)]
    pub farm_node_threads: Option<usize>,
    /// `sign_payloads` of the nodes and of the bare PUTs: `false` (the default here) sends
    /// `UNSIGNED-PAYLOAD`, as a farm over `https://` does by default and as the nodes'
    /// cut-through fragments always do, so a bare PUT sends its body the way a node sends a
    /// fragment; `true` hashes every written body into its signature (bitsd's default over
    /// a plain-HTTP endpoint such as the benchmark's Garage; the benchmark's setting before
    /// 2026-12-04 evening, which gave the bare PUTs a SHA-256 pass the nodes' fragments did
    /// not have).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub farm_sign_payloads: bool,

    /// Run the store as a three-node Garage cluster with replication factor 3 on loopback
    /// (a write needs two of the three nodes; every node fsyncs data and metadata) instead
    /// of a single node; the farm nodes and the bare PUTs go through the first node's S3 API
    #[arg(long)]
    pub farm_garage_cluster: bool,
    /// Client counts of the concurrency sweep (comma-separated; 0: no sweep).
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub farm_sweep: Vec<usize>,
    /// Paired rounds of three nodes against one, both behind nginx, the side that goes first
    /// alternating (0: none; see the `farm_scale` module).
    #[arg(long, default_value_t = 7)]
    pub farm_scale_rounds: usize,
    /// Concurrent clients of 4 KiB echo jobs in those rounds.
    #[arg(long, default_value_t = 64)]
    pub farm_scale_clients: usize,
    /// Clients that each trickle a 16 MiB fragment at once to one more farm node, whose peak
    /// RSS is checked against its `fragment_memory` (0: not run; see the `farm_rss` module).
    #[arg(long, default_value_t = 32)]
    pub farm_rss_clients: usize,
    /// That node's `fragment_memory`, in MiB.
    #[arg(long, default_value_t = 64)]
    pub farm_rss_memory_mib: u64,
    /// Uploads per target and fragment size (1 MiB, 64 KiB) whose fragments are each paired
    /// with a bare PUT of the same bytes, one right after the other (0: not run; see the
    /// `farm_paired` module).
    #[arg(long, default_value_t = 3)]
    pub farm_paired_uploads: usize,
}

/// Where the bytes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Bare PUTs to the bucket.
    Bare,
    /// Bare PUTs through an nginx configured as the balancer (the hop's own cost).
    BareLb,
    /// One farm node, directly.
    Farm1,
    /// Three farm nodes behind nginx.
    Farm3,
    /// One farm node behind the same kind of nginx (the fair comparison for `Farm3`: the
    /// balancer's hop and CPU on both sides).
    Farm1Lb,
    /// Single-node bitsd, local backend.
    Local,
}

impl Target {
    /// Every target, in the order of a round.
    pub const ALL: [Target; 6] = [
        Target::Bare,
        Target::BareLb,
        Target::Farm1,
        Target::Farm1Lb,
        Target::Farm3,
        Target::Local,
    ];

    /// Column name.
    pub fn name(self) -> &'static str {
        match self {
            Target::Bare => "bare PUT",
            Target::BareLb => "bare PUT + nginx",
            Target::Farm1 => "farm, 1 node",
            Target::Farm3 => "farm, 3 nodes + nginx",
            Target::Farm1Lb => "farm, 1 node + nginx",
            Target::Local => "single node (local)",
        }
    }

    /// How a farm target is named in the per-fragment overhead checks.
    pub fn check_phrase(self) -> &'static str {
        match self {
            Target::Farm1 => "one farm node",
            Target::Farm1Lb => "one farm node behind nginx",
            Target::Farm3 => "three farm nodes behind nginx",
            Target::Bare | Target::BareLb | Target::Local => self.name(),
        }
    }
}

/// Serialized by its column name.
impl serde::Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// One workload of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// Plain upload in fragments of this many bytes.
    Fragments(usize),
    /// 4 KiB echo upload-reply jobs.
    Jobs,
}

impl Case {
    /// Row label.
    pub fn label(self, a: &FarmArgs) -> String {
        match self {
            Case::Fragments(f) => format!(
                "{} fragments, {} × {} MiB upload",
                crate::util::size_label(f as u64),
                a.farm_sessions,
                upload_bytes(a, self) / MIB
            ),
            Case::Jobs => format!("4 KiB echo jobs, {} clients", a.farm_job_clients),
        }
    }
}

/// Bytes per upload of a fragment case.
pub fn upload_bytes(a: &FarmArgs, case: Case) -> u64 {
    match case {
        Case::Fragments(f) if f as u64 >= MIB => a.farm_mib.max(1) * MIB,
        // An eighth: 512 fragments of 8 KiB by default (nginx closes a client connection
        // after 1000 requests, which the benchmark's connections do not survive).
        Case::Fragments(f) if f < 64 * 1024 => (a.farm_mib.max(8) * MIB) / 8,
        Case::Fragments(_) => (a.farm_mib.max(4) * MIB) / 4,
        Case::Jobs => 0,
    }
}

pub async fn run_one(
    env: &FarmEnv,
    target: Target,
    case: Case,
    a: &FarmArgs,
    clients: usize,
    tag: &str,
    payload: &Bytes,
) -> Result<Run> {
    // Every run uploads to names of its own: a published name is not taken twice.
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tag = &format!("{tag}-{n}");
    let addr = match target {
        Target::Bare | Target::BareLb => None,
        Target::Farm1 => Some(env.nodes[0].addr),
        Target::Farm3 => Some(env.nginx.addr()),
        Target::Farm1Lb => Some(env.nginx1.addr()),
        Target::Local => Some(env.local.addr),
    };
    let run = match (case, addr) {
        (Case::Fragments(f), Some(addr)) => {
            let each = upload_bytes(a, case);
            load::http_fragments(addr, tag, a.farm_sessions, each, f, payload).await
        }
        (Case::Fragments(f), None) => {
            let each = upload_bytes(a, case);
            let objects = bare_objects(env, target)?;
            load::bare_fragments(&objects, tag, a.farm_sessions, each, f, payload).await
        }
        (Case::Jobs, Some(addr)) => load::http_jobs(addr, tag, clients, a.farm_job_secs).await,
        (Case::Jobs, None) => {
            let objects = bare_objects(env, target)?;
            load::bare_jobs(&objects, tag, clients, a.farm_job_secs).await
        }
    };
    run.map_err(|e| format!("{} → {}: {e}", case.label(a), target.name()).into())
}

/// The bucket's client of a bare target: straight to the store, or through `bare_lb`.
fn bare_objects(env: &FarmEnv, target: Target) -> Result<bitsd_storage::shared::objects::Objects> {
    match target {
        Target::BareLb => env.objects_lb(),
        _ => env.objects(),
    }
}

/// `--farm`: runs the farm scenario alone and prints its own report (markdown, or JSON).
pub async fn main(
    a: &FarmArgs,
    bitsd: Option<&Path>,
    work_dir: Option<&Path>,
    json: bool,
) -> std::process::ExitCode {
    let run = async {
        let base = work_dir.map_or_else(std::env::temp_dir, Path::to_owned);
        let work = tempfile::Builder::new()
            .prefix("bitsd-bench-")
            .tempdir_in(&base)?;
        let bin = crate::child::find_bitsd(bitsd)?;
        let report = run(a, &bin, work.path()).await?;
        Ok::<_, crate::client::BoxError>(if json {
            serde_json::to_string_pretty(&report)?
        } else {
            report.markdown()
        })
    };
    match run.await {
        Ok(out) => {
            print!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bitsd-bench: farm: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the farm scenario and returns its report.
pub async fn run(a: &FarmArgs, bin: &Path, work: &Path) -> Result<FarmReport> {
    let dir = crate::farm_env::farm_dir(work);
    std::fs::create_dir_all(&dir)?;
    eprintln!("bench: farm: starting PostgreSQL, Garage, 3 farm nodes, nginx, a local bitsd");
    let env = FarmEnv::start(
        bin,
        &dir,
        a.farm_store_proxy,
        FarmSettings {
            coalesce: !a.farm_no_coalesce,
            pool: a.farm_pool,
            merge_parts_from: a.farm_merge_parts_from,
            balancer_body_buffer: a.farm_balancer_body_buffer.clone(),
            node_threads: a.farm_node_threads,
            sign_payloads: Some(a.farm_sign_payloads),
            balancer_keepalive: a.farm_balancer_keepalive,
            garage_cluster: a.farm_garage_cluster,
        },
    )
    .await?;
    let payload = Bytes::from(pattern(MIB as usize, 3));
    let mut report = FarmReport::new(a, &env);
    let cases = [
        Case::Fragments(MIB as usize),
        Case::Fragments(64 * 1024),
        Case::Fragments(8 * 1024),
        Case::Jobs,
    ];
    // Warm-up: connections, the first objects, PostgreSQL's caches.
    for target in Target::ALL {
        run_one(
            &env,
            target,
            Case::Fragments(MIB as usize),
            &warm(a),
            1,
            "warm-f",
            &payload,
        )
        .await?;
        let w = FarmArgs {
            farm_job_secs: 0.5,
            ..a.clone()
        };
        run_one(&env, target, Case::Jobs, &w, 2, "warm-j", &payload).await?;
    }
    for round in 0..a.farm_rounds {
        for case in cases {
            for target in Target::ALL {
                eprintln!(
                    "bench: farm round {}/{}: {} → {}",
                    round + 1,
                    a.farm_rounds,
                    case.label(a),
                    target.name()
                );
                let tag = format!("r{round}-{}", report.measured.len());
                let (before, s3) = (env.cpu(), env.s3_requests().await);
                let run =
                    run_one(&env, target, case, a, a.farm_job_clients, &tag, &payload).await?;
                let cpu = env.cpu().since(&before);
                let s3 = s3_since(&env.s3_requests().await, &s3);
                report.add(target, case, run, &cpu, &s3);
            }
        }
    }
    if a.farm_paired_uploads > 0 {
        report.paired = crate::farm_paired::measure(&env, a, &payload).await?;
    }
    let watch = PgWatch::connect(&env.postgres_url).await?;
    // One node behind nginx next to three behind nginx: the same balancer on both sides, so
    // the comparison is of node counts alone.
    for target in [Target::Farm1, Target::Farm1Lb, Target::Farm3, Target::Local] {
        for &clients in a.farm_sweep.iter().filter(|&&c| c > 0) {
            eprintln!(
                "bench: farm sweep: {clients} clients of 4 KiB jobs → {}",
                target.name()
            );
            let tag = format!("sweep-{}-{clients}", report.sweep.len());
            let (before, s3) = (env.cpu(), env.s3_requests().await);
            let (run, seen) = watch
                .watch(run_one(
                    &env,
                    target,
                    Case::Jobs,
                    a,
                    clients,
                    &tag,
                    &payload,
                ))
                .await?;
            let cpu = env.cpu().since(&before);
            let s3 = s3_since(&env.s3_requests().await, &s3);
            let seen = if target == Target::Local {
                PgSeen::default()
            } else {
                seen
            };
            report.add_sweep(target, clients, &run?, &cpu, seen, &s3);
        }
    }
    report.scale = Some(crate::farm_scale::measure(&env, &watch, a, &payload).await?);
    report.finish();
    if a.farm_rss_clients > 0 {
        let rss = crate::farm_rss::run(
            bin,
            &dir,
            &dir.join("farm.toml"),
            a.farm_rss_clients,
            a.farm_rss_memory_mib * MIB,
        )
        .await?;
        report.checks.push((
            format!(
                "peak RSS of a farm node, {} clients each trickling a 16 MiB fragment, \
                 fragment_memory {} MiB",
                rss.clients, a.farm_rss_memory_mib
            ),
            rss.figure(),
            rss.peak <= rss.limit() && rss.other.is_empty(),
        ));
    }
    drop(env);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

/// Settings of the warm-up upload (1 MiB in 1 MiB fragments... at least 2 fragments).
fn warm(a: &FarmArgs) -> FarmArgs {
    FarmArgs {
        farm_mib: 2,
        farm_sessions: 1,
        ..a.clone()
    }
}

/// The CPU of one target's own processes in `cpu`: for the bare PUTs the benchmark process
/// (the object-store client), for the farm its node processes, for the single node its
/// process.
pub fn own_cpu(target: Target, cpu: &CpuSnapshot) -> f64 {
    match target {
        Target::Bare | Target::BareLb => cpu.bench,
        Target::Farm1 | Target::Farm1Lb => cpu.nodes.first().copied().unwrap_or(0.0),
        Target::Farm3 => cpu.nodes_total(),
        Target::Local => cpu.local,
    }
}
