//! The `command` handler: the reply is the stdout of a program that reads the upload on stdin.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStderr, ChildStdin, ChildStdout};

use crate::{HandlerConfigError, HandlerError, Reply, ReplyFuture, ReplyHandler, Upload};

/// The name the program's stdout is streamed to in [`Upload::session_dir`], made unique per
/// run by [`Upload::unique_session_file`] (`command-reply.<unique>.tmp`).
pub const COMMAND_REPLY_FILE: &str = "command-reply.tmp";

/// Size of the buffer the upload is fed to the program through.
const CHUNK: usize = 64 * 1024;

/// Longest stderr line logged; the rest of a longer line is dropped.
const MAX_STDERR_LINE: usize = 4096;

/// How to run the program of a [`CommandHandler`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandConfig {
    /// The program: a path, or a name looked up in `PATH`.
    pub program: PathBuf,
    /// Its arguments (no shell is involved; use `sh -c` for one).
    pub args: Vec<String>,
    /// How long the program may run, from spawn until it has exited and closed its stdout.
    /// Past it the whole process group is killed and the handler fails as unreachable (504,
    /// transient: the client re-sends the final fragment later, §9.4). Default: 5 minutes.
    pub timeout: Duration,
    /// The status the client sees when the program exits unsuccessfully (relayed as a backend
    /// failure, §9.5; 300–599). Default: 500.
    pub failure_status: u16,
    /// Extra environment variables. The `BITS_*` variables the handler sets win over these.
    pub env: Vec<(String, String)>,
    /// Names of the server's own environment variables passed through to the program (when
    /// the server has them). Nothing else of the server's environment is: the program starts
    /// with `PATH` ([`CommandConfig::DEFAULT_PATH`] unless passed through or set in
    /// [`CommandConfig::env`]), the pass-through list, [`CommandConfig::env`] and the
    /// `BITS_*` variables. Default: empty.
    pub pass_env: Vec<String>,
}

impl CommandConfig {
    /// The default [`CommandConfig::timeout`]: 5 minutes, the IIS backend timeout (§9.4).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
    /// The default [`CommandConfig::failure_status`]: 500.
    pub const DEFAULT_FAILURE_STATUS: u16 = 500;
    /// The `PATH` a program gets unless `PATH` is passed through or set.
    pub const DEFAULT_PATH: &'static str = "/usr/local/bin:/usr/bin:/bin";

    /// Runs `program` without arguments, with the defaults for everything else.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        CommandConfig {
            program: program.into(),
            ..Self::default()
        }
    }

    /// Sets [`CommandConfig::args`].
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`CommandConfig::timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`CommandConfig::failure_status`].
    pub fn failure_status(mut self, status: u16) -> Self {
        self.failure_status = status;
        self
    }

    /// Adds an environment variable to [`CommandConfig::env`].
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Adds a variable name to [`CommandConfig::pass_env`].
    pub fn pass_env(mut self, name: impl Into<String>) -> Self {
        self.pass_env.push(name.into());
        self
    }
}

impl Default for CommandConfig {
    /// No program (it must be set), no arguments, a 5-minute timeout, failure status 500,
    /// no extra environment, nothing passed through.
    fn default() -> Self {
        CommandConfig {
            program: PathBuf::new(),
            args: Vec::new(),
            timeout: Self::DEFAULT_TIMEOUT,
            failure_status: Self::DEFAULT_FAILURE_STATUS,
            env: Vec::new(),
            pass_env: Vec::new(),
        }
    }
}

/// Runs a program per upload; its stdout is the reply.
///
/// The program gets:
/// * the upload on **stdin** (streamed from the file; a program that exits without reading
///   it is fine),
/// * a clean environment: `PATH`, the variables named in [`CommandConfig::pass_env`],
///   [`CommandConfig::env`], and `BITS_SESSION_ID` (the braced session id),
///   `BITS_ORIGINAL_URL` (the job's remote URL, as the client addressed it),
///   `BITS_CONTENT_NAME` (empty if the client sent none), `BITS_UPLOAD_PATH` (absolute path
///   of the upload file) and `BITS_UPLOAD_SIZE` (bytes). `BITS_ORIGINAL_URL` and
///   `BITS_CONTENT_NAME` are chosen by the client: pass them to programs as data (`"$VAR"`
///   quoted, or arguments), never paste them into shell code or `eval` them,
/// * its own process group, so that a timeout kills everything it started.
///
/// Its **stdout** is streamed to a file of its own run in [`Upload::session_dir`]
/// (`command-reply.<unique>.tmp`, see [`COMMAND_REPLY_FILE`]; never held in memory, removed
/// again when the run fails) and becomes the reply. Each **stderr** line is logged with `tracing` at
/// warn level, with the session id. Exit status 0 is success; anything else fails with
/// [`CommandConfig::failure_status`]. A program that cannot be spawned fails with 500; a
/// program still running at [`CommandConfig::timeout`] is killed with its process group
/// and the handler returns [`HandlerError::Unreachable`] (504, transient). If the handler's
/// future is dropped while the program runs, the process group is killed too.
#[derive(Clone, Debug)]
pub struct CommandHandler {
    config: Arc<CommandConfig>,
}

impl CommandHandler {
    /// A handler running `config.program`. Fails if the program is empty, the timeout is
    /// zero, the failure status is outside 300–599, or an environment variable name is
    /// empty or contains `=` or NUL (or a value contains NUL).
    pub fn new(config: CommandConfig) -> Result<Self, HandlerConfigError> {
        let bad = |why: String| Err(HandlerConfigError::Invalid(why));
        if config.program.as_os_str().is_empty() {
            return bad("no program".into());
        }
        if config.timeout.is_zero() {
            return bad("the timeout is zero".into());
        }
        if !(300..=599).contains(&config.failure_status) {
            return bad(format!(
                "failure status {} is not in 300-599",
                config.failure_status
            ));
        }
        for name in &config.pass_env {
            if name.is_empty() || name.contains(['=', '\0']) {
                return bad(format!("bad pass-through variable name {name:?}"));
            }
        }
        for (name, value) in &config.env {
            if name.is_empty() || name.contains(['=', '\0']) {
                return bad(format!("bad environment variable name {name:?}"));
            }
            if value.contains('\0') {
                return bad(format!("environment variable {name} contains NUL"));
            }
        }
        Ok(CommandHandler {
            config: Arc::new(config),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CommandConfig {
        &self.config
    }
}

impl ReplyHandler for CommandHandler {
    fn reply(&self, upload: Upload) -> ReplyFuture {
        let config = Arc::clone(&self.config);
        Box::pin(async move {
            let reply_path = upload.unique_session_file(COMMAND_REPLY_FILE);
            let result = run(&config, &upload, &reply_path).await;
            if result.is_err() {
                let _ = tokio::fs::remove_file(&reply_path).await;
            }
            result
        })
    }
}

/// Kills a process group when dropped, unless disarmed.
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH (the group is already gone) is fine.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }

    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the program's run produced, before its exit status is judged.
struct Outcome {
    stdin: Result<(), String>,
    stdout: Result<(), String>,
    status: std::io::Result<ExitStatus>,
}

async fn run(
    config: &CommandConfig,
    upload: &Upload,
    reply_path: &std::path::Path,
) -> Result<Reply, HandlerError> {
    let program = config.program.display().to_string();
    let session = upload.session_id.to_string();
    let input = upload.open().await.map_err(|e| {
        HandlerError::internal(format!("opening upload {}: {e}", upload.path.display()))
    })?;
    let out_file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(reply_path)
        .await
        .map_err(|e| HandlerError::internal(format!("creating {}: {e}", reply_path.display())))?;
    let upload_path = std::path::absolute(&upload.path).unwrap_or_else(|_| upload.path.clone());

    let mut cmd = tokio::process::Command::new(&config.program);
    // A clean environment: the server's own (credentials, tokens, proxies) stays private
    // unless the configuration passes a variable through.
    cmd.env_clear().env("PATH", CommandConfig::DEFAULT_PATH);
    for name in &config.pass_env {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    cmd.args(&config.args)
        .envs(config.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("BITS_SESSION_ID", &session)
        .env("BITS_ORIGINAL_URL", &upload.original_url)
        .env(
            "BITS_CONTENT_NAME",
            upload.content_name.as_deref().unwrap_or(""),
        )
        .env("BITS_UPLOAD_PATH", &upload_path)
        .env("BITS_UPLOAD_SIZE", upload.len.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| HandlerError::internal(format!("spawning {program}: {e}")))?;
    // With process_group(0) the child leads a new group whose id is its pid.
    let mut group = GroupGuard(
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw),
    );
    tracing::debug!(session_id = %session, program = %program, pid = child.id().unwrap_or(0), "command started");

    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let work = async {
        let (stdin, stdout, (), status) = tokio::join!(
            feed_stdin(input, stdin, upload.len),
            collect_stdout(stdout, out_file),
            log_stderr(stderr, &session, &program),
            child.wait(),
        );
        Outcome {
            stdin,
            stdout,
            status,
        }
    };
    let outcome = tokio::time::timeout(config.timeout, work).await;
    let outcome = match outcome {
        Ok(outcome) => {
            group.disarm();
            outcome
        }
        Err(_elapsed) => {
            group.kill();
            // Reap the leader; it was sent SIGKILL, so this is quick.
            let _ = child.wait().await;
            tracing::warn!(session_id = %session, program = %program, timeout = ?config.timeout,
                "command timed out; its process group was killed");
            return Err(HandlerError::Unreachable(format!(
                "timed out after {:?} running {program}",
                config.timeout
            )));
        }
    };

    let status = outcome
        .status
        .map_err(|e| HandlerError::internal(format!("waiting for {program}: {e}")))?;
    outcome.stdin.map_err(HandlerError::internal)?;
    outcome.stdout.map_err(HandlerError::internal)?;
    if !status.success() {
        tracing::warn!(session_id = %session, program = %program, %status, "command failed");
        return Err(HandlerError::status(
            config.failure_status,
            format!("{program} failed: {status}"),
        ));
    }
    Ok(Reply::file(reply_path))
}

/// Streams the upload into the program's stdin, then closes it. A program that stops
/// reading (broken pipe) is not an error; failing to read the upload is.
async fn feed_stdin(
    mut input: tokio::io::Take<tokio::fs::File>,
    stdin: Option<ChildStdin>,
    len: u64,
) -> Result<(), String> {
    let Some(mut stdin) = stdin else {
        return Ok(());
    };
    let mut buf = vec![0u8; CHUNK];
    let mut fed = 0u64;
    loop {
        let n = input
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading the upload: {e}"))?;
        let Some(chunk) = buf.get(..n) else {
            return Err("read past the buffer".into());
        };
        if chunk.is_empty() {
            break;
        }
        if let Err(e) = stdin.write_all(chunk).await {
            // The program closed its stdin (or exited) without reading everything.
            tracing::debug!("command stopped reading its stdin: {e}");
            return Ok(());
        }
        fed += n as u64;
    }
    if fed != len {
        return Err(format!("the upload holds {fed} bytes, expected {len}"));
    }
    // Dropping stdin closes the pipe: the program sees end of file.
    let _ = stdin.shutdown().await;
    Ok(())
}

/// Streams the program's stdout into `out`.
async fn collect_stdout(
    stdout: Option<ChildStdout>,
    mut out: tokio::fs::File,
) -> Result<(), String> {
    if let Some(mut stdout) = stdout {
        tokio::io::copy(&mut stdout, &mut out)
            .await
            .map_err(|e| format!("storing the command's stdout: {e}"))?;
    }
    out.flush()
        .await
        .map_err(|e| format!("storing the command's stdout: {e}"))
}

/// Logs each stderr line of the program at warn level.
async fn log_stderr(stderr: Option<ChildStderr>, session: &str, program: &str) {
    let Some(stderr) = stderr else {
        return;
    };
    let emit = |line: &[u8]| {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\r', '\n']);
        tracing::warn!(session_id = %session, program = %program, "command stderr: {text}");
    };
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        let buf = match reader.fill_buf().await {
            Ok(buf) => buf,
            Err(e) => {
                tracing::debug!(session_id = %session, "reading the command's stderr: {e}");
                break;
            }
        };
        if buf.is_empty() {
            break;
        }
        let (take, end_of_line) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let room = MAX_STDERR_LINE.saturating_sub(line.len());
        line.extend_from_slice(buf.get(..take.min(room)).unwrap_or_default());
        reader.consume(take);
        if end_of_line {
            emit(&line);
            line.clear();
        }
    }
    if !line.is_empty() {
        emit(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults() {
        let c = CommandConfig::new("cat");
        assert_eq!(c.timeout, Duration::from_secs(300));
        assert_eq!(c.failure_status, 500);
        assert!(c.args.is_empty() && c.env.is_empty());
        assert!(CommandHandler::new(c).is_ok());
    }

    #[test]
    fn bad_configs_are_refused() {
        for c in [
            CommandConfig::default(),
            CommandConfig::new("cat").timeout(Duration::ZERO),
            CommandConfig::new("cat").failure_status(200),
            CommandConfig::new("cat").failure_status(600),
            CommandConfig::new("cat").env("A=B", "x"),
            CommandConfig::new("cat").env("", "x"),
            CommandConfig::new("cat").env("A", "x\0y"),
        ] {
            let err = CommandHandler::new(c.clone()).unwrap_err();
            assert!(
                matches!(err, HandlerConfigError::Invalid(_)),
                "{c:?}: {err:?}"
            );
        }
    }
}
