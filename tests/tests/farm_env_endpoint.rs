//! The object store's endpoint from `AWS_ENDPOINT_URL` instead of `[object_store] endpoint`:
//! a plain `http://` one is allowed as it is when set in the config (before, every request
//! of the ordinary S3 client failed with "URL scheme is not allowed" unless `allow_http` was
//! set, while streamed fragments went through). One test in a binary of its own, because it
//! sets a process-wide environment variable. Skips with a printed reason when Garage is not
//! installed.
#![allow(clippy::unwrap_used)]

use bitsd_storage::shared::objects::{ObjectStoreConfig, Objects};
use bitsd_tests::garage::Garage;
use bitsd_tests::pattern;
use bitsd_tests::shared_backend::read_object;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_endpoint_from_aws_endpoint_url_is_allowed() {
    let Some(garage) = Garage::start() else {
        return;
    };
    let access = garage.access();
    // The only test of this binary: nothing else reads the environment meanwhile.
    std::env::set_var("AWS_ENDPOINT_URL", garage.endpoint());
    let config = ObjectStoreConfig {
        bucket: access.bucket.clone(),
        prefix: "env-endpoint".into(),
        region: Some(access.region.clone()),
        access_key_id: Some(access.access_key.clone()),
        secret_access_key: Some(access.secret_key.clone()),
        ..ObjectStoreConfig::default()
    };
    let objects = Objects::new(&config).unwrap();
    let data = pattern(100_000, 3);
    let key = objects.prefix().join("object");
    let mut writer = objects.writer(key.clone());
    writer.write(&data).await.unwrap();
    writer.finish().await.unwrap();
    assert_eq!(read_object(&objects, &key).await, data);
}
