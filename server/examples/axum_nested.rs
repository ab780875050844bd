//! An axum application that serves its own routes and BITS uploads under `/bits`:
//! `/` answers "hello", `/bits/upload/…` takes plain uploads and `/bits/echo/…` upload-reply
//! jobs. Reply URLs carry the `/bits` prefix back.
//!
//! ```sh
//! cargo run --example axum_nested -- 127.0.0.1:8080 ./data
//! ```

use axum::routing::get;
use axum::Router;
use bitsd::{BitsService, EchoHandler, Route, SessionStore};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
    let data = args.next().unwrap_or_else(|| "bitsd-example-data".into());
    std::fs::create_dir_all(&data)?;
    let store = SessionStore::open(data.as_ref()).await?;
    let bits = BitsService::builder(store)
        .route(Route::upload("/upload/"))
        .route(Route::upload_reply("/echo/", EchoHandler))
        // axum strips "/bits" before the service sees the request; reply URLs put it back.
        .mount_path("/bits")
        .build()?;
    let app = Router::new()
        .route("/", get(|| async { "hello\n" }))
        .nest_service("/bits", bits);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on http://{}/", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
