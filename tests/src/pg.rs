//! A real PostgreSQL 15 server for tests: `initdb` on a temporary directory, `pg_ctl` to
//! start, stop and restart it, listening on `127.0.0.1` and a free port (its unix socket in
//! the temporary directory). PostgreSQL refuses to run as root, so when the tests run as root
//! the server runs as the unprivileged user `bitsd-test` if it exists, else `nobody`.
//!
//! Test clusters are built for speed: `initdb --no-sync`, and unless a test asks for
//! [`ClusterOptions::durable`], `fsync`, `synchronous_commit` and `full_page_writes` are off (a
//! crash of the machine could lose a test cluster's data; a crash of the server alone
//! cannot). One cluster per test binary ([`PgCluster::shared`]) with one database per test
//! ([`PgCluster::fresh_database`]) keeps start-up cost to one `initdb` per binary.
//!
//! When the binaries are missing, [`PgCluster::shared`] and [`PgCluster::start`] return the
//! reason and the test prints it and skips. The cluster stops and its directory is removed
//! when the last handle is dropped; a watchdog process also stops it if the test process dies
//! without dropping it (a killed test binary leaves no server behind).
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Where Debian's PostgreSQL 15 server binaries live.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The database superuser of a test cluster (trust authentication on loopback).
pub const PG_USER: &str = "bitsd";

/// How a test cluster is set up.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClusterOptions {
    /// Keep `fsync`, `synchronous_commit` and `full_page_writes` on (for measurements).
    pub durable: bool,
}

/// A running PostgreSQL test cluster.
pub struct PgCluster {
    dir: tempfile::TempDir,
    port: u16,
    run_as: Option<String>,
    options: ClusterOptions,
    watchdog: Mutex<Option<Child>>,
    databases: AtomicU32,
}

static SHARED: Mutex<Weak<PgCluster>> = Mutex::new(Weak::new());

impl PgCluster {
    /// The cluster shared by the tests of this binary, started on first use; `Err` tells why
    /// PostgreSQL cannot run here (the caller prints it and skips).
    pub fn shared() -> Result<Arc<PgCluster>, String> {
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cluster) = shared.upgrade() {
            return Ok(cluster);
        }
        let cluster = Arc::new(PgCluster::start(ClusterOptions::default())?);
        *shared = Arc::downgrade(&cluster);
        Ok(cluster)
    }

    /// A cluster of its own (for a test that stops and restarts it).
    pub fn start(options: ClusterOptions) -> Result<PgCluster, String> {
        let bin = Path::new(PG_BIN);
        for tool in ["initdb", "pg_ctl", "postgres", "createdb"] {
            if !bin.join(tool).exists() {
                return Err(format!(
                    "PostgreSQL 15 is not installed ({}/{tool} is missing; apt-get install postgresql)",
                    PG_BIN
                ));
            }
        }
        let run_as = if running_as_root() {
            Some(unprivileged_user()?)
        } else {
            None
        };
        // As root, under /tmp: the server's user must be able to reach its directory, which
        // a private TMPDIR of root's would not let it.
        let parent = match run_as {
            Some(_) => PathBuf::from("/tmp"),
            None => std::env::temp_dir(),
        };
        let dir = tempfile::Builder::new()
            .prefix("bitsd-pg-")
            .tempdir_in(parent)
            .map_err(|e| format!("temp dir: {e}"))?;
        if let Some(user) = &run_as {
            let status = Command::new("chown")
                .arg(user)
                .arg(dir.path())
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !status.success() {
                return Err(format!("chown {user} {} failed", dir.path().display()));
            }
        }
        let mut cluster = PgCluster {
            dir,
            port: 0,
            run_as,
            options,
            watchdog: Mutex::new(None),
            databases: AtomicU32::new(0),
        };
        let out = cluster
            .command("initdb")
            .arg("-D")
            .arg(cluster.data_dir())
            .args(["-U", PG_USER, "-A", "trust", "-E", "UTF8", "--no-sync"])
            .args(["--no-locale", "--no-instructions"])
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut last = String::new();
        for _ in 0..5 {
            cluster.port = free_port();
            match cluster.start_server() {
                Ok(()) => {
                    cluster.spawn_watchdog();
                    return Ok(cluster);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The cluster's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new, empty database and returns its URL.
    pub fn fresh_database(&self) -> String {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{}_{n}", std::process::id());
        let out = Command::new(Path::new(PG_BIN).join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                PG_USER,
            ])
            .arg(&name)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "createdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(&name)
    }

    /// Stops the server (fast shutdown: open connections are cut), keeping its data.
    pub fn stop(&self) {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "stop"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server again on the same port after [`PgCluster::stop`].
    pub fn restart(&self) {
        self.start_server().unwrap();
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn start_server(&self) -> Result<(), String> {
        let off = if self.options.durable { "on" } else { "off" };
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={off} -c synchronous_commit={off} \
             -c full_page_writes={off} -c max_connections=300 -c shared_buffers=32MB",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "-t", "30", "-o", &opts, "start"])
            .output()
            .map_err(|e| format!("pg_ctl start: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
            Err(format!(
                "pg_ctl start failed: {}\n{log}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Stops the server and removes its directory if this test process dies first.
    fn spawn_watchdog(&self) {
        let stop = self.shell_line("pg_ctl", &["-m", "immediate", "stop"]);
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop}; rm -rf '{dir}'",
            pid = std::process::id(),
            dir = self.dir.path().display()
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        *self.watchdog.lock().unwrap() = child;
    }

    fn shell_line(&self, tool: &str, args: &[&str]) -> String {
        let prefix = match &self.run_as {
            Some(user) => format!("runuser -u {user} -- "),
            None => String::new(),
        };
        format!(
            "{prefix}{PG_BIN}/{tool} -D '{}' {} >/dev/null 2>&1",
            self.data_dir().display(),
            args.join(" ")
        )
    }

    fn command(&self, tool: &str) -> Command {
        let path = Path::new(PG_BIN).join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        };
        cmd.stdin(Stdio::null());
        cmd
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        if let Some(mut w) = self
            .watchdog
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn unprivileged_user() -> Result<String, String> {
    for user in ["bitsd-test", "nobody"] {
        let known = Command::new("id")
            .arg("-u")
            .arg(user)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if known {
            return Ok(user.to_owned());
        }
    }
    Err("running as root and neither user bitsd-test nor nobody exists to run PostgreSQL".into())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh upload-reply session record (route `/upload/`) of `owner`, for state-store tests.
pub fn session_record(owner: Option<&str>) -> bitsd_storage::SessionRecord {
    let mut r = bitsd_storage::SessionRecord::new(
        bitsd_protocol::SessionId::random(),
        "/upload/".into(),
        bitsd_storage::UploadMode::UploadReply,
        "http://farm/upload/x".into(),
    );
    r.owner = owner.map(str::to_owned);
    r
}

/// A stored reply of `len` bytes made at `created_ms`, nothing delivered yet, for state-store
/// tests.
pub fn stored_reply(len: u64, created_ms: u64) -> bitsd_storage::ReplyRecord {
    bitsd_storage::ReplyRecord {
        url: "http://farm/reply/x".into(),
        kind: bitsd_storage::ReplyKind::Stored {
            len,
            crc32c: None,
            in_upload: false,
            object: None,
        },
        created_ms,
        delivered: Default::default(),
    }
}

/// A fragment commit of `len` bytes at `expected` held in object `key` (a made-up CRC).
pub fn fragment(
    id: bitsd_protocol::SessionId,
    expected: u64,
    len: u64,
    key: &str,
) -> bitsd_storage::shared::pg::NewFragment {
    bitsd_storage::shared::pg::NewFragment {
        id,
        expected_received: expected,
        len,
        crc32c: (expected as u32) ^ 0xABCD,
        object_key: key.to_owned(),
        total: Some(1 << 40),
        state: None,
    }
}

/// The shared cluster of this test binary, or `None` after printing why a test skips
/// (PostgreSQL is not installed).
pub fn cluster_or_skip() -> Option<Arc<PgCluster>> {
    match PgCluster::shared() {
        Ok(c) => Some(c),
        Err(why) => {
            crate::skip::missing(crate::skip::Needs::Postgresql, why);
            None
        }
    }
}

/// A state store on `url` with a pool of one connection: every call runs on the same
/// PostgreSQL backend (the schema migrated).
pub async fn single_connection_store(url: &str) -> bitsd_storage::shared::pg::PgStateStore {
    bitsd_storage::shared::pg::PgStateStore::connect(
        url,
        bitsd_storage::shared::pg::PgOptions {
            max_connections: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// A farm node's state store on `url` (its own pool; the schema migrated).
pub async fn state_store(url: &str) -> bitsd_storage::shared::pg::PgStateStore {
    bitsd_storage::shared::pg::PgStateStore::connect(url, Default::default())
        .await
        .unwrap()
}

/// A plain client of `url`, its connection driven by a task of its own.
pub async fn raw_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Backends of `pg`'s database whose `bitsd` connection is inside an open transaction,
/// waiting for its next statement (a fragment commit's statement run before the store's
/// answer).
pub async fn open_transactions(pg: &tokio_postgres::Client) -> i64 {
    pg.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' \
         AND application_name = 'bitsd' AND datname = current_database()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}
