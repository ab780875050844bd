//! Real Garage (S3-compatible object store) servers for the farm tests: a single node
//! ([`Garage`]) and a three-node, replication-factor-3 cluster ([`GarageCluster`]), each on free
//! loopback ports over a temporary directory, with kill and restart of a node.
//!
//! The calls block (they start processes and poll ports): from an async test, call them from
//! a multi-threaded runtime or through `tokio::task::spawn_blocking`.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::io::{Read, Write};

/// The Garage version the harness is written for (what `.ci/run` installs).
pub const GARAGE_VERSION: &str = "2.5.0";

/// The S3 region Garage answers to in the harness's configurations.
pub const GARAGE_REGION: &str = "garage";

/// How long a node may take to answer its health check after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The `garage` binary: `$GARAGE_BIN`, else `~/.cargo/bin/garage`, else `garage` on the `PATH`;
/// `None` (with the reason printed, so the skip is visible) when none runs.
pub fn garage_binary() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(bin) = std::env::var_os("GARAGE_BIN") {
        candidates.push(PathBuf::from(bin));
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    if let Some(home) = cargo_home {
        candidates.push(home.join("bin").join("garage"));
    }
    candidates.push(PathBuf::from("garage"));
    for bin in candidates {
        let Ok(out) = Command::new(&bin).arg("--version").output() else {
            continue;
        };
        if out.status.success() {
            let version = String::from_utf8_lossy(&out.stdout);
            if !version.contains(GARAGE_VERSION) {
                println!(
                    "note: {} is not Garage {GARAGE_VERSION}: {}",
                    bin.display(),
                    version.lines().next().unwrap_or("")
                );
            }
            return Some(bin);
        }
    }
    crate::skip::missing(
        crate::skip::Needs::Garage,
        format_args!(
            "garage is not installed (cargo install garage --version {GARAGE_VERSION} --locked)"
        ),
    );
    None
}

/// A free TCP port on 127.0.0.1 for a server that may be killed and restarted on it.
///
/// The port is drawn below the kernel's ephemeral range (32768 and up on Linux): a port from
/// `bind(0)` could be handed out again as the local port of some outgoing connection while
/// its server is down, and the restart would find it taken. Checked by binding it once, and
/// never handed out twice by one test process: tests of one binary run in parallel, and two
/// of them drawing the same port (one server's, between the check and its bind, or while it
/// is down for a restart) made an nginx fail to bind and its test talk to another test's
/// Garage. A race with another process picking the same random port is possible but very
/// rare.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let bytes = *uuid::Uuid::new_v4().as_bytes();
        let port = 10_000 + u16::from_le_bytes([bytes[0], bytes[1]]) % 22_000;
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free loopback port between 10000 and 32000");
}

/// Random hex, from UUIDs.
fn random_hex(chars: usize) -> String {
    let mut s = String::new();
    while s.len() < chars {
        s.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    s.truncate(chars);
    s
}

/// S3 credentials and bucket of a test Garage.
#[derive(Clone, Debug)]
pub struct S3Access {
    /// Access key id (`GK` and 24 hex digits).
    pub access_key: String,
    /// Secret key (64 hex digits).
    pub secret_key: String,
    /// The bucket the key may read and write.
    pub bucket: String,
    /// The region to sign requests for ([`GARAGE_REGION`]).
    pub region: String,
}

impl S3Access {
    fn generate() -> Self {
        S3Access {
            access_key: format!("GK{}", random_hex(24)),
            secret_key: random_hex(64),
            bucket: "bitsd-test".to_string(),
            region: GARAGE_REGION.to_string(),
        }
    }
}

/// One Garage server process and its files (`<dir>/garage.toml`, `meta/`, `data/`, `garage.log`).
#[derive(Debug)]
struct Node {
    bin: PathBuf,
    dir: PathBuf,
    s3_port: u16,
    rpc_port: u16,
    admin_port: u16,
    /// Arguments after `server` (`--single-node --default-bucket` for a single node).
    server_args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Node {
    fn new(bin: &Path, dir: PathBuf, replication: u8, rpc_secret: &str, peers: &[String]) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let node = Node {
            bin: bin.to_path_buf(),
            dir,
            s3_port: free_port(),
            rpc_port: free_port(),
            admin_port: free_port(),
            server_args: Vec::new(),
            env: Vec::new(),
            child: None,
        };
        node.write_config(replication, rpc_secret, peers);
        node
    }

    fn config(&self) -> PathBuf {
        self.dir.join("garage.toml")
    }

    fn write_config(&self, replication: u8, rpc_secret: &str, peers: &[String]) {
        let dir = self.dir.display();
        let peers = peers
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        // Both fsyncs on: a PUT that returned is on disk on a write quorum of nodes.
        let config = format!(
            "metadata_dir = \"{dir}/meta\"\n\
             data_dir = \"{dir}/data\"\n\
             db_engine = \"sqlite\"\n\
             replication_factor = {replication}\n\
             metadata_fsync = true\n\
             data_fsync = true\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_secret = \"{rpc_secret}\"\n\
             bootstrap_peers = [{peers}]\n\
             [s3_api]\n\
             s3_region = \"{GARAGE_REGION}\"\n\
             api_bind_addr = \"127.0.0.1:{s3}\"\n\
             root_domain = \".s3.garage.localhost\"\n\
             [admin]\n\
             api_bind_addr = \"127.0.0.1:{admin}\"\n",
            rpc = self.rpc_port,
            s3 = self.s3_port,
            admin = self.admin_port,
        );
        std::fs::write(self.config(), config).unwrap();
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "garage node already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("garage.log"))
            .unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(self.config())
            .arg("server")
            .args(&self.server_args)
            .env("RUST_LOG", "garage=info,garage_api_common=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start garage"));
    }

    /// Waits until the node's admin health check answers 200 (the node serves requests).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "garage exited ({status}) while starting; log:\n{}",
                        self.log_tail()
                    );
                }
            }
            if http_status(self.admin_addr(), "/health") == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "garage did not become healthy within {READY_TIMEOUT:?}; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the node's S3 port accepts connections.
    fn wait_listening(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while TcpStream::connect(self.s3_addr()).is_err() {
            assert!(
                Instant::now() < deadline,
                "garage S3 API not listening; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn s3_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.s3_port))
    }

    fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin_port))
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("garage.log")).unwrap_or_default();
        crate::last_lines(&log, 30)
    }

    /// Runs `garage -c <config> ARGS` against this node and returns its stdout.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(self.config())
            .args(args)
            .output()
            .expect("run garage cli");
        assert!(
            out.status.success(),
            "garage {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Imports `access`'s key as `name` and gives it the permissions `allow` (`--read`,
    /// `--write`, `--owner`) on its bucket, which must exist.
    fn import_key(&self, name: &str, access: &S3Access, allow: &[&str]) {
        self.cli(&[
            "key",
            "import",
            "--yes",
            "-n",
            name,
            &access.access_key,
            &access.secret_key,
        ]);
        let mut args = vec!["bucket", "allow"];
        args.extend_from_slice(allow);
        args.extend_from_slice(&[&access.bucket, "--key", &access.access_key]);
        self.cli(&args);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET path` over plain HTTP/1.1; the status code, or `None` if there was no answer.
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    plain_request(addr, "GET", path, Duration::from_secs(2)).map(|(status, _)| status)
}

/// `method path` without a body over plain HTTP/1.1 (unsigned: for a server's health or
/// admin endpoint, or moto, which checks no signature), waiting up to `read_timeout` for the
/// answer; its status and the whole answer after it, `None` if there was no answer.
pub(crate) fn plain_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    read_timeout: Duration,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(read_timeout)).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let status = answer.get(9..12)?.parse().ok()?;
    Some((status, answer))
}

/// A single-node Garage (`garage server --single-node --default-bucket`): a ready bucket and
/// a key that may use it, on free loopback ports over a temporary directory.
#[derive(Debug)]
pub struct Garage {
    node: Node,
    access: S3Access,
    _dir: tempfile::TempDir,
}

impl Garage {
    /// Starts the node and waits until it is healthy; `None` (printed) when Garage is not
    /// installed.
    pub fn start() -> Option<Self> {
        let bin = garage_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("bitsd-garage-")
            .tempdir()
            .unwrap();
        let access = S3Access::generate();
        let mut node = Node::new(&bin, dir.path().join("node"), 1, &random_hex(64), &[]);
        node.server_args = vec!["--single-node".into(), "--default-bucket".into()];
        node.env = vec![
            (
                "GARAGE_DEFAULT_ACCESS_KEY".into(),
                access.access_key.clone(),
            ),
            (
                "GARAGE_DEFAULT_SECRET_KEY".into(),
                access.secret_key.clone(),
            ),
            ("GARAGE_DEFAULT_BUCKET".into(), access.bucket.clone()),
        ];
        node.spawn();
        node.wait_ready();
        node.wait_listening();
        Some(Garage {
            node,
            access,
            _dir: dir,
        })
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.node.s3_addr())
    }

    /// The S3 API's address.
    pub fn s3_addr(&self) -> SocketAddr {
        self.node.s3_addr()
    }

    /// Credentials, bucket and region.
    pub fn access(&self) -> &S3Access {
        &self.access
    }

    /// The access key id.
    pub fn access_key(&self) -> &str {
        &self.access.access_key
    }

    /// The secret key.
    pub fn secret_key(&self) -> &str {
        &self.access.secret_key
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.access.bucket
    }

    /// Whether the server process runs.
    pub fn is_running(&self) -> bool {
        self.node.child.is_some()
    }

    /// SIGKILLs the server (its data stays).
    pub fn kill(&mut self) {
        self.node.kill();
    }

    /// Starts the server again over the same data and ports, and waits until it is healthy.
    pub fn restart(&mut self) {
        self.node.kill();
        self.node.spawn();
        self.node.wait_ready();
        self.node.wait_listening();
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        self.node.log_tail()
    }

    /// Runs a `garage` CLI command against the node and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.node.cli(args)
    }

    /// A new key that may read the bucket and list it, but not write to it (`garage key
    /// import`, `garage bucket allow --read`).
    pub fn read_only_key(&self) -> S3Access {
        self.new_key(&["--read"])
    }

    /// A new key with the bucket permissions `allow` (`--read`, `--write`, `--owner`); change
    /// them later with `garage bucket allow` / `deny` through [`Garage::cli`].
    pub fn new_key(&self, allow: &[&str]) -> S3Access {
        let access = S3Access {
            bucket: self.bucket().to_string(),
            ..S3Access::generate()
        };
        let name = format!("bitsd-{}", &access.access_key[2..10]);
        self.node.import_key(&name, &access, allow);
        access
    }

    /// Unfinished uploads in the bucket (`garage bucket info`, which counts them
    /// asynchronously: allow a moment after a change).
    pub fn unfinished_uploads(&self) -> u64 {
        let info = self.cli(&["bucket", "info", &self.access.bucket]);
        info.lines()
            .find_map(|l| l.trim().strip_prefix("Unfinished uploads:"))
            .map_or(0, |v| {
                v.split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("unreadable upload count in:\n{info}"))
            })
    }
}

/// Three Garage nodes on loopback forming one cluster with replication factor 3 (a write
/// needs two of the three nodes), a bucket and a key allowed to read and write it.
#[derive(Debug)]
pub struct GarageCluster {
    nodes: Vec<Node>,
    access: S3Access,
    _dir: tempfile::TempDir,
}

impl GarageCluster {
    /// Starts three nodes, connects them, applies a layout giving each one role in zone
    /// `dc1`, creates the key and the bucket through the CLI, and waits until every node is
    /// healthy; `None` (printed) when Garage is not installed.
    pub fn start() -> Option<Self> {
        let bin = garage_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("bitsd-garage3-")
            .tempdir()
            .unwrap();
        let secret = random_hex(64);
        let mut nodes: Vec<Node> = (0..3)
            .map(|i| Node::new(&bin, dir.path().join(format!("node{i}")), 3, &secret, &[]))
            .collect();
        for node in &mut nodes {
            node.spawn();
        }
        for node in &nodes {
            node.wait_listening();
        }
        let ids: Vec<String> = nodes
            .iter()
            .map(|n| n.cli(&["node", "id", "-q"]).trim().to_string())
            .collect();
        // Every node knows the others from now on, also after a restart.
        for node in &nodes {
            node.write_config(3, &secret, &ids);
        }
        for id in &ids[1..] {
            nodes[0].cli(&["node", "connect", id]);
        }
        for id in &ids {
            let short = id.split('@').next().unwrap_or(id);
            nodes[0].cli(&["layout", "assign", "-z", "dc1", "-c", "1G", short]);
        }
        nodes[0].cli(&["layout", "apply", "--version", "1"]);
        for node in &mut nodes {
            node.wait_ready();
        }
        let access = S3Access::generate();
        nodes[0].cli(&["bucket", "create", &access.bucket]);
        nodes[0].import_key("bitsd-test", &access, &["--read", "--write", "--owner"]);
        Some(GarageCluster {
            nodes,
            access,
            _dir: dir,
        })
    }

    /// The S3 endpoint of node `i` (0, 1 or 2), `http://127.0.0.1:PORT`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{}", self.nodes[i].s3_addr())
    }

    /// The S3 API addresses of the three nodes.
    pub fn s3_addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(Node::s3_addr).collect()
    }

    /// Credentials, bucket and region.
    pub fn access(&self) -> &S3Access {
        &self.access
    }

    /// SIGKILLs node `i` (its data stays).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again over its data and ports and waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].kill();
        self.nodes[i].spawn();
        self.nodes[i].wait_ready();
        self.nodes[i].wait_listening();
    }

    /// Runs a `garage` CLI command against node `i` and returns its output.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        self.nodes[i].cli(args)
    }

    /// The last lines of node `i`'s log.
    pub fn log_tail(&self, i: usize) -> String {
        self.nodes[i].log_tail()
    }
}
