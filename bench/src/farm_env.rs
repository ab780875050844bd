//! The farm scenario's servers and their CPU clocks: a durable PostgreSQL 15 cluster, a
//! single-node Garage, three `bitsd` farm nodes (child processes on one shared config file),
//! nginx round robin over them, and a single-node `bitsd` on the default local backend. The
//! servers come from the `bitsd-tests` harness (the same ones the farm tests run).
//!
//! CPU time is read from `/proc/<pid>/stat` (user + system, plus reaped children's for
//! process trees such as PostgreSQL's postmaster and its backends).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bitsd_storage::shared::objects::{ObjectStoreConfig, Objects};
use bitsd_tests::garage::{Garage, GarageCluster, S3Access};
use bitsd_tests::nginx::Nginx;
use bitsd_tests::pg::{ClusterOptions, PgCluster};

use crate::child::BitsdChild;
use crate::client::Result;

/// Farm nodes started (the one-node target uses the first of them, directly).
pub const NODES: usize = 3;

/// Everything the farm scenario runs against.
pub struct FarmEnv {
    /// PostgreSQL (fsync, synchronous_commit and full_page_writes on).
    pub pg: Arc<PgCluster>,
    /// The database the nodes share.
    pub postgres_url: String,
    /// Garage (data_fsync and metadata_fsync on): one node, or three with `--farm-garage-cluster`.
    pub garage: Store,
    /// The object-store settings of the nodes, for the bare PUT baseline.
    pub store: ObjectStoreConfig,
    /// The farm nodes.
    pub nodes: Vec<BitsdChild>,
    /// nginx over all nodes.
    pub nginx: Nginx,
    /// nginx over the first node alone (configured as `nginx`).
    pub nginx1: Nginx,
    /// nginx over the store's S3 API alone (configured as `nginx`): the bare PUTs through the
    /// same kind of hop, so the balancer's share of a farm's overhead is measured, not guessed.
    pub bare_lb: Nginx,
    /// The single-node bitsd (local backend, default per-fragment fsync).
    pub local: BitsdChild,
    /// PostgreSQL's postmaster.
    pub pg_pid: u32,
    /// The Garage servers.
    pub garage_pids: Vec<u32>,
    /// nginx's master process.
    pub nginx_pid: u32,
    /// The master process of the nginx over the first node alone.
    pub nginx1_pid: u32,
    /// The master process of [`FarmEnv::bare_lb`].
    pub bare_lb_pid: u32,
    /// Garage's admin listeners (their `/metrics` count the S3 requests by endpoint).
    pub garage_admin: Vec<std::net::SocketAddr>,
    /// The nginx in front of Garage (`--farm-store-proxy`).
    pub store_proxy: Option<Nginx>,
}

impl FarmEnv {
    /// Starts every server; `Err` says what is missing (PostgreSQL, Garage or nginx).
    /// With `store_proxy`, the nodes and the bare PUTs reach Garage through an nginx of its
    /// own (a fresh upstream connection per request, `tcp_nodelay` towards the client).
    pub async fn start(
        bin: &Path,
        work: &Path,
        store_proxy: bool,
        settings: FarmSettings,
    ) -> Result<FarmEnv> {
        let pg = tokio::task::spawn_blocking(|| {
            PgCluster::start(ClusterOptions { durable: true }).map(Arc::new)
        })
        .await??;
        let postgres_url = {
            let pg = Arc::clone(&pg);
            tokio::task::spawn_blocking(move || pg.fresh_database()).await?
        };
        let cluster = settings.garage_cluster;
        let garage = tokio::task::spawn_blocking(move || {
            if cluster {
                GarageCluster::start().map(Store::Three)
            } else {
                Garage::start().map(Store::One)
            }
        })
        .await?
        .ok_or("Garage is not installed (cargo install garage --version 2.5.0 --locked)")?;
        let mut store = garage.object_store_config("bench");
        store.sign_payloads = settings.sign_payloads;
        let store_proxy = if store_proxy {
            let s3 = garage.s3_addr();
            // A fresh upstream connection per request: Garage does not set TCP_NODELAY, and on
            // a kept-alive connection a small response body waits for nginx's delayed ACK
            // (about 40 ms, docs/farm.md, "Garage").
            let proxy = tokio::task::spawn_blocking(move || Nginx::start(&[s3]))
                .await?
                .ok_or("nginx is not installed (apt-get install nginx)")?;
            store.endpoint = Some(proxy.url());
            Some(proxy)
        } else {
            None
        };
        let endpoint = store.endpoint.clone().unwrap_or_else(|| garage.endpoint());
        let config = work.join("farm.toml");
        std::fs::write(
            &config,
            node_config(&postgres_url, garage.access(), &endpoint, &settings),
        )?;
        let threads: Vec<(&str, String)> = settings
            .node_threads
            .map(|n| ("TOKIO_WORKER_THREADS", n.to_string()))
            .into_iter()
            .collect();
        let mut nodes = Vec::new();
        for i in 0..NODES {
            let dir = work.join(format!("node{i}"));
            let args: [&OsStr; 2] = ["--config".as_ref(), config.as_os_str()];
            nodes.push(BitsdChild::spawn_env(
                bin,
                &dir,
                &args,
                &threads,
                &work.join(format!("node{i}.log")),
                Duration::from_secs(60),
            )?);
        }
        let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
        let first = addrs[..1].to_vec();
        let directives = format!("client_body_buffer_size {};", settings.balancer_body_buffer);
        let also = directives.clone();
        let idle = settings.balancer_keepalive;
        let nginx =
            tokio::task::spawn_blocking(move || Nginx::start_keepalive_pool(&addrs, idle, &also))
                .await?
                .ok_or("nginx is not installed (apt-get install nginx)")?;
        let also = directives.clone();
        let nginx1 =
            tokio::task::spawn_blocking(move || Nginx::start_keepalive_pool(&first, idle, &also))
                .await?
                .ok_or("nginx is not installed (apt-get install nginx)")?;
        let s3 = [store_proxy
            .as_ref()
            .map_or_else(|| garage.s3_addr(), Nginx::addr)];
        let bare_lb = tokio::task::spawn_blocking(move || {
            Nginx::start_keepalive_pool(&s3, idle, &directives)
        })
        .await?
        .ok_or("nginx is not installed (apt-get install nginx)")?;
        let local = BitsdChild::spawn(
            bin,
            &work.join("local"),
            &work.join("local.log"),
            Duration::from_secs(60),
        )?;
        let pg_pid = find_process(|p| {
            p.comm == "postgres" && p.cmdline.contains(&format!("-p {}", pg.port()))
        })
        .ok_or("cannot find the postmaster in /proc")?;
        let me = std::process::id();
        let garage_pids = find_processes(|p| p.ppid == me && p.comm == "garage");
        let started = match garage {
            Store::One(_) => 1,
            Store::Three(_) => 3,
        };
        if garage_pids.len() != started {
            return Err(format!(
                "found {} Garage processes in /proc, started {started}",
                garage_pids.len()
            )
            .into());
        }
        let master_of = |balancer: &Nginx| {
            find_process(|p| {
                p.ppid == me && p.comm == "nginx" && !p.cmdline.is_empty() && nginx_of(p, balancer)
            })
        };
        let nginx_pid = master_of(&nginx).ok_or("cannot find nginx's master process in /proc")?;
        let nginx1_pid =
            master_of(&nginx1).ok_or("cannot find the one-node nginx's master process in /proc")?;
        let bare_lb_pid = master_of(&bare_lb)
            .ok_or("cannot find the master process of the nginx over the store in /proc")?;
        let garage_admin = garage_pids
            .iter()
            .filter_map(|p| garage_admin_addr(*p))
            .collect();
        Ok(FarmEnv {
            pg,
            postgres_url,
            garage,
            store,
            nodes,
            nginx,
            nginx1,
            bare_lb,
            local,
            pg_pid,
            garage_pids,
            nginx_pid,
            nginx1_pid,
            bare_lb_pid,
            garage_admin,
            store_proxy,
        })
    }

    /// Garage's S3 request counters by endpoint (`PutObject`, `GetObject`, ...); empty when
    /// its metrics cannot be read.
    pub async fn s3_requests(&self) -> S3Counts {
        // Only the node the clients reach counts S3 requests; the others get Garage's RPCs.
        let addrs = self.garage_admin.clone();
        tokio::task::spawn_blocking(move || {
            let mut all = S3Counts::new();
            for addr in addrs {
                for (endpoint, n) in garage_metrics(addr) {
                    *all.entry(endpoint).or_default() += n;
                }
            }
            all
        })
        .await
        .unwrap_or_default()
    }

    /// A client of the bucket built exactly as a node builds its own.
    pub fn objects(&self) -> Result<Objects> {
        Ok(Objects::new(&self.store)?)
    }

    /// The same client, through [`FarmEnv::bare_lb`].
    pub fn objects_lb(&self) -> Result<Objects> {
        let mut store = self.store.clone();
        store.endpoint = Some(self.bare_lb.url());
        Ok(Objects::new(&store)?)
    }

    /// CPU seconds so far of every process the scenario accounts for.
    pub fn cpu(&self) -> CpuSnapshot {
        CpuSnapshot {
            bench: process_cpu(std::process::id(), false),
            nodes: self
                .nodes
                .iter()
                .map(|n| process_cpu(n.pid(), false))
                .collect(),
            local: process_cpu(self.local.pid(), false),
            garage: self.garage_pids.iter().map(|p| tree_cpu(*p)).sum(),
            postgres: tree_cpu(self.pg_pid),
            nginx: tree_cpu(self.nginx_pid)
                + tree_cpu(self.nginx1_pid)
                + tree_cpu(self.bare_lb_pid),
        }
    }
}

/// What the farm's config varies by (`--farm-no-coalesce`, `--farm-pool`,
/// `--farm-merge-parts-from`,
/// `--farm-balancer-body-buffer`, `--farm-balancer-keepalive`, `--farm-node-threads`,
/// `--farm-sign-payloads`).
#[derive(Clone, Debug)]
pub struct FarmSettings {
    /// `coalesce_fragments`.
    pub coalesce: bool,
    /// `postgres_max_connections` (`None`: bitsd's default).
    pub pool: Option<usize>,
    /// `merge_parts_from` (`None`: bitsd's default).
    pub merge_parts_from: Option<u64>,
    /// nginx's `client_body_buffer_size` in front of the nodes.
    pub balancer_body_buffer: String,
    /// nginx's idle upstream connections (`keepalive`).
    pub balancer_keepalive: usize,
    /// Each farm node's runtime worker threads (`TOKIO_WORKER_THREADS`; `None`: one per core).
    pub node_threads: Option<usize>,
    /// `sign_payloads` of the nodes and of the bare PUTs (`None`: bitsd's default, signed
    /// over this plain-HTTP endpoint).
    pub sign_payloads: Option<bool>,
    /// A three-node Garage cluster (replication 3) instead of a single node.
    pub garage_cluster: bool,
}

/// The shared config file of the farm nodes.
fn node_config(url: &str, access: &S3Access, endpoint: &str, settings: &FarmSettings) -> String {
    let coalesce = settings.coalesce;
    let pool = settings
        .pool
        .map(|n| format!("postgres_max_connections = {n}\n"))
        .unwrap_or_default();
    let merge_parts = settings
        .merge_parts_from
        .map(|n| format!("merge_parts_from = {n}\n"))
        .unwrap_or_default();
    let sign = settings
        .sign_payloads
        .map(|b| format!("sign_payloads = {b}\n"))
        .unwrap_or_default();
    format!(
        "[storage]\nbackend = \"shared\"\npostgres_url = \"{url}\"\n{pool}\n\
         [object_store]\nbucket = \"{}\"\nprefix = \"farm\"\nendpoint = \"{}\"\n\
         region = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n\
         coalesce_fragments = {coalesce}\n{merge_parts}{sign}",
        access.bucket, endpoint, access.region, access.access_key, access.secret_key
    )
}

/// CPU seconds of each accounted process at one moment.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CpuSnapshot {
    /// This benchmark process (the load generator, and the object-store client of the bare
    /// PUTs).
    pub bench: f64,
    /// Each farm node.
    pub nodes: Vec<f64>,
    /// The single-node bitsd.
    pub local: f64,
    /// Garage.
    pub garage: f64,
    /// PostgreSQL (postmaster, its backends and helpers, and the reaped ones).
    pub postgres: f64,
    /// Both nginx (masters and workers; only one of them has work at a time).
    pub nginx: f64,
}

impl CpuSnapshot {
    /// `self - earlier`, field by field.
    pub fn since(&self, earlier: &CpuSnapshot) -> CpuSnapshot {
        CpuSnapshot {
            bench: self.bench - earlier.bench,
            nodes: self
                .nodes
                .iter()
                .zip(earlier.nodes.iter().chain(std::iter::repeat(&0.0)))
                .map(|(a, b)| a - b)
                .collect(),
            local: self.local - earlier.local,
            garage: self.garage - earlier.garage,
            postgres: self.postgres - earlier.postgres,
            nginx: self.nginx - earlier.nginx,
        }
    }

    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &CpuSnapshot) {
        self.bench += other.bench;
        if self.nodes.len() < other.nodes.len() {
            self.nodes.resize(other.nodes.len(), 0.0);
        }
        for (a, b) in self.nodes.iter_mut().zip(&other.nodes) {
            *a += b;
        }
        self.local += other.local;
        self.garage += other.garage;
        self.postgres += other.postgres;
        self.nginx += other.nginx;
    }

    /// All farm nodes together.
    pub fn nodes_total(&self) -> f64 {
        self.nodes.iter().sum()
    }
}

/// One line of `/proc/<pid>/stat`, the fields this module uses.
struct Stat {
    pid: u32,
    comm: String,
    ppid: u32,
    cmdline: String,
    /// utime + stime, in clock ticks.
    own: u64,
    /// cutime + cstime (reaped children), in clock ticks.
    children: u64,
}

fn read_stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses; it ends at the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // rest[0] is field 3 (state); field n is rest[n - 3].
    let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_owned()
        })
        .unwrap_or_default();
    Some(Stat {
        pid,
        comm,
        ppid: field(4)? as u32,
        cmdline,
        own: field(14)? + field(15)?,
        children: field(16)? + field(17)?,
    })
}

fn all_processes() -> Vec<Stat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(read_stat)
        .collect()
}

fn find_process(pred: impl Fn(&Stat) -> bool) -> Option<u32> {
    find_processes(pred).into_iter().next()
}

fn find_processes(pred: impl Fn(&Stat) -> bool) -> Vec<u32> {
    all_processes()
        .into_iter()
        .filter(|p| pred(p))
        .map(|p| p.pid)
        .collect()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every Linux this runs on).
fn ticks_per_sec() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// CPU seconds of one process (with its reaped children's when `with_children`).
fn process_cpu(pid: u32, with_children: bool) -> f64 {
    read_stat(pid).map_or(0.0, |s| {
        let ticks = s.own + if with_children { s.children } else { 0 };
        ticks as f64 / ticks_per_sec()
    })
}

/// CPU seconds of a process, its reaped children, and its live children (PostgreSQL's
/// backends, nginx's worker).
fn tree_cpu(root: u32) -> f64 {
    let kids: u64 = all_processes()
        .iter()
        .filter(|p| p.ppid == root)
        .map(|p| p.own + p.children)
        .sum();
    process_cpu(root, true) + kids as f64 / ticks_per_sec()
}

/// Whether nginx process `p` is the balancer `balancer` (its prefix is in the command line)
/// rather than the store's proxy.
fn nginx_of(p: &Stat, balancer: &Nginx) -> bool {
    let port = balancer.addr().port();
    let conf = p
        .cmdline
        .split_whitespace()
        .skip_while(|a| *a != "-c")
        .nth(1)
        .map(std::fs::read_to_string);
    matches!(conf, Some(Ok(text)) if text.contains(&format!(":{port};")))
}

/// S3 requests by endpoint.
pub type S3Counts = std::collections::BTreeMap<String, u64>;

/// `later - earlier`, endpoint by endpoint (zeros left out).
pub fn s3_since(later: &S3Counts, earlier: &S3Counts) -> S3Counts {
    later
        .iter()
        .map(|(k, v)| (k.clone(), v - earlier.get(k).copied().unwrap_or(0).min(*v)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// Garage's admin address from its config file (`garage -c FILE server`).
fn garage_admin_addr(pid: u32) -> Option<std::net::SocketAddr> {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmd
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let file = args
        .iter()
        .position(|a| a == "-c")
        .and_then(|i| args.get(i + 1))?;
    let config = std::fs::read_to_string(file).ok()?;
    let admin = config.split("[admin]").nth(1)?;
    let line = admin
        .lines()
        .find(|l| l.trim_start().starts_with("api_bind_addr"))?;
    line.split('"').nth(1)?.parse().ok()
}

/// `GET /metrics` of Garage's admin API; the `api_s3_request_counter` lines.
fn garage_metrics(addr: std::net::SocketAddr) -> S3Counts {
    use std::io::{Read, Write};
    let mut out = S3Counts::new();
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return out;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("api_s3_request_counter{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let endpoint = labels
            .split(',')
            .find_map(|l| l.strip_prefix("api_endpoint=\""))
            .map(|e| e.trim_end_matches('"').to_owned());
        if let (Some(e), Ok(v)) = (endpoint, value.trim().parse::<f64>()) {
            *out.entry(e).or_default() += v as u64;
        }
    }
    out
}

/// Where the run's temporary files go: `work/farm`.
pub fn farm_dir(work: &Path) -> PathBuf {
    work.join("farm")
}

/// The object store the scenario runs against.
pub enum Store {
    /// A single Garage node.
    One(Garage),
    /// Three Garage nodes, replication factor 3; clients use the first node's S3 API.
    Three(GarageCluster),
}

impl Store {
    /// The S3 endpoint the nodes and the bare PUTs use.
    pub fn endpoint(&self) -> String {
        match self {
            Store::One(g) => g.endpoint(),
            Store::Three(c) => c.endpoint(0),
        }
    }

    /// The S3 address behind [`Store::endpoint`].
    pub fn s3_addr(&self) -> std::net::SocketAddr {
        match self {
            Store::One(g) => g.s3_addr(),
            Store::Three(c) => c.s3_addrs()[0],
        }
    }

    /// Credentials, bucket and region.
    pub fn access(&self) -> &S3Access {
        match self {
            Store::One(g) => g.access(),
            Store::Three(c) => c.access(),
        }
    }

    /// Object-store settings for the bucket under `prefix`, through [`Store::endpoint`].
    pub fn object_store_config(&self, prefix: &str) -> ObjectStoreConfig {
        match self {
            Store::One(g) => g.object_store_config(prefix),
            Store::Three(c) => c.object_store_config(0, prefix),
        }
    }

    /// How the report names it.
    pub fn describe(&self) -> String {
        match self {
            Store::One(g) => format!("single-node Garage at {}", g.endpoint()),
            Store::Three(c) => format!(
                "three-node Garage cluster, replication 3, clients on {}",
                c.endpoint(0)
            ),
        }
    }
}
