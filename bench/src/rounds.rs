//! Interleaved rounds: every comparison runs its sides round by round (A B A B ...), and the
//! table reports the median and the spread (min–max) of each side and the median of the
//! per-round ratios, so a noisy, shared machine moves both sides of a ratio together.

use serde::Serialize;

/// The values of one side over the rounds, with their median and spread.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Spread {
    /// Median (the mean of the two middle values for an even count).
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Every round's value, in round order.
    pub rounds: Vec<f64>,
}

impl Spread {
    /// The spread of `values` (all zero when empty).
    pub fn of(values: &[f64]) -> Self {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Spread {
            median: median_sorted(&sorted),
            min: sorted.first().copied().unwrap_or(0.0),
            max: sorted.last().copied().unwrap_or(0.0),
            rounds: values.to_vec(),
        }
    }

    /// Per-round `a[i] / b[i]` (rounds where `b` is zero are left out).
    pub fn ratios(a: &[f64], b: &[f64]) -> Self {
        let r: Vec<f64> = a
            .iter()
            .zip(b)
            .filter(|(_, &b)| b > 0.0)
            .map(|(&a, &b)| a / b)
            .collect();
        Spread::of(&r)
    }

    /// `median (min–max)` with `prec` decimals.
    pub fn show(&self, prec: usize) -> String {
        if self.rounds.len() <= 1 {
            format!("{:.prec$}", self.median)
        } else {
            format!(
                "{:.prec$} ({:.prec$}–{:.prec$})",
                self.median, self.min, self.max
            )
        }
    }

    /// Like [`Spread::show`] for ratios, as percentages.
    pub fn show_pct(&self) -> String {
        let pct = |v: f64| format!("{:.0}%", v * 100.0);
        if self.rounds.len() <= 1 {
            pct(self.median)
        } else {
            format!("{} ({}–{})", pct(self.median), pct(self.min), pct(self.max))
        }
    }
}

/// The median of sorted values: the middle one, or the mean of the two middle ones of an
/// even count; 0 for none.
pub(crate) fn median_sorted(v: &[f64]) -> f64 {
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// CPU time of one side, normalised (`s/GiB` for uploads, `ms/job` for jobs).
#[derive(Clone, Debug, Serialize)]
pub struct Cpu {
    /// Unit of the figures.
    pub unit: &'static str,
    /// bitsd's server process (utime + stime from `/proc/<pid>/stat`).
    pub bitsd: Spread,
    /// The baseline's own CPU (the file writer's threads, `RUSAGE_THREAD`), if measured.
    pub baseline: Option<Spread>,
    /// Per-round bitsd / baseline.
    pub ratio: Option<Spread>,
}

/// One interleaved comparison: bitsd against a baseline over the same rounds.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// `upload` or `jobs`.
    pub group: &'static str,
    /// What was measured.
    pub scenario: String,
    /// bitsd's fsync policy (the file writer's matches it).
    pub fsync: &'static str,
    /// Unit of `bitsd`, `baseline` and `sink` (`MiB/s`, `jobs/s`).
    pub unit: &'static str,
    /// Rounds run.
    pub rounds: usize,
    /// bitsd.
    pub bitsd: Spread,
    /// The baseline's name (`file`, `sink`).
    pub baseline_name: &'static str,
    /// The baseline.
    pub baseline: Spread,
    /// Per-round bitsd / baseline; its median is the figure that counts.
    pub ratio: Spread,
    /// The HTTP sink doing the same work, where the main baseline is the file writer.
    pub sink: Option<Spread>,
    /// CPU per unit of work, if measured.
    pub cpu: Option<Cpu>,
    /// The target, in words (`—` for none).
    pub target: String,
    /// Whether the median ratio (or figure) meets it.
    pub pass: Option<bool>,
}

impl Comparison {
    /// For one upload at a time against the file writer: the share of the file writer's
    /// throughput a server that cost nothing of its own could reach, per round. The client
    /// sends the next fragment only after the Ack (stop-and-wait), so each fragment pays the
    /// HTTP transfer (the sink's time for it) and the disk (the file writer's) one after the
    /// other: `1 / (1/file + 1/sink)` of throughput, that is `sink / (file + sink)` of the
    /// file writer's. With many uploads at once the sessions overlap and this bound does not
    /// apply.
    pub fn stop_and_wait_ceiling(&self) -> Option<Spread> {
        if self.baseline_name != "file" || !self.scenario.starts_with("upload 1 ×") {
            return None;
        }
        let sink = self.sink.as_ref()?;
        let ceiling: Vec<f64> = self
            .baseline
            .rounds
            .iter()
            .zip(&sink.rounds)
            .filter(|(f, s)| **f + **s > 0.0)
            .map(|(f, s)| s / (f + s))
            .collect();
        (!ceiling.is_empty()).then(|| Spread::of(&ceiling))
    }

    /// The stop-and-wait ceilings of `rows` (see [`Comparison::stop_and_wait_ceiling`]) as a
    /// markdown table, empty when no row has one.
    pub fn ceiling_markdown(rows: &[Comparison]) -> String {
        let mut out = String::new();
        for r in rows {
            let Some(c) = r.stop_and_wait_ceiling() else {
                continue;
            };
            if out.is_empty() {
                out.push_str(
                    "One upload at a time is stop-and-wait (the next fragment leaves after the \
                     Ack): each fragment pays its HTTP transfer (the sink's time) and the disk \
                     (the file writer's) in a row, so even a server that cost nothing would \
                     reach only sink / (file + sink) of the file writer:\n\n\
                     | scenario | fsync | ceiling (per-round median) | bitsd/file | bitsd/ceiling |\n\
                     |---|---|---:|---:|---:|\n",
                );
            }
            out.push_str(&format!(
                "| {} | {} | {} | {:.0}% | {:.0}% |\n",
                r.scenario,
                r.fsync,
                c.show_pct(),
                r.ratio.median * 100.0,
                if c.median > 0.0 {
                    r.ratio.median / c.median * 100.0
                } else {
                    0.0
                }
            ));
        }
        out
    }

    /// The markdown table of `rows`.
    pub fn markdown(rows: &[Comparison]) -> String {
        let mut out = String::from(
            "| scenario | fsync | bitsd | baseline | bitsd/baseline (per-round median) | HTTP sink \
             | CPU bitsd | CPU baseline | CPU ratio | target | result |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
        );
        for r in rows {
            let (cb, cf, cr) = match &r.cpu {
                Some(c) => (
                    format!("{} {}", c.bitsd.show(2), c.unit),
                    c.baseline
                        .as_ref()
                        .map_or("—".into(), |b| format!("{} {}", b.show(2), c.unit)),
                    c.ratio
                        .as_ref()
                        .map_or("—".into(), |r| format!("{:.2}×", r.median)),
                ),
                None => ("—".into(), "—".into(), "—".into()),
            };
            let result = match r.pass {
                Some(true) => "PASS",
                Some(false) => "MISS",
                None => "info",
            };
            out.push_str(&format!(
                "| {} | {} | {} {} | {} {} ({}) | {} | {} | {} | {} | {} | {} | {} |\n",
                r.scenario,
                r.fsync,
                r.bitsd.show(0),
                r.unit,
                r.baseline.show(0),
                r.unit,
                r.baseline_name,
                r.ratio.show_pct(),
                r.sink
                    .as_ref()
                    .map_or("—".into(), |s| format!("{} {}", s.show(0), r.unit)),
                cb,
                cf,
                cr,
                r.target,
                result
            ));
        }
        out
    }
}

/// `per-fragment`, `on-close`, `never`.
pub fn fsync_name(p: bitsd::FsyncPolicy) -> &'static str {
    match p {
        bitsd::FsyncPolicy::PerFragment => "per-fragment",
        bitsd::FsyncPolicy::OnClose => "on-close",
        bitsd::FsyncPolicy::Never => "never",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread_of_odd_and_even_counts() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(s.rounds, vec![3.0, 1.0, 2.0]);
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0]);
        assert_eq!(s.median, 2.5);
        assert_eq!(Spread::of(&[]).median, 0.0);
    }

    #[test]
    fn the_stop_and_wait_ceiling_is_sink_over_file_plus_sink_for_one_upload() {
        let row = |scenario: &str| Comparison {
            group: "upload",
            scenario: scenario.into(),
            fsync: "per-fragment",
            unit: "MiB/s",
            rounds: 2,
            bitsd: Spread::of(&[50.0, 60.0]),
            baseline_name: "file",
            baseline: Spread::of(&[100.0, 300.0]),
            ratio: Spread::of(&[0.5, 0.2]),
            sink: Some(Spread::of(&[300.0, 100.0])),
            cpu: None,
            target: "—".into(),
            pass: None,
        };
        // Round 1: 300 / (100 + 300) = 0.75; round 2: 100 / (300 + 100) = 0.25.
        let c = row("upload 1 × 256 MiB, 1 MiB fragments")
            .stop_and_wait_ceiling()
            .unwrap();
        assert_eq!(c.rounds, vec![0.75, 0.25]);
        assert!(row("upload 8 × 16 MiB, 1 MiB fragments")
            .stop_and_wait_ceiling()
            .is_none());
        let table = Comparison::ceiling_markdown(&[row("upload 1 × 256 MiB, 1 MiB fragments")]);
        assert!(table.contains("| 50% (25%–75%) | 35% | 70% |"), "{table}");
    }

    #[test]
    fn ratios_are_per_round_not_of_medians() {
        // Round 1 fast for both, round 2 slow for both: per-round ratios are 0.5 each, the
        // ratio of medians would hide that.
        let r = Spread::ratios(&[100.0, 10.0, 50.0], &[200.0, 20.0, 100.0]);
        assert_eq!((r.median, r.min, r.max), (0.5, 0.5, 0.5));
        let r = Spread::ratios(&[1.0, 1.0], &[0.0, 2.0]);
        assert_eq!(r.rounds, vec![0.5]);
    }
}
