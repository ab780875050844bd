//! `--attach CMD`: a profiler attached to the bitsd server process for exactly the span of
//! each bitsd measurement (e.g. `perf stat -p {pid} -o /tmp/stat-{case}.txt`), stopped with
//! SIGINT when the measurement ends, so a profile covers one case and nothing else.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A running attach command.
pub struct Attached {
    child: Child,
}

/// `case` as a file-name-safe slug (`upload 8 × 64 MiB, 1 MiB fragments` →
/// `upload-8-64mib-1mib-fragments`).
pub fn slug(case: &str) -> String {
    let mut out = String::new();
    for c in case.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_owned()
}

impl Attached {
    /// Runs `template` through `sh -c` with `{pid}` replaced by `pid` and `{case}` by
    /// `case`, and gives it a moment to attach. `None` (with a message) when it cannot start.
    pub async fn start(template: &str, pid: u32, case: &str) -> Option<Attached> {
        let cmd = template
            .replace("{pid}", &pid.to_string())
            .replace("{case}", case);
        match Command::new("sh")
            .args(["-c", &format!("exec {cmd}")])
            .stdin(Stdio::null())
            .spawn()
        {
            Ok(child) => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Some(Attached { child })
            }
            Err(e) => {
                eprintln!("bench: --attach {cmd:?} did not start: {e}");
                None
            }
        }
    }

    /// Sends SIGINT and waits for the command to write its output and exit.
    pub fn stop(mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
        }
        let _ = self.child.wait();
    }
}

/// Starts `template` (if any) for one measurement.
pub async fn maybe(template: Option<&str>, pid: u32, case: &str) -> Option<Attached> {
    match template {
        Some(t) => Attached::start(t, pid, &slug(case)).await,
        None => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn case_names_become_file_name_slugs() {
        assert_eq!(
            super::slug("upload 8 × 64 MiB, 1 MiB fragments per-fragment"),
            "upload-8-64-mib-1-mib-fragments-per-fragment"
        );
        assert_eq!(super::slug("  jobs/../32 "), "jobs-32");
    }
}
