//! [`Moto`]: a second S3 implementation for the farm tests, `moto_server` (the `moto`
//! Python package, `pip install 'moto[server]'`), beside Garage.
//!
//! Moto is an emulator: it keeps objects in memory and checks no signature, so it proves
//! nothing about durability. What it is for: the farm must not lean on what one store
//! happens to do. Moto is another code base answering the same S3 calls (multipart uploads,
//! `UploadPartCopy`, `CopyObject`, ranged GETs, listings, batch deletes, presigned URLs), with
//! its own ETags, its own error bodies and its own ideas of what is optional; a test that
//! passes on Garage and fails here has found a Garage-ism in bitsd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bitsd_storage::shared::objects::ObjectStoreConfig;

use crate::emulator::{find_binary, Served};
use crate::garage::plain_request;
use crate::skip::Needs;

/// How long a request to moto may wait for its answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The bucket a test moto gets.
pub const MOTO_BUCKET: &str = "bitsd-test";

/// `moto_server` from `$MOTO_SERVER_BIN` or the `PATH`; `None` (printed, or a failure under
/// `BITSD_TEST_REQUIRE=moto`) when it is not installed.
pub fn moto_binary() -> Option<PathBuf> {
    find_binary(
        "MOTO_SERVER_BIN",
        "moto_server",
        Needs::Moto,
        "moto_server is not installed (pip install 'moto[server]==5.2.1'); \
         the tests against a second S3 implementation skip",
    )
}

/// One `moto_server` on a free loopback port with the bucket [`MOTO_BUCKET`]; killed when
/// dropped.
#[derive(Debug)]
pub struct Moto {
    served: Served,
}

impl Moto {
    /// Starts the server, waits until it answers and creates the bucket; `None` (printed)
    /// when moto is not installed or does not start.
    pub fn start() -> Option<Self> {
        let bin = moto_binary()?;
        // Python's start-up takes a second or two; the bucket's creation is the readiness
        // check (the server answers it once it serves S3).
        let served = Served::start(
            &bin,
            "bitsd-moto-",
            Needs::Moto,
            |port, _| {
                vec![
                    "-H".into(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    port.to_string().into(),
                ]
            },
            |served| match plain_request(served.addr, "PUT", &format!("/{MOTO_BUCKET}"), TIMEOUT)
                .map(|r| r.0)
            {
                Some(200) => Some(Ok(())),
                Some(status) => Some(Err(format!("moto refused to create its bucket ({status})"))),
                None => None,
            },
        )?;
        Some(Moto { served })
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.served.addr)
    }

    /// The S3 API's address.
    pub fn s3_addr(&self) -> SocketAddr {
        self.served.addr
    }

    /// Multipart uploads begun and neither completed nor aborted in the bucket
    /// (`ListMultipartUploads`; fewer than 1,000 in a test).
    pub fn unfinished_uploads(&self) -> u64 {
        match plain_request(
            self.served.addr,
            "GET",
            &format!("/{MOTO_BUCKET}?uploads"),
            TIMEOUT,
        ) {
            Some((200, body)) => body.matches("<Upload>").count() as u64,
            other => panic!("moto did not list its multipart uploads: {other:?}"),
        }
    }

    /// Object-store settings for the bucket under `prefix` (any credentials: moto checks no
    /// signature; timeouts and retries at their defaults).
    pub fn object_store_config(&self, prefix: &str) -> ObjectStoreConfig {
        ObjectStoreConfig {
            bucket: MOTO_BUCKET.to_owned(),
            prefix: prefix.into(),
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".into()),
            access_key_id: Some("bitsd-test".into()),
            secret_access_key: Some("bitsd-test-secret".into()),
            ..ObjectStoreConfig::default()
        }
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        self.served.log_tail()
    }
}
