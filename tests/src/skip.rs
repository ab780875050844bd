//! Tests that cannot run here skip with a printed reason; this module makes those skips
//! visible after the run and, where the caller asks for it, a failure.
//!
//! libtest hides what a passing test prints, so a skip printed by a test body is invisible in
//! `cargo test`'s output: a run could report every test passed while the farm tests never
//! started a server. Two environment variables change that (`.ci/run` sets both):
//!
//! - `BITSD_TEST_SKIP_LOG=FILE`: every skip appends one line to `FILE` (the test's name and
//!   the reason), which `.ci/run` prints at the end of the run.
//! - `BITSD_TEST_REQUIRE=postgresql,garage,nginx,strace,moto` (any of them, comma-separated, or
//!   `all`): a test that would skip because one of these is missing or does not start fails
//!   instead. `.ci/run` lists the tools it installed and checked, so a green CI run means
//!   every test that needs one of them ran.

use std::fmt::Display;
use std::io::Write;

/// A server or tool the test suite starts for real.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// PostgreSQL 15 (Debian's `postgresql` package).
    Postgresql,
    /// Garage, the S3 object store (`cargo install garage`).
    Garage,
    /// nginx, the farm's balancer (Debian's `nginx` package).
    Nginx,
    /// strace, which injects failures and delays into the real binary.
    Strace,
    /// moto, a second S3 implementation (`pip install 'moto[server]'`).
    Moto,
    /// Azurite, the Azure Blob Storage emulator (`npm install -g azurite`).
    Azurite,
}

impl Needs {
    /// Its name in `BITSD_TEST_REQUIRE`.
    pub fn name(self) -> &'static str {
        match self {
            Needs::Postgresql => "postgresql",
            Needs::Garage => "garage",
            Needs::Nginx => "nginx",
            Needs::Strace => "strace",
            Needs::Moto => "moto",
            Needs::Azurite => "azurite",
        }
    }

    /// Whether `BITSD_TEST_REQUIRE` names it (or is `all`).
    pub fn required(self) -> bool {
        std::env::var("BITSD_TEST_REQUIRE").is_ok_and(|list| {
            list.split(',')
                .map(str::trim)
                .any(|name| name == "all" || name == self.name())
        })
    }
}

/// The test skips because `needs` cannot run here, for `why`: printed, logged to
/// `BITSD_TEST_SKIP_LOG`, and a panic when `BITSD_TEST_REQUIRE` names `needs`.
pub fn missing(needs: Needs, why: impl Display) {
    if needs.required() {
        log(&format!("FAILED (required {}): {why}", needs.name()));
        panic!(
            "{} is required here (BITSD_TEST_REQUIRE) but cannot run: {why}",
            needs.name()
        );
    }
    skipped(why);
}

/// The test skips for `why`, a reason no setting turns into a failure (an optional tool, an
/// address this machine cannot bind): printed and logged to `BITSD_TEST_SKIP_LOG`.
pub fn skipped(why: impl Display) {
    let line = format!("SKIPPED: {why}");
    eprintln!("{line}");
    log(&line);
}

/// Appends `line`, with the test's name, to `BITSD_TEST_SKIP_LOG` when it is set.
fn log(line: &str) {
    let Some(path) = std::env::var_os("BITSD_TEST_SKIP_LOG") else {
        return;
    };
    let binary = std::env::args()
        .next()
        .and_then(|arg| {
            std::path::Path::new(&arg)
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .map(|name| match name.rsplit_once('-') {
            // cargo's test binaries end in `-<16 hex digits>`.
            Some((stem, hash))
                if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                stem.to_string()
            }
            _ => name,
        })
        .unwrap_or_default();
    // libtest names each test's thread after the test.
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        // One write per line: concurrent tests append whole lines.
        let _ = file.write_all(format!("{binary} {test}: {line}\n").as_bytes());
    }
}
