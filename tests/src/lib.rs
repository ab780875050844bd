//! Test harness for bitsd's end-to-end tests: a real server on an ephemeral loopback port
//! with its data in a temporary directory, and a raw HTTP/1.1 client that sends exact bytes
//! and parses exact responses.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod garage;
pub mod nginx;
pub mod pg;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bitsd::{RunningServer, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The BITS 1.5 upload protocol GUID.
pub const PROTOCOL: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";

/// Path of the repository's `fixtures/` directory.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("fixtures")
}

/// Deterministic pseudo-random bytes (xorshift), so payloads need no files.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A bitsd server on `127.0.0.1:0` over a temporary data directory.
pub struct TestServer {
    server: Option<RunningServer>,
    data: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server with the default routes (`/upload/`, `/echo/`) on a fresh data directory.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a server on a fresh data directory after `adjust` has changed the config.
    pub async fn start_with(adjust: impl FnOnce(&mut ServerConfig)) -> Self {
        let data = tempfile::tempdir().unwrap();
        Self::start_in(data, adjust).await
    }

    /// Starts a server on an existing data directory (a restart).
    pub async fn start_in(data: tempfile::TempDir, adjust: impl FnOnce(&mut ServerConfig)) -> Self {
        let mut config = ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            data_dir: data.path().to_owned(),
            shutdown_grace: Duration::from_secs(5),
            ..ServerConfig::default()
        };
        adjust(&mut config);
        // The previous server of a restart may still be releasing the sled lock.
        let mut tries = 0;
        let server = loop {
            match bitsd::start(config.clone()).await {
                Ok(s) => break s,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("server failed to start: {e}"),
            }
        };
        TestServer {
            server: Some(server),
            data,
        }
    }

    /// The BITS listener.
    pub fn addr(&self) -> SocketAddr {
        self.server.as_ref().unwrap().addr()
    }

    /// The admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.server.as_ref().unwrap().admin_addr().unwrap()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// The running server.
    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().unwrap()
    }

    /// Stops the server gracefully and hands back its data directory.
    pub async fn stop(mut self) -> tempfile::TempDir {
        let server = self.server.take().unwrap();
        server.shutdown().await.unwrap();
        // `self.data` moves out; Drop of TestServer does nothing else.
        std::mem::replace(&mut self.data, tempfile::tempdir().unwrap())
    }

    /// A raw client connection to the BITS listener.
    pub async fn connect(&self) -> RawClient {
        RawClient::connect(self.addr()).await
    }

    /// `GET` on the admin listener; the parsed JSON body and the status.
    pub async fn admin_get(&self, path: &str) -> (u16, serde_json::Value) {
        let mut c = RawClient::connect(self.admin_addr()).await;
        let res = c
            .send(&format!("GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").into_bytes())
            .await;
        let json = serde_json::from_slice(&res.body).unwrap_or(serde_json::Value::Null);
        (res.status, json)
    }
}

/// One parsed HTTP/1.1 response.
#[derive(Clone, Debug)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Header names (lower case) and values, in wire order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The value of a header (case-insensitive name), if present exactly once or first.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts the BITS Ack invariants: `BITS-Packet-Type: Ack`, `Content-Length: 0`, no body.
    pub fn assert_ack(&self) {
        assert_eq!(
            self.header("bits-packet-type"),
            Some("Ack"),
            "not an Ack: {self:?}"
        );
        assert_eq!(
            self.header("content-length"),
            Some("0"),
            "Ack without Content-Length: 0: {self:?}"
        );
        assert!(self.body.is_empty());
        assert!(self.header("transfer-encoding").is_none());
    }

    /// Asserts an error Ack with this status, `BITS-Error-Code` and context `0x5`.
    pub fn assert_error(&self, status: u16, code: &str) {
        self.assert_ack();
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("bits-error-code"), Some(code), "{self:?}");
        assert_eq!(self.header("bits-error-context"), Some("0x5"), "{self:?}");
    }
}

/// A keep-alive HTTP/1.1 connection that writes exact request bytes.
pub struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    /// Connects.
    pub async fn connect(addr: SocketAddr) -> Self {
        RawClient {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// Connects, or says why not.
    pub async fn try_connect(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(RawClient {
            stream: TcpStream::connect(addr).await?,
            buf: Vec::new(),
        })
    }

    /// Writes `request` and reads one response (no body expected for HEAD requests).
    pub async fn send(&mut self, request: &[u8]) -> RawResponse {
        self.stream.write_all(request).await.unwrap();
        let head_only = request.starts_with(b"HEAD ");
        self.read_response(head_only).await
    }

    /// Like [`RawClient::send`], but a dropped connection is an error, not a panic.
    pub async fn try_send(&mut self, request: &[u8]) -> std::io::Result<RawResponse> {
        self.stream.write_all(request).await?;
        let head_only = request.starts_with(b"HEAD ");
        let read = self.try_read_response(head_only);
        match tokio::time::timeout(Duration::from_secs(30), read).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "response timed out",
            )),
        }
    }

    async fn try_read_response(&mut self, head_only: bool) -> std::io::Result<RawResponse> {
        use std::io::{Error, ErrorKind};
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut res = httparse::Response::new(&mut headers);
            let parsed = res
                .parse(&self.buf)
                .map_err(|e| Error::new(ErrorKind::InvalidData, e))?;
            if let httparse::Status::Complete(head_len) = parsed {
                let status = res.code.unwrap_or(0);
                let headers: Vec<(String, String)> = res
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let len: usize = if head_only {
                    0
                } else {
                    headers
                        .iter()
                        .find(|(n, _)| n == "content-length")
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(0)
                };
                while self.buf.len() < head_len + len {
                    self.try_fill().await?;
                }
                let body = self.buf[head_len..head_len + len].to_vec();
                self.buf.drain(..head_len + len);
                return Ok(RawResponse {
                    status,
                    headers,
                    body,
                });
            }
            self.try_fill().await?;
        }
    }

    async fn try_fill(&mut self) -> std::io::Result<()> {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Writes bytes without reading (for partial requests).
    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads one response.
    pub async fn read_response(&mut self, head_only: bool) -> RawResponse {
        let deadline = Duration::from_secs(30);
        tokio::time::timeout(deadline, self.read_response_inner(head_only))
            .await
            .expect("response timed out")
    }

    async fn read_response_inner(&mut self, head_only: bool) -> RawResponse {
        self.try_read_response(head_only)
            .await
            .expect("connection closed before a full response")
    }

    /// Whether the server closes the connection within 3 s (whatever it writes before).
    pub async fn is_closed(&mut self) -> bool {
        let mut b = vec![0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Sends a `BITS_POST` with the given headers and body to `path`.
    pub async fn bits_post(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> RawResponse {
        let mut req = format!("BITS_POST {path} HTTP/1.1\r\nHost: bits.example.test\r\n");
        let mut has_len = false;
        for (k, v) in headers {
            has_len |= k.eq_ignore_ascii_case("content-length")
                || k.eq_ignore_ascii_case("transfer-encoding");
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !has_len {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.send(&bytes).await
    }

    /// Create-Session on `path`; returns the new session id.
    pub async fn create_session(&mut self, path: &str) -> String {
        let res = self
            .bits_post(
                path,
                &[
                    ("BITS-Packet-Type", "Create-Session"),
                    ("BITS-Supported-Protocols", PROTOCOL),
                ],
                b"",
            )
            .await;
        res.assert_ack();
        assert_eq!(res.status, 200, "{res:?}");
        res.header("bits-session-id").unwrap().to_owned()
    }

    /// A Fragment carrying `data[first..first+len]` of an upload of `data.len()` bytes.
    pub async fn fragment(
        &mut self,
        path: &str,
        sid: &str,
        data: &[u8],
        first: usize,
        len: usize,
    ) -> RawResponse {
        let total = data.len();
        let range = if total == 0 {
            "bytes */0".to_owned()
        } else {
            format!("bytes {}-{}/{}", first, first + len - 1, total)
        };
        self.bits_post(
            path,
            &[
                ("BITS-Packet-Type", "Fragment"),
                ("BITS-Session-Id", sid),
                ("Content-Range", &range),
            ],
            &data[first..first + len],
        )
        .await
    }

    /// Close-Session.
    pub async fn close_session(&mut self, path: &str, sid: &str) -> RawResponse {
        self.bits_post(
            path,
            &[
                ("BITS-Packet-Type", "Close-Session"),
                ("BITS-Session-Id", sid),
            ],
            b"",
        )
        .await
    }

    /// Cancel-Session.
    pub async fn cancel_session(&mut self, path: &str, sid: &str) -> RawResponse {
        self.bits_post(
            path,
            &[
                ("BITS-Packet-Type", "Cancel-Session"),
                ("BITS-Session-Id", sid),
            ],
            b"",
        )
        .await
    }

    /// `GET` (or `HEAD`) of a path with extra headers.
    pub async fn get(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> RawResponse {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: bits.example.test\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.send(req.as_bytes()).await
    }

    /// Uploads `data` in fragments of `fragment` bytes to a new session; returns the session id
    /// and the final Ack.
    pub async fn upload(
        &mut self,
        path: &str,
        data: &[u8],
        fragment: usize,
    ) -> (String, RawResponse) {
        let sid = self.create_session(path).await;
        let mut at = 0;
        loop {
            let len = fragment.min(data.len() - at);
            let res = self.fragment(path, &sid, data, at, len).await;
            res.assert_ack();
            assert_eq!(res.status, 200, "{res:?}");
            at += len;
            assert_eq!(
                res.header("bits-received-content-range"),
                Some(at.to_string().as_str())
            );
            if at == data.len() {
                return (sid, res);
            }
        }
    }
}

/// The path part of an absolute reply URL.
pub fn url_path(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.find('/')
        .map(|i| rest[i..].to_owned())
        .unwrap_or_else(|| "/".to_owned())
}

/// The `bitsd` binary of this build: next to the test executable's `deps/` directory, built
/// on demand when this test crate runs alone.
pub fn bitsd_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
    let bin = profile_dir.join(format!("bitsd{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = std::process::Command::new(cargo)
            .args(["build", "--locked", "-p", "bitsd", "--bin", "bitsd"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "building bitsd failed");
    }
    bin
}

/// A `bitsd` process on ephemeral loopback ports.
pub struct BitsdProcess {
    child: std::process::Child,
    /// The BITS listener.
    pub addr: SocketAddr,
    /// The admin listener (`None` with `--admin-listen off`).
    pub admin_addr: Option<SocketAddr>,
    /// `bitsd` runs under a wrapper program (see [`BitsdProcess::start_wrapped`]).
    wrapped: bool,
}

/// The `strace` binary, for tests that inject failures or delays into the real server; `None`
/// (with the reason printed, so the skip is visible) when it is not installed or cannot trace
/// here (no ptrace in the container, no `--seccomp-bpf`).
pub fn strace() -> Option<PathBuf> {
    let Some(found) = ["/usr/bin/strace", "/bin/strace", "/usr/local/bin/strace"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    else {
        println!("SKIPPED: strace is not installed (apt-get install strace)");
        return None;
    };
    let works = std::process::Command::new(&found)
        .args([
            "-f",
            "--seccomp-bpf",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "trace=linkat",
        ])
        .args(["-e", "inject=linkat:error=EIO", "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        println!("SKIPPED: strace cannot trace here (ptrace not permitted, or no --seccomp-bpf)");
        return None;
    }
    Some(found)
}

impl BitsdProcess {
    /// Starts `bitsd --data-dir DIR` on ephemeral ports plus `extra` arguments, and waits
    /// until it prints its addresses.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_logging(data_dir, extra, None)
    }

    /// Like [`BitsdProcess::start`], with the process's stderr (its log) appended to `log`.
    pub fn start_logging(data_dir: &Path, extra: &[&str], log: Option<&Path>) -> Self {
        Self::start_wrapped(&[], data_dir, extra, log)
    }

    /// Like [`BitsdProcess::start_logging`], with `bitsd` run by `wrapper` (a program and its
    /// arguments, the `bitsd` command line appended; e.g. `strace -f -e inject=...` to inject
    /// failures or delays into the real binary). Empty: run `bitsd` itself.
    pub fn start_wrapped(
        wrapper: &[&str],
        data_dir: &Path,
        extra: &[&str],
        log: Option<&Path>,
    ) -> Self {
        use std::io::BufRead;
        let stderr = match log {
            Some(path) => std::process::Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap(),
            ),
            None => std::process::Stdio::inherit(),
        };
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = std::process::Command::new(program);
                c.args(args).arg(bitsd_binary());
                c
            }
            None => std::process::Command::new(bitsd_binary()),
        };
        if !extra.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--admin-listen") {
            command.args(["--admin-listen", "127.0.0.1:0"]);
        }
        let mut child = command
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut addr = None;
        let mut admin_addr = None;
        let want_admin = !extra
            .windows(2)
            .any(|w| w[0] == "--admin-listen" && w[1] == "off");
        while addr.is_none() || (want_admin && admin_addr.is_none()) {
            let line = lines
                .next()
                .expect("bitsd exited before printing its addresses")
                .unwrap();
            let grab = |l: &str, marker: &str| -> Option<SocketAddr> {
                let rest = l.split(marker).nth(1)?;
                rest.split('/').next()?.parse().ok()
            };
            if line.contains("BITS upload") {
                addr = grab(&line, "://");
            } else if line.contains("session progress on") {
                admin_addr = grab(&line, "://");
            }
        }
        // Keep draining stdout so the process never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        BitsdProcess {
            child,
            addr: addr.unwrap(),
            admin_addr,
            wrapped: !wrapper.is_empty(),
        }
    }

    /// The process id (for `strace -p`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process id of `bitsd` itself (the wrapper's child when it runs under one).
    pub fn server_pid(&self) -> u32 {
        if !self.wrapped {
            return self.child.id();
        }
        self.wrapped_child().expect("bitsd runs under its wrapper")
    }

    fn wrapped_child(&self) -> Option<u32> {
        let own = self.child.id();
        std::fs::read_to_string(format!("/proc/{own}/task/{own}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// SIGKILL: no shutdown, no flush. Under a wrapper, `bitsd` itself is killed and the
    /// wrapper waited for (it ends with its child).
    pub fn kill(mut self) {
        let wrapped = self.wrapped.then(|| self.server_pid());
        if let Some(pid) = wrapped {
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
        // A wrapper may hold its dead child for a while (strace in an injected delay): it is
        // killed too, and the server waited for until it is gone (its files closed).
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        if let Some(pid) = wrapped {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !stat.contains(") Z "))
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "bitsd {pid} outlived SIGKILL"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    #[cfg(unix)]
    pub fn terminate(mut self) -> bool {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().unwrap().success()
    }
}

impl Drop for BitsdProcess {
    fn drop(&mut self) {
        if let Some(pid) = self.wrapped.then(|| self.wrapped_child()).flatten() {
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
