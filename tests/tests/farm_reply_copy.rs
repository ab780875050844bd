//! A reply that is the upload itself (the echo handler hands the upload's path back) on the
//! shared backend: assembled in the store from the fragment objects, never read through the
//! node (one fragment: a server-side copy). A real Garage behind an nginx that logs every S3
//! request the node sends, and real PostgreSQL. Skips with a printed reason when PostgreSQL,
//! Garage or nginx is not installed (`.ci/run` installs them).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bitsd::reply_handlers::ReplyFuture;
use bitsd::storage::shared::objects::{ObjectKey, Objects};
use bitsd::{Reply, ReplyHandler, Route, StorageConfig, Upload};
use bitsd_protocol::SessionId;
use bitsd_tests::farm_servers::{shared_storage, FarmServers};
use bitsd_tests::garage::Garage;
use bitsd_tests::nginx::Nginx;
use bitsd_tests::pg::PgCluster;
use bitsd_tests::{pattern, url_path, RawClient, TestServer};

/// Hands the upload's path back as its reply and asks for the upload to be published first,
/// without reading it (as echo, plus `BITS-Copy-File-To-Destination`).
struct EchoAndPublish;

impl ReplyHandler for EchoAndPublish {
    fn reply(&self, upload: Upload) -> ReplyFuture {
        Box::pin(async move { Ok(Reply::file(upload.path).with_commit_upload()) })
    }

    fn reads_upload(&self) -> bool {
        false
    }
}

/// What a handler found on disk when it was called: (the upload's path is a file, its
/// directory exists, the work directory exists, the route's prefix).
static SEEN: std::sync::Mutex<Vec<(bool, bool, bool, &'static str)>> =
    std::sync::Mutex::new(Vec::new());

/// Echoes the upload's path back, after noting what exists on disk; `reads` is what it says
/// in `reads_upload`.
struct LooksAround {
    reads: bool,
    prefix: &'static str,
}

impl ReplyHandler for LooksAround {
    fn reply(&self, upload: Upload) -> ReplyFuture {
        let prefix = self.prefix;
        Box::pin(async move {
            let dir = upload.path.parent().unwrap().to_owned();
            SEEN.lock().unwrap().push((
                upload.path.is_file(),
                dir.exists(),
                upload.session_dir.is_dir(),
                prefix,
            ));
            Ok(Reply::file(upload.path))
        })
    }

    fn reads_upload(&self) -> bool {
        self.reads
    }
}

/// One node whose object store is Garage behind a logging nginx.
struct Node {
    node: TestServer,
    store_log: Nginx,
    objects: Objects,
    _pg: Arc<PgCluster>,
    _garage: Garage,
}

async fn node() -> Option<Node> {
    let FarmServers {
        pg,
        postgres_url,
        garage,
    } = FarmServers::start().await?;
    let s3 = garage.s3_addr();
    let store_log = tokio::task::spawn_blocking(move || Nginx::start(&[s3]))
        .await
        .unwrap()?;
    let mut store = garage.object_store_config("copy");
    store.endpoint = Some(store_log.url());
    let objects = Objects::new(&store).unwrap();
    let shared = shared_storage(&postgres_url, &store);
    let node = TestServer::start_with(move |c| {
        c.storage = StorageConfig::Shared(Box::new(shared));
        c.routes
            .push(Route::upload_reply("/published/", EchoAndPublish));
        for (prefix, reads) in [("/unread/", false), ("/read/", true)] {
            c.routes
                .push(Route::upload_reply(prefix, LooksAround { reads, prefix }));
        }
    })
    .await;
    Some(Node {
        node,
        store_log,
        objects,
        _pg: pg,
        _garage: garage,
    })
}

impl Node {
    /// The S3 requests the node sent so far, `METHOD /bucket/key…` each.
    fn requests(&self) -> Vec<String> {
        self.store_log
            .access_log()
            .lines()
            .filter_map(|l| l.split('"').nth(1).map(str::to_owned))
            .collect()
    }

    /// The session's reply object (`…/reply-<nonce>`: the only one of the session).
    async fn reply_object(&self, sid: &str) -> Vec<u8> {
        let prefix = self.objects.session_prefix(&session(sid));
        let mut replies = bitsd_tests::shared_backend::listed_keys(&self.objects, &prefix).await;
        replies.retain(|k| k.starts_with(&format!("{}/reply-", prefix.as_str())));
        assert_eq!(replies.len(), 1, "reply objects: {replies:?}");
        let key = ObjectKey::parse(&replies[0]).unwrap();
        bitsd_tests::shared_backend::read_object(&self.objects, &key).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_reply_of_one_fragment_is_a_copy_in_the_store() {
    let Some(n) = node().await else { return };
    let mut client = RawClient::connect(n.node.addr()).await;
    let data = pattern(40_000, 21);
    let (sid, fin) = client.upload("/echo/one", &data, data.len()).await;
    assert_eq!(fin.status, 200, "{fin:?}");
    // Before anyone downloads it: no fragment object was read, the reply object was made.
    let before = n.requests();
    assert!(
        !before
            .iter()
            .any(|r| r.starts_with("GET ") && r.contains("/frag/")),
        "the node read the upload to make the reply: {before:#?}"
    );
    assert!(
        before
            .iter()
            .any(|r| r.starts_with("PUT ")
                && r.contains(&format!("{}/reply", session(&sid).simple()))),
        "no reply object written: {before:#?}"
    );
    assert_eq!(n.reply_object(&sid).await, data);
    let reply = url_path(fin.header("bits-reply-url").unwrap());
    let got = client.get("GET", &reply, &[]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body, data);
    let got = client
        .get("GET", &reply, &[("Range", "bytes=100-199")])
        .await;
    assert_eq!(got.status, 206, "{got:?}");
    assert_eq!(got.body, data[100..200]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_reply_of_many_fragments_and_of_nothing_is_byte_exact() {
    let Some(n) = node().await else { return };
    let mut client = RawClient::connect(n.node.addr()).await;
    for (len, fragment) in [(70_001usize, 10_000usize), (3, 1)] {
        let data = pattern(len, len as u64);
        let (sid, fin) = client.upload("/echo/many", &data, fragment).await;
        assert_eq!(fin.status, 200, "{fin:?}");
        assert_eq!(n.reply_object(&sid).await, data, "{len} bytes");
        let reply = url_path(fin.header("bits-reply-url").unwrap());
        let got = client.get("GET", &reply, &[]).await;
        assert_eq!(got.body, data, "{len} bytes");
    }
    // The node's scratch directory holds no copy of any upload afterwards.
    let left: Vec<_> = walk(n.node.data_dir())
        .into_iter()
        .filter(|p| p.ends_with("/upload"))
        .collect();
    assert_eq!(left, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_publishes_first_gets_its_reply_from_the_published_file() {
    let Some(n) = node().await else { return };
    let mut client = RawClient::connect(n.node.addr()).await;
    let data = pattern(50_000, 22);
    // Three fragments: the publish assembles them, then drops their objects.
    let (sid, fin) = client.upload("/published/p.bin", &data, 20_000).await;
    assert_eq!(fin.status, 200, "{fin:?}");
    let file = n.objects.file_key("p.bin");
    let published = n.objects.read(&file, None).await.unwrap().bytes().await;
    assert_eq!(published.unwrap(), data, "the published upload");
    assert_eq!(n.reply_object(&sid).await, data, "the reply");
    let reply = url_path(fin.header("bits-reply-url").unwrap());
    let got = client.get("GET", &reply, &[]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body, data);
}

/// A handler that neither reads the upload nor uses its work directory gets names only:
/// nothing is made on disk for it (the node made and removed two directories per echo job
/// before, a tenth of its CPU on small jobs), and its reply is still the upload, byte-exact.
/// A handler that reads the upload gets the file and a work directory, both gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_does_not_read_the_upload_gets_nothing_made_on_disk() {
    let Some(n) = node().await else { return };
    let mut client = RawClient::connect(n.node.addr()).await;
    for prefix in ["/unread/", "/read/"] {
        let data = pattern(30_000, 23);
        let (sid, fin) = client
            .upload(&format!("{prefix}x.bin"), &data, 10_000)
            .await;
        assert_eq!(fin.status, 200, "{prefix}: {fin:?}");
        assert_eq!(n.reply_object(&sid).await, data, "{prefix}: the reply");
        let reply = url_path(fin.header("bits-reply-url").unwrap());
        let got = client.get("GET", &reply, &[]).await;
        assert_eq!(got.body, data, "{prefix}");
    }
    let seen = SEEN.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            (false, false, false, "/unread/"),
            (true, true, true, "/read/")
        ],
        "(upload is a file, its directory exists, work directory exists, route)"
    );
    let left: Vec<_> = walk(n.node.data_dir())
        .into_iter()
        .filter(|p| p.ends_with("/upload") || p.ends_with("/work"))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "scratch files left behind");
}

fn session(sid: &str) -> SessionId {
    sid.trim_matches(['{', '}']).parse().unwrap()
}

/// Every file and directory under `dir`, as strings.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p.to_string_lossy().into_owned());
    }
    out
}
