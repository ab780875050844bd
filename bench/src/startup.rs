//! Scenario 5: startup time with many idle sessions in the store, and the data directory's
//! size on disk against the bytes it holds.

use std::path::Path;
use std::time::{Duration, Instant};

use bitsd_protocol::SessionId;
use bitsd_storage::{SessionRecord, UploadMode};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::child::BitsdChild;
use crate::client::{BoxError, Conn, Result, PROTOCOL};
use crate::report::{human_bytes, Report, Row, Value};
use crate::util::{disk_usage, size_label, start_bitsd, MIB};
use crate::Plan;

/// Sessions created at once while populating the store.
const POPULATE_CONCURRENCY: usize = 64;

/// Creates `n` idle sessions (no bytes yet) through `SessionStore::create`, as Create-Session
/// does: a directory fsynced into place and a durably saved record.
async fn populate(dir: &Path, n: usize) -> Result<Duration> {
    let store = bitsd::SessionStore::open(dir).await?;
    let started = Instant::now();
    let mut creates = futures_util::stream::iter(0..n)
        .map(|i| {
            let store = store.clone();
            async move {
                let mut record = SessionRecord::new(
                    SessionId::random(),
                    "/upload/".into(),
                    UploadMode::Upload,
                    format!("http://127.0.0.1/upload/idle/{i}.bin"),
                );
                record.destination = Some(format!("idle/{i}.bin"));
                store.create(&record).await
            }
        })
        .buffer_unordered(POPULATE_CONCURRENCY);
    while let Some(r) = creates.next().await {
        r?;
    }
    drop(creates);
    store.flush().await?;
    let took = started.elapsed();
    drop(store);
    Ok(took)
}

/// In-process start on `dir`: how long `bitsd::start` took, and how long until the first
/// Create-Session was answered (with its status: 503 when the session limit is reached).
async fn time_in_process(dir: &Path) -> Result<(Duration, Duration, u16)> {
    let t = Instant::now();
    let (server, start) = start_bitsd(dir).await?;
    // start_bitsd may have retried while the store's sled lock was being released; count
    // from the successful attempt.
    let offset = t.elapsed().saturating_sub(start);
    let mut conn = Conn::connect(server.addr()).await?;
    let res = conn
        .bits_post(
            "/upload/probe.bin",
            "Create-Session",
            &[("BITS-Supported-Protocols", PROTOCOL)],
            b"",
        )
        .await?;
    let first = t.elapsed().saturating_sub(offset);
    drop(conn);
    server.shutdown().await?;
    Ok((start, first, res.status))
}

/// Child process start on `dir`: time until the listening line (retrying while the sled lock
/// is held by the previous server).
async fn time_child(bin: &Path, dir: &Path, log: &Path) -> Result<Duration> {
    let mut tries = 0;
    loop {
        match BitsdChild::spawn(bin, dir, log, Duration::from_secs(120)) {
            Ok(c) => {
                let t = c.startup;
                c.stop();
                return Ok(t);
            }
            Err(e) if tries < 20 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Startup with `plan.startup_sessions` idle sessions, against an empty data directory.
pub async fn run_startup(
    plan: &Plan,
    bin: Option<&Path>,
    work: &Path,
    report: &mut Report,
) -> Result<()> {
    let n = plan.startup_sessions;
    let empty = work.join("startup-empty");
    let dir = work.join("startup-bitsd");
    eprintln!("bench: startup, creating {n} idle sessions");
    // Baselines: the same measurements on an empty data directory.
    std::fs::create_dir_all(&empty)?;
    let (empty_start, empty_first, _) = time_in_process(&empty).await?;
    let took = populate(&dir, n).await?;
    let (start, first, status) = time_in_process(&dir).await?;
    let limit = Duration::from_secs(2);
    let ms = |d: Duration| Value::Millis(d.as_secs_f64() * 1000.0);
    report.rows.push(
        Row::new(
            "startup",
            format!("startup with {n} idle sessions: bitsd::start (in-process)"),
            ms(start),
        )
        .baseline("empty dir", ms(empty_start))
        .target("< 2 s", start < limit),
    );
    report.rows.push(
        Row::new(
            "startup",
            format!("startup with {n} idle sessions: start → first Ack (HTTP {status})"),
            ms(first),
        )
        .baseline("empty dir", ms(empty_first))
        .target("< 2 s", first < limit),
    );
    if let Some(bin) = bin {
        let log = work.join("startup-bitsd.log");
        let empty_child = time_child(bin, &empty, &log).await?;
        let child = time_child(bin, &dir, &log).await?;
        report.rows.push(
            Row::new(
                "startup",
                format!("startup with {n} idle sessions: bitsd process → listening line"),
                ms(child),
            )
            .baseline("empty dir", ms(empty_child))
            .target("< 2 s", child < limit),
        );
    }
    let (allocated, _) = disk_usage(&dir)?;
    let (empty_allocated, _) = disk_usage(&empty)?;
    report.rows.push(
        Row::new(
            "startup",
            format!(
                "data dir with {n} idle sessions, 0 bytes held ({} per session)",
                human_bytes(allocated / n.max(1) as u64)
            ),
            Value::Bytes(allocated),
        )
        .baseline("empty dir", Value::Bytes(empty_allocated)),
    );
    report.rows.push(Row::new(
        "startup",
        format!("creating {n} sessions via SessionStore::create ({POPULATE_CONCURRENCY} at once)"),
        Value::PerSec(n as f64 / took.as_secs_f64().max(1e-9)),
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&empty);
    Ok(())
}

/// The data directory against the bytes it holds: complete uploads (left open) and half-done
/// ones, then after Close / Cancel (committed files stay, everything else should go).
pub async fn run_disk(
    plan: &Plan,
    work: &Path,
    payload: &Bytes,
    report: &mut Report,
) -> Result<()> {
    let dir = work.join("disk-bitsd");
    let (server, _) = start_bitsd(&dir).await?;
    let result = async {
        let (fixed, _) = disk_usage(&dir)?;
        let (n, each) = (plan.disk_sessions, plan.disk_each);
        let half = each / 2;
        eprintln!(
            "bench: data dir size, {n} × {} complete + {n} × {} partial uploads",
            size_label(each),
            size_label(half)
        );
        let mut conn = Conn::connect(server.addr()).await?;
        let mut complete = Vec::new();
        for i in 0..n {
            let path = format!("/upload/disk/complete-{i}.bin");
            let (sid, _) = conn.upload(&path, each, MIB as usize, payload).await?;
            complete.push((path, sid));
        }
        let mut partial = Vec::new();
        for i in 0..n {
            let path = format!("/upload/disk/partial-{i}.bin");
            let sid = conn.create_session(&path).await?;
            conn.send_fragments(&path, &sid, 0..half, each, 64 * 1024, payload)
                .await?;
            partial.push((path, sid));
        }
        let held = n as u64 * (each + half);
        let (allocated, _) = disk_usage(&dir)?;
        let allowed = |held: u64| held as f64 * 1.1 + fixed as f64;
        report.rows.push(
            Row::new(
                "disk",
                format!(
                    "data dir: {n} complete (1 MiB fragments) + {n} half (64 KiB fragments) uploads"
                ),
                Value::Bytes(allocated),
            )
            .baseline("bytes held", Value::Bytes(held))
            .target(
                format!("≤ 1.1 × held + {} (empty store)", human_bytes(fixed)),
                allocated as f64 <= allowed(held),
            ),
        );
        for (path, sid) in &complete {
            conn.close_session(path, sid).await?;
        }
        for (path, sid) in &partial {
            conn.cancel_session(path, sid).await?;
        }
        let held = n as u64 * each;
        let (allocated, _) = disk_usage(&dir)?;
        report.rows.push(
            Row::new(
                "disk",
                "data dir right after Close (complete) / Cancel (partial); committed files stay",
                Value::Bytes(allocated),
            )
            .baseline("bytes held", Value::Bytes(held))
            .target(
                format!("≤ 1.1 × held + {}", human_bytes(fixed)),
                allocated as f64 <= allowed(held),
            ),
        );
        Ok::<_, BoxError>(())
    }
    .await;
    server.shutdown().await?;
    let _ = std::fs::remove_dir_all(&dir);
    result
}
