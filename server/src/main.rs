//! The `bitsd` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use bitsd::config::{parse_admin, ByteSize, ConfigFile};
use clap::{Args, CommandFactory, Parser, Subcommand};

/// A line of the startup banner on stdout. A reader that stopped reading (a closed pipe)
/// must not stop the server, so write errors are ignored instead of panicking as `println!`.
macro_rules! banner {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[path = "cli/commands.rs"]
mod commands;
#[path = "cli/startup.rs"]
mod startup;

/// A server for the Microsoft BITS upload and upload-reply protocol.
///
/// With no options it listens on 127.0.0.1:8080, keeps its data in ./bitsd-data, takes plain
/// uploads under /upload/ (files land in bitsd-data/files/) and upload-reply jobs under /echo/
/// (the reply is the upload), and serves session progress as JSON on 127.0.0.1:8081.
#[derive(Debug, Parser)]
#[command(name = "bitsd", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// For people.
    Text,
    /// One JSON object per line, with the request span's fields (packet, session, user).
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a configuration file and explain what is wrong, with its line.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
    /// Print the argon2 hash of a password for a users file: asks without echo on a terminal,
    /// reads one line of standard input otherwise.
    HashPassword,
    /// Upload a file to a BITS server as a Windows BITS client would (upload or upload-reply).
    Upload(bitsd_client::UploadArgs),
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `bitsd man > bitsd.1`.
    Man,
    /// Exit 0 when the admin listener answers GET /healthz with 200 (for container health checks).
    Healthcheck {
        /// The admin listener's address.
        #[arg(long, default_value = "127.0.0.1:8081", env = "BITSD_ADMIN_LISTEN")]
        admin: SocketAddr,
    },
}

/// Serving options; each overrides the configuration file.
#[derive(Debug, Args)]
struct ServeArgs {
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, value_enum, default_value = "text", env = "BITSD_LOG_FORMAT")]
    log_format: LogFormat,
    /// TOML configuration file (docs/configuration.md; bitsd.example.toml); flags override it.
    #[arg(long, env = "BITSD_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the BITS listener [default: 127.0.0.1:8080].
    #[arg(long, env = "BITSD_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory (sessions, replies, committed uploads) [default: ./bitsd-data].
    #[arg(long, env = "BITSD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the admin listener (session progress JSON), or "off"; keep it private
    /// [default: 127.0.0.1:8081].
    #[arg(long, env = "BITSD_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Do not start the admin listener.
    #[arg(long)]
    no_admin: bool,
    /// Base of reply URLs (e.g. https://bits.example.com) when clients reach bitsd through a proxy.
    #[arg(long, env = "BITSD_PUBLIC_URL")]
    public_url: Option<String>,
    /// Build reply URLs from X-Forwarded-Proto / X-Forwarded-Host (only behind a proxy that sets them).
    #[arg(long)]
    trust_forwarded_headers: bool,
    /// Largest accepted upload (BITSMaximumUploadSize): bytes, or with a suffix such as 10G
    /// [default: unlimited].
    #[arg(long, value_name = "SIZE")]
    max_upload_size: Option<ByteSize>,
    /// Largest accepted fragment; larger ones get 413 and the client shrinks them: bytes, or
    /// with a suffix such as 64M [default: 64M].
    #[arg(long, value_name = "SIZE")]
    max_fragment_size: Option<ByteSize>,
    /// Seconds without progress before a session is removed (BITSSessionTimeout)
    /// [default: 1209600, 14 days].
    #[arg(long)]
    session_timeout: Option<u64>,
    /// Seconds between sweeps for expired sessions [default: 3600].
    #[arg(long)]
    cleanup_interval: Option<u64>,
    /// When fragment bytes are synced: per-fragment, on-close or never [default: per-fragment].
    #[arg(long)]
    fsync: Option<bitsd::FsyncPolicy>,
    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require HTTP Basic authentication against this users file (`user:$argon2id$…` lines).
    #[arg(long)]
    users_file: Option<PathBuf>,
    /// Accept bearer tokens listed in this file (`user:<sha256 hex of the token>` lines).
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// Test server mode: inject the faults of this plan (TOML; see
    /// docs/testing-your-bits-client.md). Never on a production server.
    #[arg(long, value_name = "FILE")]
    fault_plan: Option<PathBuf>,
    /// Test server mode: one more fault rule, PACKET[#NTH]:ACTION[=VALUE][,KEY=VALUE]...,
    /// e.g. "Fragment#3:drop-after=1000" or "GET#1:truncate=4096"; repeatable, added after the
    /// plan's rules.
    #[arg(long = "fault", value_name = "SPEC")]
    faults: Vec<String>,
    /// Seed of the fault plan's probability draws (overrides the plan's `seed`).
    #[arg(long, value_name = "N")]
    fault_seed: Option<u64>,
    /// Test server mode: write a JSON-lines transcript of every request and answer to FILE
    /// (also served on the admin listener at /transcript).
    #[arg(long, value_name = "FILE")]
    transcript: Option<PathBuf>,
    /// Require `Authorization: Bearer <token>` on the admin API (all but /healthz and
    /// /readyz); the token is the content of FILE (at least 16 characters).
    #[arg(long, value_name = "FILE", env = "BITSD_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Allow the admin listener on an address other than loopback (refused otherwise).
    #[arg(long)]
    admin_allow_non_loopback: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => return check_config(&file),
        Some(Command::HashPassword) => return commands::hash_password(),
        Some(Command::Completions { shell }) => {
            return commands::completions(shell, Cli::command())
        }
        Some(Command::Man) => return commands::man(Cli::command()),
        Some(Command::Healthcheck { admin }) => return commands::healthcheck(admin),
        Some(Command::Upload(args)) => return upload(args),
        None => {}
    }
    startup::init_logging(cli.serve.log_format == LogFormat::Json, "info");
    let config = match server_config(&cli.serve) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bitsd: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = startup::check_data_dir(&config.data_dir) {
        eprintln!("bitsd: {e}");
        return ExitCode::FAILURE;
    }
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bitsd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    let mut config = bitsd::ServerConfig::default();
    let name = file.display().to_string();
    let result =
        ConfigFile::load(file).and_then(|(parsed, text)| parsed.apply(&text, &name, &mut config));
    match result {
        Ok(())
            if config
                .admin_listen
                .is_some_and(|a| !a.ip().is_loopback() && !config.admin_allow_non_loopback) =>
        {
            let admin = config
                .admin_listen
                .map(|a| a.to_string())
                .unwrap_or_default();
            eprintln!(
                "{name}: admin_listen {admin} is not a loopback address: bitsd will refuse to \
                 start unless admin_allow_non_loopback = true (and set admin_token_file)"
            );
            ExitCode::FAILURE
        }
        Ok(()) => {
            println!("{name}: OK");
            println!("  listen        {}", config.listen);
            println!(
                "  admin         {}",
                config
                    .admin_listen
                    .map_or("off".to_owned(), |a| a.to_string())
            );
            println!("  data_dir      {}", config.data_dir.display());
            match &config.storage {
                bitsd::StorageConfig::Local => println!("  storage       local"),
                bitsd::StorageConfig::Shared(s) => {
                    let store = &s.object_store;
                    println!(
                        "  storage       shared (postgres {}, {})",
                        bitsd::storage_config::redact_url(&s.postgres_url),
                        store.describe()
                    );
                    println!(
                        "  fragments     at most {} bytes in memory (fragment_memory)",
                        store.fragment_memory()
                    );
                    if let Some(ttl) = s.object_store.presigned_reply_ttl() {
                        println!(
                            "  replies       redirected to presigned store URLs valid {} s",
                            ttl.as_secs()
                        );
                    }
                }
            }
            for r in &config.routes {
                println!("  route         {} ({:?})", r.prefix(), r.mode());
            }
            if let Some(plan) = &config.fault_plan {
                println!(
                    "  fault plan    {} rule(s), seed {}",
                    plan.rules.len(),
                    plan.seed
                );
                for rule in &plan.rules {
                    println!("    {rule}");
                }
            }
            if let Some(file) = config.transcript.as_ref().and_then(|t| t.file.as_ref()) {
                println!("  transcript    {}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn upload(args: bitsd_client::UploadArgs) -> ExitCode {
    startup::init_logging(false, "warn");
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // run_upload_cli prints the outcome (or the BITS error by name and code) itself.
    match runtime.block_on(bitsd_client::run_upload_cli(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("bitsd: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
}

fn server_config(args: &ServeArgs) -> Result<bitsd::ServerConfig, Box<dyn std::error::Error>> {
    let mut config = bitsd::ServerConfig::default();
    if let Some(path) = &args.config {
        let (parsed, text) = ConfigFile::load(path)?;
        parsed.apply(&text, &path.display().to_string(), &mut config)?;
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(d) = &args.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(a) = &args.admin_listen {
        config.admin_listen = parse_admin(a)?;
    }
    if args.no_admin {
        config.admin_listen = None;
    }
    if let Some(u) = &args.public_url {
        config.public_base_url = Some(u.clone());
    }
    if args.trust_forwarded_headers {
        config.trust_forwarded_headers = true;
    }
    if let Some(ByteSize(n)) = args.max_upload_size {
        config.limits.max_upload_size = n;
    }
    if let Some(ByteSize(n)) = args.max_fragment_size {
        config.limits.max_fragment_size = n.max(1);
    }
    if let Some(s) = args.session_timeout {
        config.session_timeout = std::time::Duration::from_secs(s.max(1));
    }
    if let Some(p) = args.fsync {
        config.fsync = p;
    }
    if let Some(s) = args.cleanup_interval {
        config.cleanup_interval = std::time::Duration::from_secs(s.max(1));
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(bitsd::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        });
    }
    if let Some(path) = &args.fault_plan {
        config.fault_plan = Some(bitsd::FaultPlan::load(path)?);
    }
    for spec in &args.faults {
        let rule: bitsd::FaultRule = spec.parse().map_err(|e| format!("--fault {spec:?}: {e}"))?;
        config
            .fault_plan
            .get_or_insert_with(bitsd::FaultPlan::default)
            .rules
            .push(rule);
    }
    if let Some(seed) = args.fault_seed {
        config
            .fault_plan
            .get_or_insert_with(bitsd::FaultPlan::default)
            .seed = seed;
    }
    if let Some(file) = &args.transcript {
        config.transcript = Some(bitsd::TranscriptOptions {
            file: Some(file.clone()),
        });
    }
    if let Some(path) = &args.admin_token_file {
        config.admin_token = Some(bitsd::config::read_admin_token(path)?);
    }
    if args.admin_allow_non_loopback {
        config.admin_allow_non_loopback = true;
    }
    if args.users_file.is_some() || args.tokens_file.is_some() {
        let entry = bitsd::config::AuthEntry {
            users_file: args.users_file.clone(),
            tokens_file: args.tokens_file.clone(),
            realm: None,
        };
        let auth = bitsd::config::build_auth(&entry)
            .map_err(|m| format!("--{}", m.replacen('_', "-", 1)))?;
        config.auth = Some(bitsd::SharedAuthenticator(std::sync::Arc::new(auth)));
    }
    Ok(config)
}

async fn run(config: bitsd::ServerConfig) -> Result<(), Box<dyn std::error::Error>> {
    let fault_plan = config.fault_plan.clone();
    let server = bitsd::start(config)
        .await
        .map_err(|e| startup::explain_start_error(&e))?;
    // One line per route, with the scheme clients must use (the root serves nothing).
    for route in server.routes() {
        let mode = match route.mode() {
            bitsd::UploadMode::Upload => "upload",
            bitsd::UploadMode::UploadReply => "upload-reply",
        };
        banner!(
            "bitsd: BITS {mode} on {}://{}{}",
            server.scheme(),
            server.addr(),
            route.prefix()
        );
    }
    if let Some(admin) = server.admin_addr() {
        banner!(
            "bitsd: session progress on http://{admin}/sessions (also /metrics, /healthz, /readyz)"
        );
    }
    if let Some(plan) = &fault_plan {
        banner!(
            "bitsd: TEST SERVER MODE: {} fault rule(s), seed {}",
            plan.rules.len(),
            plan.seed
        );
        for rule in &plan.rules {
            banner!("bitsd:   fault {rule}");
        }
    }
    if let Some(t) = server.transcript() {
        let file = t
            .file()
            .map_or("memory only".to_owned(), |f| f.display().to_string());
        match server.admin_addr() {
            Some(admin) => banner!("bitsd: transcript to {file} and http://{admin}/transcript"),
            None => banner!("bitsd: transcript to {file}"),
        }
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await?;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
