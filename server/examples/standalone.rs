//! A complete bitsd server from the library: the default routes plus a digest route, on the
//! address given as the first argument (default 127.0.0.1:8080).
//!
//! ```sh
//! cargo run --example standalone -- 127.0.0.1:8080
//! ```

use bitsd::{DigestHandler, Route, ServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into())
        .parse()?;
    let data = tempfile_dir()?;
    let mut routes = ServerConfig::default_routes();
    routes.push(Route::upload_reply("/receipt/", DigestHandler::new()));
    let server = bitsd::start(ServerConfig {
        listen,
        admin_listen: None,
        data_dir: data,
        routes,
        ..ServerConfig::default()
    })
    .await?;
    println!("listening on http://{}/", server.addr());
    tokio::signal::ctrl_c().await?;
    server.shutdown().await?;
    Ok(())
}

/// `./bitsd-example-data`, created if missing.
fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::path::PathBuf::from("bitsd-example-data");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
