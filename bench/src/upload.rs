//! Scenario 1: upload throughput, bitsd against the plain-file writer and the HTTP sink.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinSet;

use crate::client::{BoxError, Conn, Result};
use crate::report::{Report, Row, Value};
use crate::util::{mib_per_sec, settle, size_label, start_bitsd, MIB};
use crate::{file_baseline, sink::Sink, Plan};

/// `uploads` concurrent uploads (one connection each) of `each` bytes in `fragment`-byte
/// fragments to `{prefix}{i}.bin`, each closed at the end; the wall time of all of them.
pub async fn http_uploads(
    addr: std::net::SocketAddr,
    prefix: &str,
    uploads: usize,
    each: u64,
    fragment: usize,
    payload: &Bytes,
) -> Result<Duration> {
    let conns = Conn::connect_many(addr, uploads).await?;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let path = format!("{prefix}{i}.bin");
        let payload = payload.clone();
        set.spawn(async move {
            let (sid, _) = conn.upload(&path, each, fragment, &payload).await?;
            conn.close_session(&path, &sid).await?;
            Ok::<_, BoxError>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(started.elapsed())
}

/// Runs every fragment size × concurrency case and adds one row per case.
pub async fn run(plan: &Plan, work: &Path, payload: &Bytes, report: &mut Report) -> Result<()> {
    let bitsd_dir = work.join("upload-bitsd");
    let (server, _) = start_bitsd(&bitsd_dir).await?;
    let sink = Sink::start(None).await?;
    let file_dir = work.join("upload-file");
    let result = async {
        for &fragment in &plan.fragments {
            for &uploads in &plan.concurrency {
                let each = if uploads == 1 { plan.single } else { plan.each }.max(fragment as u64);
                let total = each * uploads as u64;
                let label = format!(
                    "upload {uploads} × {}, {} fragments",
                    size_label(each),
                    size_label(fragment as u64)
                );
                eprintln!("bench: {label}");
                let (mut file_time, mut sink_time, mut bitsd_time) =
                    (Duration::MAX, Duration::MAX, Duration::MAX);
                for run in 0..plan.upload_repeats {
                    settle().await;
                    let t = {
                        let (dir, payload) = (file_dir.clone(), payload.clone());
                        tokio::task::spawn_blocking(move || {
                            file_baseline::write_uploads(&dir, uploads, each, fragment, &payload)
                        })
                        .await??
                    };
                    file_time = file_time.min(t);
                    let t = http_uploads(
                        sink.addr(),
                        "/upload/sink/",
                        uploads,
                        each,
                        fragment,
                        payload,
                    )
                    .await?;
                    sink_time = sink_time.min(t);
                    settle().await;
                    let tag = format!("f{}-c{uploads}-r{run}-", fragment / 1024);
                    let t = http_uploads(
                        server.addr(),
                        &format!("/upload/bench/{tag}"),
                        uploads,
                        each,
                        fragment,
                        payload,
                    )
                    .await?;
                    bitsd_time = bitsd_time.min(t);
                    // Committed uploads stay in files/ (plain-upload semantics); free the space.
                    let _ = std::fs::remove_dir_all(bitsd_dir.join("files").join("bench"));
                }
                let mut row = Row::new(
                    "upload",
                    label,
                    Value::MibPerSec(mib_per_sec(total, bitsd_time)),
                )
                .baseline("file", Value::MibPerSec(mib_per_sec(total, file_time)))
                .sink(Value::MibPerSec(mib_per_sec(total, sink_time)));
                if fragment as u64 == MIB {
                    row = row.at_least_ratio(0.85);
                } else if fragment == 64 * 1024 {
                    row = row.at_least_ratio(0.70);
                }
                report.rows.push(row);
            }
        }
        Ok::<_, BoxError>(())
    }
    .await;
    sink.stop();
    server.shutdown().await?;
    let _ = std::fs::remove_dir_all(&bitsd_dir);
    result
}
