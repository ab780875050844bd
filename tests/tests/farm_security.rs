//! Hostile input against the shared (farm) backend: destinations that race for one key or that
//! an S3 key cannot hold, traversal attempts that must never leave `<prefix>/files/`, and
//! hostile `Range` headers on a farm's reply downloads. Real in-process nodes on one
//! PostgreSQL database and one Garage bucket; skips with a printed reason when PostgreSQL or
//! Garage is not installed (`.ci/run` installs them).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bitsd::storage::shared::objects::ObjectKey;
use bitsd::storage::shared::pg::{PgOptions, PgStateStore};
use bitsd::{CredentialsAuthenticator, SharedAuthenticator, StorageConfig};
use bitsd_protocol::SessionId;
use bitsd_tests::farm_servers::{shared_nodes, shared_storage, Farm, FarmServers};
use bitsd_tests::shared_backend::{
    listed_keys, read_object, two_sessions_race_for_one_destination,
};
use bitsd_tests::{pattern, url_path, RawClient, TestServer, PROTOCOL};

async fn farm(n: usize) -> Option<Farm> {
    Farm::start("sec", n, |_, _| {}).await
}

/// Two sessions uploading to the same destination, on two nodes, whose final fragments arrive
/// together: exactly one publishes (the other gets 403 `E_ACCESSDENIED`, as when the file
/// existed), and the file holds the winner's bytes. The local backend links the file into
/// place, which refuses a second one; the farm must not let the later assembly replace the
/// first session's published file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_completing_one_destination_together_publish_it_once() {
    let Some(farm) = farm(2).await else { return };
    two_sessions_race_for_one_destination(&farm.nodes, &farm.objects, 64 * 1024, 16).await;
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
    let res = c.try_create_session(&fits).await;
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
        let res = c.try_create_session(&target).await;
        res.assert_ack();
        res.assert_error(400, "0x800700ce");
    }
}

/// Traversal and encoding tricks in the URL of a farm upload: each is refused at
/// Create-Session with 403 `E_ACCESSDENIED` (400 for a double encoding), and a plain upload
/// beside them lands at `<prefix>/files/<name>` and nowhere else in the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_attempts_never_leave_the_files_prefix() {
    let Some(farm) = farm(1).await else { return };
    let mut c = farm.nodes[0].connect().await;
    for target in [
        "/upload/../sessions/x",
        "/upload/%2e%2e/sessions/x",
        "/upload/a%2f..%2f..%2fsessions%2fx",
        "/upload/a%5c..%5cx",
        "/upload/a%00b",
        "/upload/a%0ab",
        "/upload/.x",
        "/upload/a//b",
        "/upload/c%3a%5cx",
    ] {
        let res = c.try_create_session(target).await;
        res.assert_ack();
        res.assert_error(403, "0x80070005");
    }
    let res = c.try_create_session("/upload/%252e%252e/x").await;
    res.assert_error(400, "0x80070057");
    // Characters S3 keys avoid are stored encoded, under files/.
    let data = pattern(5000, 9);
    let (_, fin) = c.upload("/upload/a~b%25c%20d", &data, 2000).await;
    assert_eq!(fin.status, 200, "{fin:?}");
    let keys = listed_keys(&farm.objects, farm.objects.prefix()).await;
    let key = farm.objects.file_key("a~b%c d");
    assert_eq!(keys, vec![key.as_str().to_owned()]);
    assert!(key.as_str().starts_with("sec/files/"), "{key}");
    assert!(read_object(&farm.objects, &key).await == data);
    assert_eq!(ObjectKey::parse(key.as_str()), Some(key));
}

/// Hostile `Range` headers on a reply served by a farm node (no presigned redirect): numbers
/// past `u64`, suffix ranges longer than the reply, ranges past the end, reversed ranges and
/// multiple ranges get the exact single-node answers, and no byte outside the reply is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ranges_on_a_farm_reply_get_exact_answers() {
    let Some(farm) = farm(2).await else { return };
    let data = pattern(10_000, 3);
    let mut c = farm.nodes[0].connect().await;
    let (_, fin) = c.upload("/echo/ranges", &data, 4000).await;
    assert_eq!(fin.status, 200, "{fin:?}");
    let reply = url_path(fin.header("bits-reply-url").unwrap());
    let mut other = farm.nodes[1].connect().await;
    let cases: [(&str, u16, Option<&str>, std::ops::Range<usize>); 8] = [
        (
            "bytes=9990-99999999999999999999999",
            206,
            Some("bytes 9990-9999/10000"),
            9990..10_000,
        ),
        (
            "bytes=-99999999999999999999999",
            206,
            Some("bytes 0-9999/10000"),
            0..10_000,
        ),
        (
            "bytes=-10",
            206,
            Some("bytes 9990-9999/10000"),
            9990..10_000,
        ),
        ("bytes=10000-", 416, Some("bytes */10000"), 0..0),
        (
            "bytes=18446744073709551615-",
            416,
            Some("bytes */10000"),
            0..0,
        ),
        ("bytes=-0", 416, Some("bytes */10000"), 0..0),
        ("bytes=20-10", 200, None, 0..10_000),
        (
            "bytes=20000-20001, 5-6, 0-1",
            206,
            Some("bytes 5-6/10000"),
            5..7,
        ),
    ];
    for (range, status, content_range, bytes) in cases {
        let res = other.get("GET", &reply, &[("Range", range)]).await;
        assert_eq!(res.status, status, "{range}: {res:?}");
        assert_eq!(res.header("content-range"), content_range, "{range}");
        assert!(res.body == data[bytes.clone()], "{range}: wrong bytes");
        let head = other.get("HEAD", &reply, &[("Range", range)]).await;
        assert_eq!(head.status, status, "HEAD {range}: {head:?}");
        assert_eq!(
            head.header("content-length"),
            Some(bytes.len().to_string().as_str()),
            "HEAD {range}"
        );
    }
}

/// A `Content-Range` total that PostgreSQL's `bigint` cannot hold (past `i64::MAX`) is the
/// client's error, not the server's: 400 `BG_E_TOO_LARGE`, as for an upload over
/// `max_upload_size`, and never a 500 that a BITS client would retry for ever. The session
/// takes a sane fragment afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_past_what_postgres_holds_are_too_large_not_a_server_failure() {
    let Some(farm) = farm(1).await else { return };
    let mut c = farm.nodes[0].connect().await;
    let path = "/upload/huge.bin";
    let sid = c.create_session(path).await;
    for range in [
        "bytes 0-9/9223372036854775808",
        "bytes 0-9/18446744073709551615",
        "bytes 9223372036854775800-9223372036854775809/9223372036854775810",
    ] {
        let res = c
            .bits_post(
                path,
                &[
                    ("BITS-Packet-Type", "Fragment"),
                    ("BITS-Session-Id", &sid),
                    ("Content-Range", range),
                ],
                &[7u8; 10],
            )
            .await;
        res.assert_ack();
        res.assert_error(400, "0x80200020");
    }
    let data = pattern(10, 4);
    let res = c.fragment(path, &sid, &data, 0, 10).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.header("bits-received-content-range"), Some("10"));
}

/// With `presigned_reply_secs` a node counts a redirected range as delivered, since the store
/// sends the bytes. A `Range` the store reads otherwise than the node (Garage answers 416 to
/// numbers past `u64`, to `BYTES=` and to spaces around `=`, where the node sees a range)
/// must not count bytes the client never got: the reply's delivered bytes equal exactly what
/// the client received, however the answer came (redirect or the node itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_range_never_counts_reply_bytes_the_store_did_not_send() {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let mut store = servers.garage.object_store_config("pre");
    store.presigned_reply_secs = Some(300);
    let nodes = shared_nodes(&servers.postgres_url, &store, 1).await;
    let state = PgStateStore::connect(&servers.postgres_url, PgOptions::default())
        .await
        .unwrap();
    let data = pattern(10_000, 3);
    let mut c = nodes[0].connect().await;
    for (range, expect) in [
        ("bytes=0-99999999999999999999999", 0..10_000),
        ("bytes=-99999999999999999999999", 0..10_000),
        ("BYTES=0-9", 0..10),
        ("bytes = 0-9", 0..10),
        // A plain range is still redirected and counted.
        ("bytes=5000-", 5000..10_000),
    ] {
        let (sid, fin) = c.upload("/echo/pre", &data, 10_000).await;
        let reply = url_path(fin.header("bits-reply-url").unwrap());
        let res = c.get("GET", &reply, &[("Range", range)]).await;
        let got = if res.status == 307 {
            let url = res.header("location").unwrap();
            let rest = url.strip_prefix("http://").unwrap();
            let (host, path) = rest.split_at(rest.find('/').unwrap());
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nRange: {range}\r\nConnection: close\r\n\r\n"
            );
            let mut store = RawClient::connect(host.parse().unwrap()).await;
            store.send(req.as_bytes()).await
        } else {
            res
        };
        let received = if got.status == 206 { got.body.len() } else { 0 };
        if range == "bytes=5000-" {
            assert_eq!(got.status, 206, "{range}: {got:?}");
        }
        assert!(
            got.status != 206 || got.body == data[expect.clone()],
            "{range}"
        );
        // Recorded in the background: wait for it to settle.
        let id: SessionId = sid.trim_matches(['{', '}']).parse().unwrap();
        let mut covered = 0;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let record = state.load(&id).await.unwrap().unwrap();
            covered = record.reply.unwrap().delivered.covered();
            if covered >= received as u64 && covered > 0 {
                break;
            }
        }
        assert_eq!(
            covered, received as u64,
            "{range}: the client got {received} bytes (status {}), {covered} counted",
            got.status
        );
    }
}

/// The presigned redirect's `Location` comes from `[object_store] endpoint` alone: a hostile
/// `Host`, `X-Forwarded-Host` or `X-Forwarded-Proto` never picks where a client is sent. And
/// the admin API of a farm node answers hostile paging parameters with 400 or an empty page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_names_never_pick_the_redirect_and_admin_paging_refuses_garbage() {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let mut store = servers.garage.object_store_config("pre");
    store.presigned_reply_secs = Some(300);
    let endpoint = store.endpoint.clone().unwrap();
    let nodes = shared_nodes(&servers.postgres_url, &store, 1).await;
    let mut c = nodes[0].connect().await;
    let (_, fin) = c.upload("/echo/pre", &pattern(10_000, 3), 10_000).await;
    let reply = url_path(fin.header("bits-reply-url").unwrap());
    for host in ["evil.example", "evil.example:3900", "127.0.0.1:1"] {
        let headers = [
            ("Host", host),
            ("X-Forwarded-Host", host),
            ("X-Forwarded-Proto", "https"),
        ];
        let res = c.get("GET", &reply, &headers).await;
        assert_eq!(res.status, 307, "{res:?}");
        let location = res.header("location").unwrap();
        assert!(location.starts_with(&format!("{endpoint}/")), "{location}");
    }
    for query in [
        "limit=0",
        "limit=-1",
        "limit=99999999999999999999999",
        "limit=1%00",
        "after=zzz",
        "after=%00",
    ] {
        let (status, _) = nodes[0].admin_text(&format!("/sessions?{query}")).await;
        assert_eq!(status, 400, "{query}");
    }
    let (status, page) = nodes[0]
        .admin_get("/sessions?after=ffffffff-ffff-ffff-ffff-ffffffffffff")
        .await;
    assert_eq!((status, page), (200, serde_json::json!([])));
    let (status, _) = nodes[0].admin_text("/sessions/..%2f..%2fetc").await;
    assert_eq!(status, 404);
}

/// Sessions belong to their creator across the farm: with credentials on two nodes and
/// presigned redirects on, Bob's Fragment or Close of Alice's session (on the other node) is
/// "no such session", and Alice's reply is 401 without credentials and 404 to Bob, with no
/// presigned URL given out; Alice gets her redirect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_session_and_reply_do_not_exist_on_any_node() {
    let Some(servers) = FarmServers::start().await else {
        return;
    };
    let mut store = servers.garage.object_store_config("auth");
    store.presigned_reply_secs = Some(300);
    let shared = shared_storage(&servers.postgres_url, &store);
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let (s, mut auth) = (shared.clone(), CredentialsAuthenticator::new("farm"));
        for (user, pw) in [("alice", "alice-pw"), ("bob", "bob-pw")] {
            auth = auth.with_user(user, &bitsd::auth::hash_password(pw).unwrap());
        }
        nodes.push(
            TestServer::start_with(move |c| {
                c.storage = StorageConfig::Shared(Box::new(s));
                c.auth = Some(SharedAuthenticator(Arc::new(auth)));
            })
            .await,
        );
    }
    let basic = |user: &str| {
        let pair = format!("{user}:{user}-pw");
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    };
    let (alice, bob) = (basic("alice"), basic("bob"));
    let (mut a, mut b) = (nodes[0].connect().await, nodes[1].connect().await);
    let path = "/echo/mine";
    let created = a
        .bits_post(
            path,
            &[
                ("BITS-Packet-Type", "Create-Session"),
                ("BITS-Supported-Protocols", PROTOCOL),
                ("Authorization", &alice),
            ],
            b"",
        )
        .await;
    assert_eq!(created.status, 200, "{created:?}");
    let sid = created.header("bits-session-id").unwrap().to_owned();
    let data = pattern(5000, 6);
    let fragment = |auth: String| {
        vec![
            ("BITS-Packet-Type", "Fragment".to_owned()),
            ("BITS-Session-Id", sid.clone()),
            ("Content-Range", "bytes 0-4999/5000".to_owned()),
            ("Authorization", auth),
        ]
    };
    for (c, auth) in [(&mut b, bob.clone()), (&mut a, bob.clone())] {
        let h = fragment(auth);
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        c.bits_post(path, &h, &data)
            .await
            .assert_error(500, "0x8020001f");
    }
    let close = [
        ("BITS-Packet-Type", "Close-Session"),
        ("BITS-Session-Id", sid.as_str()),
        ("Authorization", bob.as_str()),
    ];
    let res = b.bits_post(path, &close, b"").await;
    res.assert_error(500, "0x8020001f");
    let h = fragment(alice.clone());
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let fin = b.bits_post(path, &h, &data).await;
    assert_eq!(fin.status, 200, "{fin:?}");
    let reply = url_path(fin.header("bits-reply-url").unwrap());
    for c in [&mut a, &mut b] {
        let res = c.get("GET", &reply, &[]).await;
        assert_eq!((res.status, res.header("location")), (401, None), "{res:?}");
        let res = c.get("GET", &reply, &[("Authorization", &bob)]).await;
        assert_eq!((res.status, res.header("location")), (404, None), "{res:?}");
        let res = c.get("HEAD", &reply, &[("Authorization", &bob)]).await;
        assert_eq!((res.status, res.header("location")), (404, None), "{res:?}");
        let res = c.get("GET", &reply, &[("Authorization", &alice)]).await;
        assert_eq!(res.status, 307, "{res:?}");
    }
}
