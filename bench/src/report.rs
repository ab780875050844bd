//! Results: table rows with their baselines and targets, printed as markdown or JSON.

use serde::Serialize;

/// A measured figure with its unit.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(tag = "unit", content = "value", rename_all = "snake_case")]
pub enum Value {
    /// Throughput, MiB per second.
    MibPerSec(f64),
    /// Jobs per second.
    PerSec(f64),
    /// A duration in milliseconds.
    Millis(f64),
    /// A size in bytes.
    Bytes(u64),
}

impl Value {
    /// The number, for ratios.
    pub fn number(self) -> f64 {
        match self {
            Value::MibPerSec(v) | Value::PerSec(v) | Value::Millis(v) => v,
            Value::Bytes(b) => b as f64,
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Value::MibPerSec(v) => write!(f, "{v:.0} MiB/s"),
            Value::PerSec(v) => write!(f, "{v:.0}/s"),
            Value::Millis(v) if v < 10.0 => write!(f, "{v:.2} ms"),
            Value::Millis(v) => write!(f, "{v:.0} ms"),
            Value::Bytes(b) => write!(f, "{}", human_bytes(b)),
        }
    }
}

/// `1.5 GiB`, `12.0 MiB`, `640 KiB`, `12 B`.
pub fn human_bytes(b: u64) -> String {
    const K: f64 = 1024.0;
    let v = b as f64;
    if v >= K * K * K {
        format!("{:.2} GiB", v / (K * K * K))
    } else if v >= K * K {
        format!("{:.1} MiB", v / (K * K))
    } else if v >= K {
        format!("{:.0} KiB", v / K)
    } else {
        format!("{b} B")
    }
}

/// A baseline figure and what produced it.
#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    /// What was measured (`file`, `sink`, `idle`, ...).
    pub name: String,
    /// The figure.
    pub value: Value,
}

/// One line of the results table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Scenario group (`upload`, `jobs`, `download`, `rss`, `startup`, `disk`).
    pub group: &'static str,
    /// What was measured.
    pub scenario: String,
    /// bitsd's figure.
    pub bitsd: Value,
    /// The main baseline, if any.
    pub baseline: Option<Baseline>,
    /// bitsd / baseline.
    pub ratio: Option<f64>,
    /// The HTTP sink for the same work, where the main baseline is something else.
    pub sink: Option<Value>,
    /// bitsd / sink.
    pub sink_ratio: Option<f64>,
    /// The target, in words.
    pub target: String,
    /// Whether the target is met (`None`: no target).
    pub pass: Option<bool>,
}

impl Row {
    /// A row with no baseline and no target.
    pub fn new(group: &'static str, scenario: impl Into<String>, bitsd: Value) -> Self {
        Row {
            group,
            scenario: scenario.into(),
            bitsd,
            baseline: None,
            ratio: None,
            sink: None,
            sink_ratio: None,
            target: "—".into(),
            pass: None,
        }
    }

    /// Adds the main baseline and the ratio against it.
    pub fn baseline(mut self, name: &str, value: Value) -> Self {
        self.ratio = ratio(self.bitsd, value);
        self.baseline = Some(Baseline {
            name: name.into(),
            value,
        });
        self
    }

    /// Sets the target and whether it is met.
    pub fn target(mut self, target: impl Into<String>, pass: bool) -> Self {
        self.target = target.into();
        self.pass = Some(pass);
        self
    }

    /// Target: bitsd at least `min` × the main baseline.
    pub fn at_least_ratio(self, min: f64) -> Self {
        let pass = self.ratio.is_some_and(|r| r >= min);
        let what = self
            .baseline
            .as_ref()
            .map_or("baseline", |b| b.name.as_str());
        let target = format!("≥ {:.0}% of {what}", min * 100.0);
        self.target(target, pass)
    }
}

fn ratio(a: Value, b: Value) -> Option<f64> {
    let d = b.number();
    (d > 0.0).then(|| a.number() / d)
}

/// Rates as a percentage of the baseline; times and sizes as a multiple.
fn fmt_ratio(r: Option<f64>, of: Value) -> String {
    match (r, of) {
        (Some(r), Value::MibPerSec(_) | Value::PerSec(_)) => format!("{:.0}%", r * 100.0),
        (Some(r), _) if r < 10.0 => format!("{r:.2}×"),
        (Some(r), _) => format!("{r:.1}×"),
        (None, _) => "—".into(),
    }
}

/// Latency of one packet type at one concurrency and fsync policy, bitsd and sink (samples
/// of every round pooled).
#[derive(Clone, Debug, Serialize)]
pub struct LatencyRow {
    /// Concurrent clients.
    pub clients: usize,
    /// bitsd's fsync policy.
    pub fsync: &'static str,
    /// Packet (`Create-Session`, `Fragment`, `GET reply`, `Close-Session`).
    pub packet: &'static str,
    /// bitsd samples behind the quantiles.
    pub samples: usize,
    /// bitsd p50, ms.
    pub bitsd_p50_ms: f64,
    /// bitsd p99, ms.
    pub bitsd_p99_ms: f64,
    /// bitsd p99.9, ms.
    pub bitsd_p999_ms: f64,
    /// bitsd max, ms.
    pub bitsd_max_ms: f64,
    /// Sink p50, ms.
    pub sink_p50_ms: f64,
    /// Sink p99, ms.
    pub sink_p99_ms: f64,
    /// Sink p99.9, ms.
    pub sink_p999_ms: f64,
}

/// Everything one run measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// The machine and the run's parameters (a JSON object).
    #[serde(serialize_with = "context_object")]
    pub context: Vec<(String, String)>,
    /// Interleaved comparisons (uploads against the file writer, jobs against the sink).
    pub comparisons: Vec<crate::rounds::Comparison>,
    /// The other figures (single measurements or best of a few).
    pub rows: Vec<Row>,
    /// Per-packet latencies of the small-job scenario.
    pub latencies: Vec<LatencyRow>,
    /// Scenarios that could not run, with why.
    pub skipped: Vec<String>,
}

impl Report {
    /// The markdown tables.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.context {
            out.push_str(&format!("- {k}: {v}\n"));
        }
        out.push('\n');
        if !self.comparisons.is_empty() {
            out.push_str(
                "Interleaved rounds: median (min–max) of each side; the ratio is the median of \
                 the per-round ratios. CPU is the server process's utime+stime (bitsd) and the \
                 writer threads' own rusage (file).\n\n",
            );
            out.push_str(&crate::rounds::Comparison::markdown(&self.comparisons));
            out.push('\n');
            let ceiling = crate::rounds::Comparison::ceiling_markdown(&self.comparisons);
            if !ceiling.is_empty() {
                out.push_str(&ceiling);
                out.push('\n');
            }
        }
        if self.rows.is_empty() {
            return self.tail(out);
        }
        out.push_str(
            "| scenario | bitsd | baseline | ratio | HTTP sink | bitsd/sink | target | result |\n",
        );
        out.push_str("|---|---:|---:|---:|---:|---:|---|---|\n");
        for r in &self.rows {
            let baseline = r
                .baseline
                .as_ref()
                .map_or("—".into(), |b| format!("{} ({})", b.value, b.name));
            let sink = r.sink.map_or("—".into(), |s| s.to_string());
            let result = match r.pass {
                Some(true) => "PASS",
                Some(false) => "MISS",
                None => "info",
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.scenario,
                r.bitsd,
                baseline,
                fmt_ratio(r.ratio, r.bitsd),
                sink,
                fmt_ratio(r.sink_ratio, r.bitsd),
                r.target,
                result
            ));
        }
        self.tail(out)
    }

    /// The latency table and the skipped scenarios.
    fn tail(&self, mut out: String) -> String {
        if !self.latencies.is_empty() {
            out.push_str(
                "\nSmall upload-reply jobs, latency per packet (ms, every round's samples):\n\n",
            );
            out.push_str(
                "| clients | fsync | packet | samples | bitsd p50 | bitsd p99 | bitsd p999 \
                 | bitsd max | sink p50 | sink p99 | sink p999 |\n",
            );
            out.push_str("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
            for l in &self.latencies {
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                    l.clients,
                    l.fsync,
                    l.packet,
                    l.samples,
                    l.bitsd_p50_ms,
                    l.bitsd_p99_ms,
                    l.bitsd_p999_ms,
                    l.bitsd_max_ms,
                    l.sink_p50_ms,
                    l.sink_p99_ms,
                    l.sink_p999_ms
                ));
            }
        }
        for s in &self.skipped {
            out.push_str(&format!("\nskipped: {s}\n"));
        }
        out
    }
}

fn context_object<S: serde::Serializer>(
    context: &[(String, String)],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(context.len()))?;
    for (k, v) in context {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

/// Sorted latency samples in microseconds.
#[derive(Debug, Default, Clone)]
pub struct Samples(Vec<u32>);

impl Samples {
    /// Records one sample.
    pub fn push(&mut self, d: std::time::Duration) {
        self.0
            .push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
    }

    /// Number of samples.
    pub fn count(&self) -> usize {
        self.0.len()
    }

    /// Adds another set.
    pub fn extend(&mut self, other: &Samples) {
        self.0.extend_from_slice(&other.0);
    }

    /// The `p` quantile (0..=1) in milliseconds (nearest rank), 0 with no samples.
    pub fn quantile_ms(&mut self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.sort_unstable();
        let rank = ((p * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        f64::from(self.0[rank - 1]) / 1000.0
    }
}
