//! The farm's object-store component against a real Garage (single node and a three-node,
//! replication-3 cluster, also behind the nginx balancer). Each test skips with a printed
//! reason when Garage (or nginx) is not installed (`.ci/run` installs both).
#![allow(clippy::unwrap_used)]

use bitsd_protocol::SessionId;
use bitsd_storage::shared::objects::{FragmentObject, ObjectKey, ObjectStoreConfig, Objects};
use bitsd_storage::StorageError;
use bitsd_tests::garage::{Garage, GarageCluster, S3Access};
use bitsd_tests::nginx::Nginx;
use bitsd_tests::pattern;
use bitsd_tests::shared_backend::read_object;
use bytes::Bytes;
use futures_util::StreamExt;

const MIB: usize = 1024 * 1024;

fn config(endpoint: String, access: &S3Access, part_size: usize) -> ObjectStoreConfig {
    ObjectStoreConfig {
        bucket: access.bucket.clone(),
        prefix: "farm-test".into(),
        endpoint: Some(endpoint),
        region: Some(access.region.clone()),
        access_key_id: Some(access.access_key.clone()),
        secret_access_key: Some(access.secret_key.clone()),
        part_size: Some(part_size as u64),
        ..ObjectStoreConfig::default()
    }
}

/// `data` as body frames of changing sizes (tiny, odd and large), like socket reads.
fn frames(data: &[u8]) -> Vec<Result<Bytes, StorageError>> {
    let sizes = [1000, 70_000, 17, 300_000, 4096, 1 << 20];
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < data.len() {
        let n = sizes[i % sizes.len()].min(data.len() - at);
        out.push(Ok(Bytes::copy_from_slice(&data[at..at + n])));
        at += n;
        i += 1;
    }
    out
}

async fn put(objects: &Objects, key: ObjectKey, data: &[u8]) -> FragmentObject {
    let stored = objects
        .put_stream(key.clone(), futures_util::stream::iter(frames(data)))
        .await
        .unwrap();
    assert_eq!(stored.len, data.len() as u64);
    assert_eq!(stored.crc32c, crc32c::crc32c(data));
    FragmentObject {
        offset: 0,
        len: data.len() as u64,
        key,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_fragment_put_and_ranged_reads_are_byte_exact() {
    let Some(garage) = Garage::start() else {
        return;
    };
    // Parts of the minimum 5 MiB: 8 MiB is a multipart upload of 5 + 3 MiB.
    let objects = Objects::new(&config(garage.endpoint(), garage.access(), 5 * MIB)).unwrap();
    let session = SessionId::random();
    for (i, size) in [5_000, 65_536, MIB + 3, 5 * MIB - 1, 5 * MIB, 8 * MIB]
        .into_iter()
        .enumerate()
    {
        let data = pattern(size, i as u64 + 1);
        let key = objects.fragment_key(&session, i as u64 * 10_000_000);
        put(&objects, key.clone(), &data).await;
        let info = objects.head(&key).await.unwrap();
        assert_eq!(info.len, size as u64, "head of {size}");
        assert!(info.e_tag.is_some());
        assert_eq!(
            read_object(&objects, &key).await,
            data,
            "whole read of {size}"
        );
        let n = size as u64;
        for range in [0..1, 0..100, n / 2..n / 2 + 4097, n - 1..n, 17..n] {
            let read = objects.read(&key, Some(range.clone())).await.unwrap();
            // A range past the end is cut at the end.
            let range = range.start..range.end.min(n);
            assert_eq!(read.range, range);
            assert_eq!(read.total, n);
            let got = read.bytes().await.unwrap();
            let want = &data[range.start as usize..range.end as usize];
            assert!(got == want, "range {range:?} of {size}");
        }
    }
    // Every fragment is under the session's prefix, in offset order; deleting the session
    // removes them all.
    let listed = objects
        .list(&objects.session_prefix(&session))
        .await
        .unwrap();
    assert_eq!(listed.len(), 6);
    let streamed: Vec<_> = objects
        .list_stream(&objects.session_prefix(&session))
        .collect()
        .await;
    assert_eq!(streamed.len(), 6);
    assert!(objects.session_ids().await.unwrap().contains(&session));
    assert_eq!(objects.delete_session(&session).await.unwrap(), 6);
    assert!(objects
        .list(&objects.session_prefix(&session))
        .await
        .unwrap()
        .is_empty());
    assert!(!objects.session_ids().await.unwrap().contains(&session));
    // A file key with characters S3 keys need encoded round-trips through the store.
    let odd = objects.file_key("inv entory/ü%25/../x.bin");
    put(&objects, odd.clone(), b"odd").await;
    let listed = objects.list(&objects.prefix().join("files")).await.unwrap();
    assert!(listed.iter().any(|o| o.key == odd), "{listed:?}");
    assert_eq!(read_object(&objects, &odd).await, b"odd");
    objects.delete(std::slice::from_ref(&odd)).await.unwrap();
    let gone = objects.fragment_key(&session, 0);
    assert!(matches!(
        objects.head(&gone).await,
        Err(StorageError::ObjectNotFound { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_unfinished_writes_leave_no_object_and_racing_writes_never_collide() {
    let Some(garage) = Garage::start() else {
        return;
    };
    let objects = Objects::new(&config(garage.endpoint(), garage.access(), 5 * MIB)).unwrap();
    let session = SessionId::random();

    // A writer that is never finished nor dropped (a node killed mid-fragment) leaves an
    // unfinished multipart upload (for the bucket's lifecycle rule), never an object.
    let leaked_key = objects.fragment_key(&session, 0);
    let mut leaked = objects.writer(leaked_key.clone());
    for frame in frames(&pattern(6 * MIB, 1)) {
        leaked.write_bytes(frame.unwrap()).await.unwrap();
    }
    std::mem::forget(leaked);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while garage.unfinished_uploads() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the unfinished upload is not counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(matches!(
        objects.head(&leaked_key).await,
        Err(StorageError::ObjectNotFound { .. })
    ));

    // A writer dropped (the client went away mid-fragment) or aborted (a failed body read)
    // after a part went out has made nothing visible, and its upload is aborted.
    for abort in [false, true] {
        let key = objects.fragment_key(&session, 0);
        let mut writer = objects.writer(key.clone());
        for frame in frames(&pattern(6 * MIB, 1)) {
            writer.write_bytes(frame.unwrap()).await.unwrap();
        }
        assert_eq!(writer.len(), 6 * MIB as u64);
        if abort {
            writer.abort().await;
        } else {
            drop(writer);
        }
        assert!(matches!(
            objects.head(&key).await,
            Err(StorageError::ObjectNotFound { .. })
        ));
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(
        garage.unfinished_uploads(),
        1,
        "only the leaked upload remains"
    );
    let err = objects
        .put_stream(
            objects.fragment_key(&session, 0),
            futures_util::stream::iter(vec![
                Ok(Bytes::from(pattern(6 * MIB, 2))),
                Err(StorageError::Task("client went away".into())),
            ]),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Task(_)));
    assert!(objects
        .list(&objects.session_prefix(&session))
        .await
        .unwrap()
        .is_empty());

    // Two nodes writing the same fragment (a client that reconnected elsewhere) write two
    // objects; neither overwrites the other, whatever the store does with conditions.
    let first = objects.fragment_key(&session, 4096);
    let second = objects.fragment_key(&session, 4096);
    assert_ne!(first, second);
    let a = pattern(10_000, 3);
    let b = pattern(10_000, 4);
    let (fa, fb) = tokio::join!(
        put(&objects, first.clone(), &a),
        put(&objects, second.clone(), &b)
    );
    assert!(read_object(&objects, &fa.key).await == a);
    assert!(read_object(&objects, &fb.key).await == b);
    // A fragment object shorter than its index entry is refused at assembly.
    let lying = FragmentObject {
        offset: 0,
        len: 10_001,
        key: first,
    };
    let rest = FragmentObject {
        offset: 10_001,
        len: 10_000,
        key: second,
    };
    let refused = objects
        .assemble(&objects.file_key("lying.bin"), &[lying, rest], 20_001)
        .await;
    assert!(
        matches!(refused, Err(StorageError::Corrupt { .. })),
        "{refused:?}"
    );
    assert!(matches!(
        objects.head(&objects.file_key("lying.bin")).await,
        Err(StorageError::ObjectNotFound { .. })
    ));
}

/// Puts `sizes` as consecutive fragments of one upload (16 PUTs at once) and returns them
/// with the upload's bytes.
async fn put_fragments(
    objects: &Objects,
    session: &SessionId,
    sizes: &[usize],
    seed: u64,
) -> (Vec<FragmentObject>, Vec<u8>) {
    let total: usize = sizes.iter().sum();
    let data = pattern(total, seed);
    let mut jobs = Vec::new();
    let mut offset = 0;
    for &size in sizes {
        let key = objects.fragment_key(session, offset as u64);
        let bytes = data[offset..offset + size].to_vec();
        jobs.push((offset as u64, key, bytes));
        offset += size;
    }
    let fragments = futures_util::stream::iter(jobs)
        .map(|(offset, key, bytes)| async move {
            let mut f = put(objects, key, &bytes).await;
            f.offset = offset;
            f
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    (fragments, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_assembles_many_small_and_mixed_fragments_byte_exact() {
    let Some(garage) = Garage::start() else {
        return;
    };
    let objects = Objects::new(&config(garage.endpoint(), garage.access(), 5 * MIB)).unwrap();

    // 300 fragments of 20 KB: coalesced into two parts (5 MiB and the rest).
    let session = SessionId::random();
    let (fragments, data) = put_fragments(&objects, &session, &[20_000; 300], 7).await;
    let dest = objects.file_key("inventory/many-small.bin");
    let started = std::time::Instant::now();
    let assembled = objects
        .assemble(&dest, &fragments, data.len() as u64)
        .await
        .unwrap();
    println!(
        "assembled 300 x 20 KB in {:?} with {} requests",
        started.elapsed(),
        assembled.requests
    );
    assert_eq!(assembled.len, data.len() as u64);
    // A multipart upload (parts a later attempt may go on with): no CRC of the whole.
    assert_eq!(assembled.crc32c, None);
    // 300 GETs, one more for the fragment across the part boundary (a range of it in each
    // part), two parts, create and complete.
    assert_eq!(assembled.requests, 300 + 1 + 2 + 2);
    assert!(read_object(&objects, &dest).await == data);
    // The same bytes straight from the fragments, for a reply handler.
    let mut stream = objects
        .read_upload(&fragments, data.len() as u64, &dest)
        .unwrap();
    let mut streamed = Vec::new();
    while let Some(chunk) = stream.next().await {
        streamed.extend_from_slice(&chunk.unwrap());
    }
    assert!(streamed == data);
    assert_eq!(objects.delete_session(&session).await.unwrap(), 300);

    // Mixed sizes from 3 bytes to 6 MiB, in shuffled order.
    let session = SessionId::random();
    let sizes = [5_000, 6 * MIB, 20_000, MIB, 5 * MIB + 7, 3, 8 * MIB];
    let (mut fragments, data) = put_fragments(&objects, &session, &sizes, 8).await;
    fragments.reverse();
    let dest = objects.file_key("dumps/mixed.bin");
    let assembled = objects
        .assemble(&dest, &fragments, data.len() as u64)
        .await
        .unwrap();
    // The last 8 MiB fragment is copied by the store (tests/tests/farm_assembly.rs has the
    // shapes of assembly with part copies); the rest is streamed through the node.
    assert!(assembled.copied_bytes >= 5 * MIB as u64, "{assembled:?}");
    assert!(read_object(&objects, &dest).await == data);

    // A gap in the index is refused, nothing is written.
    let holed: Vec<_> = fragments.iter().filter(|f| f.len != 3).cloned().collect();
    let refused = objects
        .assemble(
            &objects.file_key("dumps/holed.bin"),
            &holed,
            data.len() as u64,
        )
        .await;
    assert!(matches!(refused, Err(StorageError::Corrupt { .. })));

    // One fragment: a server-side copy.
    let session = SessionId::random();
    let (fragments, data) = put_fragments(&objects, &session, &[3 * MIB + 1], 9).await;
    let dest = objects.file_key("single.bin");
    let assembled = objects
        .assemble(&dest, &fragments, data.len() as u64)
        .await
        .unwrap();
    assert_eq!(assembled.requests, 1);
    assert!(read_object(&objects, &dest).await == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_cluster_with_a_node_killed_keeps_taking_puts_and_reads() {
    let Some(mut cluster) = tokio::task::spawn_blocking(GarageCluster::start)
        .await
        .unwrap()
    else {
        return;
    };
    let objects = Objects::new(&config(cluster.endpoint(0), cluster.access(), 5 * MIB)).unwrap();
    // The same cluster behind nginx (round robin over the three S3 APIs): requests meant for
    // the killed node go to the next one.
    let addrs = cluster.s3_addrs();
    let nginx = tokio::task::spawn_blocking(move || Nginx::start(&addrs))
        .await
        .unwrap();
    let balanced = nginx
        .as_ref()
        .map(|n| Objects::new(&config(n.url(), cluster.access(), 5 * MIB)).unwrap());
    let session = SessionId::random();
    // A writer keeps putting fragments (small ones and a multipart one) while node 2 is
    // SIGKILLed under it: two of three replicas are a write quorum, so every put succeeds.
    let (killed_tx, mut killed_rx) = tokio::sync::watch::channel(false);
    let writer = {
        let objects = objects.clone();
        let balanced = balanced.clone();
        tokio::spawn(async move {
            let mut written = Vec::new();
            let mut after_kill = 0;
            for i in 0..40u64 {
                let size = if i % 10 == 6 { 6 * MIB } else { 200_000 };
                let data = pattern(size, i);
                let via = match &balanced {
                    Some(balanced) if i % 2 == 1 => balanced,
                    _ => &objects,
                };
                let key = via.fragment_key(&session, i);
                put(via, key.clone(), &data).await;
                written.push((key, data));
                if *killed_rx.borrow_and_update() {
                    after_kill += 1;
                    if after_kill >= 8 {
                        break;
                    }
                }
            }
            assert!(after_kill >= 8, "the writer ran out before the kill");
            written
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    tokio::task::block_in_place(|| cluster.kill(2));
    killed_tx.send(true).unwrap();
    let written = writer.await.unwrap();
    if let Some(balanced) = &balanced {
        for (key, data) in &written {
            assert!(read_object(balanced, key).await == *data, "{key} via nginx");
        }
    }
    for (key, data) in &written {
        assert!(read_object(&objects, key).await == *data, "{key}");
    }
    let (fragments, upload) = put_fragments(&objects, &session, &[50_000; 20], 11).await;
    let dest = objects.file_key("cluster/assembled.bin");
    objects
        .assemble(&dest, &fragments, upload.len() as u64)
        .await
        .unwrap();
    // Back with its peers, the node serves everything through its own endpoint too.
    tokio::task::block_in_place(|| cluster.restart(2));
    let via_restarted =
        Objects::new(&config(cluster.endpoint(2), cluster.access(), 5 * MIB)).unwrap();
    assert!(read_object(&via_restarted, &dest).await == upload);
    for (key, data) in &written {
        assert!(read_object(&via_restarted, key).await == *data, "{key}");
    }

    // Two nodes down: no write quorum. The node still answers (503), and that is the
    // transient error too, not a refusal.
    tokio::task::block_in_place(|| {
        cluster.kill(1);
        cluster.kill(2);
    });
    let started = std::time::Instant::now();
    let err = objects
        .put_stream(
            objects.fragment_key(&session, 99),
            futures_util::stream::iter(frames(&pattern(1000, 99))),
        )
        .await
        .unwrap_err();
    assert!(err.is_object_store_unreachable(), "{err}");
    println!("no quorum answered in {:?}: {err}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_unreachable_is_the_transient_error() {
    // Nothing listens: every call is the transient kind, quickly (bounded retries).
    let port = bitsd_tests::garage::free_port();
    let access = S3Access {
        access_key: "GK000000000000000000000000".into(),
        secret_key: "0".repeat(64),
        bucket: "nowhere".into(),
        region: "garage".into(),
    };
    let mut cfg = config(format!("http://127.0.0.1:{port}"), &access, 5 * MIB);
    cfg.retry_timeout_secs = Some(2);
    let objects = Objects::new(&cfg).unwrap();
    let session = SessionId::random();
    let started = std::time::Instant::now();
    let err = objects
        .put_stream(
            objects.fragment_key(&session, 0),
            futures_util::stream::iter(frames(b"abc")),
        )
        .await
        .unwrap_err();
    assert!(err.is_object_store_unreachable(), "{err}");
    let err = objects
        .read(&objects.fragment_key(&session, 0), None)
        .await
        .unwrap_err();
    assert!(err.is_object_store_unreachable(), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    // The same over TLS (the client's rustls is set up, nothing listens).
    let mut tls = config(format!("https://127.0.0.1:{port}"), &access, 5 * MIB);
    tls.retry_timeout_secs = Some(2);
    let err = Objects::new(&tls)
        .unwrap()
        .head(&objects.fragment_key(&session, 0))
        .await
        .unwrap_err();
    assert!(err.is_object_store_unreachable(), "{err}");

    // A real Garage going away mid-run: transient errors, then it works again.
    let Some(mut garage) = Garage::start() else {
        return;
    };
    let mut cfg = config(garage.endpoint(), garage.access(), 5 * MIB);
    cfg.retry_timeout_secs = Some(2);
    let objects = Objects::new(&cfg).unwrap();
    let key = objects.fragment_key(&session, 0);
    let data = pattern(100_000, 3);
    put(&objects, key.clone(), &data).await;
    tokio::task::block_in_place(|| garage.kill());
    let err = objects.head(&key).await.unwrap_err();
    assert!(err.is_object_store_unreachable(), "{err}");
    let err = objects
        .put_stream(
            objects.fragment_key(&session, 1),
            futures_util::stream::iter(frames(&data)),
        )
        .await
        .unwrap_err();
    assert!(err.is_object_store_unreachable(), "{err}");
    tokio::task::block_in_place(|| garage.restart());
    assert!(read_object(&objects, &key).await == data);

    // Wrong credentials are a refusal, not an outage: no retrying that as transient.
    let mut wrong = garage.access().clone();
    wrong.secret_key = "f".repeat(64);
    let refused = Objects::new(&config(garage.endpoint(), &wrong, 5 * MIB))
        .unwrap()
        .head(&key)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, StorageError::ObjectStore { .. }),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_delete_reporting_a_busy_store_is_the_transient_error() {
    // A store can answer DeleteObjects 200 and report a key failed inside: "busy" codes
    // (Garage: ServiceUnavailable, "database is locked") are worth a retry, a refusal is not.
    let Some(garage) = Garage::start() else {
        return;
    };
    let objects = Objects::new(&config(garage.endpoint(), garage.access(), 5 * MIB)).unwrap();
    let key = objects.fragment_key(&SessionId::random(), 0);
    for (code, transient) in [
        ("ServiceUnavailable", true),
        ("SlowDown", true),
        ("AccessDenied", false),
    ] {
        let Some(proxy) = Nginx::start_failing_deletes(&[garage.s3_addr()], key.as_str(), code)
        else {
            return;
        };
        let through = Objects::new(&config(proxy.url(), garage.access(), 5 * MIB)).unwrap();
        let err = through
            .delete(std::slice::from_ref(&key))
            .await
            .unwrap_err();
        assert_eq!(err.is_transient(), transient, "{code}: {err}");
        assert!(err.to_string().contains(code), "{err}");
    }
    // Straight to Garage the same delete succeeds (the key is simply absent).
    objects.delete(&[key]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_delete_answer_naming_a_key_not_asked_for_is_an_error_not_a_panic() {
    // object_store 0.14 unwraps the position of every key a DeleteObjects result reports
    // failed; a store naming another key (a bug, or a key encoded differently) made it panic
    // in whatever task deleted, the sweeper's loop included.
    let Some(garage) = Garage::start() else {
        return;
    };
    let objects = Objects::new(&config(garage.endpoint(), garage.access(), 5 * MIB)).unwrap();
    let asked = objects.fragment_key(&SessionId::random(), 0);
    let other = objects.fragment_key(&SessionId::random(), 0);
    let Some(proxy) =
        Nginx::start_failing_deletes(&[garage.s3_addr()], other.as_str(), "AccessDenied")
    else {
        return;
    };
    let through = Objects::new(&config(proxy.url(), garage.access(), 5 * MIB)).unwrap();
    let err = through
        .delete(std::slice::from_ref(&asked))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("DeleteObjects answer"), "{err}");
    // The same client goes on working.
    let bytes = Bytes::from_static(b"still here");
    through
        .put_stream(
            asked.clone(),
            futures_util::stream::iter([Ok::<_, StorageError>(bytes.clone())]),
        )
        .await
        .unwrap();
    assert_eq!(read_object(&through, &asked).await, bytes.to_vec());
    objects.delete(&[asked]).await.unwrap();
}
