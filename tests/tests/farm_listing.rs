//! Listings and deletes longer than one page of the S3 API: 2,500 objects under one
//! session's prefix are listed whole (ListObjectsV2 answers at most 1,000 keys a page, so
//! three pages, also as the sweeper's stream) and deleted whole (DeleteObjects takes at most
//! 1,000 keys a request), on Garage and on moto (a second S3 implementation). What a purge of
//! a session with many fragment objects, or a sweep of a large bucket, relies on. Skips with
//! a printed reason when Garage (moto) is not installed.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use bitsd_protocol::SessionId;
use bitsd_storage::shared::objects::{ObjectStoreConfig, Objects};
use bitsd_storage::StorageError;
use bitsd_tests::azurite::Azurite;
use bitsd_tests::garage::Garage;
use bitsd_tests::moto::Moto;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};

/// More than two pages of keys.
const OBJECTS: u64 = 2_500;

async fn many_objects_listed_and_deleted_whole(store: ObjectStoreConfig) {
    let objects = Objects::new(&store).unwrap();
    let session = SessionId::random();
    let keys: Vec<_> = (0..OBJECTS)
        .map(|i| objects.fragment_key(&session, i * 10))
        .collect();
    futures_util::stream::iter(keys.clone())
        .map(|key| {
            let objects = &objects;
            async move {
                let body = Bytes::copy_from_slice(key.as_str().as_bytes());
                objects
                    .put_stream(
                        key,
                        futures_util::stream::iter([Ok::<_, StorageError>(body)]),
                    )
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let prefix = objects.session_prefix(&session);
    let want: BTreeSet<String> = keys.iter().map(|k| k.to_string()).collect();
    let listed: BTreeSet<String> = objects
        .list(&prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key.to_string())
        .collect();
    assert_eq!(
        listed.len() as u64,
        OBJECTS,
        "the listing stopped at a page"
    );
    assert_eq!(listed, want);
    let streamed: Vec<_> = objects.list_stream(&prefix).try_collect().await.unwrap();
    assert_eq!(
        streamed.len() as u64,
        OBJECTS,
        "the listing stream stopped at a page"
    );

    objects.delete(&keys).await.unwrap();
    let left = objects.list(&prefix).await.unwrap();
    assert!(
        left.is_empty(),
        "{} of {OBJECTS} objects left after the delete",
        left.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_a_page_of_objects_is_listed_and_deleted_whole() {
    let Some(garage) = tokio::task::spawn_blocking(Garage::start).await.unwrap() else {
        return;
    };
    many_objects_listed_and_deleted_whole(garage.object_store_config("listing")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_a_page_of_objects_is_listed_and_deleted_whole_on_a_second_s3_implementation() {
    let Some(moto) = tokio::task::spawn_blocking(Moto::start).await.unwrap() else {
        return;
    };
    many_objects_listed_and_deleted_whole(moto.object_store_config("listing")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_a_page_of_objects_is_listed_and_deleted_whole_on_azure_blob_storage() {
    let Some(azurite) = tokio::task::spawn_blocking(Azurite::start).await.unwrap() else {
        return;
    };
    many_objects_listed_and_deleted_whole(azurite.object_store_config("listing")).await;
}
