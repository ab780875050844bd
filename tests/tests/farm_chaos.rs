//! The farm's failures under load: real `bitsd` binaries on one PostgreSQL database and one
//! Garage bucket (the node kills also on an Azurite container) behind nginx round robin,
//! driven by clients that retry like BITS (`bitsd_tests::bits_job`), while nodes are
//! SIGKILLed and restarted, a Garage node dies, PostgreSQL stops, or a node dies while a
//! fragment's body is streaming. Every job must finish byte-exact without a session ever
//! restarting from zero and without an acknowledged offset going back.
//!
//! `BITSD_CHAOS_SEED=N` replays a run of the soak (its seed is printed);
//! `BITSD_CHAOS_SCALE=K` runs K times the jobs and volume (a longer soak). Skips with a
//! printed reason when PostgreSQL, Garage or nginx is not installed.
#![allow(clippy::unwrap_used)]

mod chaos_support;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitsd::storage::shared::objects::Objects;
use bitsd_tests::bits_job::RetryPolicy;
use bitsd_tests::farm_cluster::FarmCluster;
use bitsd_tests::farm_servers::StoreServers;

use chaos_support::{check_plain_uploads, run_jobs, tally, JobPlan, Rng, MIB};

/// Seed from `BITSD_CHAOS_SEED`, else from the clock; printed either way.
fn seed() -> u64 {
    let seed = std::env::var("BITSD_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_007
        });
    println!("seed {seed} (replay with BITSD_CHAOS_SEED={seed})");
    seed
}

/// With `BITSD_CHAOS_LOGS=DIR`, a failed run's node logs are copied to `DIR/node<i>.log`
/// (the cluster's own directory goes with the test).
fn keep_node_logs(cluster: &FarmCluster) {
    let Some(dir) = std::env::var_os("BITSD_CHAOS_LOGS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..cluster.len() {
        std::fs::write(dir.join(format!("node{i}.log")), cluster.log(i)).unwrap();
    }
    println!("node logs kept in {}", dir.display());
}

fn scale() -> usize {
    std::env::var("BITSD_CHAOS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_jobs_complete_byte_exact_while_nodes_are_sigkilled() {
    if let Some(servers) = StoreServers::garage().await {
        sixty_four_jobs_while_nodes_are_sigkilled_on(servers).await;
    }
}

/// The same on Azure Blob Storage (Azurite, `service = "azure"`): fragments, merges,
/// assemblies as block lists and their resumption, under the same kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_jobs_on_azure_complete_byte_exact_while_nodes_are_sigkilled() {
    if let Some(servers) = StoreServers::azurite().await {
        sixty_four_jobs_while_nodes_are_sigkilled_on(servers).await;
    }
}

async fn sixty_four_jobs_while_nodes_are_sigkilled_on(servers: StoreServers) {
    let StoreServers {
        pg: _pg,
        postgres_url,
        store: server,
    } = servers;
    let seed = seed();
    let scale = scale();
    let store = server.object_store_config("chaos");
    let config = bitsd_tests::farm_cluster::shared_config("", &postgres_url, 8, 5, &store);
    let Some(cluster) = tokio::task::spawn_blocking(move || {
        FarmCluster::start(&[config.clone(), config.clone(), config])
    })
    .await
    .unwrap() else {
        return;
    };
    let addr = cluster.addr();
    let cluster = Arc::new(Mutex::new(cluster));

    // The workload: 64 jobs (times the scale), half upload-reply, two of them 64 MiB, six in
    // tiny fragments (1.5 to 3 MiB in fragments of 5 to 24 KB: what nodes merge behind the
    // upload, so merges are killed too), the rest log-uniform from 4 KB to 12 MiB; fragments
    // log-uniform from 5 KB to 8 MiB.
    let mut rng = Rng::new(seed);
    let tiny = 2 * scale..8 * scale;
    let jobs: Vec<JobPlan> = (0..64 * scale)
        .map(|j| {
            let size = if j < 2 * scale {
                64 * MIB
            } else if tiny.contains(&j) {
                rng.log_uniform(3 * MIB as u64 / 2, 3 * MIB as u64) as usize
            } else {
                rng.log_uniform(4_000, 12 * MIB as u64) as usize
            };
            JobPlan {
                echo: j % 2 == 0,
                path: if j % 2 == 0 {
                    format!("/echo/chaos-{j}")
                } else {
                    format!("/upload/chaos/{seed}-{j}.bin")
                },
                size,
                data_seed: seed ^ (j as u64 + 1),
                fragment_seed: rng.next(),
                fragments: if tiny.contains(&j) {
                    (5_000, 24_000)
                } else {
                    (5_000, 8 * MIB as u64)
                },
            }
        })
        .collect();
    let volume: usize = jobs.iter().map(|j| j.size).sum();
    println!("{} jobs, {} MiB", jobs.len(), volume / MIB);

    // The killer: a random node SIGKILLed at a random moment, down for a random while, then
    // restarted on its port; one node down at a time.
    let done = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicU32::new(0));
    let killer = {
        let (cluster, done, kills) = (cluster.clone(), done.clone(), kills.clone());
        let mut rng = Rng::new(seed.rotate_left(17));
        std::thread::spawn(move || {
            let nap = |ms: u64, done: &AtomicBool| {
                let until = Instant::now() + Duration::from_millis(ms);
                while Instant::now() < until && !done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            };
            loop {
                nap(rng.range(300, 1200), &done);
                if done.load(Ordering::SeqCst) {
                    return;
                }
                let i = rng.range(0, 3) as usize;
                cluster.lock().unwrap().kill(i);
                kills.fetch_add(1, Ordering::SeqCst);
                nap(rng.range(100, 800), &done);
                cluster.lock().unwrap().restart(i);
            }
        })
    };

    let started = Instant::now();
    let policy = RetryPolicy::default();
    let results = run_jobs(addr, &jobs, &policy).await;
    done.store(true, Ordering::SeqCst);
    killer.join().unwrap();
    let kills = kills.load(Ordering::SeqCst);

    let (mut failures, transient) = tally(&jobs, &results);
    let packets: u32 = results.iter().flatten().map(|o| o.packets).sum();
    println!(
        "{} jobs in {:?}: {kills} node kills, {packets} packets, transient answers {transient:?}",
        jobs.len(),
        started.elapsed()
    );
    let objects = Objects::new(&store).unwrap();
    failures.extend(check_plain_uploads(&objects, &jobs).await);
    if !failures.is_empty() {
        keep_node_logs(&cluster.lock().unwrap());
    }
    assert!(
        failures.is_empty(),
        "seed {seed}: {failures:#?}\n{}",
        cluster.lock().unwrap().log_tails(20)
    );
    assert!(kills >= 2, "seed {seed}: the run ended before two kills");
    // The tiny-fragment jobs were merged behind (some merges may have died with a node).
    let merged: usize = {
        let cluster = cluster.lock().unwrap();
        (0..3)
            .map(|i| cluster.log(i).matches("Merged {").count())
            .sum()
    };
    println!("{merged} merges of tiny fragments");
    assert!(
        merged > 0,
        "seed {seed}: no run of tiny fragments was merged"
    );
    drop(server);
}
