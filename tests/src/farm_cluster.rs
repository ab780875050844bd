//! [`FarmCluster`]: N real `bitsd` binaries of a farm (each from its own config file, usually
//! the same shared-backend settings), behind nginx round robin without stickiness, each
//! SIGKILL-able and restartable on the same port; and [`shared_config`], the TOML of a
//! `[storage] backend = "shared"` node.
//!
//! The calls block (they start processes and wait for them): call them from
//! `spawn_blocking` or `block_in_place` in async tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bitsd_storage::shared::objects::ObjectStoreConfig;

use crate::garage::free_port;
use crate::nginx::Nginx;
use crate::BitsdProcess;

/// Writes [`shared_config`] of one test node (no top-level keys, a pool of 2, a 5 s
/// PostgreSQL timeout) to `dir/<name>.toml` and returns its path.
pub fn write_shared_config(
    dir: &Path,
    name: &str,
    postgres_url: &str,
    store: &ObjectStoreConfig,
) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, shared_config("", postgres_url, 2, 5, store)).unwrap();
    path
}

/// Runs the real binary on [`write_shared_config`] of `store` (`dir/<name>.toml`, data in
/// `dir/<name>`, no admin listener), which must refuse to start within 30 s; its standard
/// error, printed too. Blocks.
pub fn refused_start(
    dir: &Path,
    name: &str,
    postgres_url: &str,
    store: &ObjectStoreConfig,
) -> String {
    let config = write_shared_config(dir, name, postgres_url, store);
    let stderr = crate::bitsd_refuses(
        &dir.join(name),
        &[
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
        ],
        std::time::Duration::from_secs(30),
        "started on object-store settings it cannot use",
    );
    println!("{name}: {stderr}");
    stderr
}

/// The config file of a shared-backend node: `top` (top-level keys, verbatim; TOML wants them
/// before the tables), `[storage]` on `postgres_url` with this pool size and timeout in
/// seconds, and `[object_store]` from `store` (every field that is set).
pub fn shared_config(
    top: &str,
    postgres_url: &str,
    pool: usize,
    timeout_secs: u64,
    store: &ObjectStoreConfig,
) -> String {
    let mut s = format!(
        "{top}\n[storage]\nbackend = \"shared\"\npostgres_url = \"{postgres_url}\"\n\
         postgres_max_connections = {pool}\npostgres_timeout_secs = {timeout_secs}\n\n\
         [object_store]\nbucket = \"{}\"\nprefix = \"{}\"\n",
        store.bucket, store.prefix
    );
    if store.service == bitsd::storage::shared::objects::StoreService::Azure {
        s.push_str("service = \"azure\"\n");
    }
    let text = [
        ("account", &store.account),
        ("endpoint", &store.endpoint),
        ("region", &store.region),
        ("access_key_id", &store.access_key_id),
        ("secret_access_key", &store.secret_access_key),
        ("session_token", &store.session_token),
    ];
    for (key, value) in text {
        if let Some(v) = value {
            s.push_str(&format!("{key} = \"{v}\"\n"));
        }
    }
    let numbers = [
        ("part_size", store.part_size),
        ("connect_timeout_ms", store.connect_timeout_ms),
        ("request_timeout_secs", store.request_timeout_secs),
        ("max_retries", store.max_retries.map(|n| n as u64)),
        ("retry_timeout_secs", store.retry_timeout_secs),
    ];
    for (key, value) in numbers {
        if let Some(v) = value {
            s.push_str(&format!("{key} = {v}\n"));
        }
    }
    s
}

/// One `bitsd` of the cluster: its fixed port, files and (while it runs) its process.
struct Node {
    port: u16,
    config: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    process: Option<BitsdProcess>,
}

impl Node {
    fn spawn(&mut self) {
        let listen = format!("127.0.0.1:{}", self.port);
        let config = self.config.to_str().unwrap().to_owned();
        let args = [
            "--config",
            &config,
            "--listen",
            &listen,
            "--admin-listen",
            "off",
        ];
        self.process = Some(BitsdProcess::start_logging(
            &self.data_dir,
            &args,
            Some(&self.log),
        ));
    }
}

/// N `bitsd` processes behind one nginx (round robin, no stickiness, a refused connection
/// passed on to the next node), over a temporary directory holding their config files, data
/// directories and logs.
pub struct FarmCluster {
    nodes: Vec<Node>,
    nginx: Nginx,
    dir: tempfile::TempDir,
}

impl FarmCluster {
    /// Starts one node per config text (each on a fixed free port, so a restart keeps its
    /// address in nginx's upstream list) and nginx in front of them; `None` (printed) when
    /// nginx is not installed.
    pub fn start(configs: &[String]) -> Option<Self> {
        assert!(!configs.is_empty(), "a cluster needs a node");
        let dir = tempfile::Builder::new()
            .prefix("bitsd-cluster-")
            .tempdir()
            .unwrap();
        let mut nodes: Vec<Node> = configs
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let config = dir.path().join(format!("node{i}.toml"));
                std::fs::write(&config, text).unwrap();
                let data_dir = dir.path().join(format!("node{i}"));
                std::fs::create_dir_all(&data_dir).unwrap();
                Node {
                    port: free_port(),
                    config,
                    data_dir,
                    log: dir.path().join(format!("node{i}.log")),
                    process: None,
                }
            })
            .collect();
        for node in &mut nodes {
            node.spawn();
        }
        let addrs: Vec<SocketAddr> = nodes
            .iter()
            .map(|n| SocketAddr::from(([127, 0, 0, 1], n.port)))
            .collect();
        let nginx = Nginx::start(&addrs)?;
        Some(FarmCluster { nodes, nginx, dir })
    }

    /// The balancer's address (where clients connect).
    pub fn addr(&self) -> SocketAddr {
        self.nginx.addr()
    }

    /// The balancer.
    pub fn nginx(&self) -> &Nginx {
        &self.nginx
    }

    /// Node `i`'s own address (also while it is down: its port is kept).
    pub fn node_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.nodes[i].port))
    }

    /// How many nodes the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node (never: [`FarmCluster::start`] needs one).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Whether node `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].process.is_some()
    }

    /// SIGKILLs node `i` (no shutdown, no flush) and waits until it is gone.
    pub fn kill(&mut self, i: usize) {
        if let Some(p) = self.nodes[i].process.take() {
            p.kill();
        }
    }

    /// Starts node `i` again on its port (after [`FarmCluster::kill`]; a running node is
    /// killed first) and waits until it listens.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.nodes[i].spawn();
    }

    /// The PID of node `i`'s `bitsd` while it runs (to trace or signal it).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].process.as_ref().map(BitsdProcess::server_pid)
    }

    /// Node `i`'s log (its stderr at `RUST_LOG=warn` plus merges of tiny fragments at debug,
    /// across restarts).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// The last `lines` lines of every node's log and of nginx's error log, for a failure
    /// message.
    pub fn log_tails(&self, lines: usize) -> String {
        let tail = |text: String| crate::last_lines(&text, lines);
        let mut s = String::new();
        for i in 0..self.nodes.len() {
            s.push_str(&format!("--- node {i}\n{}\n", tail(self.log(i))));
        }
        s.push_str(&format!("--- nginx\n{}\n", tail(self.nginx.error_log())));
        s
    }

    /// The cluster's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
