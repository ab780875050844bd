//! `bitsd upload`: the command-line front end (arguments, progress bars, final report).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::error::ClientError;
use crate::progress::{JobEvent, Progress, ProgressObserver, BG_SIZE_UNKNOWN};
use crate::uploader::{
    BitsUploader, CancelHandle, ReplyDestination, UploadJob, UploadOutcome, DEFAULT_FRAGMENT_SIZE,
};

/// Arguments of `bitsd upload URL FILE`.
#[derive(Clone, Debug, clap::Args)]
pub struct UploadArgs {
    /// Remote URL (the BITS upload target), e.g. http://host:8080/upload/a.bin.
    pub url: String,
    /// Local file to upload.
    pub file: PathBuf,
    /// Upload-reply job: write the reply to this file. Without it a reply the server offers is
    /// written to stdout.
    #[arg(long, value_name = "OUT")]
    pub reply_file: Option<PathBuf>,
    /// Bytes per fragment (suffixes K, M, G = KiB, MiB, GiB); halved on every 413.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_FRAGMENT_SIZE, value_parser = parse_size)]
    pub fragment_size: u64,
    /// User name for HTTP Basic authentication.
    #[arg(long, value_name = "U")]
    pub user: Option<String>,
    /// Password for HTTP Basic authentication (or the BITSD_PASSWORD environment variable).
    #[arg(long, value_name = "P", env = "BITSD_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// https: do not verify the server's certificate (self-signed test servers).
    #[arg(long)]
    pub insecure: bool,
    /// https: also trust the CA certificate(s) in this PEM file.
    #[arg(long, value_name = "PEM")]
    pub ca_file: Option<std::path::PathBuf>,
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

/// Two bars: the upload (`BG_JOB_PROGRESS`), then the reply (`BG_JOB_REPLY_PROGRESS`).
struct Bars {
    multi: MultiProgress,
    upload: ProgressBar,
    reply: Mutex<Option<ProgressBar>>,
    style: ProgressStyle,
    quiet: bool,
}

impl Bars {
    fn new(quiet: bool) -> Self {
        let style = ProgressStyle::with_template(
            "{prefix:>7} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let multi = MultiProgress::new();
        let upload = if quiet {
            ProgressBar::hidden()
        } else {
            multi.add(ProgressBar::new(0))
        };
        upload.set_style(style.clone());
        upload.set_prefix("upload");
        Bars {
            multi,
            upload,
            reply: Mutex::new(None),
            style,
            quiet,
        }
    }

    fn say(&self, msg: &str) {
        if self.quiet {
            eprintln!("{msg}");
        } else {
            let _ = self.multi.println(msg);
        }
    }

    fn finish(&self) {
        self.upload.finish();
        if let Ok(r) = self.reply.lock() {
            if let Some(b) = r.as_ref() {
                b.finish();
            }
        }
    }
}

impl ProgressObserver for Bars {
    fn progress(&self, p: &Progress) {
        self.upload.set_length(p.upload.bytes_total);
        self.upload.set_position(p.upload.bytes_transferred);
        self.upload.set_message(p.state.as_str());
        if p.reply.bytes_total != BG_SIZE_UNKNOWN {
            if let Ok(mut r) = self.reply.lock() {
                let bar = r.get_or_insert_with(|| {
                    self.upload.set_message("");
                    let b = if self.quiet {
                        ProgressBar::hidden()
                    } else {
                        self.multi.add(ProgressBar::new(p.reply.bytes_total))
                    };
                    b.set_style(self.style.clone());
                    b.set_prefix("reply");
                    b
                });
                bar.set_length(p.reply.bytes_total);
                bar.set_position(p.reply.bytes_transferred);
                bar.set_message(p.state.as_str());
            }
        }
    }

    fn event(&self, e: &JobEvent) {
        match e {
            JobEvent::Retrying {
                attempt,
                delay,
                error,
            } => self.say(&format!("retry {attempt} in {delay:?}: {error}")),
            JobEvent::SessionRestarted { old_session_id } => self.say(&format!(
                "session {old_session_id} not found on the server: starting over"
            )),
            JobEvent::FragmentSizeReduced { from, to } => self.say(&format!(
                "413: fragment of {from} bytes too large, now {to}"
            )),
            JobEvent::HostIdRedirect { url, .. } => {
                self.say(&format!("server farm: continuing at {url}"))
            }
            JobEvent::HostIdFallback { url } => {
                self.say(&format!("Host-Id unreachable: falling back to {url}"))
            }
            _ => {}
        }
    }
}

/// Runs `bitsd upload`: uploads `args.file` to `args.url`, downloads the reply if there is one,
/// shows progress on stderr, and prints the final state (and any BITS error by name and code,
/// e.g. `BG_E_SESSION_NOT_FOUND (0x8020001f)`) to stderr. Ctrl-C cancels the job (the
/// session is cancelled on the server). The error is returned as well, for the exit status;
/// it has already been printed.
pub async fn run_upload_cli(args: UploadArgs) -> Result<(), ClientError> {
    let bars = Arc::new(Bars::new(args.no_progress));
    let mut builder = BitsUploader::builder()
        .fragment_size(args.fragment_size)
        .observer(bars.clone());
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
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| ClientError::LocalFile {
                path: path.clone(),
                source: std::io::Error::other(format!("not a PEM certificate file: {e}")),
            });
        match certs {
            Ok(certs) => {
                for c in certs {
                    builder = builder.add_root_certificate(c.to_vec());
                }
            }
            Err(e) => {
                eprintln!("{e}");
                return Err(e);
            }
        }
    }
    let uploader = builder.build();
    let cancel = CancelHandle::new();
    let mut job =
        UploadJob::new(args.url.clone(), args.file.clone()).with_cancel_handle(cancel.clone());
    job = match &args.reply_file {
        Some(out) => job.reply_to(ReplyDestination::File(out.clone())),
        None => job.reply_if_offered(ReplyDestination::Writer(Box::new(tokio::io::stdout()))),
    };
    let ctrl_c = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            cancel.cancel();
        }
    });
    let result = uploader.run(job).await;
    ctrl_c.abort();
    bars.finish();
    report(&args, &result);
    result.map(|_| ())
}

fn report(args: &UploadArgs, result: &Result<UploadOutcome, ClientError>) {
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
                let to = match (&r.path, &args.reply_file) {
                    (Some(p), _) => p.display().to_string(),
                    (None, Some(p)) => p.display().to_string(),
                    (None, None) => "stdout".to_owned(),
                };
                eprintln!("reply: {} bytes from {} written to {to}", r.size, r.url);
            }
        }
        Err(ClientError::Cancelled) => eprintln!("state: CANCELLED"),
        Err(e) => eprintln!("state: ERROR - {e}"),
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
        ])
        .expect("parse");
        assert_eq!(cli.args.fragment_size, 65536);
        assert_eq!(cli.args.reply_file, Some(PathBuf::from("out.bin")));
        assert!(cli.args.insecure && cli.args.no_progress);
        let cli = Cli::try_parse_from(["bitsd", "http://h/upload/a", "a.bin"]).expect("parse");
        assert_eq!(cli.args.fragment_size, DEFAULT_FRAGMENT_SIZE);
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12X").is_err());
    }
}
