//! The real `bitsd` binary: finding (or building) it, [`BitsdProcess`] on ephemeral loopback
//! ports, and [`strace`] for failure injection into it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `bitsd check-config FILE`, which must accept the file: what it printed.
pub fn check_config_ok(file: &Path) -> String {
    check_config_ok_with_env(file, &[])
}

/// [`check_config_ok`] with `env` added to the environment of `bitsd check-config`.
pub fn check_config_ok_with_env(file: &Path, env: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(bitsd_binary())
        .arg("check-config")
        .arg(file)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "check-config refused {}: {shown}{}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    shown
}

/// Runs `bitsd --data-dir DIR` with `args`, which must stop by itself, failing, within
/// `within`: its stderr. A `bitsd` still running then is killed, and the panic says `what`
/// it should not have done.
pub fn bitsd_refuses(data_dir: &Path, args: &[&str], within: Duration, what: &str) -> String {
    let mut child = std::process::Command::new(bitsd_binary())
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bitsd {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "bitsd exited successfully");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The `bitsd` binary of this build, next to the test executable's `deps/` directory.
///
/// The first call in a test process runs `cargo build -p bitsd --bin bitsd` for the same
/// profile (a no-op when it is up to date, as under `cargo test --workspace`): a test crate
/// run alone (`cargo test -p bitsd-tests --test ...`) would otherwise start a stale binary
/// left from an older build and test old code.
pub fn bitsd_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().unwrap();
            let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
            let bin = profile_dir.join(format!("bitsd{}", std::env::consts::EXE_SUFFIX));
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let mut build = std::process::Command::new(cargo);
            build
                .args([
                    "build", "--locked", "--quiet", "-p", "bitsd", "--bin", "bitsd",
                ])
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                build.arg("--release");
            }
            let status = build.status().unwrap();
            assert!(status.success(), "building bitsd failed");
            bin
        })
        .clone()
}

/// A `bitsd` process on ephemeral loopback ports.
pub struct BitsdProcess {
    child: std::process::Child,
    /// The BITS listener.
    pub addr: SocketAddr,
    /// The admin listener (`None` with `--admin-listen off`).
    pub admin_addr: Option<SocketAddr>,
    /// `bitsd` runs under a wrapper program (see [`BitsdProcess::start_wrapped`]).
    wrapped: bool,
}

/// The `strace` binary, for tests that inject failures or delays into the real server; `None`
/// (with the reason printed, so the skip is visible) when it is not installed or cannot trace
/// here (no ptrace in the container, no `--seccomp-bpf`).
pub fn strace() -> Option<PathBuf> {
    let Some(found) = ["/usr/bin/strace", "/bin/strace", "/usr/local/bin/strace"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    else {
        crate::skip::missing(
            crate::skip::Needs::Strace,
            "strace is not installed (apt-get install strace)",
        );
        return None;
    };
    let works = std::process::Command::new(&found)
        .args([
            "-f",
            "--seccomp-bpf",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "trace=linkat",
        ])
        .args(["-e", "inject=linkat:error=EIO", "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        crate::skip::missing(
            crate::skip::Needs::Strace,
            "strace cannot trace here (ptrace not permitted, or no --seccomp-bpf)",
        );
        return None;
    }
    Some(found)
}

impl BitsdProcess {
    /// Starts `bitsd --data-dir DIR` on ephemeral ports plus `extra` arguments, and waits
    /// until it prints its addresses.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_logging(data_dir, extra, None)
    }

    /// Writes `config` to `dir/NAME.toml` and starts `bitsd --config` on it with its data
    /// under `dir/NAME`, in a blocking task (for async tests).
    pub async fn start_configured(dir: &Path, name: &str, config: String) -> Self {
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, config).unwrap();
        let data = dir.join(name);
        tokio::task::spawn_blocking(move || {
            BitsdProcess::start(&data, &["--config", file.to_str().unwrap()])
        })
        .await
        .unwrap()
    }

    /// Like [`BitsdProcess::start`], with the process's stderr (its log) appended to `log`.
    pub fn start_logging(data_dir: &Path, extra: &[&str], log: Option<&Path>) -> Self {
        Self::start_wrapped(&[], data_dir, extra, log)
    }

    /// Like [`BitsdProcess::start_logging`], with `bitsd` run by `wrapper` (a program and its
    /// arguments, the `bitsd` command line appended; e.g. `strace -f -e inject=...` to inject
    /// failures or delays into the real binary). Empty: run `bitsd` itself.
    pub fn start_wrapped(
        wrapper: &[&str],
        data_dir: &Path,
        extra: &[&str],
        log: Option<&Path>,
    ) -> Self {
        use std::io::BufRead;
        let stderr = match log {
            Some(path) => std::process::Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap(),
            ),
            None => std::process::Stdio::inherit(),
        };
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = std::process::Command::new(program);
                c.args(args).arg(bitsd_binary());
                c
            }
            None => std::process::Command::new(bitsd_binary()),
        };
        if !extra.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--admin-listen") {
            command.args(["--admin-listen", "127.0.0.1:0"]);
        }
        let mut child = command
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            // Warnings, and a farm node's merges of tiny fragments (tests count them); more with
            // `BITSD_TEST_NODE_LOG` (a `RUST_LOG` filter that keeps the merges, for a run whose
            // node logs are kept, e.g. `BITSD_CHAOS_LOGS`).
            .env(
                "RUST_LOG",
                std::env::var("BITSD_TEST_NODE_LOG").unwrap_or_else(|_| {
                    "warn,bitsd_storage::shared::backend::coalesce=debug".into()
                }),
            )
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut addr = None;
        let mut admin_addr = None;
        let want_admin = !extra
            .windows(2)
            .any(|w| w[0] == "--admin-listen" && w[1] == "off");
        while addr.is_none() || (want_admin && admin_addr.is_none()) {
            let line = lines
                .next()
                .expect("bitsd exited before printing its addresses")
                .unwrap();
            let grab = |l: &str, marker: &str| -> Option<SocketAddr> {
                let rest = l.split(marker).nth(1)?;
                rest.split('/').next()?.parse().ok()
            };
            if line.contains("BITS upload") {
                addr = grab(&line, "://");
            } else if line.contains("session progress on") {
                admin_addr = grab(&line, "://");
            }
        }
        // Keep draining stdout so the process never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        BitsdProcess {
            child,
            addr: addr.unwrap(),
            admin_addr,
            wrapped: !wrapper.is_empty(),
        }
    }

    /// The process id (for `strace -p`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process id of `bitsd` itself (the wrapper's child when it runs under one).
    pub fn server_pid(&self) -> u32 {
        if !self.wrapped {
            return self.child.id();
        }
        self.wrapped_child().expect("bitsd runs under its wrapper")
    }

    fn wrapped_child(&self) -> Option<u32> {
        let own = self.child.id();
        std::fs::read_to_string(format!("/proc/{own}/task/{own}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// SIGKILL: no shutdown, no flush. Under a wrapper, `bitsd` itself is killed and the
    /// wrapper waited for (it ends with its child).
    pub fn kill(mut self) {
        let wrapped = self.wrapped.then(|| self.server_pid());
        if let Some(pid) = wrapped {
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
        // A wrapper may hold its dead child for a while (strace in an injected delay): it is
        // killed too, and the server waited for until it is gone (its files closed).
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        if let Some(pid) = wrapped {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !stat.contains(") Z "))
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "bitsd {pid} outlived SIGKILL"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    #[cfg(unix)]
    pub fn terminate(mut self) -> bool {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().unwrap().success()
    }
}

impl Drop for BitsdProcess {
    fn drop(&mut self) {
        if let Some(pid) = self.wrapped.then(|| self.wrapped_child()).flatten() {
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
