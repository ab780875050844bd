//! Assembly of a finished upload from its fragment objects with server-side part copies
//! (`UploadPartCopy`), against a real Garage: byte-exact for every shape (large fragments
//! copied, runs of small ones streamed as parts, a large fragment lending its first bytes to
//! the part before it), the bytes that pass through the node counted, the same shapes
//! streamed when the switch is off or the store refuses part copies (nginx in front of Garage
//! answering them 501), and a failed copy leaving no object and no unfinished upload; the
//! shapes again on moto, a second S3 implementation. Skips with a printed reason when Garage
//! (nginx, moto) is not installed.
#![allow(clippy::unwrap_used)]

use bitsd_protocol::SessionId;
use bitsd_storage::shared::objects::{FragmentObject, ObjectStoreConfig, Objects};
use bitsd_storage::StorageError;
use bitsd_tests::azurite::Azurite;
use bitsd_tests::garage::Garage;
use bitsd_tests::moto::Moto;
use bitsd_tests::nginx::Nginx;
use bitsd_tests::pattern;
use bitsd_tests::shared_backend::read_object;
use bytes::Bytes;
use futures_util::StreamExt;

const MIB: usize = 1024 * 1024;

/// Garage's bucket under `assembly/`, 8 MiB parts, part copies on or off, through `endpoint`.
fn config(garage: &Garage, endpoint: String, copies: bool) -> ObjectStoreConfig {
    ObjectStoreConfig {
        endpoint: Some(endpoint),
        ..parts_of(garage.object_store_config("assembly"), copies)
    }
}

/// `store` with 8 MiB parts and part copies on or off.
fn parts_of(store: ObjectStoreConfig, copies: bool) -> ObjectStoreConfig {
    ObjectStoreConfig {
        part_size: Some(8 * MIB as u64),
        server_side_copy: Some(copies),
        ..store
    }
}

/// Puts `sizes` as consecutive fragment objects of one new session (8 PUTs at once).
async fn put_fragments(
    objects: &Objects,
    sizes: &[usize],
    seed: u64,
) -> (Vec<FragmentObject>, Vec<u8>) {
    let session = SessionId::random();
    let data = pattern(sizes.iter().sum(), seed);
    let mut jobs = Vec::new();
    let mut offset = 0;
    for &size in sizes {
        let key = objects.fragment_key(&session, offset as u64);
        jobs.push((offset, size, key));
        offset += size;
    }
    let data_ref = &data;
    let fragments = futures_util::stream::iter(jobs)
        .map(|(offset, size, key)| async move {
            let bytes = Bytes::copy_from_slice(&data_ref[offset..offset + size]);
            let stored = objects
                .put_stream(
                    key.clone(),
                    futures_util::stream::iter([Ok::<_, StorageError>(bytes)]),
                )
                .await
                .unwrap();
            assert_eq!(stored.len, size as u64);
            FragmentObject {
                offset: offset as u64,
                len: size as u64,
                key,
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    (fragments, data)
}

/// The shapes every test assembles: (name, fragment sizes, bytes the store should copy when
/// part copies work).
fn shapes() -> Vec<(&'static str, Vec<usize>, usize)> {
    vec![
        // 64 MiB in 8 MiB fragments: every byte copied by the store.
        ("eight-8mib", vec![8 * MIB; 8], 64 * MIB),
        // Small ones, a 16 MiB one lending them 5 MiB - 250 KB, small ones taking the last
        // 5 MiB - 100 KB of that 16 MiB copy (the 8 MiB one after them would keep too little
        // to be copied if it lent them its first bytes), the 8 MiB one copied whole, a tail.
        (
            "mixed",
            [
                vec![5_000; 50],
                vec![16 * MIB],
                vec![5_000; 20],
                vec![8 * MIB],
                vec![MIB],
            ]
            .concat(),
            16 * MIB - (5 * MIB - 250_000) - (5 * MIB - 100_000) + 8 * MIB,
        ),
        // Just over 5 MiB: 2 MiB, then 11 MiB of which 3 MiB are lent.
        ("lend", vec![2 * MIB, 11 * MIB], 8 * MIB),
        // Exactly 5 MiB copied, then a 3-byte last part.
        ("five-and-three", vec![5 * MIB, 3], 5 * MIB),
        // Small fragments only (nothing to copy: streamed).
        ("small-only", vec![700_000; 12], 0),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_fragments_are_copied_by_the_store_and_every_shape_is_byte_exact() {
    let Some(garage) = Garage::start() else {
        return;
    };
    every_shape_copied_and_streamed(&garage.object_store_config("assembly")).await;
    assert_eq!(garage.unfinished_uploads(), 0);
}

/// The same shapes on moto, a second S3 implementation (its own ETags and its own
/// `UploadPartCopy`): the assembly keeps to what S3 promises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shape_is_byte_exact_on_a_second_s3_implementation() {
    let Some(moto) = tokio::task::spawn_blocking(Moto::start).await.unwrap() else {
        return;
    };
    every_shape_copied_and_streamed(&moto.object_store_config("assembly")).await;
}

/// The shapes on Azurite (`service = "azure"`): no part copies there, every shape streamed
/// as a blob's blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shape_is_byte_exact_on_azure_blob_storage() {
    let Some(azurite) = tokio::task::spawn_blocking(Azurite::start).await.unwrap() else {
        return;
    };
    every_shape_streamed(&azurite.object_store_config("assembly")).await;
}

/// Every shape of [`shapes`] assembled on `store` with part copies (the store copies what
/// it should) and without (every byte through the node), each read back byte for byte.
async fn every_shape_copied_and_streamed(store: &ObjectStoreConfig) {
    let with = Objects::new(&parts_of(store.clone(), true)).unwrap();
    let without = Objects::new(&parts_of(store.clone(), false)).unwrap();
    for (name, sizes, copies) in shapes() {
        let (fragments, data) = put_fragments(&with, &sizes, 3).await;
        let total = data.len() as u64;
        // With part copies: only the small fragments' bytes pass through the node.
        let dest = with.file_key(&format!("copied/{name}.bin"));
        let assembled = with.assemble(&dest, &fragments, total).await.unwrap();
        assert_eq!(assembled.len, total, "{name}");
        assert_eq!(assembled.copied_bytes, copies as u64, "{name}");
        assert!(
            read_object(&with, &dest).await == data,
            "{name}: copied bytes differ"
        );
        println!(
            "{name}: {total} bytes, {} copied by the store, {} through the node, {} requests",
            assembled.copied_bytes,
            total - assembled.copied_bytes,
            assembled.requests
        );
        // The switch off: every byte through the node, the same result.
        streamed_byte_exact(&without, name, &fragments, &data).await;
    }
}

/// Every shape of [`shapes`] assembled on `store` without part copies, read back byte for
/// byte: what a store without `UploadPartCopy` does (Azure Blob Storage).
async fn every_shape_streamed(store: &ObjectStoreConfig) {
    let objects = Objects::new(&parts_of(store.clone(), false)).unwrap();
    for (name, sizes, _) in shapes() {
        let (fragments, data) = put_fragments(&objects, &sizes, 3).await;
        streamed_byte_exact(&objects, name, &fragments, &data).await;
    }
}

/// `fragments` (holding `data`) assembled by `objects`, which copies no part: every byte
/// through the node, the object read back byte for byte.
async fn streamed_byte_exact(
    objects: &Objects,
    name: &str,
    fragments: &[FragmentObject],
    data: &[u8],
) {
    let total = data.len() as u64;
    let dest = objects.file_key(&format!("streamed/{name}.bin"));
    let assembled = objects.assemble(&dest, fragments, total).await.unwrap();
    assert_eq!(assembled.copied_bytes, 0, "{name}");
    // A multipart upload is made of parts a later attempt may go on with: no CRC of the
    // whole.
    let one_put = total < objects.part_size() as u64;
    let crc = one_put.then(|| crc32c::crc32c(data));
    assert_eq!(assembled.crc32c, crc, "{name}");
    assert!(
        read_object(objects, &dest).await == data,
        "{name}: streamed bytes differ"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_part_copy_leaves_no_object_and_no_unfinished_upload() {
    let Some(garage) = Garage::start() else {
        return;
    };
    let objects = Objects::new(&config(&garage, garage.endpoint(), true)).unwrap();
    let (fragments, _) = put_fragments(&objects, &[MIB, 8 * MIB, 8 * MIB, 500], 4).await;
    // The second large fragment's object is gone (say, deleted by hand): its copy fails.
    let gone = fragments
        .iter()
        .find(|f| f.offset == 9 * MIB as u64)
        .unwrap();
    objects
        .delete(std::slice::from_ref(&gone.key))
        .await
        .unwrap();
    let dest = objects.file_key("failed/copy.bin");
    let failed = objects
        .assemble(&dest, &fragments, (17 * MIB + 500) as u64)
        .await;
    assert!(failed.is_err(), "{failed:?}");
    assert!(
        matches!(
            objects.head(&dest).await,
            Err(StorageError::ObjectNotFound { .. })
        ),
        "nothing at the destination"
    );
    assert_eq!(
        garage.unfinished_uploads(),
        0,
        "the multipart upload was aborted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_refuses_part_copies_gets_the_upload_streamed() {
    let Some(garage) = Garage::start() else {
        return;
    };
    let Some(nginx) = Nginx::start_refusing_part_copies(&[garage.s3_addr()]) else {
        return;
    };
    let objects = Objects::new(&config(&garage, nginx.url(), true)).unwrap();
    for (name, sizes, _) in shapes() {
        let (fragments, data) = put_fragments(&objects, &sizes, 5).await;
        let dest = objects.file_key(&format!("refused/{name}.bin"));
        let assembled = objects
            .assemble(&dest, &fragments, data.len() as u64)
            .await
            .unwrap();
        let single_copy = sizes.len() == 1;
        if !single_copy {
            assert_eq!(
                assembled.copied_bytes, 0,
                "{name}: streamed after the refusal"
            );
        }
        assert!(read_object(&objects, &dest).await == data, "{name}");
    }
    assert!(
        nginx.access_log().contains("status=501"),
        "the refusal was seen: {}",
        nginx.access_log()
    );
    assert_eq!(garage.unfinished_uploads(), 0);
}
