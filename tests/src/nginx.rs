//! nginx as a plain round-robin load balancer for the farm tests: no stickiness, no
//! request or response buffering, no upstream keep-alive, so consecutive requests of one
//! client (even on one kept-alive connection) go to different upstreams in turn.
//!
//! The calls block (they start a process and poll a port).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `nginx` binary: `$NGINX_BIN`, else `/usr/sbin/nginx`, else `nginx` on the `PATH`;
/// `None` (with the reason printed, so the skip is visible) when none runs.
pub fn nginx_binary() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(bin) = std::env::var_os("NGINX_BIN") {
        candidates.push(PathBuf::from(bin));
    }
    candidates.push(PathBuf::from("/usr/sbin/nginx"));
    candidates.push(PathBuf::from("nginx"));
    for bin in candidates {
        if Command::new(&bin)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return Some(bin);
        }
    }
    crate::skip::missing(
        crate::skip::Needs::Nginx,
        "nginx is not installed (apt-get install nginx)",
    );
    None
}

/// An nginx balancing `127.0.0.1:PORT` over upstream addresses, in its own temporary prefix
/// (`nginx.conf`, `nginx.pid`, `error.log`, `access.log` naming the upstream of each request).
#[derive(Debug)]
pub struct Nginx {
    bin: PathBuf,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    child: Option<Child>,
}

/// Idle upstream connections nginx keeps by default here (`keepalive 16`).
pub const KEEPALIVE: usize = 16;

impl Nginx {
    /// Starts nginx in front of `upstreams` (round robin, in this order) and waits until it
    /// listens; `None` (printed) when nginx is not installed.
    pub fn start(upstreams: &[SocketAddr]) -> Option<Self> {
        Self::start_with(upstreams, None, "")
    }

    /// As [`Nginx::start`] in front of an S3 server, answering every `UploadPartCopy` with a
    /// range (`x-amz-copy-source-range`) itself: 501 `NotImplemented`, as a store without the
    /// call does.
    pub fn start_refusing_part_copies(upstreams: &[SocketAddr]) -> Option<Self> {
        Self::start_with(
            upstreams,
            None,
            "            if ($http_x_amz_copy_source_range) {\n\
             \x20               return 501 '<?xml version=\"1.0\"?><Error><Code>NotImplemented</Code><Message>part copies are not implemented here</Message></Error>';\n\
             \x20           }\n",
        )
    }

    /// As [`Nginx::start`], but every PUT signed with `x-amz-content-sha256: UNSIGNED-PAYLOAD`
    /// is answered 501 `NotImplemented` (a store that does not take unsigned payloads).
    pub fn start_refusing_unsigned_payloads(upstreams: &[SocketAddr]) -> Option<Self> {
        Self::start_answering_unsigned_payloads(
            upstreams,
            501,
            "NotImplemented",
            "unsigned payloads are not taken here",
        )
    }

    /// As [`Nginx::start_refusing_unsigned_payloads`], answering 403 `AccessDenied` (what a
    /// bucket policy that requires signed payloads answers) instead of 501.
    pub fn start_denying_unsigned_payloads(upstreams: &[SocketAddr]) -> Option<Self> {
        Self::start_answering_unsigned_payloads(upstreams, 403, "AccessDenied", "Access Denied")
    }

    /// As [`Nginx::start`], but every PUT signed `UNSIGNED-PAYLOAD` is answered `status` with
    /// the S3 error `code` and `message`.
    fn start_answering_unsigned_payloads(
        upstreams: &[SocketAddr],
        status: u16,
        code: &str,
        message: &str,
    ) -> Option<Self> {
        let location = format!(
            "            if ($http_x_amz_content_sha256 = \"UNSIGNED-PAYLOAD\") {{\n\
             \x20               return {status} '<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>{message}</Message></Error>';\n\
             \x20           }}\n"
        );
        Self::start_with(upstreams, None, &location)
    }

    /// As [`Nginx::start`] in front of an S3 server, answering every bulk delete
    /// (`POST ?delete`) itself with a DeleteObjects result that reports `key` failed with the
    /// S3 error `code` (as Garage's SQLite engine reports `ServiceUnavailable` when its
    /// database is locked). `key` must be the one key the request names.
    pub fn start_failing_deletes(upstreams: &[SocketAddr], key: &str, code: &str) -> Option<Self> {
        let location = format!(
            "            set $bulk_delete \"\";\n\
             \x20           if ($request_method = POST) {{ set $bulk_delete P; }}\n\
             \x20           if ($args = delete) {{ set $bulk_delete \"${{bulk_delete}}D\"; }}\n\
             \x20           if ($bulk_delete = PD) {{\n\
             \x20               return 200 '<?xml version=\"1.0\" encoding=\"UTF-8\"?><DeleteResult><Error><Key>{key}</Key><Code>{code}</Code><Message>database is locked</Message></Error></DeleteResult>';\n\
             \x20           }}\n"
        );
        Self::start_with(upstreams, None, &location)
    }

    /// As [`Nginx::start`], but nginx keeps its upstream connections alive between requests
    /// (`keepalive` in the upstream block, HTTP/1.1 without `Connection: close`), as a
    /// production balancer usually does.
    pub fn start_keepalive(upstreams: &[SocketAddr]) -> Option<Self> {
        Self::start_with(upstreams, Some(KEEPALIVE), "")
    }

    /// As [`Nginx::start_keepalive`], with `directives` (complete lines, e.g.
    /// `client_body_buffer_size 1m;`) added to the proxying location.
    pub fn start_keepalive_with(upstreams: &[SocketAddr], directives: &str) -> Option<Self> {
        Self::start_keepalive_pool(upstreams, KEEPALIVE, directives)
    }

    /// As [`Nginx::start_keepalive_with`], keeping up to `idle` idle upstream connections
    /// (nginx's `keepalive`, for the whole upstream group: with several nodes, a request
    /// finds an idle connection only to the node round robin picked).
    pub fn start_keepalive_pool(
        upstreams: &[SocketAddr],
        idle: usize,
        directives: &str,
    ) -> Option<Self> {
        let location: String = directives
            .lines()
            .map(|l| format!("            {}\n", l.trim()))
            .collect();
        Self::start_with(upstreams, Some(idle), &location)
    }

    fn start_with(
        upstreams: &[SocketAddr],
        keepalive: Option<usize>,
        location: &str,
    ) -> Option<Self> {
        assert!(!upstreams.is_empty(), "nginx needs at least one upstream");
        let bin = nginx_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("bitsd-nginx-")
            .tempdir()
            .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], crate::garage::free_port()));
        std::fs::write(
            dir.path().join("nginx.conf"),
            config(dir.path(), addr, upstreams, keepalive, location),
        )
        .unwrap();
        let mut nginx = Nginx {
            bin,
            dir,
            addr,
            child: None,
        };
        nginx.spawn();
        Some(nginx)
    }

    fn spawn(&mut self) {
        let prefix = self.dir.path();
        // A pid file left by an nginx that was killed would read as ready.
        let _ = std::fs::remove_file(prefix.join("nginx.pid"));
        let child = Command::new(&self.bin)
            .arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(prefix.join("nginx.conf"))
            .arg("-e")
            .arg(prefix.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Ready when nginx has written its pid file (it does so after binding its port) and
        // the port answers: a port that answers alone may be another server's, which nginx
        // then failed to bind.
        let pid = prefix.join("nginx.pid");
        while !pid.exists() || TcpStream::connect(self.addr).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "nginx exited ({status}) while starting:\n{}",
                    self.error_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen within 10 s:\n{}",
                self.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The balancer's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// nginx's error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// The access log so far: one line per request, `upstream=ADDR status=CODE "REQUEST"`.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Stops nginx (`nginx -s stop`: the master ends its workers), then reaps it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let prefix = self.dir.path();
        let _ = Command::new(&self.bin)
            .arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(prefix.join("nginx.conf"))
            .arg("-e")
            .arg(prefix.join("error.log"))
            .args(["-s", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts nginx again with the same configuration (after [`Nginx::stop`]).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The configuration: one worker, round robin over `upstreams` (without `keepalive`, nginx
/// opens a new upstream connection per request and closes it; with it, nginx keeps up to
/// that many idle upstream connections open), bodies streamed both ways, no body size limit, long
/// timeouts for slow uploads.
/// nginx's configuration; `location` goes first into the `location /` block.
fn config(
    prefix: &Path,
    listen: SocketAddr,
    upstreams: &[SocketAddr],
    keepalive: Option<usize>,
    location: &str,
) -> String {
    let p = prefix.display();
    let (pool, connection) = match keepalive {
        Some(idle) => (format!("        keepalive {idle};\n"), "\"\""),
        None => (String::new(), "close"),
    };
    let servers: String = upstreams
        .iter()
        .map(|u| format!("        server {u} max_fails=0;\n"))
        .collect();
    format!(
        "daemon off;\n\
         master_process on;\n\
         worker_processes 1;\n\
         pid {p}/nginx.pid;\n\
         error_log {p}/error.log info;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         \x20   log_format up 'upstream=$upstream_addr status=$status \"$request\"';\n\
         \x20   access_log {p}/access.log up;\n\
         \x20   client_body_temp_path {p}/client_body;\n\
         \x20   proxy_temp_path {p}/proxy;\n\
         \x20   fastcgi_temp_path {p}/fastcgi;\n\
         \x20   uwsgi_temp_path {p}/uwsgi;\n\
         \x20   scgi_temp_path {p}/scgi;\n\
         \x20   upstream farm {{\n{servers}{pool}    }}\n\
         \x20   server {{\n\
         \x20       listen {listen};\n\
         \x20       client_max_body_size 0;\n\
         \x20       location / {{\n\
         {location}\
         \x20           proxy_pass http://farm;\n\
         \x20           proxy_http_version 1.1;\n\
         \x20           proxy_set_header Connection {connection};\n\
         \x20           proxy_set_header Host $http_host;\n\
         \x20           proxy_request_buffering off;\n\
         \x20           proxy_buffering off;\n\
         \x20           proxy_connect_timeout 2s;\n\
         \x20           proxy_read_timeout 300s;\n\
         \x20           proxy_send_timeout 300s;\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n"
    )
}
