//! The farm scenario's report as markdown (the figures themselves: `farm_report`).

use std::fmt::Write as _;

use crate::farm::{own_cpu, Case, Target};
use crate::farm_report::{case_label, FarmReport, RoundFigures};

impl FarmReport {
    /// The report as markdown.
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# bitsd-bench --farm\n");
        for (k, v) in &self.context {
            let _ = writeln!(o, "- **{k}**: {v}");
        }
        let _ = writeln!(
            o,
            "\n## Throughput and latency (median of {} rounds)\n",
            self.rounds
        );
        let heads: Vec<&str> = Target::ALL.iter().map(|t| t.name()).collect();
        let _ = writeln!(o, "| case | figure | {} |", heads.join(" | "));
        let _ = writeln!(o, "|---|---|{}", "---:|".repeat(heads.len()));
        let mut cases: Vec<Case> = Vec::new();
        for m in &self.measured {
            if let Some((_, c)) = m.kind {
                if !cases.contains(&c) {
                    cases.push(c);
                }
            }
        }
        type Pick = fn(&RoundFigures) -> f64;
        for case in &cases {
            let label = case_label(*case);
            let mut figures: Vec<(&str, Pick, &str)> = vec![
                (
                    if *case == Case::Jobs {
                        "jobs/s"
                    } else {
                        "MiB/s"
                    },
                    |r| r.rate,
                    "",
                ),
                ("Fragment Ack p50", |r| r.p50_ms, " ms"),
                ("Fragment Ack p99", |r| r.p99_ms, " ms"),
            ];
            if *case != Case::Jobs {
                figures.push((
                    "last Fragment Ack (completion) p50",
                    |r| r.last_p50_ms,
                    " ms",
                ));
            }
            if *case == Case::Jobs {
                figures.push(("whole job p50", |r| r.job_p50_ms, " ms"));
                figures.push(("whole job p99", |r| r.job_p99_ms, " ms"));
                figures.push(("Create-Session p50", |r| r.packet_p50_ms[0], " ms"));
                figures.push(("GET reply p50", |r| r.packet_p50_ms[1], " ms"));
                figures.push((
                    "Close-Session (bare: DELETE) p50",
                    |r| r.packet_p50_ms[2],
                    " ms",
                ));
            }
            for (name, pick, unit) in figures {
                let cells: Vec<String> = Target::ALL
                    .iter()
                    .map(|t| {
                        self.get(*t, *case)
                            .map_or("—".into(), |m| format!("{:.2}{unit}", m.median(pick)))
                    })
                    .collect();
                let _ = writeln!(o, "| {label} | {name} | {} |", cells.join(" | "));
            }
        }
        let _ = writeln!(
            o,
            "\nFor the bare PUT target, \"Fragment Ack\" is one PUT of the same bytes and a job is \
             PUT + GET + DELETE of 4 KiB. Fragment latencies leave out each upload's last \
             fragment (its Ack also waits for the upload's completion); throughput includes it \
             and Close-Session.\n"
        );
        let _ = writeln!(
            o,
            "## CPU (seconds per GiB uploaded; ms per job for the job case; summed over the \
             rounds)\n"
        );
        let _ = writeln!(
            o,
            "| case | target | its own process(es) | benchmark process | Garage | PostgreSQL | nginx | \
             S3 requests per fragment (per job) |"
        );
        let _ = writeln!(o, "|---|---|---:|---:|---:|---:|---:|---|");
        for m in &self.measured {
            let Some((t, _)) = m.kind else { continue };
            let own = if matches!(t, Target::Bare | Target::BareLb) {
                "— (client is the benchmark)".to_owned()
            } else {
                format!("{:.3}", m.per_unit(own_cpu(t, &m.cpu)))
            };
            let _ = writeln!(
                o,
                "| {} | {} | {own} | {:.3} | {:.3} | {:.3} | {:.3} | {} |",
                m.case,
                m.target,
                m.per_unit(m.cpu.bench),
                m.per_unit(m.cpu.garage),
                m.per_unit(m.cpu.postgres),
                m.per_unit(m.cpu.nginx),
                m.s3_per_unit()
            );
        }
        if !self.paired.is_empty() {
            let _ = writeln!(
                o,
                "\n## Fragment by fragment: each fragment beside a bare PUT of the same bytes\n"
            );
            let _ = writeln!(
                o,
                "| fragment | target | pairs | Ack p50 | bare PUT p50 | overhead at p50 | median \
                 of the differences | bare PUT + nginx p50 | Ack p99 | bare PUT p99 |"
            );
            let _ = writeln!(o, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
            for p in &self.paired {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {} | {:.2} ms \
                     | {:.2} ms |",
                    crate::util::size_label(p.fragment as u64),
                    p.target.name(),
                    p.pairs,
                    p.farm_p50_ms,
                    p.bare_p50_ms,
                    p.overhead_ms,
                    p.median_diff_ms,
                    p.bare_lb_p50_ms
                        .map_or_else(|| "—".to_owned(), |v| format!("{v:.2} ms")),
                    p.p99_ms.0,
                    p.p99_ms.1
                );
            }
            if !self.rounds_overhead.is_empty() {
                let _ = writeln!(
                    o,
                    "\nThe same overheads over the rounds (each round's p50 against the bare \
                     PUTs' of that round; shown, not checked):\n"
                );
                for (what, fig) in &self.rounds_overhead {
                    let _ = writeln!(o, "- {what}: {fig}");
                }
            }
        }
        let _ = writeln!(o, "\n## Checks\n");
        let _ = writeln!(o, "| what | measured | result |");
        let _ = writeln!(o, "|---|---|---|");
        for (what, fig, pass) in &self.checks {
            let _ = writeln!(
                o,
                "| {what} | {fig} | {} |",
                if *pass { "PASS" } else { "MISS" }
            );
        }
        let _ = writeln!(
            o,
            "\n## Concurrency sweep: 4 KiB echo jobs, PostgreSQL sampled every 20 ms\n"
        );
        let _ = writeln!(
            o,
            "| target | clients | jobs/s | job p50 | job p99 | PG write txns/job | PG txns/s | \
             WAL/job | samples (active) | Lock waits | ungranted locks | top waits of active \
             backends | CPU ms/job own / PG / Garage | S3 requests per job |"
        );
        let _ = writeln!(
            o,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"
        );
        for s in &self.sweep {
            let _ = writeln!(
                o,
                "| {} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.2} | {:.0} | {:.0} B | {} ({}) | {} | \
                 {} | {} | {:.2} / {:.2} / {:.2} | {} |",
                s.target,
                s.clients,
                s.jobs_per_sec,
                s.job_p50_ms,
                s.job_p99_ms,
                s.txns_per_job,
                s.txns_per_sec,
                s.wal_per_job,
                s.pg_samples,
                s.pg_active,
                s.pg_lock_waits,
                s.pg_ungranted,
                s.pg_top_waits,
                s.cpu_ms_per_job[0],
                s.cpu_ms_per_job[1],
                s.cpu_ms_per_job[2],
                s.s3_per_job
            );
        }
        let waits: Vec<_> = self
            .sweep
            .iter()
            .filter(|s| !s.pg_lock_statements.is_empty())
            .collect();
        if !waits.is_empty() {
            let _ = writeln!(
                o,
                "\nLock waits by statement (waiting ← the statement of the backend it waited \
                 for, and that backend's state):\n"
            );
            for s in waits {
                for (what, n) in s.pg_lock_statements.iter().take(4) {
                    let _ = writeln!(o, "- {}, {} clients: {n} × `{what}`", s.target, s.clients);
                }
            }
        }
        if let Some(scale) = &self.scale {
            scale.markdown(&mut o);
        }
        o
    }
}
