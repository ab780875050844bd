//! The `bitsd` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// A server for the Microsoft BITS upload and upload-reply protocol.
///
/// With no options it listens on 127.0.0.1:8080, keeps its data in ./bitsd-data, takes plain
/// uploads under /upload/ (files land in bitsd-data/files/) and upload-reply jobs under /echo/
/// (the reply is the upload), and serves session progress as JSON on 127.0.0.1:8081.
#[derive(Debug, Parser)]
#[command(name = "bitsd", version)]
struct Args {
    /// Address of the BITS listener.
    #[arg(long, default_value = "127.0.0.1:8080", env = "BITSD_LISTEN")]
    listen: SocketAddr,
    /// Data directory (sessions, replies, committed uploads).
    #[arg(long, default_value = "bitsd-data", env = "BITSD_DATA_DIR")]
    data_dir: PathBuf,
    /// Address of the admin listener (session progress JSON); keep it private.
    #[arg(long, default_value = "127.0.0.1:8081", env = "BITSD_ADMIN_LISTEN")]
    admin_listen: SocketAddr,
    /// Do not start the admin listener.
    #[arg(long)]
    no_admin: bool,
    /// Base of reply URLs (e.g. https://bits.example.com) when clients reach bitsd through a proxy.
    #[arg(long, env = "BITSD_PUBLIC_URL")]
    public_url: Option<String>,
    /// Largest accepted upload in bytes (BITSMaximumUploadSize); unlimited by default.
    #[arg(long)]
    max_upload_size: Option<u64>,
    /// Largest accepted fragment in bytes; larger ones get 413 and the client shrinks them.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    max_fragment_size: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bitsd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bitsd: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = bitsd::ServerConfig {
        listen: args.listen,
        admin_listen: (!args.no_admin).then_some(args.admin_listen),
        data_dir: args.data_dir,
        public_base_url: args.public_url,
        ..Default::default()
    };
    config.limits.max_fragment_size = args.max_fragment_size;
    if let Some(max) = args.max_upload_size {
        config.limits.max_upload_size = max;
    }
    let server = bitsd::start(config).await?;
    println!(
        "bitsd: BITS uploads on http://{}/upload/ and upload-reply on http://{}/echo/",
        server.addr(),
        server.addr()
    );
    if let Some(admin) = server.admin_addr() {
        println!("bitsd: session progress on http://{admin}/sessions");
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
