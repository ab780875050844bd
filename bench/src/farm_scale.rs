//! Three farm nodes against one, both behind the same kind of nginx, at one client count of
//! 4 KiB echo jobs (`--farm-scale-rounds`, `--farm-scale-clients`): the issue's "three nodes
//! are not slower in aggregate than one" on a machine too small to show them scaling.
//!
//! The sweep measures each target once, one after the other, always one node first. But a
//! run leaves PostgreSQL's tables and Garage's metadata bigger than it found them, and the
//! machine's load drifts, so whatever runs later pays for what ran before. Here the two sides
//! alternate which one goes first (one then three, three then one, ...), each round is a
//! pair measured seconds apart, and the check is the median of the rounds' ratios.

use std::fmt::Write as _;

use bytes::Bytes;
use serde::Serialize;

use crate::client::Result;
use crate::farm::{run_one, Case, FarmArgs, Target};
use crate::farm_env::{CpuSnapshot, FarmEnv};
use crate::farm_pg::{PgSeen, PgWatch};

/// The ratio (three nodes' jobs/s over one node's) at or above which three nodes count as
/// not slower: the rounds' own spread on this machine is several per cent either way.
pub const NOT_SLOWER: f64 = 0.95;

/// One side of one round.
#[derive(Clone, Debug, Serialize)]
pub struct Side {
    /// Jobs per second.
    pub jobs_per_sec: f64,
    /// Job latency p50, ms.
    pub job_p50_ms: f64,
    /// CPU ms per job: the nodes, nginx, PostgreSQL, Garage.
    pub cpu_ms_per_job: [f64; 4],
    /// PostgreSQL backend-samples waiting on a heavyweight lock (sampled every 20 ms).
    pub pg_lock_waits: u64,
}

impl Side {
    fn new(run: &crate::farm_load::Run, cpu: &CpuSnapshot, seen: &PgSeen) -> Self {
        let jobs = run.jobs.max(1) as f64;
        let per_job = |secs: f64| secs * 1000.0 / jobs;
        Side {
            jobs_per_sec: run.jobs as f64 / run.elapsed.as_secs_f64().max(1e-9),
            job_p50_ms: run.job.ms(0.5),
            cpu_ms_per_job: [
                per_job(cpu.nodes_total()),
                per_job(cpu.nginx),
                per_job(cpu.postgres),
                per_job(cpu.garage),
            ],
            pg_lock_waits: seen.lock_waits,
        }
    }
}

/// One round: both sides, in the order they ran.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleRound {
    /// Whether three nodes ran first this round.
    pub three_first: bool,
    /// One node behind nginx.
    pub one: Side,
    /// Three nodes behind nginx.
    pub three: Side,
}

impl ScaleRound {
    /// Three nodes' jobs/s over one node's.
    pub fn ratio(&self) -> f64 {
        self.three.jobs_per_sec / self.one.jobs_per_sec.max(1e-9)
    }
}

/// The comparison's rounds.
#[derive(Clone, Debug, Serialize)]
pub struct Scale {
    /// Concurrent clients on each side.
    pub clients: usize,
    /// Seconds of each side's measurement.
    pub secs: f64,
    /// The rounds, in the order they ran.
    pub rounds: Vec<ScaleRound>,
}

/// The median: the middle value, or the mean of the two middle ones of an even count (the
/// upper one alone would favour three nodes); 0 for none.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    crate::rounds::median_sorted(&v)
}

/// Runs `a.farm_scale_rounds` rounds of one node and three behind nginx, alternating which
/// goes first.
pub async fn measure(
    env: &FarmEnv,
    watch: &PgWatch,
    a: &FarmArgs,
    payload: &Bytes,
) -> Result<Scale> {
    let clients = a.farm_scale_clients.max(1);
    let mut rounds = Vec::new();
    for round in 0..a.farm_scale_rounds {
        let three_first = round % 2 == 1;
        let order = if three_first {
            [Target::Farm3, Target::Farm1Lb]
        } else {
            [Target::Farm1Lb, Target::Farm3]
        };
        let (mut one, mut three) = (None, None);
        for target in order {
            eprintln!(
                "bench: farm scale round {}/{}: {clients} clients of 4 KiB jobs → {}",
                round + 1,
                a.farm_scale_rounds,
                target.name()
            );
            let before = env.cpu();
            let tag = format!("scale-{round}");
            let (run, seen) = watch
                .watch(run_one(env, target, Case::Jobs, a, clients, &tag, payload))
                .await?;
            let side = Side::new(&run?, &env.cpu().since(&before), &seen);
            if target == Target::Farm3 {
                three = Some(side);
            } else {
                one = Some(side);
            }
        }
        if let (Some(one), Some(three)) = (one, three) {
            rounds.push(ScaleRound {
                three_first,
                one,
                three,
            });
        }
    }
    Ok(Scale {
        clients,
        secs: a.farm_job_secs,
        rounds,
    })
}

impl Scale {
    /// The median of the rounds' ratios (three nodes' jobs/s over one node's).
    pub fn median_ratio(&self) -> f64 {
        median(self.rounds.iter().map(ScaleRound::ratio).collect())
    }

    /// The check: (what, figure, pass); `None` without rounds.
    pub fn check(&self) -> Option<(String, String, bool)> {
        if self.rounds.is_empty() {
            return None;
        }
        let ratio = self.median_ratio();
        Some((
            format!(
                "three farm nodes against one, both behind nginx, 4 KiB echo jobs at {} clients",
                self.clients
            ),
            format!(
                "{:.0} % of one node's jobs/s, median of {} paired rounds (target: not slower, \
                 ≥ {:.0} %)",
                ratio * 100.0,
                self.rounds.len(),
                NOT_SLOWER * 100.0
            ),
            ratio >= NOT_SLOWER,
        ))
    }

    /// The section of the markdown report.
    pub fn markdown(&self, o: &mut String) {
        if self.rounds.is_empty() {
            return;
        }
        let _ = writeln!(
            o,
            "\n## Three nodes against one, both behind nginx ({} clients of 4 KiB echo jobs, \
             {} s each side, the side that goes first alternating)\n",
            self.clients, self.secs
        );
        let _ = writeln!(
            o,
            "| round | first | one node jobs/s | three nodes jobs/s | ratio | job p50 one / three \
             | CPU ms/job one: nodes / nginx / PG / Garage | the same, three | lock waits one / \
             three |"
        );
        let _ = writeln!(o, "|---:|---|---:|---:|---:|---|---|---|---|");
        let cpu = |c: &[f64; 4]| format!("{:.2} / {:.2} / {:.2} / {:.2}", c[0], c[1], c[2], c[3]);
        for (i, r) in self.rounds.iter().enumerate() {
            let _ = writeln!(
                o,
                "| {} | {} | {:.0} | {:.0} | {:.2} | {:.1} / {:.1} ms | {} | {} | {} / {} |",
                i + 1,
                if r.three_first { "three" } else { "one" },
                r.one.jobs_per_sec,
                r.three.jobs_per_sec,
                r.ratio(),
                r.one.job_p50_ms,
                r.three.job_p50_ms,
                cpu(&r.one.cpu_ms_per_job),
                cpu(&r.three.cpu_ms_per_job),
                r.one.pg_lock_waits,
                r.three.pg_lock_waits,
            );
        }
        let _ = writeln!(
            o,
            "\nMedian ratio {:.2}; medians of jobs/s: one node {:.0}, three nodes {:.0}.",
            self.median_ratio(),
            median(self.rounds.iter().map(|r| r.one.jobs_per_sec).collect()),
            median(self.rounds.iter().map(|r| r.three.jobs_per_sec).collect()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_its_middle_values() {
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median(vec![0.9]), 0.9);
        assert_eq!(median(vec![1.05, 0.81, 0.98, 0.92]), (0.92 + 0.98) / 2.0);
        assert_eq!(median(vec![1.0, 0.8, 0.9]), 0.9);
    }
}
