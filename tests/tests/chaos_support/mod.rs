//! Helpers of the farm failure tests (farm_chaos*.rs): a seeded RNG, job plans run
//! concurrently through [`bitsd_tests::bits_job::BitsJob`], and the bucket check of the plain
//! uploads.
#![allow(dead_code)]

use std::net::SocketAddr;

use bitsd::storage::shared::objects::Objects;
use bitsd_tests::bits_job::{BitsJob, JobOutcome, RetryPolicy};
use bitsd_tests::pattern;

/// One mebibyte.
pub const MIB: usize = 1024 * 1024;

/// splitmix64: a small seeded generator, so a run replays from its printed seed.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }

    /// Log-uniform in `lo..=hi` (as many small values as large ones per octave).
    pub fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let unit = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
        ((a + (b - a) * unit).exp() as u64).clamp(lo, hi)
    }
}

/// One job of a run.
#[derive(Clone, Debug)]
pub struct JobPlan {
    /// Upload-reply (the echo route) rather than a plain upload.
    pub echo: bool,
    /// The URL path.
    pub path: String,
    /// Upload size in bytes.
    pub size: usize,
    /// Seed of the bytes ([`bitsd_tests::pattern`]).
    pub data_seed: u64,
    /// Seed of the fragment sizes.
    pub fragment_seed: u64,
    /// Fragment sizes are log-uniform in `min..=max` bytes.
    pub fragments: (u64, u64),
}

impl JobPlan {
    /// The upload's bytes.
    pub fn data(&self) -> Vec<u8> {
        pattern(self.size, self.data_seed)
    }

    /// The bucket key of a plain upload, relative to `files/` (the path after `/upload/`).
    pub fn file_name(&self) -> &str {
        self.path.strip_prefix("/upload/").unwrap()
    }
}

/// Runs every job concurrently against `addr`; the results in plan order.
pub async fn run_jobs(
    addr: SocketAddr,
    jobs: &[JobPlan],
    policy: &RetryPolicy,
) -> Vec<Result<JobOutcome, String>> {
    let tasks: Vec<_> = jobs
        .iter()
        .cloned()
        .map(|plan| {
            let policy = policy.clone();
            tokio::spawn(async move {
                let data = plan.data();
                let mut rng = Rng::new(plan.fragment_seed);
                let (min, max) = plan.fragments;
                BitsJob {
                    addr,
                    path: plan.path.clone(),
                    data: &data,
                    next_fragment: Box::new(move || rng.log_uniform(min, max) as usize),
                    reply: plan.echo,
                    policy,
                }
                .run()
                .await
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(
            t.await
                .unwrap_or_else(|e| Err(format!("job panicked: {e}"))),
        );
    }
    results
}

/// The plain uploads in the bucket: each byte-exact at its key, and each key exactly once in
/// the listing of `files/`; the problems found.
pub async fn check_plain_uploads(objects: &Objects, jobs: &[JobPlan]) -> Vec<String> {
    let mut problems = Vec::new();
    let listed = objects.list(&objects.prefix().join("files")).await.unwrap();
    for plan in jobs.iter().filter(|j| !j.echo) {
        let key = objects.file_key(plan.file_name());
        let n = listed.iter().filter(|o| o.key == key).count();
        if n != 1 {
            problems.push(format!("{}: listed {n} times in the bucket", plan.path));
            continue;
        }
        let stored = objects
            .read(&key, None)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        if stored != plan.data() {
            problems.push(format!(
                "{}: stored {} bytes differ from the {} uploaded",
                plan.path,
                stored.len(),
                plan.size
            ));
        }
    }
    let plain = jobs.iter().filter(|j| !j.echo).count();
    if listed.len() != plain {
        problems.push(format!(
            "{} objects under files/, {plain} plain uploads",
            listed.len()
        ));
    }
    problems
}

/// The failures of a run (job errors, replies that differ from their upload) and the
/// transient answers seen, by kind.
pub fn tally(
    jobs: &[JobPlan],
    results: &[Result<JobOutcome, String>],
) -> (Vec<String>, std::collections::BTreeMap<String, u32>) {
    let mut failures = Vec::new();
    let mut transient = std::collections::BTreeMap::new();
    for (plan, result) in jobs.iter().zip(results) {
        match result {
            Ok(out) => {
                for t in &out.transient {
                    *transient.entry(t.clone()).or_insert(0u32) += 1;
                    // Transient means 503 (bitsd), 502 (nginx: the node died under the
                    // request) or a cut connection; a 500 says something broke.
                    if t.contains(": 500 ") {
                        failures.push(format!("{}: answered {t}", plan.path));
                    }
                }
                if plan.echo && *out.reply.as_ref().unwrap() != plan.data() {
                    failures.push(format!("{}: the reply differs from the upload", plan.path));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", plan.path)),
        }
    }
    (failures, transient)
}

/// `n` jobs named `{name}-{j}`, every other one upload-reply, sizes log-uniform in `sizes`,
/// fragments log-uniform in `fragments`.
pub fn plans(
    name: &str,
    n: usize,
    seed: u64,
    sizes: (u64, u64),
    fragments: (u64, u64),
) -> Vec<JobPlan> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|j| JobPlan {
            echo: j % 2 == 0,
            path: if j % 2 == 0 {
                format!("/echo/{name}-{j}")
            } else {
                format!("/upload/{name}/{j}.bin")
            },
            size: rng.log_uniform(sizes.0, sizes.1) as usize,
            data_seed: seed ^ (j as u64 + 1),
            fragment_seed: rng.next(),
            fragments,
        })
        .collect()
}
