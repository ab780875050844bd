//! Hostile input against the shared (farm) backend: destinations that race for one key or that
//! an S3 key cannot hold. Real
//! in-process nodes on one PostgreSQL database and one Garage bucket; skips with a printed reason when PostgreSQL or
//! Garage is not installed (`.ci/run` installs them).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bitsd::storage::shared::objects::Objects;
use bitsd_tests::farm_servers::{shared_nodes, FarmServers};
use bitsd_tests::garage::Garage;
use bitsd_tests::pg::PgCluster;
use bitsd_tests::shared_backend::read_object;
use bitsd_tests::{pattern, RawClient, RawResponse, TestServer, PROTOCOL};

/// Nodes on one database and one bucket, and the bucket to look inside.
struct Farm {
    nodes: Vec<TestServer>,
    objects: Objects,
    _pg: Arc<PgCluster>,
    _garage: Garage,
}

async fn farm(n: usize) -> Option<Farm> {
    let FarmServers {
        pg,
        postgres_url: url,
        garage,
    } = FarmServers::start().await?;
    let store = garage.object_store_config("sec");
    let nodes = shared_nodes(&url, &store, n).await;
    let objects = Objects::new(&store).unwrap();
    Some(Farm {
        nodes,
        objects,
        _pg: pg,
        _garage: garage,
    })
}

async fn create(c: &mut RawClient, path: &str) -> RawResponse {
    c.bits_post(
        path,
        &[
            ("BITS-Packet-Type", "Create-Session"),
            ("BITS-Supported-Protocols", PROTOCOL),
        ],
        b"",
    )
    .await
}

/// Two sessions uploading to the same destination, on two nodes, whose final fragments arrive
/// together: exactly one publishes (the other gets 403 `E_ACCESSDENIED`, as when the file
/// existed), and the file holds the winner's bytes. The local backend links the file into
/// place, which refuses a second one; the farm must not let the later assembly replace the
/// first session's published file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_completing_one_destination_together_publish_it_once() {
    let Some(farm) = farm(2).await else { return };
    let frag = 64 * 1024;
    for round in 0..3 {
        let path = format!("/upload/race-{round}.bin");
        let data = [
            pattern(16 * frag, 2 * round),
            pattern(16 * frag, 2 * round + 1),
        ];
        let mut clients = Vec::new();
        let mut sids = Vec::new();
        for (i, node) in farm.nodes.iter().enumerate() {
            let mut c = node.connect().await;
            let sid = c.create_session(&path).await;
            // Everything but the last fragment.
            for at in (0..data[i].len() - frag).step_by(frag) {
                let res = c.fragment(&path, &sid, &data[i], at, frag).await;
                assert_eq!(res.status, 200, "{res:?}");
            }
            clients.push(c);
            sids.push(sid);
        }
        let last = data[0].len() - frag;
        let finals = clients
            .into_iter()
            .zip(sids)
            .zip(data.clone())
            .map(|((mut c, sid), d)| {
                let path = path.clone();
                tokio::spawn(async move { c.fragment(&path, &sid, &d, last, frag).await })
            })
            .collect::<Vec<_>>();
        let mut answers = Vec::new();
        for f in finals {
            answers.push(f.await.unwrap());
        }
        let won: Vec<usize> = (0..2).filter(|&i| answers[i].status == 200).collect();
        assert_eq!(won.len(), 1, "round {round}: {answers:?}");
        let lost = 1 - won[0];
        answers[lost].assert_error(403, "0x80070005");
        let key = farm.objects.file_key(&format!("race-{round}.bin"));
        assert!(
            read_object(&farm.objects, &key).await == data[won[0]],
            "round {round}: the published file is not the winner's upload"
        );
    }
}

/// S3 keys hold at most 1024 bytes. A destination whose key (`<prefix>/files/<path>`, with
/// the characters S3 keys avoid percent-encoded) would be longer is refused at Create-Session
/// with the local backend's answer for a name the file system cannot hold (400
/// `ERROR_FILENAME_EXCED_RANGE`), not accepted and left to fail at the final fragment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_an_s3_key_cannot_hold_are_refused_at_create_session() {
    let Some(farm) = farm(1).await else { return };
    let mut c = farm.nodes[0].connect().await;
    // "sec/files/" is 10 bytes: 1014 bytes of path is the longest key S3 takes.
    let fits = format!("/upload/{}/{}", "d".repeat(200), "n".repeat(1014 - 201));
    let res = create(&mut c, &fits).await;
    assert_eq!(res.status, 200, "{res:?}");
    for target in [
        // Short segments, long path.
        format!("/upload/{}/x.bin", vec!["d".repeat(100); 10].join("/")),
        // One byte too many.
        format!("/upload/{}/{}", "d".repeat(200), "n".repeat(1015 - 201)),
        // 400 bytes of path that the key's encoding makes 1200 (`~` is stored as `%7E`).
        format!("/upload/{}", "~".repeat(400)),
        // On an upload-reply route too.
        format!("/echo/{}", "e".repeat(1100)),
    ] {
        let res = create(&mut c, &target).await;
        res.assert_ack();
        res.assert_error(400, "0x800700ce");
    }
}
