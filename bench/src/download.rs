//! Scenario 3: reply download throughput. One upload to `/echo/` makes a reply of the given
//! size; its reply URL is then fetched repeatedly, against the sink serving the same bytes
//! from a file.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinSet;

use crate::client::{url_path, BoxError, Conn, Result};
use crate::report::{Report, Row, Value};
use crate::util::{mib_per_sec, size_label, start_bitsd, MIB};
use crate::{sink::Sink, Plan};

/// Fragment size of the upload that makes the reply.
const UPLOAD_FRAGMENT: u64 = 16 * MIB;

/// `clients` connections each GETting `path` `repeats` times; bytes and wall time.
async fn fetch(
    addr: SocketAddr,
    path: &str,
    expect: u64,
    clients: usize,
    repeats: usize,
) -> Result<(u64, Duration)> {
    let conns = Conn::connect_many(addr, clients).await?;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for mut conn in conns {
        let path = path.to_owned();
        set.spawn(async move {
            for _ in 0..repeats {
                let res = conn.get(&path).await?;
                if res.status != 200 || res.body_len != expect {
                    return Err(format!(
                        "GET {path}: HTTP {} with {} bytes, expected {expect}",
                        res.status, res.body_len
                    )
                    .into());
                }
            }
            Ok::<_, BoxError>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok((expect * (clients * repeats) as u64, started.elapsed()))
}

/// Runs the download scenario.
pub async fn run(plan: &Plan, work: &Path, payload: &Bytes, report: &mut Report) -> Result<()> {
    let size = plan.reply;
    let fragment = UPLOAD_FRAGMENT.min(size) as usize;
    // The sink's file: the same bytes the upload sends (payload[..fragment] per fragment).
    let sink_file = work.join("download-sink.bin");
    {
        let mut f = std::fs::File::create(&sink_file)?;
        let mut at = 0;
        while at < size {
            let len = (fragment as u64).min(size - at) as usize;
            f.write_all(&payload[..len])?;
            at += len as u64;
        }
        f.sync_all()?;
    }
    let sink = Sink::start(Some(sink_file.clone())).await?;
    let dir = work.join("download-bitsd");
    let (server, _) = start_bitsd(&dir).await?;
    let result = async {
        eprintln!("bench: reply download of {}", size_label(size));
        let mut conn = Conn::connect(server.addr()).await?;
        let path = "/echo/download.bin";
        let (sid, ack) = conn.upload(path, size, fragment, payload).await?;
        let reply = url_path(
            ack.header("bits-reply-url")
                .ok_or("final Ack without BITS-Reply-URL")?,
        );
        // Warm-up: both files are in the page cache afterwards.
        fetch(server.addr(), &reply, size, 1, 1).await?;
        fetch(sink.addr(), "/file", size, 1, 1).await?;
        let repeats = plan.download_repeats;
        for &clients in &plan.download_clients {
            // Best of up to 3 of `plan.rounds` rounds for each side (same bytes every round).
            let (mut st, mut bt, mut s64t) = (Duration::MAX, Duration::MAX, Duration::MAX);
            let (mut sb, mut bb, mut s64b) = (0, 0, 0);
            for _ in 0..plan.rounds.min(3) {
                let (b, t) = fetch(sink.addr(), "/file", size, clients, repeats).await?;
                (sb, st) = (b, st.min(t));
                let (b, t) = fetch(server.addr(), &reply, size, clients, repeats).await?;
                (bb, bt) = (b, bt.min(t));
                let (b, t) = fetch(sink.addr(), "/file-64k", size, clients, repeats).await?;
                (s64b, s64t) = (b, s64t.min(t));
            }
            let label = format!(
                "reply download {} × {}, {clients} connection{}",
                size_label(size),
                repeats * clients,
                if clients == 1 { "" } else { "s" }
            );
            let bitsd = Value::MibPerSec(mib_per_sec(bb, bt));
            report.rows.push(
                Row::new("download", label.clone(), bitsd)
                    .baseline("sink", Value::MibPerSec(mib_per_sec(sb, st)))
                    .at_least_ratio(0.85),
            );
            report.rows.push(
                Row::new(
                    "download",
                    format!("{label}; sink reading 64 KiB chunks"),
                    bitsd,
                )
                .baseline("sink 64 KiB", Value::MibPerSec(mib_per_sec(s64b, s64t))),
            );
        }
        conn.close_session(path, &sid).await?;
        Ok::<_, BoxError>(())
    }
    .await;
    sink.stop();
    server.shutdown().await?;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&sink_file);
    result
}
