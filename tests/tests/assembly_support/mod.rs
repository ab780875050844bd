//! What the assembly tests share (`farm_resumed_assembly.rs`, `farm_assembly_lease.rs`): two
//! shared backends on one real PostgreSQL and one real Garage (or moto), each talking to the
//! store through a relay, and an upload of [`TOTAL`] bytes completed on one of them.

use std::sync::Arc;
use std::time::Duration;

use bitsd_protocol::SessionId;
use bitsd_storage::shared::objects::{ObjectKey, ObjectStoreConfig};
use bitsd_storage::shared::SharedBackend;
use bitsd_storage::{ReplyKind, SessionBackend, SessionState};
use bitsd_tests::farm_servers::{StoreServer, StoreServers};
use bitsd_tests::pg::PgCluster;
use bitsd_tests::pg::{raw_client, session_record};
use bitsd_tests::relay::Relay;
use bitsd_tests::shared_backend::{backend_on, send};
use bitsd_tests::{pattern, until};

pub const MIB: usize = 1024 * 1024;

/// 21 MiB in 1 MiB fragments with 5 MiB parts: nothing to copy, five streamed parts
/// (5, 5, 5, 5, 1 MiB), two sent at once.
pub const TOTAL: usize = 21 * MIB;

pub struct Setup {
    _pg: Arc<PgCluster>,
    pub postgres_url: String,
    /// The store: Garage, or moto for a test against a second S3 implementation.
    pub store: StoreServer,
    scratch: tempfile::TempDir,
}

impl Setup {
    /// PostgreSQL and Garage.
    pub async fn start() -> Option<Setup> {
        Some(Setup::on(StoreServers::garage().await?))
    }

    /// PostgreSQL and moto.
    #[allow(dead_code)] // not every test binary that shares this module uses it
    pub async fn start_moto() -> Option<Setup> {
        Some(Setup::on(StoreServers::moto().await?))
    }

    /// PostgreSQL and Azurite.
    #[allow(dead_code)] // not every test binary that shares this module uses it
    pub async fn start_azurite() -> Option<Setup> {
        Some(Setup::on(StoreServers::azurite().await?))
    }

    fn on(servers: StoreServers) -> Setup {
        Setup {
            _pg: servers.pg,
            postgres_url: servers.postgres_url,
            store: servers.store,
            scratch: tempfile::tempdir().unwrap(),
        }
    }

    /// A node whose store requests go through a relay of its own to Garage, and that relay
    /// (kept for as long as the node is used).
    pub async fn relayed_node(&self, name: &str) -> (SharedBackend, Relay) {
        let relay = Relay::start(self.store.s3_addr()).await;
        (self.node(&relay, name).await, relay)
    }

    /// A node whose store requests go through `relay`.
    pub async fn node(&self, relay: &Relay, name: &str) -> SharedBackend {
        self.node_with(relay, name, |_| {}).await
    }

    /// As [`Setup::node`], its store settings changed by `configure`.
    pub async fn node_with(
        &self,
        relay: &Relay,
        name: &str,
        configure: impl FnOnce(&mut ObjectStoreConfig),
    ) -> SharedBackend {
        let mut store: ObjectStoreConfig = self.store.object_store_config("resume");
        // The relay's address in place of the store's (Azurite's endpoint goes on with the
        // account's path).
        let path = store
            .endpoint
            .as_deref()
            .and_then(|e| e.splitn(4, '/').nth(3))
            .unwrap_or_default();
        store.endpoint = Some(format!("http://{}/{path}", relay.addr()));
        store.part_size = Some(5 * MIB as u64);
        store.coalesce_fragments = Some(false);
        store.server_side_copy = Some(false);
        configure(&mut store);
        let scratch = self.scratch.path().join(name);
        std::fs::create_dir_all(&scratch).unwrap();
        backend_on(&self.postgres_url, &store, &scratch).await
    }

    pub async fn count(&self, sql: &str) -> i64 {
        raw_client(&self.postgres_url)
            .await
            .query_one(sql, &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Waits (up to 60 s) until at least `n` parts are recorded.
    pub async fn until_parts_recorded(&self, n: i64) {
        until("parts are recorded", Duration::from_secs(60), || async {
            self.count("SELECT count(*) FROM bitsd_assembly_parts")
                .await
                >= n
        })
        .await;
    }

    /// Checks that no journal is left and waits (up to 20 s) until the store has no
    /// unfinished upload.
    pub async fn assert_nothing_left(&self, context: &str) {
        assert_eq!(
            self.count("SELECT count(*) FROM bitsd_assemblies").await,
            0,
            "{context}: a journal is left"
        );
        until("no unfinished upload", Duration::from_secs(20), || async {
            self.store.unfinished_uploads() == 0
        })
        .await;
    }
}

/// What differs between the stores' requests (S3's multipart calls, Azure's block lists),
/// for the tests that stop or count an assembly's requests.
#[allow(dead_code)] // not every test binary that shares this module uses it
impl Setup {
    /// Whether the store is Azurite (`service = "azure"`).
    pub fn on_azure(&self) -> bool {
        matches!(self.store, StoreServer::Azurite(_))
    }

    /// Stops, before the store sees it, the request of part `n` (1-based) of the next
    /// assembly through `relay`: S3's `partNumber=n`; on Azure, whose blocks have random ids,
    /// the `n`-th block sent from now on (an assembly starts its parts in order).
    pub fn stop_part(&self, relay: &Relay, n: usize) {
        if self.on_azure() {
            relay.stop_request_to_nth(n, &["PUT ", "comp=block&"]);
        } else {
            relay.stop_request_to(&["PUT ", &format!("partNumber={n}&")]);
        }
    }

    /// What the request that completes a multipart upload contains: S3's
    /// `POST ...?uploadId=`, Azure's `PUT ...?comp=blocklist`.
    pub fn completion_request(&self) -> &'static [&'static str] {
        if self.on_azure() {
            &["PUT ", "comp=blocklist"]
        } else {
            &["POST ", "uploadId="]
        }
    }

    /// Watches the parts sent through `relay` from now on, for
    /// [`Setup::assert_only_unrecorded_parts_sent`]: on S3 part 1's request is stopped (an
    /// attempt that sends it again then waits for its timeout), on Azure block requests are
    /// counted.
    pub fn watch_parts(&self, relay: &Relay) {
        if self.on_azure() {
            relay.count_requests_to(&["PUT ", "comp=block&"]);
        } else {
            relay.stop_request_to(&["PUT ", "partNumber=1&"]);
        }
    }

    /// Checks that the attempt through `relay` ([`Setup::watch_parts`]) sent no recorded
    /// part again: part 1 not sent (S3), or exactly the `unrecorded` parts sent (Azure).
    pub fn assert_only_unrecorded_parts_sent(&self, relay: &Relay, unrecorded: usize) {
        if self.on_azure() {
            assert_eq!(
                relay.counted(),
                unrecorded,
                "a recorded part was sent again"
            );
        } else {
            assert!(relay.stop_armed(), "part 1 was sent again");
        }
    }
}

/// A complete upload of [`TOTAL`] bytes (plain, to `destination`, or upload-reply) on `node`.
pub async fn complete_upload(
    node: &SharedBackend,
    destination: Option<&str>,
    seed: u64,
) -> (bitsd_storage::SessionRecord, Vec<u8>) {
    let data = pattern(TOTAL, seed);
    let mut record = session_record(None);
    record.destination = destination.map(str::to_owned);
    node.create(&record).await.unwrap();
    for _ in 0..TOTAL / MIB {
        send(node, &mut record, &data, MIB).await;
    }
    assert_eq!(record.state, SessionState::Complete);
    (record, data)
}

/// The key of `reply`, a reply of session `id` stored by `node` as an object of [`TOTAL`]
/// bytes (anything else fails the test).
pub fn stored_reply_key(node: &SharedBackend, id: &SessionId, reply: ReplyKind) -> ObjectKey {
    let ReplyKind::Stored {
        len,
        object: Some(name),
        ..
    } = reply
    else {
        panic!("not a stored reply: {reply:?}");
    };
    assert_eq!(len, TOTAL as u64);
    node.objects().session_prefix(id).join(&name)
}

/// Records `kind` as the reply of session `id` on `node`, as the server does once it has
/// stored a reply: the record names it and the session is `ReplyReady`.
pub async fn record_reply(node: &SharedBackend, id: &SessionId, kind: &ReplyKind) {
    let mut record = node.load(id).await.unwrap().unwrap();
    record.reply = Some(bitsd_storage::ReplyRecord {
        url: format!("http://node/reply/{}", id.simple()),
        kind: kind.clone(),
        created_ms: bitsd_storage::now_millis(),
        delivered: bitsd_storage::ByteRanges::new(),
    });
    record.state = SessionState::ReplyReady;
    record.touch();
    node.save(&record).await.unwrap();
}
