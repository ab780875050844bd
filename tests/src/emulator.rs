//! What the test servers started from one binary share ([`crate::moto`], [`crate::azurite`]):
//! the binary from an environment variable or the `PATH`, a process on a free loopback port
//! over a temporary directory, logging to a file there, waited for until it answers, and
//! killed when dropped.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::garage::free_port;
use crate::skip::{missing, Needs};

/// How long a server may take to answer after its start.
const START_WITHIN: Duration = Duration::from_secs(30);

/// `$env`, else `name` on the `PATH`; `None` (with `missing_why` printed, or a failure when
/// `BITSD_TEST_REQUIRE` names `needs`) when neither is there.
pub(crate) fn find_binary(
    env: &str,
    name: &str,
    needs: Needs,
    missing_why: &str,
) -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os(env) {
        return Some(PathBuf::from(bin));
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        missing(needs, missing_why);
    }
    found
}

/// One server process on a loopback port; killed when dropped.
#[derive(Debug)]
pub(crate) struct Served {
    child: Child,
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Served {
    /// Starts `bin` with the arguments `args` makes of a free port and a temporary directory
    /// (named `prefix…`), its output to a log file there; then asks `ready` (every 100 ms, up
    /// to 30 s) until it answers `Some(Ok(()))`. `Some(Err(why))` is a server that answered
    /// and refused (a panic: the test cannot go on); `None`, no answer yet. `None` (printed
    /// as `needs` missing) when it does not start or answer.
    pub(crate) fn start(
        bin: &Path,
        prefix: &str,
        needs: Needs,
        args: impl FnOnce(u16, &Path) -> Vec<OsString>,
        ready: impl Fn(&Served) -> Option<Result<(), String>>,
    ) -> Option<Served> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        let port = free_port();
        let log = dir.path().join("server.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .args(args(port, dir.path()))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                missing(needs, format!("{} did not start: {e}", bin.display()));
                return None;
            }
        };
        let served = Served {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + START_WITHIN;
        loop {
            match ready(&served) {
                Some(Ok(())) => return Some(served),
                Some(Err(why)) => panic!("{why}; its log:\n{}", served.log_tail()),
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                None => {
                    missing(
                        needs,
                        format!(
                            "{} did not answer in 30 s; its log:\n{}",
                            bin.display(),
                            served.log_tail()
                        ),
                    );
                    return None;
                }
            }
        }
    }

    /// The last lines of the server's log.
    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        crate::last_lines(&text, 40)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
