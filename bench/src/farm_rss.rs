//! A farm node's memory under slow clients: one more node of the farm, with a small
//! `fragment_memory`, takes `--farm-rss-clients` clients at once, each trickling one 16 MiB
//! fragment (a multipart one: it reserves 2 × `part_size` of the budget before its body is
//! read). Fragments that do not fit wait for room (`fragment_memory_wait_secs` long enough
//! for all of them). The node's peak RSS (`VmHWM`) is checked against what docs/farm.md
//! says to size a node for: the process at rest, plus `fragment_memory`, plus 512 KiB per
//! connection.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinSet;

use crate::child::BitsdChild;
use crate::client::{BoxError, Conn, Result};
use crate::util::{size_label, MIB};

/// Each client's fragment.
const FRAGMENT: usize = 16 * MIB as usize;
/// Sent this many bytes at a time, with [`PAUSE`] after each: about 4 MiB/s.
const CHUNK: usize = 256 * 1024;
const PAUSE: Duration = Duration::from_millis(60);

/// What the run measured.
pub struct RssRun {
    /// Clients at once.
    pub clients: usize,
    /// The node's `fragment_memory`.
    pub budget: u64,
    /// `VmRSS` at rest, before the clients.
    pub idle: u64,
    /// `VmHWM` after them.
    pub peak: u64,
    /// Fragments acknowledged (200) and answered otherwise.
    pub acked: usize,
    pub other: Vec<String>,
    /// From the first byte to the last Ack.
    pub elapsed: Duration,
}

impl RssRun {
    /// What docs/farm.md says to size a node for.
    pub fn limit(&self) -> u64 {
        self.idle + self.budget + self.clients as u64 * 512 * 1024
    }

    /// The check's figure.
    pub fn figure(&self) -> String {
        format!(
            "peak {} (at rest {}; limit at rest + fragment_memory {} + {} × 512 KiB = {}); \
             {} of {} acknowledged{} in {:.1} s",
            size_label(self.peak),
            size_label(self.idle),
            size_label(self.budget),
            self.clients,
            size_label(self.limit()),
            self.acked,
            self.clients,
            if self.other.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.other.join(", "))
            },
            self.elapsed.as_secs_f64()
        )
    }
}

/// Starts the extra node on `farm_toml` (the farm nodes' config) with a `fragment_memory` of
/// `budget`, runs the clients, stops the node.
pub async fn run(
    bin: &Path,
    dir: &Path,
    farm_toml: &Path,
    clients: usize,
    budget: u64,
) -> Result<RssRun> {
    let config = dir.join("rss.toml");
    // The farm config ends in its [object_store] table.
    let mut text = std::fs::read_to_string(farm_toml)?;
    text.push_str(&format!(
        "\nfragment_memory = {budget}\nfragment_memory_wait_secs = 600\n"
    ));
    std::fs::write(&config, text)?;
    let args: [&std::ffi::OsStr; 2] = ["--config".as_ref(), config.as_os_str()];
    let node = BitsdChild::spawn_env(
        bin,
        &dir.join("rss-node"),
        &args,
        &[],
        &dir.join("rss-node.log"),
        Duration::from_secs(60),
    )?;
    let idle = node.status_bytes("VmRSS").unwrap_or(0);
    eprintln!(
        "bench: farm memory: {clients} clients each trickling a {} fragment to one node \
         (fragment_memory {})",
        size_label(FRAGMENT as u64),
        size_label(budget)
    );
    let body = Bytes::from(crate::util::pattern(FRAGMENT, 9));
    let mut conns = Vec::with_capacity(clients);
    for i in 0..clients {
        let mut c = Conn::connect(node.addr).await?;
        let path = format!("/upload/rss/{i}.bin");
        let sid = c.create_session(&path).await?;
        conns.push((c, path, sid));
    }
    let started = Instant::now();
    let mut set = JoinSet::new();
    for (mut c, path, sid) in conns {
        let body = body.clone();
        set.spawn(async move {
            let res = c.paced_fragment(&path, &sid, &body, CHUNK, PAUSE).await?;
            if res.status == 200 {
                c.close_session(&path, &sid).await?;
            }
            Ok::<_, BoxError>(res.status)
        });
    }
    let (mut acked, mut other) = (0, Vec::new());
    while let Some(r) = set.join_next().await {
        match r.map_err(BoxError::from).and_then(|r| r) {
            Ok(200) => acked += 1,
            Ok(status) => other.push(format!("status {status}")),
            Err(e) => other.push(e.to_string()),
        }
    }
    let elapsed = started.elapsed();
    let peak = node
        .status_bytes("VmHWM")
        .ok_or("could not read VmHWM of the farm node")?;
    node.stop();
    Ok(RssRun {
        clients,
        budget,
        idle,
        peak,
        acked,
        other,
        elapsed,
    })
}
