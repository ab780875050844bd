//! Where the fixtures' scenarios run: [`Target`] (an address and a place for files) and
//! [`Targets`] (a fresh target per scenario); [`LocalServers`] is one local server.

use std::net::SocketAddr;

use async_trait::async_trait;

use super::ScenarioConfig;

/// What a scenario runs against: a BITS listener and the place published files land.
#[async_trait]
pub trait Target: Send + Sync {
    /// Where requests go.
    fn addr(&self) -> SocketAddr;
    /// An admin listener (on a farm: any node's, as each lists every session).
    fn admin_addr(&self) -> SocketAddr;
    /// Stores `bytes` at `rel` (a path like `files/x.bin`, relative to the data directory).
    async fn put_file(&self, rel: &str, bytes: Vec<u8>) -> Result<(), String>;
    /// The bytes at `rel`, or `None` when there is no such file.
    async fn read_file(&self, rel: &str) -> Result<Option<Vec<u8>>, String>;
    /// The names under the directory `rel` (empty when it is empty or missing).
    async fn list_dir(&self, rel: &str) -> Result<Vec<String>, String>;
    /// Checks made once the scenario's steps passed, after `requests` requests (e.g. where
    /// each packet went).
    async fn finish(&self, requests: usize) -> Result<(), String> {
        let _ = requests;
        Ok(())
    }
}

/// Starts a fresh [`Target`] per scenario.
#[async_trait]
pub trait Targets: Send + Sync + 'static {
    /// A fresh target with `config` applied.
    async fn start(&self, config: ScenarioConfig) -> Result<Box<dyn Target>, String>;
}

/// The default target: one [`crate::TestServer`] on a fresh data directory.
pub struct LocalServers;

#[async_trait]
impl Targets for LocalServers {
    async fn start(&self, config: ScenarioConfig) -> Result<Box<dyn Target>, String> {
        let server = crate::TestServer::start_with(move |cfg| config.apply(cfg)).await;
        Ok(Box::new(server))
    }
}

#[async_trait]
impl Target for crate::TestServer {
    fn addr(&self) -> SocketAddr {
        crate::TestServer::addr(self)
    }

    fn admin_addr(&self) -> SocketAddr {
        crate::TestServer::admin_addr(self)
    }

    async fn put_file(&self, rel: &str, bytes: Vec<u8>) -> Result<(), String> {
        let path = self.data_dir().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        std::fs::write(&path, bytes).map_err(|e| format!("put_file {path:?}: {e}"))
    }

    async fn read_file(&self, rel: &str) -> Result<Option<Vec<u8>>, String> {
        match std::fs::read(self.data_dir().join(rel)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("read {rel}: {e}")),
        }
    }

    async fn list_dir(&self, rel: &str) -> Result<Vec<String>, String> {
        match std::fs::read_dir(self.data_dir().join(rel)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(format!("list {rel}: {e}")),
            Ok(entries) => entries
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string()),
        }
    }
}
