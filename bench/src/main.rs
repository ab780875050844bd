//! `bitsd-bench`: the benchmark of issue 5.
//!
//! In one run on one machine it starts (a) a minimal hyper sink that discards request bodies
//! and serves a file, (b) a plain file writer with the same fragment size and fsync policy,
//! and (c) bitsd: the real binary as a child process per fsync policy for the upload and job
//! scenarios (its own CPU and RSS), in-process for the others; drives them with the same raw
//! HTTP/1.1 client in interleaved rounds, and prints medians, spreads, per-round ratios against
//! the baselines of the same run, and the issue's targets with PASS/MISS.
//!
//! ```sh
//! CARGO_TARGET_DIR=target cargo build --release -p bitsd -p bitsd-bench
//! target/release/bitsd-bench            # the issue's sizes (several minutes)
//! target/release/bitsd-bench --quick    # small sizes, about 30 s
//! target/release/bitsd-bench --only jobs,download --json
//! ```

mod attach;
mod child;
mod client;
mod compare;
mod download;
// The farm scenario (`--farm`), kept apart from the other scenarios.
mod farm;
mod farm_env;
mod farm_load;
mod farm_markdown;
mod farm_paired;
mod farm_pg;
mod farm_report;
mod farm_rss;
mod farm_scale;
mod file_baseline;
mod jobs;
mod machine;
mod report;
mod rounds;
mod sink;
mod startup;
mod upload;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::{Parser, ValueEnum};

use crate::client::Result;
use crate::report::Report;
use crate::util::{pattern, size_label, MIB};

/// Benchmark bitsd against a hyper sink and a plain file writer, in one run.
#[derive(Debug, Parser)]
#[command(name = "bitsd-bench", version)]
struct Args {
    /// Small sizes and short runs (about 30 s in all); same as --scale 0.0625 plus shorter
    /// job runs, fewer RSS sessions and 10,000 startup sessions.
    #[arg(long)]
    quick: bool,
    /// Multiplies every upload and reply size (1 = the issue's sizes: 1 GiB single upload,
    /// 64 MiB per concurrent upload, 256 MiB reply).
    #[arg(long)]
    scale: Option<f64>,
    /// Run only these scenarios (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// Print the results as JSON instead of markdown tables.
    #[arg(long)]
    json: bool,
    /// The bitsd binary for the child-process scenarios [default: `bitsd` next to this
    /// executable].
    #[arg(long)]
    bitsd: Option<PathBuf>,
    /// Where the temporary data directories go (the same file system as production data, ideally)
    /// [default: the system temporary directory].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Seconds each small-job measurement runs.
    #[arg(long)]
    job_secs: Option<f64>,
    /// Idle sessions in the store for the startup scenario.
    #[arg(long)]
    startup_sessions: Option<usize>,
    /// Concurrent sessions of the peak-RSS scenario.
    #[arg(long)]
    rss_sessions: Option<usize>,
    /// Fragment sizes of the upload scenario, in KiB (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "64,1024")]
    fragment_kib: Vec<usize>,
    /// Concurrent upload counts of the upload scenario (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    uploads: Vec<usize>,
    /// bitsd's fsync policies (per-fragment, on-close, never; comma-separated): the upload and
    /// job scenarios run one bitsd process per policy in the same rounds, and the file
    /// baseline syncs the same way (after every fragment, once at the end, never). The other
    /// scenarios use the first.
    #[arg(long, value_delimiter = ',', default_value = "per-fragment,never")]
    fsync: Vec<bitsd::FsyncPolicy>,
    /// Client counts of the small-job scenario (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "32,256")]
    job_clients: Vec<usize>,
    /// Interleaved rounds of every upload and job comparison (each side once per round; the
    /// median counts) and best-of runs of the download scenario [default: 5, with --quick 2].
    #[arg(long, alias = "repeat")]
    rounds: Option<usize>,
    /// Shell command run during every bitsd measurement of the upload and job scenarios,
    /// `{pid}` replaced by the bitsd process id and `{case}` by the case's name, stopped with
    /// SIGINT when the measurement ends; e.g.
    /// `--attach 'perf stat -e task-clock -p {pid} -o /tmp/{case}.txt'`.
    #[arg(long)]
    attach: Option<String>,
    /// An earlier `--json` output: print this run's comparisons next to its (markdown only).
    #[arg(long, value_name = "OLD.json")]
    compare: Option<PathBuf>,
    /// The farm scenario (`--farm` and its `--farm-*` settings).
    #[command(flatten)]
    farm: farm::FarmArgs,
}

/// The parts of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// 1. Upload throughput (64 KiB, 1 MiB, 16 MiB fragments; 1, 8, 64 uploads).
    Upload,
    /// 2. Small upload-reply jobs per second and per-packet latency.
    Jobs,
    /// 3. Reply download throughput.
    Download,
    /// 4. Peak RSS of the bitsd process (child process).
    Rss,
    /// 5a. Startup time with many idle sessions.
    Startup,
    /// 5b. Data directory size against the bytes it holds.
    Disk,
}

/// Sizes and counts of one run.
#[derive(Debug)]
pub struct Plan {
    /// The single upload's size.
    pub single: u64,
    /// Each concurrent upload's size.
    pub each: u64,
    /// Fragment sizes.
    pub fragments: Vec<usize>,
    /// Interleaved rounds of each comparison (download: runs, best counts).
    pub rounds: usize,
    /// fsync policies the upload and job scenarios compare.
    pub fsync: Vec<bitsd::FsyncPolicy>,
    /// Command attached to the server during each bitsd measurement (`--attach`).
    pub attach: Option<String>,
    /// Upload concurrency levels.
    pub concurrency: Vec<usize>,
    /// Seconds per job measurement.
    pub job_secs: f64,
    /// Job client counts.
    pub job_clients: Vec<usize>,
    /// Reply size.
    pub reply: u64,
    /// GETs per connection in the download scenario.
    pub download_repeats: usize,
    /// Connection counts of the download scenario.
    pub download_clients: Vec<usize>,
    /// Sessions of the RSS scenario.
    pub rss_sessions: usize,
    /// Fragment size of the RSS scenario.
    pub rss_fragment: usize,
    /// Fragments per session of the RSS scenario.
    pub rss_fragments_each: usize,
    /// Idle sessions of the startup scenario.
    pub startup_sessions: usize,
    /// Complete (and as many partial) uploads of the disk scenario.
    pub disk_sessions: usize,
    /// Size of each of them.
    pub disk_each: u64,
}

impl Plan {
    fn new(args: &Args) -> Self {
        let scale = args
            .scale
            .unwrap_or(if args.quick { 1.0 / 16.0 } else { 1.0 })
            .max(1e-6);
        // Whole 64 KiB units, at least one.
        let sized = |mib: u64| {
            let unit = 64 * 1024;
            (((mib * MIB) as f64 * scale / unit as f64).round() as u64).max(1) * unit
        };
        Plan {
            single: sized(1024),
            each: sized(64),
            fragments: args.fragment_kib.iter().map(|k| k.max(&1) * 1024).collect(),
            rounds: args.rounds.unwrap_or(if args.quick { 2 } else { 5 }).max(1),
            fsync: if args.fsync.is_empty() {
                vec![bitsd::FsyncPolicy::PerFragment]
            } else {
                args.fsync.clone()
            },
            attach: args.attach.clone(),
            concurrency: args.uploads.iter().map(|&n| n.max(1)).collect(),
            job_secs: args.job_secs.unwrap_or(if args.quick { 1.5 } else { 5.0 }),
            job_clients: args.job_clients.iter().map(|&n| n.max(1)).collect(),
            reply: sized(256),
            download_repeats: if args.quick { 3 } else { 5 },
            download_clients: vec![1, 4],
            rss_sessions: args
                .rss_sessions
                .unwrap_or(if args.quick { 64 } else { 256 }),
            rss_fragment: 16 * MIB as usize,
            rss_fragments_each: 1,
            startup_sessions: args.startup_sessions.unwrap_or(if args.quick {
                10_000
            } else {
                100_000
            }),
            disk_sessions: 8,
            disk_each: sized(64).max(2 * MIB),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} interleaved rounds; single upload {}, concurrent uploads {} each, reply {}, \
             jobs {} s per round, RSS {} sessions, startup {} sessions",
            self.rounds,
            size_label(self.single),
            size_label(self.each),
            size_label(self.reply),
            self.job_secs,
            self.rss_sessions,
            self.startup_sessions
        )
    }
}

fn machine() -> Vec<(String, String)> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .map(|l| l["MemTotal:".len()..].trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let mut context = vec![(
        "machine".into(),
        format!("{cores} cores, {cpu}, {mem} RAM, Linux {kernel}"),
    )];
    if let Some(reporting) = free_page_reporting() {
        context.push(("free page reporting".into(), reporting));
    }
    context
}

/// Whether the guest hands freed memory back to its host (virtio-balloon free page reporting)
/// and how soon. On a VM that does it at once, page-cache memory freed when one case deletes
/// its files costs the next writer a host page fault per page again: a plain `dd` of 1 GiB
/// after a delete ran at 0.66–1.7 GB/s with `min_free_ms` 0 and at 6.5 GB/s with 60000 on the
/// development VM (docs/performance-log.md). The swings land on whichever side writes then.
fn free_page_reporting() -> Option<String> {
    let dir = std::path::Path::new("/sys/module/page_reporting/parameters");
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .map(|s| s.trim().to_owned())
    };
    let order = read("page_reporting_order")?;
    let balloon = std::path::Path::new("/sys/bus/virtio/drivers/virtio_balloon").exists();
    let mut out = format!("page_reporting_order {order}");
    if let Some(min_free_ms) = read("min_free_ms") {
        out.push_str(&format!(", min_free_ms {min_free_ms}"));
        if min_free_ms == "0" && balloon {
            out.push_str(
                " (freed page cache goes back to the host at once: write throughput of \
                 both sides swings with it; see docs/performance-log.md)",
            );
        }
    }
    Some(out)
}

async fn run(args: Args) -> Result<Report> {
    let plan = Plan::new(&args);
    let wants = |s: Scenario| args.only.is_empty() || args.only.contains(&s);
    let base = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)?;
    let work = tempfile::Builder::new()
        .prefix("bitsd-bench-")
        .tempdir_in(&base)?;
    let max_fragment = plan
        .fragments
        .iter()
        .copied()
        .chain([plan.rss_fragment])
        .max()
        .unwrap_or(MIB as usize);
    let payload = Bytes::from(pattern(max_fragment, 1));
    let mut report = Report {
        context: machine(),
        ..Report::default()
    };
    report
        .context
        .push(("work dir".into(), base.display().to_string()));
    report.context.push(("plan".into(), plan.describe()));
    report.context.push((
        "disk fsync cost".into(),
        machine::fsync_cost(work.path(), 100).unwrap_or_else(|e| format!("not measured: {e}")),
    ));
    report
        .context
        .push(("load average at start".into(), machine::loadavg()));
    util::set_fsync(plan.fsync[0]);
    report.context.push((
        "fsync".into(),
        plan.fsync
            .iter()
            .map(|p| match p {
                bitsd::FsyncPolicy::PerFragment => {
                    "per-fragment (bitsd default; file baseline: sync_data after every fragment)"
                }
                bitsd::FsyncPolicy::OnClose => {
                    "on-close (file baseline: sync_data once, after the last fragment)"
                }
                bitsd::FsyncPolicy::Never => "never (file baseline: no sync_data)",
            })
            .collect::<Vec<_>>()
            .join("; "),
    ));
    let bin = if [
        Scenario::Rss,
        Scenario::Startup,
        Scenario::Upload,
        Scenario::Jobs,
    ]
    .into_iter()
    .any(wants)
    {
        child::find_bitsd(args.bitsd.as_deref())
    } else {
        Err("not needed".into())
    };
    macro_rules! scenario {
        ($s:expr, $name:literal, $run:expr) => {
            if wants($s) {
                if let Err(e) = $run.await {
                    eprintln!("bench: {} failed: {e}", $name);
                    report.skipped.push(format!("{}: {e}", $name));
                }
            }
        };
    }
    for (s, name) in [(Scenario::Upload, "upload"), (Scenario::Jobs, "jobs")] {
        if !wants(s) {
            continue;
        }
        let Ok(bin) = &bin else {
            report.skipped.push(format!("{name}: no bitsd binary"));
            continue;
        };
        let r = if s == Scenario::Upload {
            upload::run(&plan, bin, work.path(), &payload, &mut report).await
        } else {
            jobs::run(&plan, bin, work.path(), &mut report).await
        };
        if let Err(e) = r {
            eprintln!("bench: {name} failed: {e}");
            report.skipped.push(format!("{name}: {e}"));
        }
    }
    scenario!(
        Scenario::Download,
        "download",
        download::run(&plan, work.path(), &payload, &mut report)
    );
    if wants(Scenario::Rss) {
        match &bin {
            Ok(bin) => {
                scenario!(
                    Scenario::Rss,
                    "rss",
                    child::run_rss(&plan, bin, work.path(), &payload, &mut report)
                );
            }
            Err(e) => report.skipped.push(format!("rss: {e}")),
        }
    }
    if wants(Scenario::Startup) && bin.is_err() {
        report.context.push((
            "note".into(),
            "no bitsd binary: the startup scenario skips its child-process part".into(),
        ));
    }
    scenario!(
        Scenario::Startup,
        "startup",
        startup::run_startup(&plan, bin.as_deref().ok(), work.path(), &mut report)
    );
    scenario!(
        Scenario::Disk,
        "disk",
        startup::run_disk(&plan, work.path(), &payload, &mut report)
    );
    report
        .context
        .push(("load average at end".into(), machine::loadavg()));
    Ok(report)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Stopped by a signal, the benchmark drops what it is running, and with it every server
    // it started (bitsd nodes, PostgreSQL, Garage, nginx stop in their `Drop`), instead of
    // leaving them running as the process's default end would.
    tokio::select! {
        code = bench(args) => code,
        why = stop_signal() => {
            eprintln!("bitsd-bench: {why}: stopping the servers it started");
            ExitCode::from(130)
        }
    }
}

/// The first SIGINT, SIGTERM or SIGHUP (never, if they cannot be listened to).
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "interrupted",
        _ = term.recv() => "terminated",
        _ = hup.recv() => "hung up",
    }
}

async fn bench(args: Args) -> ExitCode {
    if args.farm.farm {
        let (bin, work) = (args.bitsd.as_deref(), args.work_dir.as_deref());
        return farm::main(&args.farm, bin, work, args.json).await;
    }
    let json = args.json;
    let compare_with = args.compare.clone();
    match run(args).await {
        Ok(report) => {
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("bitsd-bench: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", report.markdown());
                if let Some(old) = &compare_with {
                    match compare::markdown(old, &report.comparisons) {
                        Ok(table) => print!("{table}"),
                        Err(e) => eprintln!("bitsd-bench: {e}"),
                    }
                }
            }
            if report.skipped.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("bitsd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
