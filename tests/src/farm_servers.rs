//! The real servers of a farm test in one call: the shared PostgreSQL cluster of the test
//! binary with a fresh database, and a single-node Garage (or either store, [`StoreServers`]), with
//! the object-store settings that point bitsd at it.

use std::sync::Arc;

use bitsd_storage::shared::objects::{ObjectStoreConfig, Objects};

use crate::azurite::Azurite;
use crate::garage::Garage;
use crate::moto::Moto;
use crate::pg::{ClusterOptions, PgCluster};

/// PostgreSQL and Garage for one farm test.
pub struct FarmServers {
    /// The cluster (shared by the test binary); keep it alive for the test.
    pub pg: Arc<PgCluster>,
    /// A new database on it, as a connection URL.
    pub postgres_url: String,
    /// A single-node Garage with its default bucket.
    pub garage: Garage,
}

impl FarmServers {
    /// Starts (or joins) both servers; `None` after printing why when either is not
    /// installed, so the test can return early.
    pub async fn start() -> Option<FarmServers> {
        Self::start_on(PgCluster::shared).await
    }

    /// Like [`FarmServers::start`], but on a PostgreSQL cluster of the test's own, which the
    /// test may stop and restart (stopping the binary's shared one would hit the other tests).
    pub async fn start_own() -> Option<FarmServers> {
        Self::start_on(|| PgCluster::start(ClusterOptions::default()).map(Arc::new)).await
    }

    async fn start_on(
        cluster: impl FnOnce() -> Result<Arc<PgCluster>, String> + Send + 'static,
    ) -> Option<FarmServers> {
        let pg = start_postgres(cluster).await?;
        let garage = tokio::task::spawn_blocking(Garage::start)
            .await
            .expect("Garage start task")?;
        let postgres_url = fresh_database(&pg).await;
        Some(FarmServers {
            pg,
            postgres_url,
            garage,
        })
    }
}

/// Starts (or joins) a PostgreSQL cluster; `None` after printing why when it cannot run.
async fn start_postgres(
    cluster: impl FnOnce() -> Result<Arc<PgCluster>, String> + Send + 'static,
) -> Option<Arc<PgCluster>> {
    match tokio::task::spawn_blocking(cluster)
        .await
        .expect("PostgreSQL start task")
    {
        Ok(c) => Some(c),
        Err(why) => {
            crate::skip::missing(crate::skip::Needs::Postgresql, why);
            None
        }
    }
}

/// A new database on `pg`, as a connection URL.
async fn fresh_database(pg: &Arc<PgCluster>) -> String {
    let pg = Arc::clone(pg);
    tokio::task::spawn_blocking(move || pg.fresh_database())
        .await
        .expect("database task")
}

/// The S3 server a farm test runs on: Garage (the store the farm is measured and
/// soak-tested on) or moto (a second implementation, see [`crate::moto`]).
pub enum StoreServer {
    /// A single-node Garage.
    Garage(Garage),
    /// A `moto_server`.
    Moto(Moto),
    /// An `azurite-blob` (the farm on `service = "azure"`).
    Azurite(Azurite),
}

impl StoreServer {
    /// Object-store settings for the server's bucket under `prefix`.
    pub fn object_store_config(&self, prefix: &str) -> ObjectStoreConfig {
        match self {
            StoreServer::Garage(g) => g.object_store_config(prefix),
            StoreServer::Moto(m) => m.object_store_config(prefix),
            StoreServer::Azurite(a) => a.object_store_config(prefix),
        }
    }

    /// The S3 API's address (Azurite's blob API).
    pub fn s3_addr(&self) -> std::net::SocketAddr {
        match self {
            StoreServer::Garage(g) => g.s3_addr(),
            StoreServer::Moto(m) => m.s3_addr(),
            StoreServer::Azurite(a) => a.addr(),
        }
    }

    /// Multipart uploads begun and neither completed nor aborted in the bucket; always 0 on
    /// Azurite, where an upload is a blob's uncommitted blocks, which no call drops (the
    /// blob's next commit does, or Azure after 7 days): a test of them is S3's.
    pub fn unfinished_uploads(&self) -> u64 {
        match self {
            StoreServer::Garage(g) => g.unfinished_uploads(),
            StoreServer::Moto(m) => m.unfinished_uploads(),
            StoreServer::Azurite(_) => 0,
        }
    }
}

/// PostgreSQL (the test binary's shared cluster, a fresh database) and a store of either
/// kind, for a test that runs on Garage and again on moto.
pub struct StoreServers {
    /// The cluster (shared by the test binary); keep it alive for the test.
    pub pg: Arc<PgCluster>,
    /// A new database on it, as a connection URL.
    pub postgres_url: String,
    /// The store.
    pub store: StoreServer,
}

impl StoreServers {
    /// PostgreSQL and a single-node Garage ([`FarmServers::start`]); `None` after printing
    /// why when either cannot run.
    pub async fn garage() -> Option<StoreServers> {
        let FarmServers {
            pg,
            postgres_url,
            garage,
        } = FarmServers::start().await?;
        Some(StoreServers {
            pg,
            postgres_url,
            store: StoreServer::Garage(garage),
        })
    }

    /// PostgreSQL and moto; `None` after printing why when either cannot run.
    pub async fn moto() -> Option<StoreServers> {
        Self::with_store(|| Moto::start().map(StoreServer::Moto)).await
    }

    /// PostgreSQL and Azurite (the farm on `service = "azure"`); `None` after printing why
    /// when either cannot run.
    pub async fn azurite() -> Option<StoreServers> {
        Self::with_store(|| Azurite::start().map(StoreServer::Azurite)).await
    }

    /// PostgreSQL (the test binary's shared cluster, a fresh database) and the store `start`
    /// starts (a blocking call).
    async fn with_store(
        start: impl FnOnce() -> Option<StoreServer> + Send + 'static,
    ) -> Option<StoreServers> {
        let pg = start_postgres(PgCluster::shared).await?;
        let store = tokio::task::spawn_blocking(start)
            .await
            .expect("store start task")?;
        let postgres_url = fresh_database(&pg).await;
        Some(StoreServers {
            pg,
            postgres_url,
            store,
        })
    }
}

impl Garage {
    /// Object-store settings for this node's bucket under `prefix` (timeouts and retries at
    /// their defaults).
    pub fn object_store_config(&self, prefix: &str) -> ObjectStoreConfig {
        ObjectStoreConfig {
            bucket: self.bucket().to_owned(),
            prefix: prefix.into(),
            endpoint: Some(self.endpoint()),
            region: Some(self.access().region.clone()),
            access_key_id: Some(self.access_key().to_owned()),
            secret_access_key: Some(self.secret_key().to_owned()),
            ..ObjectStoreConfig::default()
        }
    }
}

impl crate::garage::GarageCluster {
    /// Object-store settings for the cluster's bucket through node `i`'s S3 API under
    /// `prefix` (timeouts and retries at their defaults).
    pub fn object_store_config(&self, i: usize, prefix: &str) -> ObjectStoreConfig {
        let access = self.access();
        ObjectStoreConfig {
            bucket: access.bucket.clone(),
            prefix: prefix.into(),
            endpoint: Some(self.endpoint(i)),
            region: Some(access.region.clone()),
            access_key_id: Some(access.access_key.clone()),
            secret_access_key: Some(access.secret_key.clone()),
            ..ObjectStoreConfig::default()
        }
    }
}

/// The shared backend's settings the farm tests run a node with: `postgres_url` and `store`,
/// a pool of 4 PostgreSQL connections and a 5 s call timeout (change a field for a test of
/// its own, e.g. a shorter timeout for an outage).
pub fn shared_storage(postgres_url: &str, store: &ObjectStoreConfig) -> bitsd::SharedStorage {
    bitsd::SharedStorage {
        postgres_url: postgres_url.to_owned(),
        postgres_max_connections: 4,
        postgres_timeout: std::time::Duration::from_secs(5),
        postgres_open_commit: std::time::Duration::from_secs(60),
        object_store: store.clone(),
    }
}

/// `n` in-process bitsd nodes of one farm, each on [`shared_storage`] of `postgres_url` and
/// `store`.
pub async fn shared_nodes(
    postgres_url: &str,
    store: &ObjectStoreConfig,
    n: usize,
) -> Vec<crate::TestServer> {
    let shared = shared_storage(postgres_url, store);
    let mut nodes = Vec::with_capacity(n);
    for _ in 0..n {
        let s = shared.clone();
        nodes.push(
            crate::TestServer::start_with(move |c| {
                c.storage = bitsd::StorageConfig::Shared(Box::new(s))
            })
            .await,
        );
    }
    nodes
}

/// In-process nodes of one farm on [`FarmServers`] (one database, one bucket), and the
/// bucket to look inside.
pub struct Farm {
    /// The nodes, each on [`shared_storage`].
    pub nodes: Vec<crate::TestServer>,
    /// The farm's bucket under its prefix.
    pub objects: Objects,
    /// PostgreSQL and Garage, kept alive for the test.
    pub servers: FarmServers,
}

impl Farm {
    /// `n` nodes whose objects go under `prefix`; `adjust(i, config)` changes node `i`'s
    /// config after its storage is set (routes of its own, say). `None` after printing why
    /// when PostgreSQL or Garage is not installed.
    pub async fn start(
        prefix: &str,
        n: usize,
        adjust: impl Fn(usize, &mut bitsd::ServerConfig),
    ) -> Option<Farm> {
        let servers = FarmServers::start().await?;
        let store = servers.garage.object_store_config(prefix);
        let shared = shared_storage(&servers.postgres_url, &store);
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let s = shared.clone();
            let adjust = &adjust;
            nodes.push(
                crate::TestServer::start_with(move |c| {
                    c.storage = bitsd::StorageConfig::Shared(Box::new(s));
                    adjust(i, c);
                })
                .await,
            );
        }
        let objects = Objects::new(&store).expect("the test store's config");
        Some(Farm {
            nodes,
            objects,
            servers,
        })
    }
}
