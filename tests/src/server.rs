//! [`TestServer`]: the bitsd service in this process on ephemeral loopback ports over a
//! temporary data directory.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bitsd::{RunningServer, ServerConfig};

use crate::RawClient;

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

    /// `GET` on the admin listener; the status and the body as text (`/metrics`, `/healthz`).
    pub async fn admin_text(&self, path: &str) -> (u16, String) {
        let mut c = RawClient::connect(self.admin_addr()).await;
        let res = c
            .send(&format!("GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").into_bytes())
            .await;
        (res.status, String::from_utf8_lossy(&res.body).into_owned())
    }
}
