//! `--compare OLD.json`: this run's interleaved comparisons next to those of an earlier
//! `--json` run (matched by group, scenario and fsync policy), so a change can be judged by
//! how its per-round ratios moved.

use std::path::Path;

use serde_json::Value;

use crate::client::Result;
use crate::rounds::Comparison;

/// A markdown table of `now` against the comparisons stored in `old` (a `--json` output).
pub fn markdown(old: &Path, now: &[Comparison]) -> Result<String> {
    let text =
        std::fs::read_to_string(old).map_err(|e| format!("--compare {}: {e}", old.display()))?;
    let old_json: Value = serde_json::from_str(&text).map_err(|e| {
        format!(
            "--compare {}: not a bitsd-bench --json output: {e}",
            old.display()
        )
    })?;
    let empty = Vec::new();
    let before = old_json
        .get("comparisons")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let median = |v: &Value, path: &[&str]| -> Option<f64> {
        let mut v = v;
        for p in path {
            v = v.get(p)?;
        }
        v.get("median")?.as_f64()
    };
    let mut out = format!(
        "\nAgainst {} (medians; ratio = median of per-round ratios):\n\n\
         | scenario | fsync | ratio before | ratio now | bitsd before | bitsd now | CPU before | CPU now |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
        old.display()
    );
    for c in now {
        let Some(b) = before.iter().find(|b| {
            b.get("group").and_then(Value::as_str) == Some(c.group)
                && b.get("scenario").and_then(Value::as_str) == Some(c.scenario.as_str())
                && b.get("fsync").and_then(Value::as_str) == Some(c.fsync)
        }) else {
            continue;
        };
        let show = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("—".into(), f);
        let pct = |v: f64| format!("{:.0}%", v * 100.0);
        let num = |v: f64| format!("{v:.0} {}", c.unit);
        let cpu = |v: f64| format!("{v:.2}");
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            c.scenario,
            c.fsync,
            show(median(b, &["ratio"]), &pct),
            pct(c.ratio.median),
            show(median(b, &["bitsd"]), &num),
            num(c.bitsd.median),
            show(median(b, &["cpu", "bitsd"]), &cpu),
            show(c.cpu.as_ref().map(|x| x.bitsd.median), &cpu),
        ));
    }
    Ok(out)
}
