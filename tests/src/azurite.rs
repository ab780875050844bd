//! [`Azurite`]: Microsoft's Azure Blob Storage emulator (`npm install -g azurite`), for the
//! farm on `[object_store] service = "azure"`.
//!
//! Like moto, an emulator: it proves nothing about Azure's durability. What it is for: the
//! farm's Azure path is the other client of `object_store` (block blobs, block lists as
//! multipart uploads, its own listings, batch deletes, range reads and errors), and Azurite
//! checks every request's Shared Key signature as Azure does.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use bitsd_storage::shared::objects::{ObjectStoreConfig, StoreService};

use crate::emulator::{find_binary, Served};
use crate::skip::Needs;

/// Azurite's well-known development account (the same in every installation).
pub const ACCOUNT: &str = "devstoreaccount1";

/// The development account's key (public, the same in every installation).
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The container a test Azurite gets.
pub const CONTAINER: &str = "bitsd-test";

/// The REST API version of the container's creation.
const API_VERSION: &str = "2021-08-06";

/// `azurite-blob` from `$AZURITE_BLOB_BIN` or the `PATH`; `None` (printed, or a failure
/// under `BITSD_TEST_REQUIRE=azurite`) when it is not installed.
pub fn azurite_binary() -> Option<PathBuf> {
    find_binary(
        "AZURITE_BLOB_BIN",
        "azurite-blob",
        Needs::Azurite,
        "azurite-blob is not installed (npm install -g azurite@3.35.0); \
         the tests of the farm on Azure Blob Storage skip",
    )
}

/// One `azurite-blob` on a free loopback port over a temporary directory, with the container
/// [`CONTAINER`]; killed when dropped.
#[derive(Debug)]
pub struct Azurite {
    served: Served,
}

impl Azurite {
    /// Starts the emulator, waits until it answers and creates the container; `None`
    /// (printed) when Azurite is not installed or does not start.
    pub fn start() -> Option<Self> {
        let bin = azurite_binary()?;
        // Node's start-up takes a second or so; the container's creation is the readiness
        // check.
        let served = Served::start(
            &bin,
            "bitsd-azurite-",
            Needs::Azurite,
            |port, dir| {
                let mut args: Vec<std::ffi::OsString> = ["--blobHost", "127.0.0.1", "--blobPort"]
                    .map(Into::into)
                    .to_vec();
                args.push(port.to_string().into());
                args.push("--location".into());
                args.push(dir.join("data").into());
                args.push("--skipApiVersionCheck".into());
                args.push("--disableProductStyleUrl".into());
                args
            },
            |served| match create_container(served.addr, CONTAINER) {
                Some(201) => Some(Ok(())),
                Some(status) => Some(Err(format!(
                    "Azurite refused to create its container ({status})"
                ))),
                None => None,
            },
        )?;
        Some(Azurite { served })
    }

    /// The blob endpoint of the development account, `http://127.0.0.1:PORT/devstoreaccount1`.
    pub fn endpoint(&self) -> String {
        format!("http://{}/{ACCOUNT}", self.served.addr)
    }

    /// The blob API's address.
    pub fn addr(&self) -> SocketAddr {
        self.served.addr
    }

    /// Object-store settings for the container under `prefix` (`service = "azure"`, the
    /// development account; timeouts and retries at their defaults).
    pub fn object_store_config(&self, prefix: &str) -> ObjectStoreConfig {
        ObjectStoreConfig {
            service: StoreService::Azure,
            bucket: CONTAINER.to_owned(),
            account: Some(ACCOUNT.to_owned()),
            secret_access_key: Some(ACCOUNT_KEY.to_owned()),
            prefix: prefix.into(),
            endpoint: Some(self.endpoint()),
            ..ObjectStoreConfig::default()
        }
    }

    /// The last lines of the emulator's log.
    pub fn log_tail(&self) -> String {
        self.served.log_tail()
    }
}

/// Creates container `name` (Create Container, signed with the account's Shared Key);
/// the status, `None` when the emulator does not answer.
fn create_container(addr: SocketAddr, name: &str) -> Option<u16> {
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    // Twelve standard headers, all empty here, then the x-ms- headers and the resource.
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{API_VERSION}\n\
         /{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &b64.decode(ACCOUNT_KEY).unwrap());
    let signature = b64.encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref());
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "PUT /{ACCOUNT}/{name}?restype=container HTTP/1.1\r\nHost: {}\r\n\
         x-ms-date: {date}\r\nx-ms-version: {API_VERSION}\r\n\
         Authorization: SharedKey {ACCOUNT}:{signature}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
        addr
    )
    .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    answer.get(9..12)?.parse().ok()
}
