//! The real `bitsd` binary as a child process (scenario 4, peak RSS; and the process startup
//! time of scenario 5).

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinSet;

use crate::client::{BoxError, Conn, Result};
use crate::report::{Report, Row, Value};
use crate::util::{mib_per_sec, size_label, MIB};
use crate::Plan;

/// The `bitsd` binary: `--bitsd PATH`, or the one next to this executable (the same target
/// directory and profile: `cargo build --release -p bitsd -p bitsd-bench`). Under `cargo run`
/// (`$CARGO` set) that binary is built, or brought up to date, first.
pub fn find_bitsd(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_owned())
        } else {
            Err(format!("--bitsd {}: no such file", p.display()).into())
        };
    }
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or("the benchmark executable has no directory")?;
    let bin = dir.join(format!("bitsd{}", std::env::consts::EXE_SUFFIX));
    if let (Some(cargo), Some(target)) = (std::env::var_os("CARGO"), dir.parent()) {
        eprintln!("bench: building the bitsd binary into {}", dir.display());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "bitsd", "--bin", "bitsd"])
            .env("CARGO_TARGET_DIR", target)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        match cmd.status() {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!("bench: building bitsd failed ({s})"),
            Err(e) => eprintln!("bench: cannot run cargo: {e}"),
        }
    }
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "no bitsd binary at {} (build it with `cargo build --release -p bitsd -p bitsd-bench` \
             in the same target directory, or pass --bitsd PATH)",
            bin.display()
        )
        .into())
    }
}

/// A running `bitsd` child process, killed on drop.
pub struct BitsdChild {
    child: std::process::Child,
    /// The BITS listener.
    pub addr: SocketAddr,
    /// From spawn until it printed its listening line.
    pub startup: Duration,
}

impl BitsdChild {
    /// Starts `bitsd --listen 127.0.0.1:0 --no-admin --data-dir DIR` and waits (up to
    /// `timeout`) for the line `bitsd: BITS upload on http://ADDR/upload/`. Its stderr (logs at
    /// `warn`) goes to `log`.
    pub fn spawn(bin: &Path, data_dir: &Path, log: &Path, timeout: Duration) -> Result<Self> {
        Self::spawn_with(bin, data_dir, &[], log, timeout)
    }

    /// [`BitsdChild::spawn`] with more command-line arguments (e.g. `--fsync never`).
    pub fn spawn_args(
        bin: &Path,
        data_dir: &Path,
        log: &Path,
        timeout: Duration,
        extra: &[&str],
    ) -> Result<Self> {
        let extra: Vec<&std::ffi::OsStr> = extra.iter().map(std::ffi::OsStr::new).collect();
        Self::spawn_with(bin, data_dir, &extra, log, timeout)
    }

    /// Like [`BitsdChild::spawn`], with `extra` arguments appended (e.g. `--config FILE`).
    pub fn spawn_with(
        bin: &Path,
        data_dir: &Path,
        extra: &[&std::ffi::OsStr],
        log: &Path,
        timeout: Duration,
    ) -> Result<Self> {
        Self::spawn_env(bin, data_dir, extra, &[], log, timeout)
    }

    /// Like [`BitsdChild::spawn_with`], with environment variables set for the child (e.g.
    /// `TOKIO_WORKER_THREADS`).
    pub fn spawn_env(
        bin: &Path,
        data_dir: &Path,
        extra: &[&std::ffi::OsStr],
        envs: &[(&str, String)],
        log: &Path,
        timeout: Duration,
    ) -> Result<Self> {
        let started = Instant::now();
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--no-admin", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && line.contains("BITS upload") {
                    let addr = line
                        .split("http://")
                        .nth(1)
                        .and_then(|r| r.split('/').next())
                        .and_then(|a| a.parse::<SocketAddr>().ok());
                    let _ = tx.send((addr, Instant::now()));
                    sent = true;
                }
            }
        });
        match rx.recv_timeout(timeout) {
            Ok((Some(addr), at)) => Ok(BitsdChild {
                child,
                addr,
                startup: at.duration_since(started),
            }),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                Err(format!(
                    "bitsd did not print a listening address ({}); stderr: {}",
                    if other.is_err() {
                        "timed out or exited"
                    } else {
                        "unparsable line"
                    },
                    tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                )
                .into())
            }
        }
    }

    /// The process id (for its CPU time in `/proc/<pid>/stat`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in bytes.
    pub fn status_bytes(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status.lines().find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb * 1024)
        })
    }

    /// CPU seconds the process has used so far (utime + stime of `/proc/<pid>/stat`, all its
    /// threads, in clock ticks of 1/100 s: USER_HZ is 100 on every Linux the project targets).
    pub fn cpu_secs(&self) -> Option<f64> {
        proc_cpu_secs(self.child.id())
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of process `pid` in seconds, from `/proc/<pid>/stat`.
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

impl Drop for BitsdChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Scenario 4: peak RSS of the bitsd process while `plan.rss_sessions` sessions each upload
/// `plan.rss_fragments_each` fragments of 16 MiB at once.
pub async fn run_rss(
    plan: &Plan,
    bin: &Path,
    work: &Path,
    payload: &Bytes,
    report: &mut Report,
) -> Result<()> {
    let dir = work.join("rss-bitsd");
    let child = BitsdChild::spawn(
        bin,
        &dir,
        &work.join("rss-bitsd.log"),
        Duration::from_secs(60),
    )?;
    let idle = child.status_bytes("VmRSS").unwrap_or(0);
    let fragment = plan.rss_fragment;
    let each = fragment as u64 * plan.rss_fragments_each as u64;
    let sessions = plan.rss_sessions;
    eprintln!(
        "bench: peak RSS, {sessions} sessions each sending {} × {} fragment",
        plan.rss_fragments_each,
        size_label(fragment as u64)
    );
    let conns = Conn::connect_many(child.addr, sessions).await?;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let payload = payload.clone();
        set.spawn(async move {
            let path = format!("/upload/rss/{i}.bin");
            let (sid, _) = conn.upload(&path, each, fragment, &payload).await?;
            conn.close_session(&path, &sid).await?;
            Ok::<_, BoxError>(())
        });
    }
    let mut result = Ok(());
    while let Some(r) = set.join_next().await {
        if let Err(e) = r.map_err(BoxError::from).and_then(|r| r) {
            result = Err(e);
        }
    }
    let elapsed = started.elapsed();
    let peak = child.status_bytes("VmHWM");
    child.stop();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    let peak = peak.ok_or("could not read VmHWM of the bitsd process")?;
    let limit = 128 * MIB;
    report.rows.push(
        Row::new(
            "rss",
            format!(
                "peak RSS (VmHWM), {sessions} sessions each sending {} × {} fragment",
                plan.rss_fragments_each,
                size_label(fragment as u64)
            ),
            Value::Bytes(peak),
        )
        .baseline("idle VmRSS", Value::Bytes(idle))
        .target("< 128 MiB", peak < limit),
    );
    report.rows.push(Row::new(
        "rss",
        format!("upload throughput during the RSS run ({sessions} sessions, child process)"),
        Value::MibPerSec(mib_per_sec(each * sessions as u64, elapsed)),
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_time_of_a_process_grows_with_its_work() {
        let pid = std::process::id();
        let before = super::proc_cpu_secs(pid).expect("own /proc/<pid>/stat");
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = super::proc_cpu_secs(pid).expect("own /proc/<pid>/stat");
        assert!(after > before, "{before} -> {after}");
    }
}
