//! Part merges on a real PostgreSQL and a real Garage: an upload of exactly
//! `merge_parts_from` bytes has its fragments under 5 MiB merged behind the upload into
//! objects of 5 MiB or more, one per `part_size` span, which completion copies server-side;
//! tiny fragments are merged per MiB first and those objects join the part; one byte less
//! than the threshold, or a store without part copies, keeps the 1 MiB merges only; merges
//! racing the upload's completion never change what is published. Skips with a printed
//! reason when PostgreSQL or Garage is not installed.
#![allow(clippy::unwrap_used)]

use bitsd::storage::shared::objects::{FragmentObject, ObjectKey, MIN_PART_SIZE};
use bitsd::storage::shared::{Coalesced, SharedBackend, MAX_RUN};
use bitsd::storage::SessionBackend;
use bitsd_protocol::SessionId;
use bitsd_tests::nginx::Nginx;
use bitsd_tests::pattern;
use bitsd_tests::pg::{raw_client, session_record};
use bitsd_tests::shared_backend::{
    backend_on, bucket_matches_index, farm, hold_fragment_memory, index, index_becomes,
    pending_rows, publish_and_read, read_all, read_object, send, Farm,
};
use futures_util::StreamExt;

const MIB: usize = 1024 * 1024;
const TINY: usize = 20_000;

/// A farm with 5 MiB parts, part copies as given, part merges from `from` bytes.
async fn parts_farm(from: u64, copies: bool) -> Option<Farm> {
    farm("parts", |store| {
        store.part_size = Some(MIN_PART_SIZE);
        store.server_side_copy = Some(copies);
        store.merge_parts_from = Some(from);
    })
    .await
}

/// The fragment lengths of the upload every test sends: 60 tiny fragments (1.2 MB), then
/// 1 MiB ones, then 100,000 bytes. The 4th 1 MiB fragment crosses 5 MiB, the 9th 10 MiB.
fn shape() -> Vec<usize> {
    let mut lens = vec![TINY; 60];
    lens.extend([MIB; 11]);
    lens.push(100_000);
    lens
}

const FIRST_PART: u64 = 60 * TINY as u64 + 4 * MIB as u64;
const SECOND_PART: u64 = 5 * MIB as u64;

/// Creates a session and sends every fragment of `lens` but the last.
async fn all_but_the_last(
    backend: &SharedBackend,
    lens: &[usize],
    seed: u64,
) -> (bitsd::storage::SessionRecord, Vec<u8>) {
    let data = pattern(lens.iter().sum(), seed);
    let mut record = session_record(None);
    backend.create(&record).await.unwrap();
    for &len in &lens[..lens.len() - 1] {
        send(backend, &mut record, &data, len).await;
    }
    (record, data)
}

/// What the assembly copies server-side from the session's index as it is now.
async fn copied_by_the_store(backend: &SharedBackend, id: &SessionId, total: u64) -> u64 {
    let fragments: Vec<FragmentObject> = backend
        .state()
        .fragments(id)
        .await
        .unwrap()
        .into_iter()
        .map(|f| FragmentObject {
            offset: f.entry.offset,
            len: f.entry.len,
            key: ObjectKey::parse(&f.object_key).unwrap(),
        })
        .collect();
    let dest = backend.objects().file_key(&format!("check/{id}.bin"));
    let assembled = backend
        .objects()
        .assemble(&dest, &fragments, total)
        .await
        .unwrap();
    assert_eq!(assembled.len, total);
    assembled.copied_bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_is_merged_into_parts_that_completion_copies() {
    let lens = shape();
    let total: u64 = lens.iter().sum::<usize>() as u64;
    let Some(farm) = parts_farm(total, true).await else {
        return;
    };
    let backend = &farm.backend;
    let data = pattern(total as usize, 21);
    let mut record = session_record(None);
    backend.create(&record).await.unwrap();
    let id = record.id;
    // The 53rd tiny fragment crosses 1 MiB (not a part boundary): a 1 MiB merge first.
    for _ in 0..60 {
        send(backend, &mut record, &data, TINY).await;
    }
    let mut tiny = vec![(0, 53 * TINY as u64)];
    tiny.extend((53..60).map(|i| (i * TINY as u64, TINY as u64)));
    assert_eq!(index_becomes(backend, &id, &tiny).await, tiny);
    for &len in &lens[60..lens.len() - 1] {
        send(backend, &mut record, &data, len).await;
    }
    // The first part took the 1 MiB merge's object, the 7 tiny fragments after it and four
    // 1 MiB ones; the two 1 MiB fragments after 10 MiB wait for the next span.
    let expected = vec![
        (0, FIRST_PART),
        (FIRST_PART, SECOND_PART),
        (FIRST_PART + SECOND_PART, MIB as u64),
        (FIRST_PART + SECOND_PART + MIB as u64, MIB as u64),
    ];
    assert_eq!(index_becomes(backend, &id, &expected).await, expected);
    let (listed, indexed) = bucket_matches_index(backend, &id).await;
    assert_eq!(listed, indexed, "the merged fragments' objects are deleted");
    assert_eq!(pending_rows(&farm.url).await, 0);

    send(backend, &mut record, &data, 100_000).await;
    assert_eq!(
        copied_by_the_store(backend, &id, total).await,
        FIRST_PART + SECOND_PART,
        "both merged objects are copied by the store, the tail streamed"
    );
    assert!(read_all(backend, &id).await == data, "read back byte-exact");
    assert!(
        publish_and_read(backend, &id, "parts/whole.bin").await == data,
        "published byte-exact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smaller_upload_or_a_store_without_part_copies_keeps_the_1_mib_merges() {
    let total: u64 = shape().iter().sum::<usize>() as u64;
    for (from, copies, why) in [
        (total + 1, true, "one byte under merge_parts_from"),
        (1, false, "server_side_copy off"),
    ] {
        let Some(farm) = parts_farm(from, copies).await else {
            return;
        };
        let backend = &farm.backend;
        let lens = shape();
        let (mut record, data) = all_but_the_last(backend, &lens, 22).await;
        let id = record.id;
        // The 53rd tiny fragment crosses 1 MiB: those 53 are merged; 1 MiB fragments are not.
        let mut expected = vec![(0, 53 * TINY as u64)];
        expected.extend((53..60).map(|i| (i * TINY as u64, TINY as u64)));
        expected.extend((0..11).map(|i| (60 * TINY as u64 + i * MIB as u64, MIB as u64)));
        assert_eq!(
            index_becomes(backend, &id, &expected).await,
            expected,
            "{why}"
        );
        send(backend, &mut record, &data, 100_000).await;
        assert!(read_all(backend, &id).await == data, "{why}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn part_merges_racing_the_completion_never_change_what_is_published() {
    let Some(farm) = parts_farm(1, true).await else {
        return;
    };
    let backend = &farm.backend;
    // Each upload ends right after a fragment that crosses a part boundary, so its merge runs
    // while the last fragment completes the upload (before, during or after its commit).
    let mut part_merges_won = 0;
    for (i, last) in [1usize, 1000, 300_000, MIB, 3 * MIB]
        .into_iter()
        .enumerate()
    {
        let mut lens = vec![MIB; 10];
        lens.push(last);
        let (mut record, data) = all_but_the_last(backend, &lens, 30 + i as u64).await;
        send(backend, &mut record, &data, last).await;
        let id = record.id;
        assert!(read_all(backend, &id).await == data, "upload {i} read back");
        // Whatever the merges did, no object outside the index is left once it is done.
        let (listed, indexed) = bucket_matches_index(backend, &id).await;
        assert_eq!(listed, indexed, "upload {i}");
        let rows = index(backend, &id).await;
        assert_eq!(rows.iter().map(|r| r.1).sum::<u64>(), data.len() as u64);
        part_merges_won += rows.iter().filter(|r| r.1 == SECOND_PART).count();
        let path = format!("parts/race-{i}.bin");
        assert!(
            publish_and_read(backend, &id, &path).await == data,
            "upload {i} published byte-exact"
        );
    }
    // The merge of 0..5 MiB had the time of five fragments: it ran (and won) in most uploads.
    assert!(part_merges_won > 0, "no part merge ever ran");
    for _ in 0..100 {
        if pending_rows(&farm.url).await == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        pending_rows(&farm.url).await,
        0,
        "no merge left a pending row"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_takes_at_most_the_last_max_run_fragments_of_its_run() {
    let Some(farm) = parts_farm(0, true).await else {
        return;
    };
    let backend = &farm.backend;
    // 5,300 fragments of 200 bytes (a client sending tiny fragments), stored and indexed
    // straight away (32 PUTs at once, one INSERT) instead of 5,300 commits.
    const LEN: usize = 200;
    const N: usize = 5300;
    let data = pattern(N * LEN, 60);
    let mut record = session_record(None);
    record.total = Some(data.len() as u64);
    backend.create(&record).await.unwrap();
    let id = record.id;
    let objects = backend.objects();
    let keys: Vec<ObjectKey> = (0..N)
        .map(|i| objects.fragment_key(&id, (i * LEN) as u64))
        .collect();
    let data_ref = &data;
    futures_util::stream::iter(keys.iter().enumerate())
        .map(|(i, key)| async move {
            let bytes = bytes::Bytes::copy_from_slice(&data_ref[i * LEN..(i + 1) * LEN]);
            objects
                .put_stream(
                    key.clone(),
                    futures_util::stream::iter([Ok::<_, bitsd::storage::StorageError>(bytes)]),
                )
                .await
                .unwrap();
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    let offsets: Vec<i64> = (0..N).map(|i| (i * LEN) as i64).collect();
    let crcs: Vec<i64> = (0..N)
        .map(|i| i64::from(crc32c::crc32c(&data[i * LEN..(i + 1) * LEN])))
        .collect();
    let names: Vec<String> = keys.iter().map(|k| k.as_str().to_owned()).collect();
    raw_client(&farm.url)
        .await
        .execute(
            "INSERT INTO bitsd_fragments (session_id, start_offset, len, crc32c, object_key)
             SELECT $1, o, $2, c, k FROM unnest($3::bigint[], $4::bigint[], $5::text[]) AS t(o, c, k)",
            &[id.as_uuid(), &(LEN as i64), &offsets, &crcs, &names],
        )
        .await
        .unwrap();
    // The 5,243rd fragment reaches 1 MiB: its run is all 5,243, of which the merge takes the
    // last 4,096.
    let crossing = (1 << 20) / LEN;
    let (start, end) = ((crossing * LEN) as u64, ((crossing + 1) * LEN) as u64);
    assert_eq!(
        backend.coalesce(&id, start, end).await.unwrap(),
        Coalesced::Merged {
            fragments: MAX_RUN,
            bytes: (MAX_RUN * LEN) as u64,
        }
    );
    let rows = backend.state().fragments(&id).await.unwrap();
    let first = (crossing + 1 - MAX_RUN) * LEN;
    let merged = rows
        .iter()
        .find(|r| r.entry.offset == first as u64)
        .unwrap();
    assert_eq!(merged.entry.len, (MAX_RUN * LEN) as u64);
    let bytes = read_object(objects, &ObjectKey::parse(&merged.object_key).unwrap()).await;
    assert!(
        bytes == data[first..first + MAX_RUN * LEN],
        "merged byte-exact"
    );
    assert_eq!(
        rows.len(),
        N - MAX_RUN + 1,
        "the fragments before it stay as they were"
    );
}

/// Whether the index of `id` holds an object of 5 MiB or more (a part merge's), checked every
/// 50 ms for `secs` seconds.
async fn part_merged_within(backend: &SharedBackend, id: &SessionId, secs: u64) -> bool {
    for _ in 0..secs * 20 {
        if index(backend, id)
            .await
            .iter()
            .any(|r| r.1 >= MIN_PART_SIZE)
        {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_saw_the_store_refuse_a_part_copy_stops_merging_into_parts() {
    let Some(farm) = parts_farm(1, true).await else {
        return;
    };
    let garage = farm.store.s3_addr();
    let Some(proxy) =
        tokio::task::spawn_blocking(move || Nginx::start_refusing_part_copies(&[garage]))
            .await
            .unwrap()
    else {
        return;
    };
    let mut store = farm.store.object_store_config("parts");
    store.endpoint = Some(proxy.url());
    store.part_size = Some(MIN_PART_SIZE);
    store.merge_parts_from = Some(1);
    let scratch = tempfile::tempdir().unwrap();
    let backend = backend_on(&farm.url, &store, scratch.path()).await;
    let lens = [vec![MIB; 10], vec![1000]].concat();
    // Before any refusal the node merges into parts; the publish then meets the 501 and
    // streams the upload instead.
    let (mut record, data) = all_but_the_last(&backend, &lens, 40).await;
    assert!(
        part_merged_within(&backend, &record.id, 10).await,
        "part merges ran"
    );
    send(&backend, &mut record, &data, 1000).await;
    assert!(publish_and_read(&backend, &record.id, "parts/refused-a.bin").await == data);
    assert!(
        proxy.access_log().contains("status=501"),
        "the refusal was seen"
    );
    // From then on that node merges nothing into parts (it would only stream them again).
    let (mut record, data) = all_but_the_last(&backend, &lens, 41).await;
    assert!(
        !part_merged_within(&backend, &record.id, 2).await,
        "no part merge after the refusal"
    );
    send(&backend, &mut record, &data, 1000).await;
    assert!(publish_and_read(&backend, &record.id, "parts/refused-b.bin").await == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_boundary_without_5_mib_to_merge_still_gets_its_1_mib_merge() {
    let Some(farm) = parts_farm(1, true).await else {
        return;
    };
    let backend = &farm.backend;
    // A 6 MiB fragment (a part of its own), then 4.5 MiB of tiny ones: at the 10 MiB part
    // boundary there are only 4 MiB of small fragments, too few for a part; the tiny ones
    // just before that boundary are merged per MiB all the same.
    let mut lens = vec![6 * MIB];
    lens.extend(std::iter::repeat_n(TINY, 236));
    lens.push(TINY);
    let (record, _data) = all_but_the_last(backend, &lens, 50).await;
    let boundary = 10 * MIB as u64;
    let mut covering = 0;
    for _ in 0..400 {
        let rows = index(backend, &record.id).await;
        covering = rows
            .iter()
            .find(|r| r.0 < boundary && boundary <= r.0 + r.1)
            .map_or(0, |r| r.1);
        if covering > TINY as u64 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        covering > TINY as u64,
        "the fragment reaching 10 MiB was merged with the ones before it ({covering} bytes)"
    );
    assert!(
        !index(backend, &record.id)
            .await
            .iter()
            .any(|r| r.1 >= MIN_PART_SIZE && r.0 > 0),
        "no part merged (the 6 MiB fragment is the only entry of 5 MiB or more)"
    );
}

/// A part merge counts in the node's fragment memory (`fragment_memory`): while another
/// session's fragment of 6 MiB (a multipart one, which reserves what it holds) takes the
/// whole 6 MiB budget, the merge of the first 5 MiB waits and nothing is merged; once that
/// fragment is gone the merge gets its room and runs, and the upload is published exactly.
/// (Uncounted, the merge ran at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_merge_waits_for_room_in_the_fragment_memory() {
    merge_waits_for_room("parts-memory", 6).await;
}

/// A merge's reads ahead of its writer count too: with a budget of 12 MiB of which the
/// 6 MiB fragment holds half, the merge of the first 5 MiB (its writer holding up to 5 MiB,
/// and up to 5 MiB of the 1 MiB fragments read ahead of it) does not fit and waits; it runs
/// once the fragment is gone. (With the reads uncounted, the writer's 5 MiB fitted in the
/// free 6 MiB and the merge ran at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_merge_counts_the_fragments_it_reads_ahead() {
    merge_waits_for_room("parts-memory-ahead", 12).await;
}

/// Five 1 MiB fragments (a part merge's run), a 1 MiB and a 100,000-byte one, with
/// `fragment_memory` of `budget_mib` MiB of which another session's fragment holds 6 MiB
/// until the merge has been seen not to run.
async fn merge_waits_for_room(name: &str, budget_mib: u64) {
    let mut lens = vec![MIB; 6];
    lens.push(100_000);
    let total: u64 = lens.iter().sum::<usize>() as u64;
    let Some(farm) = farm(name, |store| {
        store.part_size = Some(MIN_PART_SIZE);
        store.server_side_copy = Some(true);
        store.merge_parts_from = Some(total);
        store.fragment_memory = Some(budget_mib * MIB as u64);
    })
    .await
    else {
        return;
    };
    let backend = &farm.backend;
    let holder = hold_fragment_memory(backend, 6 * MIB as u64).await;

    let data = pattern(total as usize, 31);
    let mut record = session_record(None);
    backend.create(&record).await.unwrap();
    let id = record.id;
    // Shorter than the part size: streamed, they never wait for the budget.
    for &len in &lens[..5] {
        send(backend, &mut record, &data, len).await;
    }
    assert!(
        !part_merged_within(backend, &id, 2).await,
        "merged without room in the budget"
    );
    drop(holder);
    assert!(
        part_merged_within(backend, &id, 10).await,
        "not merged once the budget had room"
    );
    for &len in &lens[5..] {
        send(backend, &mut record, &data, len).await;
    }
    assert!(
        publish_and_read(backend, &id, "parts/memory.bin").await == data,
        "published byte-exact"
    );
}
