//! A reply handler written as a Rust closure: the reply is the upload, upper-cased, with a
//! header line naming the session. Serves upload-reply jobs on `/shout/`.
//!
//! ```sh
//! cargo run --example custom_handler -- 127.0.0.1:8080
//! bitsd upload http://127.0.0.1:8080/shout/note.txt note.txt --reply-file loud.txt
//! ```

use bitsd::{BitsService, HandlerError, Reply, Route, SessionStore, Upload};
use hyper_util::rt::TokioIo;

/// The handler: any `async fn(Upload) -> Result<Reply, HandlerError>` closure is one.
async fn shout(upload: Upload) -> Result<Reply, HandlerError> {
    // Small uploads only: refuse (HTTP 413 is relayed as 500, context 0x7) above 1 MiB.
    let bytes = upload
        .read_to_vec(1024 * 1024)
        .await
        .map_err(|e| HandlerError::status(400, e.to_string()))?;
    let mut reply = format!("session {}\n", upload.session_id).into_bytes();
    reply.extend(bytes.to_ascii_uppercase());
    Ok(Reply::bytes(reply))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen: std::net::SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into())
        .parse()?;
    std::fs::create_dir_all("bitsd-example-data")?;
    let store = SessionStore::open("bitsd-example-data".as_ref()).await?;
    let service = BitsService::builder(store)
        .route(Route::upload_reply("/shout/", shout))
        .build()?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on http://{}/shout/", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let service = service.clone();
        tokio::spawn(async move {
            // BitsService is a hyper Service: serve it directly.
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                eprintln!("connection: {e}");
            }
        });
    }
}
