//! Test harness for bitsd's end-to-end tests: a real server on an ephemeral loopback port
//! with its data in a temporary directory, and a raw HTTP/1.1 client that sends exact bytes
//! and parses exact responses.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod azurite;
pub mod bits_job;
mod emulator;
pub mod examples;
pub mod farm_cluster;
pub mod farm_servers;
pub mod garage;
pub mod moto;
pub mod nginx;
pub mod pg;
pub mod relay;
pub mod reply_suite;
pub mod shared_backend;
pub mod skip;

use std::path::{Path, PathBuf};

/// The BITS 1.5 upload protocol GUID.
pub const PROTOCOL: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";

/// Path of the repository's `fixtures/` directory.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("fixtures")
}

/// The SHA-256 of `bytes` in lowercase hex (token files, receipts, S3 payload hashes).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift), so payloads need no files.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The last `lines` lines of `text` (a server's log, for a failure message).
pub fn last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The path part of an absolute reply URL.
pub fn url_path(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.find('/')
        .map(|i| rest[i..].to_owned())
        .unwrap_or_else(|| "/".to_owned())
}

mod process;
mod raw_client;
mod server;

/// Polls `check` every 20 ms until it holds; panics with `what` after `within`.
pub async fn until<F, Fut>(what: &str, within: std::time::Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The value of one series of a Prometheus text exposition (`/metrics`); panics, showing the
/// text, when the series is missing.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

pub use process::{
    bitsd_binary, bitsd_refuses, check_config_ok, check_config_ok_with_env, strace, BitsdProcess,
};
pub use raw_client::{bits_post_request, RawClient, RawResponse};
pub use server::TestServer;
