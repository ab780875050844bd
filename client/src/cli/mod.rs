//! `bitsd upload`: the command-line front end (arguments, progress bars, final report,
//! Ctrl-C, the state file of a suspended upload).

mod bars;
mod state_file;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::ClientError;
use crate::uploader::{
    BitsUploader, CancelHandle, ReplyDestination, ResumeFrom, RetryPolicy, UploadJob,
    UploadOutcome, DEFAULT_FRAGMENT_SIZE,
};
use bars::Bars;
use state_file::ResumeState;

/// Arguments of `bitsd upload URL FILE`.
#[derive(Clone, Debug, clap::Args)]
pub struct UploadArgs {
    /// Remote URL (the BITS upload target), e.g. http://host:8080/upload/a.bin.
    pub url: String,
    /// Local file to upload.
    pub file: PathBuf,
    /// Upload-reply job: write the reply to this file (`-` for stdout). Without it a reply the
    /// server offers goes to stdout, or to FILE.reply when stdout is a terminal.
    #[arg(long, value_name = "OUT")]
    pub reply_file: Option<PathBuf>,
    /// Replace an existing reply file.
    #[arg(long)]
    pub force: bool,
    /// Bytes per fragment (suffixes K, M, G = KiB, MiB, GiB); halved on every 413.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_FRAGMENT_SIZE, value_parser = parse_size)]
    pub fragment_size: u64,
    /// User name for HTTP Basic authentication (sent only after the server asks for it).
    #[arg(long, value_name = "U")]
    pub user: Option<String>,
    /// Password for HTTP Basic authentication (or the BITSD_PASSWORD environment variable).
    #[arg(long, value_name = "P", env = "BITSD_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// https: do not verify the server's certificate (self-signed test servers).
    #[arg(long)]
    pub insecure: bool,
    /// https: also trust the certificate(s) in this PEM file: a CA, or the server's own
    /// self-signed certificate.
    #[arg(long, value_name = "PEM")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Retries after transient errors without progress before giving up.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub retries: u32,
    /// How long connecting, or waiting for one response, may take (e.g. 30s, 5m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Give up when the job has made no progress for this long (like BITSNoProgressTimeout).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub no_progress_timeout: Option<Duration>,
    /// Continue the upload suspended earlier (Ctrl-C) from FILE.bitsd-resume.
    #[arg(long)]
    pub resume: bool,
    /// Ctrl-C cancels the session on the server instead of suspending the upload.
    #[arg(long)]
    pub cancel_on_interrupt: bool,
    /// No progress bars.
    #[arg(long)]
    pub no_progress: bool,
}

/// Parses a byte count: `1048576`, `64K`, `1M`, `1MiB`, `2G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    let v = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if v == 0 {
        return Err("the fragment size must be at least 1 byte".to_owned());
    }
    Ok(v)
}

/// Parses a duration: `30` (seconds), `30s`, `500ms`, `5m`, `2h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 5m)"))?;
    let d = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "s" | "sec" | "secs" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => {
            return Err(format!(
                "unknown duration unit {other:?} (use ms, s, m or h)"
            ))
        }
    };
    if d.is_zero() {
        return Err("the duration must be more than zero".to_owned());
    }
    Ok(d)
}

/// Where `bitsd upload` writes a reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyOutput {
    /// Standard output.
    Stdout,
    /// This file.
    File(PathBuf),
}

/// Where the reply goes: `--reply-file -` is stdout, `--reply-file OUT` is OUT; without it,
/// stdout unless stdout is a terminal (binary never goes to a terminal, as with `curl`): then
/// `<file>.reply` beside the uploaded file.
pub fn reply_output(
    reply_file: Option<&Path>,
    file: &Path,
    stdout_is_terminal: bool,
) -> ReplyOutput {
    match reply_file {
        Some(p) if p.as_os_str() == "-" => ReplyOutput::Stdout,
        Some(p) => ReplyOutput::File(p.to_owned()),
        None if stdout_is_terminal => {
            let mut name = file.file_name().unwrap_or_default().to_os_string();
            name.push(".reply");
            ReplyOutput::File(file.with_file_name(name))
        }
        None => ReplyOutput::Stdout,
    }
}

fn load_certs(
    builder: crate::BitsUploaderBuilder,
    path: &Path,
) -> Result<crate::BitsUploaderBuilder, ClientError> {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ClientError::LocalFile {
            path: path.to_owned(),
            source: std::io::Error::other(format!("not a PEM certificate file: {e}")),
        })?;
    Ok(certs
        .into_iter()
        .fold(builder, |b, c| b.add_root_certificate(c.to_vec())))
}

fn resume_from(args: &UploadArgs) -> Result<Option<ResumeFrom>, ClientError> {
    let local = |source: std::io::Error| ClientError::LocalFile {
        path: state_file::path_for(&args.file),
        source,
    };
    let saved = ResumeState::load(&args.file).map_err(local)?;
    if !args.resume {
        if saved.is_some() {
            eprintln!(
                "note: {} holds a suspended upload; starting a new one (pass --resume to continue it)",
                state_file::path_for(&args.file).display()
            );
        }
        return Ok(None);
    }
    let Some(saved) = saved else {
        return Err(local(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no suspended upload to resume; run without --resume",
        )));
    };
    let refuse = |why: String| Err(local(std::io::Error::other(why)));
    if saved.url != args.url {
        return refuse(format!(
            "the suspended upload went to {}, not {}; run without --resume to start over",
            saved.url, args.url
        ));
    }
    let (size, mtime) =
        state_file::fingerprint(&args.file).map_err(|source| ClientError::LocalFile {
            path: args.file.clone(),
            source,
        })?;
    if (size, mtime) != (saved.size, saved.mtime.clone()) {
        return refuse(format!(
            "{} changed since the upload was suspended; run without --resume to start over",
            args.file.display()
        ));
    }
    Ok(Some(ResumeFrom {
        session_id: saved.session_id,
        offset: saved.offset,
    }))
}

/// Runs `bitsd upload`: uploads `args.file` to `args.url`, downloads the reply if there is one,
/// shows progress on stderr, and prints the final state (and any BITS error by name and code,
/// e.g. `BG_E_SESSION_NOT_FOUND (0x8020001f)`) to stderr. Ctrl-C suspends the job (the session
/// stays on the server and `--resume` continues it); a second Ctrl-C, or the first with
/// `--cancel-on-interrupt`, cancels it on the server. The error is returned as well, for the
/// exit status; it has already been printed.
pub async fn run_upload_cli(args: UploadArgs) -> Result<(), ClientError> {
    let result = run_inner(&args).await;
    if let Err(e) = &result {
        if !matches!(e, ClientError::Cancelled | ClientError::Suspended { .. }) {
            eprintln!("state: ERROR - {e}");
        }
    }
    result
}

async fn run_inner(args: &UploadArgs) -> Result<(), ClientError> {
    let fingerprint =
        state_file::fingerprint(&args.file).map_err(|source| ClientError::LocalFile {
            path: args.file.clone(),
            source,
        })?;
    let resume = resume_from(args)?;
    let on_session = {
        let (url, file, (size, mtime)) = (args.url.clone(), args.file.clone(), fingerprint.clone());
        Box::new(move |session_id: &str| {
            let st = ResumeState {
                url: url.clone(),
                session_id: session_id.to_owned(),
                offset: 0,
                size,
                mtime: mtime.clone(),
            };
            if let Err(e) = st.save(&file) {
                tracing::warn!(error = %e, "cannot write the upload state file");
            }
        })
    };
    let bars = Arc::new(Bars::new(args.no_progress, fingerprint.0, on_session));
    let mut builder = BitsUploader::builder()
        .fragment_size(args.fragment_size)
        .observer(bars.clone())
        .retry_policy(RetryPolicy {
            max_retries: args.retries,
            ..RetryPolicy::default()
        });
    if let Some(t) = args.timeout {
        builder = builder.connect_timeout(t).request_timeout(t);
    }
    if let Some(t) = args.no_progress_timeout {
        builder = builder.no_progress_timeout(t);
    }
    if args.user.is_some() || args.password.is_some() {
        builder = builder
            .credentials(
                args.user.as_deref().unwrap_or(""),
                args.password.as_deref().unwrap_or(""),
            )
            .ping_first(true);
    }
    builder = builder.tls_insecure(args.insecure);
    if let Some(path) = &args.ca_file {
        builder = load_certs(builder, path)?;
    }
    let uploader = builder.build();
    let cancel = CancelHandle::new();
    let mut job = UploadJob::new(args.url.clone(), args.file.clone())
        .with_cancel_handle(cancel.clone())
        .overwrite_reply(args.force);
    if let Some(from) = resume {
        job = job.resume(from);
    }
    let output = reply_output(
        args.reply_file.as_deref(),
        &args.file,
        std::io::stdout().is_terminal(),
    );
    if let (ReplyOutput::File(out), None, false) = (&output, &args.reply_file, args.force) {
        // The default reply file of a terminal session: refuse before uploading, not after.
        if std::fs::symlink_metadata(out).is_ok() {
            return Err(ClientError::LocalFile {
                path: out.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a reply would be written here (stdout is a terminal) and the file exists; \
                     pass --force to replace it or --reply-file to choose another",
                ),
            });
        }
    }
    job = match (&output, &args.reply_file) {
        (ReplyOutput::File(out), Some(_)) => job.reply_to(ReplyDestination::File(out.clone())),
        (ReplyOutput::File(out), None) => job.reply_if_offered(ReplyDestination::File(out.clone())),
        (ReplyOutput::Stdout, _) => {
            job.reply_if_offered(ReplyDestination::Writer(Box::new(tokio::io::stdout())))
        }
    };
    let cancel_on_interrupt = args.cancel_on_interrupt;
    let ctrl_c = tokio::spawn(async move {
        let mut presses = 0;
        while tokio::signal::ctrl_c().await.is_ok() {
            presses += 1;
            if cancel_on_interrupt || presses > 1 {
                eprintln!("\ncancelling the upload on the server");
                cancel.cancel();
            } else {
                eprintln!("\nsuspending (Ctrl-C again cancels the upload on the server)");
                cancel.suspend();
            }
        }
    });
    let result = uploader.run(job).await;
    ctrl_c.abort();
    let state = match &result {
        Ok(o) if o.closed => "ACKNOWLEDGED",
        Ok(_) => "TRANSFERRED",
        Err(ClientError::Suspended { .. }) => "SUSPENDED",
        Err(ClientError::Cancelled) => "CANCELLED",
        Err(_) => "ERROR",
    };
    bars.end(state, result.is_ok());
    keep_state(args, &result, fingerprint);
    report(args, &output, &result);
    result.map(|_| ())
}

/// Keeps the state file for a suspended job (with its offset) or one that failed on a transient
/// error (the session may still be there); removes it otherwise.
fn keep_state(args: &UploadArgs, result: &Result<UploadOutcome, ClientError>, fp: (u64, String)) {
    match result {
        Err(ClientError::Suspended {
            session_id: Some(id),
            offset,
        }) => {
            let st = ResumeState {
                url: args.url.clone(),
                session_id: id.clone(),
                offset: *offset,
                size: fp.0,
                mtime: fp.1,
            };
            if let Err(e) = st.save(&args.file) {
                eprintln!(
                    "cannot write {}: {e}",
                    state_file::path_for(&args.file).display()
                );
            }
        }
        Err(e) if e.is_transient() => {}
        _ => ResumeState::remove(&args.file),
    }
}

fn report(args: &UploadArgs, output: &ReplyOutput, result: &Result<UploadOutcome, ClientError>) {
    match result {
        Ok(o) => {
            eprintln!(
                "state: {} - uploaded {} bytes to {} (session {}{})",
                if o.closed {
                    "ACKNOWLEDGED"
                } else {
                    "TRANSFERRED"
                },
                o.bytes_uploaded,
                o.url,
                o.session_id,
                if o.closed {
                    ""
                } else {
                    ", Close-Session failed"
                },
            );
            if let Some(r) = &o.reply {
                let to = match (&r.path, output) {
                    (Some(p), _) | (None, ReplyOutput::File(p)) => p.display().to_string(),
                    (None, ReplyOutput::Stdout) => "stdout".to_owned(),
                };
                eprintln!("reply: {} bytes from {} written to {to}", r.size, r.url);
            }
        }
        Err(ClientError::Suspended { session_id, offset }) => match session_id {
            Some(id) => eprintln!(
                "state: SUSPENDED - the server holds {offset} of {} bytes (session {id}); \
                 `bitsd upload --resume {} {}` continues",
                std::fs::metadata(&args.file).map(|m| m.len()).unwrap_or(0),
                args.url,
                args.file.display()
            ),
            None => {
                eprintln!("state: SUSPENDED - before any session was created; nothing to resume")
            }
        },
        Err(ClientError::Cancelled) => {
            eprintln!("state: CANCELLED - the session was cancelled on the server")
        }
        Err(e) if e.is_transient() && state_file::path_for(&args.file).exists() => eprintln!(
            "the session stays on the server: `bitsd upload --resume {} {}` continues it \
             once the server answers again",
            args.url,
            args.file.display()
        ),
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: UploadArgs,
    }

    #[test]
    fn parses_arguments() {
        let cli = Cli::try_parse_from([
            "bitsd",
            "http://h/echo/a",
            "a.bin",
            "--reply-file",
            "out.bin",
            "--fragment-size",
            "64K",
            "--user",
            "u",
            "--password",
            "p",
            "--insecure",
            "--no-progress",
            "--retries",
            "3",
            "--timeout",
            "30s",
            "--no-progress-timeout",
            "5m",
            "--resume",
            "--force",
            "--cancel-on-interrupt",
        ])
        .expect("parse");
        assert_eq!(cli.args.fragment_size, 65536);
        assert_eq!(cli.args.reply_file, Some(PathBuf::from("out.bin")));
        assert!(cli.args.insecure && cli.args.no_progress);
        assert_eq!(cli.args.retries, 3);
        assert_eq!(cli.args.timeout, Some(Duration::from_secs(30)));
        assert_eq!(cli.args.no_progress_timeout, Some(Duration::from_secs(300)));
        assert!(cli.args.resume && cli.args.force && cli.args.cancel_on_interrupt);
        let cli = Cli::try_parse_from(["bitsd", "http://h/upload/a", "a.bin"]).expect("parse");
        assert_eq!(cli.args.fragment_size, DEFAULT_FRAGMENT_SIZE);
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12X").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("0").is_err() && parse_duration("1y").is_err());
    }

    #[test]
    fn binary_replies_never_go_to_a_terminal() {
        let f = Path::new("dir/q.bin");
        assert_eq!(
            reply_output(None, f, true),
            ReplyOutput::File(PathBuf::from("dir/q.bin.reply"))
        );
        assert_eq!(reply_output(None, f, false), ReplyOutput::Stdout);
        assert_eq!(
            reply_output(Some(Path::new("-")), f, true),
            ReplyOutput::Stdout
        );
        assert_eq!(
            reply_output(Some(Path::new("o")), f, false),
            ReplyOutput::File(PathBuf::from("o"))
        );
    }
}
