//! The farm on Azure Blob Storage (`[object_store] service = "azure"`), with the real binary,
//! real PostgreSQL and Azurite (Azure's emulator, which checks every request's Shared Key
//! signature): a node starts on a container, takes an upload whose file lands in the
//! container, says it is ready; a wrong account key stops it at start, as a wrong S3 secret
//! does; and a table that asks for what only S3 has is refused at start, saying which key to
//! remove. The protocol suite, assemblies, resumed assemblies, listings and racing writers on
//! Azure are in the files of each (`*_on_azure_blob_storage`). Skips with a printed reason
//! when PostgreSQL or Azurite is not installed.
#![allow(clippy::unwrap_used)]

use bitsd::storage::shared::objects::{ObjectStoreConfig, Objects};
use bitsd_tests::farm_cluster::{refused_start, write_shared_config};
use bitsd_tests::farm_servers::{shared_nodes, StoreServers};
use bitsd_tests::shared_backend::{read_object, two_sessions_race_for_one_destination};
use bitsd_tests::{pattern, BitsdProcess, RawClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_an_azure_container_takes_an_upload_and_refuses_s3_only_settings() {
    let Some(servers) = StoreServers::azurite().await else {
        return;
    };
    let url = servers.postgres_url.clone();
    let store = servers.store.object_store_config("bin");
    let dir = tempfile::tempdir().unwrap();

    // A node on the container: an upload of two fragments, published in the container.
    let config = write_shared_config(dir.path(), "azure", &url, &store);
    let shown = bitsd_tests::check_config_ok(&config);
    assert!(
        shown.contains(&format!(
            "Azure container bitsd-test, prefix bin at {})",
            store.endpoint.as_deref().unwrap()
        )),
        "{shown}"
    );
    // Without an endpoint: the account's URL, not "from the environment".
    let account_only = ObjectStoreConfig {
        endpoint: None,
        ..store.clone()
    };
    let config_account = write_shared_config(dir.path(), "account-only", &url, &account_only);
    let shown = bitsd_tests::check_config_ok(&config_account);
    assert!(
        shown.contains("at https://devstoreaccount1.blob.core.windows.net)"),
        "{shown}"
    );
    // An endpoint from the environment is where the client goes: shown, and said so.
    let shown = bitsd_tests::check_config_ok_with_env(
        &config_account,
        &[(
            "AZURE_STORAGE_ENDPOINT",
            "http://127.0.0.1:9/devstoreaccount1",
        )],
    );
    assert!(
        shown.contains("at http://127.0.0.1:9/devstoreaccount1 (from the environment))"),
        "{shown}"
    );
    let data_dir = dir.path().join("node");
    let node = tokio::task::spawn_blocking(move || {
        BitsdProcess::start(
            &data_dir,
            &[
                "--config",
                config.to_str().unwrap(),
                "--admin-listen",
                "127.0.0.1:0",
            ],
        )
    })
    .await
    .unwrap();
    let admin = node.admin_addr.unwrap();
    let ready = RawClient::connect(admin)
        .await
        .get("GET", "/readyz", &[])
        .await;
    assert_eq!(ready.status, 200, "{ready:?}");
    let data = pattern(300_000, 11);
    let mut c = RawClient::connect(node.addr).await;
    let path = "/upload/azure/one.bin";
    let sid = c.create_session(path).await;
    let first = c.fragment(path, &sid, &data, 0, 200_000).await;
    assert_eq!(first.status, 200, "{first:?}");
    let last = c.fragment(path, &sid, &data, 200_000, 100_000).await;
    assert_eq!(last.status, 200, "{last:?}");
    assert_eq!(c.close_session(path, &sid).await.status, 200);
    let objects = Objects::new(&store).unwrap();
    let file = read_object(&objects, &objects.file_key("azure/one.bin")).await;
    assert!(file == data, "the file in the container is not the upload");
    drop(node);

    // The endpoint from the environment alone (plain http://, as Azurite's): the node
    // reaches the container there (plain HTTP allowed for it, as for one the table names).
    let env_endpoint = format!(
        "AZURE_STORAGE_ENDPOINT={}",
        store.endpoint.as_deref().unwrap()
    );
    let data_dir = dir.path().join("node-env");
    let node = tokio::task::spawn_blocking(move || {
        BitsdProcess::start_wrapped(
            &["env", &env_endpoint],
            &data_dir,
            &["--config", config_account.to_str().unwrap()],
            None,
        )
    })
    .await
    .unwrap();
    let ready = RawClient::connect(node.admin_addr.unwrap())
        .await
        .get("GET", "/readyz", &[])
        .await;
    assert_eq!(ready.status, 200, "{ready:?}");
    drop(node);

    // Settings a node cannot start with: a wrong account key (asked of the store at start),
    // and what only S3 has.
    let cases: [(&str, ObjectStoreConfig, &str); 4] = [
        (
            "wrong-key",
            ObjectStoreConfig {
                secret_access_key: Some(base64_of(&[7u8; 64])),
                max_retries: Some(0),
                ..store.clone()
            },
            "check the [object_store] bucket and credentials",
        ),
        (
            "region",
            ObjectStoreConfig {
                region: Some("us-east-1".into()),
                ..store.clone()
            },
            "[object_store] region is for S3 stores, not for service = \"azure\"",
        ),
        (
            "access-key-id",
            ObjectStoreConfig {
                access_key_id: Some("AKIA0000".into()),
                ..store.clone()
            },
            "the storage account goes in account",
        ),
        (
            "account-on-s3",
            ObjectStoreConfig {
                service: Default::default(),
                ..store.clone()
            },
            "[object_store] account is for service = \"azure\"",
        ),
    ];
    for (name, store, expected) in cases {
        let (dir, url) = (dir.path().to_owned(), url.clone());
        let stderr = tokio::task::spawn_blocking(move || refused_start(&dir, name, &url, &store))
            .await
            .unwrap();
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }
}

/// Two sessions racing for one destination on two nodes, their uploads large enough to be
/// assembled as block lists of the same blob (11 MiB in 1 MiB fragments, 5 MiB parts):
/// exactly one publishes, and the blob holds the winner's bytes. (Azure keeps uncommitted
/// blocks by the blob's name, so two assemblies of one destination at once would commit or
/// drop each other's blocks; the publish marker lets only one session assemble it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_completing_one_destination_on_azure_publish_it_once() {
    let Some(servers) = StoreServers::azurite().await else {
        return;
    };
    let store = ObjectStoreConfig {
        part_size: Some(5 << 20),
        ..servers.store.object_store_config("race")
    };
    let nodes = shared_nodes(&servers.postgres_url, &store, 2).await;
    let objects = Objects::new(&store).unwrap();
    two_sessions_race_for_one_destination(&nodes, &objects, 1 << 20, 11).await;
}

/// Standard base64 of `bytes` (an account key is 64 bytes so encoded).
fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
