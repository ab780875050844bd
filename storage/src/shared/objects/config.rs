//! The `[object_store]` configuration and the S3 client built from it.

use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};

use super::part_copy::S3Location;
use object_store::{ClientOptions, RetryConfig};

use crate::StorageError;

/// S3's smallest part of a multipart upload (all but the last part).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

/// S3's largest part of a multipart upload (5 GiB).
pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;

/// The smallest part (block) bitsd writes to Azure Blob Storage, which has no minimum.
pub const MIN_AZURE_BLOCK_SIZE: u64 = 1024 * 1024;

/// Azure Blob Storage's largest block (4000 MiB).
pub const MAX_AZURE_BLOCK_SIZE: u64 = 4000 * 1024 * 1024;

/// Default part (block) size on Azure Blob Storage, whose blocks have no 5 MiB minimum.
/// Smaller than S3's default: a streamed assembly's progress is recorded part by part, and a
/// completion resumed after its node died sends again only the part it was sending; with
/// 8 MiB blocks, a four-times chaos soak on a loaded Azurite left some completions that never
/// finished a part between two kills of their node (docs/farm-internals.md).
pub const DEFAULT_AZURE_BLOCK_SIZE: u64 = 4 * 1024 * 1024;

/// Default part size, and the size below which an object is written with one PUT.
pub const DEFAULT_PART_SIZE: u64 = 8 * 1024 * 1024;

/// Default of `merge_parts_from`: uploads of 1 GiB and more, whose assembly would stream for
/// about 8 s (1 MiB fragments) to 26 s (64 KiB fragments) on the benchmark
/// machine (docs/farm-performance-log-2.md) before the final Ack.
pub const DEFAULT_MERGE_PARTS_FROM: u64 = 1 << 30;

/// Which API the store speaks (`[object_store] service`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreService {
    /// S3 and the stores that speak it (AWS S3, Garage, MinIO, Ceph RGW, R2, ...): the
    /// default.
    #[default]
    S3,
    /// Azure Blob Storage (or Azurite): `bucket` names the container, `account` the storage
    /// account, `secret_access_key` the account's key. Part copies, cut-through fragments,
    /// payload signing and presigned replies are S3's and not available.
    Azure,
}

/// Where the farm's bytes live: an S3-compatible bucket (the `[object_store]` table), or an
/// Azure Blob Storage container (`service = "azure"`).
///
/// Unset credentials and region come from the usual environment variables
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` /
/// `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`), then from the instance's metadata service;
/// for Azure from `AZURE_STORAGE_ACCOUNT_NAME` and `AZURE_STORAGE_ACCOUNT_KEY`.
#[derive(Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectStoreConfig {
    /// The API the store speaks: `"s3"` (default) or `"azure"`.
    pub service: StoreService,
    /// The bucket (required); with `service = "azure"` the container.
    pub bucket: String,
    /// The Azure storage account (`service = "azure"` only).
    pub account: Option<String>,
    /// Every key starts with this (`/`-separated, may be empty).
    pub prefix: String,
    /// The S3 endpoint URL, for stores other than AWS (`http://127.0.0.1:3900` for a local
    /// Garage); unset means AWS S3 of `region`.
    pub endpoint: Option<String>,
    /// The region to sign requests for (Garage's default is `garage`).
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key; with `service = "azure"` the storage account's key.
    pub secret_access_key: Option<String>,
    /// Session token of temporary credentials.
    pub session_token: Option<String>,
    /// Allow a plain-HTTP endpoint (default: true when the endpoint, from `endpoint` or
    /// `AWS_ENDPOINT_URL`, starts with `http://`; `false` with such an endpoint is refused at
    /// start).
    pub allow_http: Option<bool>,
    /// Address buckets as `https://<bucket>.<endpoint>` instead of `<endpoint>/<bucket>`.
    pub virtual_hosted_style: bool,
    /// Part size of multipart uploads in bytes, also the size from which one object is
    /// written as a multipart upload (default 8 MiB, at least 5 MiB, at most 5 GiB; on Azure
    /// 4 MiB, at least 1 MiB, at most 4000 MiB). A fragment writer holds up to this much in
    /// memory.
    pub part_size: Option<u64>,
    /// Connect timeout in milliseconds (default 2000).
    pub connect_timeout_ms: Option<u64>,
    /// Timeout of one request in seconds (default 60).
    pub request_timeout_secs: Option<u64>,
    /// Retries of a failed idempotent request, with exponential back-off (default 3).
    pub max_retries: Option<usize>,
    /// Stop retrying a request after this many seconds (default 10).
    pub retry_timeout_secs: Option<u64>,
    /// Assemble a finished upload's large fragments with server-side copies
    /// (`UploadPartCopy`: their bytes never pass through the node) where the store has them
    /// (default true; a store that refuses is detected and streamed to instead). `false`
    /// streams every upload's bytes through the node at assembly.
    pub server_side_copy: Option<bool>,
    /// Stream a fragment shorter than `part_size` to the store while its body arrives (one
    /// PUT opened at its first byte with the fragment's length, signed with
    /// `UNSIGNED-PAYLOAD`), instead of sending it after its last byte (default true). The
    /// signature then covers the request but not the body: over plain `http://` the body is
    /// protected only by the network (use TLS, or a private network, as for the rest of the
    /// farm's traffic). A store that refuses unsigned payloads is detected and sent whole
    /// fragments from then on.
    pub stream_fragments: Option<bool>,
    /// Sign the body of every write (PUT, multipart part) with its SHA-256 in the request's
    /// signature (`x-amz-content-sha256`) instead of `UNSIGNED-PAYLOAD`. Unset: signed over a
    /// plain `http://` endpoint, where the signature is the body's only protection in
    /// transit, and unsigned over `https://`, where TLS protects it and the hash would cost
    /// the node a pass over every byte it writes (an upload's assembly, merges, replies),
    /// before the write can start; AWS's SDKs do the same for S3 over HTTPS. Set `true` for a
    /// store that refuses unsigned payloads. (Cut-through fragments are unsigned either way:
    /// `stream_fragments`.)
    pub sign_payloads: Option<bool>,
    /// Merge runs of 32 or more fragments that end within one MiB of the upload (fragments
    /// of under 32 KiB or so) into one object, in the background while the upload goes on
    /// (default true), so that completing an upload sent in tiny fragments reads about one
    /// object per MiB instead of one per fragment. Costs a second write of those bytes to the
    /// store.
    pub coalesce_fragments: Option<bool>,
    /// Uploads of at least this many bytes (their Content-Range total) have their fragments
    /// shorter than 5 MiB merged, in the background while the upload goes on, into objects of
    /// at least 5 MiB, each ending with the fragment that reaches a multiple of `part_size`
    /// (at most 16 MiB) of the upload's offsets, so that completion copies them server-side
    /// (`UploadPartCopy`) instead of streaming them through the node before the final
    /// fragment's Ack. The bytes pass through the node once more either way, and the store
    /// copies them: the whole upload takes longer, its last Ack less. Default 1 GiB; 0 turns
    /// it off. Needs `coalesce_fragments` and `server_side_copy`.
    pub merge_parts_from: Option<u64>,
    /// Answer a reply download (GET or HEAD of a session's reply URL, after the node has
    /// checked the session, its route and its owner) with `307 Temporary Redirect` to a
    /// presigned URL of the reply object, valid this many seconds, so that the reply's bytes
    /// go from the store to the client without passing through a node. Unset or 0: off (the
    /// node streams the reply). Clients must reach `endpoint` under the same name; the reply
    /// progress of a redirected GET is counted when the redirect is given (the node never
    /// sees the bytes). At most 604800 (7 days, the longest a SigV4 signature lasts).
    pub presigned_reply_secs: Option<u64>,
    /// Bytes of fragment bodies this node holds in memory at most, all fragments in flight
    /// together (default 1 GiB). A fragment sent after its last byte (not streamed, or at
    /// least `part_size` long) reserves what it will hold, up to 2 × `part_size`, before its
    /// body is read, and when that does not fit within `fragment_memory_wait_secs` (10 s by
    /// default) answers 503 (the client retries
    /// later); a streamed fragment keeps its bytes for a second try of its PUT only while
    /// they fit. Give it at least 2 × `part_size`.
    pub fragment_memory: Option<u64>,
    /// Seconds something that must hold its bytes (a fragment sent after its last byte, an
    /// upload's assembly, a merge, a reply past its first 64 KiB) waits for room in
    /// `fragment_memory` before it gives up with a transient error (default 10; 0: it does
    /// not wait).
    pub fragment_memory_wait_secs: Option<u64>,
}

/// The longest validity of a presigned URL (SigV4: 7 days).
pub const MAX_PRESIGNED_SECS: u64 = 7 * 24 * 60 * 60;

impl std::fmt::Debug for ObjectStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("ObjectStoreConfig")
            .field("service", &self.service)
            .field("bucket", &self.bucket)
            .field("account", &self.account)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redact(&self.secret_access_key))
            .field("session_token", &redact(&self.session_token))
            .field("allow_http", &self.allow_http)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .field("part_size", &self.part_size)
            .field("server_side_copy", &self.server_side_copy)
            .field("stream_fragments", &self.stream_fragments)
            .field("sign_payloads", &self.sign_payloads)
            .field("coalesce_fragments", &self.coalesce_fragments)
            .field("merge_parts_from", &self.merge_parts_from)
            .field("presigned_reply_secs", &self.presigned_reply_secs)
            .field("fragment_memory", &self.fragment_memory)
            .field("fragment_memory_wait_secs", &self.fragment_memory_wait_secs)
            .finish_non_exhaustive()
    }
}

impl ObjectStoreConfig {
    /// The effective part size: the configured one, else [`DEFAULT_PART_SIZE`]
    /// ([`DEFAULT_AZURE_BLOCK_SIZE`] on Azure), kept within the store's limits
    /// ([`MIN_PART_SIZE`] to [`MAX_PART_SIZE`] on S3, [`MIN_AZURE_BLOCK_SIZE`] to
    /// [`MAX_AZURE_BLOCK_SIZE`] on Azure).
    pub fn part_size(&self) -> usize {
        let (default, min, max) = match self.service {
            StoreService::S3 => (DEFAULT_PART_SIZE, MIN_PART_SIZE, MAX_PART_SIZE),
            StoreService::Azure => (
                DEFAULT_AZURE_BLOCK_SIZE,
                MIN_AZURE_BLOCK_SIZE,
                MAX_AZURE_BLOCK_SIZE,
            ),
        };
        let size = self.part_size.unwrap_or(default).clamp(min, max);
        usize::try_from(size).unwrap_or(usize::MAX)
    }

    /// Whether uploads are assembled with server-side part copies where possible (S3 only).
    pub fn server_side_copy(&self) -> bool {
        self.service == StoreService::S3 && self.server_side_copy.unwrap_or(true)
    }

    /// Whether fragments shorter than the part size are streamed while they arrive (S3
    /// only).
    pub fn stream_fragments(&self) -> bool {
        self.service == StoreService::S3 && self.stream_fragments.unwrap_or(true)
    }

    /// The node's budget for fragment bytes in memory (`fragment_memory`).
    pub fn fragment_memory(&self) -> u64 {
        self.fragment_memory
            .unwrap_or(super::budget::DEFAULT_FRAGMENT_MEMORY)
    }

    /// How long something that must hold its bytes waits for room in the node's budget
    /// (`fragment_memory_wait_secs`, default 10 s).
    pub fn fragment_memory_wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.fragment_memory_wait_secs
                .unwrap_or(super::budget::DEFAULT_WAIT.as_secs()),
        )
    }

    /// Whether runs of small fragments are merged while the upload goes on.
    pub fn coalesce_fragments(&self) -> bool {
        self.coalesce_fragments.unwrap_or(true)
    }

    /// The upload length from which small fragments are merged into part-sized objects
    /// (`merge_parts_from`; `None`: never).
    pub fn merge_parts_from(&self) -> Option<u64> {
        match self.merge_parts_from.unwrap_or(DEFAULT_MERGE_PARTS_FROM) {
            0 => None,
            n => Some(n),
        }
    }

    /// How long a presigned reply URL is valid, when reply downloads are redirected to the
    /// store (`presigned_reply_secs` set and not 0).
    pub fn presigned_reply_ttl(&self) -> Option<Duration> {
        self.presigned_reply_secs
            .filter(|&s| s > 0)
            .map(Duration::from_secs)
    }

    /// The connect timeout, the timeout of one request, and the retries of a failed one.
    pub(crate) fn timeouts(&self) -> (Duration, Duration, usize) {
        (
            Duration::from_millis(self.connect_timeout_ms.unwrap_or(2000)),
            Duration::from_secs(self.request_timeout_secs.unwrap_or(60)),
            self.max_retries.unwrap_or(3),
        )
    }

    /// What makes the table unusable before anything is sent: no bucket, a presigned URL
    /// validity no signature can have, or a wait for memory longer than an hour. The message
    /// names the key and what to set.
    pub fn check(&self) -> Result<(), String> {
        if self.bucket.is_empty() {
            return Err("[object_store] bucket must be set".into());
        }
        if self
            .presigned_reply_secs
            .is_some_and(|s| s > MAX_PRESIGNED_SECS)
        {
            return Err(format!(
                "[object_store] presigned_reply_secs must be at most {MAX_PRESIGNED_SECS} (7 \
                 days, the longest a presigned URL lasts), or 0 to serve replies through the \
                 nodes"
            ));
        }
        if self.fragment_memory_wait_secs.is_some_and(|s| s > 3600) {
            return Err(
                "[object_store] fragment_memory_wait_secs must be at most 3600 (an hour); 0 \
                 answers at once when the node has no room"
                    .into(),
            );
        }
        match self.service {
            StoreService::S3 if self.account.is_some() => Err(
                "[object_store] account is for service = \"azure\"; an S3 store's key goes in \
                 access_key_id"
                    .into(),
            ),
            StoreService::S3 => Ok(()),
            StoreService::Azure => super::azure::check(self),
        }
    }

    /// The endpoint requests go to, as the S3 client reads it: `endpoint`, else the one the
    /// environment names (`AWS_ENDPOINT_URL`); `None` for AWS S3 itself.
    /// With `service = "azure"`: `endpoint`, else `AZURE_STORAGE_ENDPOINT`, else the
    /// account's blob URL.
    pub fn effective_endpoint(&self) -> Option<String> {
        self.endpoint_and_whence().map(|(endpoint, _)| endpoint)
    }

    /// [`ObjectStoreConfig::effective_endpoint`], and whether a key of this table named it
    /// (`false`: the environment did).
    fn endpoint_and_whence(&self) -> Option<(String, bool)> {
        match self.service {
            StoreService::S3 => endpoint_of(&self.builder_from_env())
                .map(|endpoint| (endpoint, self.endpoint.is_some())),
            StoreService::Azure => super::azure::endpoint(self),
        }
    }

    /// Where the bytes go, as `bitsd check-config` shows it: `bucket B` (`Azure container B`),
    /// `, prefix P` when there is one, then ` at URL` ([`ObjectStoreConfig::effective_endpoint`];
    /// `(from the environment)` when no key of the table named it), ` on AWS S3` for S3
    /// without an endpoint, or for Azure without an account what to set.
    pub fn describe(&self) -> String {
        let noun = match self.service {
            StoreService::S3 => "bucket",
            StoreService::Azure => "Azure container",
        };
        let prefix = if self.prefix.is_empty() {
            String::new()
        } else {
            format!(", prefix {}", self.prefix)
        };
        let place = match self.endpoint_and_whence() {
            Some((e, true)) => format!(" at {e}"),
            Some((e, false)) => format!(" at {e} (from the environment)"),
            None if self.service == StoreService::Azure => {
                " (no account: set account or AZURE_STORAGE_ACCOUNT_NAME)".to_owned()
            }
            None => " on AWS S3".to_owned(),
        };
        format!("{noun} {}{prefix}{place}", self.bucket)
    }

    /// The client builder from the environment, with this table's bucket and endpoint.
    fn builder_from_env(&self) -> AmazonS3Builder {
        let builder = AmazonS3Builder::from_env().with_bucket_name(&self.bucket);
        match &self.endpoint {
            Some(endpoint) => builder.with_endpoint(endpoint),
            None => builder,
        }
    }

    /// The S3 client, and where its bucket is (for the requests `object_store` cannot send).
    pub(crate) fn build(&self) -> Result<(AmazonS3, S3Location), StorageError> {
        let mut builder = self.builder_from_env();
        let endpoint = endpoint_of(&builder);
        let (client, retry) = self.prepare(endpoint.as_deref())?;
        if let Some(region) = &self.region {
            builder = builder.with_region(region);
        }
        if let Some(key) = &self.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &self.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if let Some(token) = &self.session_token {
            builder = builder.with_token(token);
        }
        // The bucket's URL as object_store forms it (endpoint from the config or AWS_ENDPOINT_URL).
        let region = builder
            .get_config_value(&AmazonS3ConfigKey::Region)
            .unwrap_or_else(|| "us-east-1".into());
        let sign_payloads = signs_payloads(self.sign_payloads, endpoint.as_deref());
        let bucket_endpoint = match (endpoint, self.virtual_hosted_style) {
            (Some(endpoint), true) => endpoint.trim_end_matches('/').to_string(),
            (Some(endpoint), false) => {
                format!("{}/{}", endpoint.trim_end_matches('/'), self.bucket)
            }
            (None, true) => format!("https://{}.s3.{region}.amazonaws.com", self.bucket),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{}", self.bucket),
        };
        let location = S3Location {
            bucket_endpoint,
            bucket: self.bucket.clone(),
            region,
        };
        let s3 = builder
            .with_client_options(client)
            .with_virtual_hosted_style_request(self.virtual_hosted_style)
            .with_retry(retry)
            .with_unsigned_payload(!sign_payloads)
            .build()
            .map_err(|e| self.refusal(e.to_string()))?;
        Ok((s3, location))
    }

    /// The Azure client of a `service = "azure"` table (plain HTTP allowed, unless the table
    /// says otherwise, when the endpoint it sends to is `http://`, wherever it came from).
    pub(crate) fn build_azure(&self) -> Result<object_store::azure::MicrosoftAzure, StorageError> {
        let (client, retry) = self.prepare(self.effective_endpoint().as_deref())?;
        super::azure::build(self, client, retry).map_err(|why| self.refusal(why))
    }

    /// What every store's client is built with, once the table is checked: the HTTP
    /// client's options (timeouts, and plain HTTP allowed for `endpoint`) and the retries.
    fn prepare(
        &self,
        endpoint: Option<&str>,
    ) -> Result<(ClientOptions, RetryConfig), StorageError> {
        self.check().map_err(|why| self.refusal(why))?;
        // The HTTP client's TLS needs a process-wide rustls provider; bitsd uses ring
        // everywhere (a provider installed earlier by the embedding program stays).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let allow_http = self.allow_http(endpoint).map_err(|why| self.refusal(why))?;
        let (connect_timeout, timeout, max_retries) = self.timeouts();
        let client = ClientOptions::new()
            .with_connect_timeout(connect_timeout)
            .with_timeout(timeout)
            .with_allow_http(allow_http);
        let retry = RetryConfig {
            max_retries,
            retry_timeout: Duration::from_secs(self.retry_timeout_secs.unwrap_or(10)),
            ..RetryConfig::default()
        };
        Ok((client, retry))
    }

    /// The error of a table a client cannot be built from, for `why`.
    fn refusal(&self, why: String) -> StorageError {
        StorageError::ObjectStore {
            op: "configure",
            key: self.bucket.clone(),
            why,
        }
    }

    /// `allow_http` as set, else whether `endpoint` is plain `http://`; refused when it is
    /// and `allow_http = false`.
    fn allow_http(&self, endpoint: Option<&str>) -> Result<bool, String> {
        let plain_http = endpoint.is_some_and(is_plain_http);
        let allow_http = self.allow_http.unwrap_or(plain_http);
        if plain_http && !allow_http {
            return Err(format!(
                "the endpoint {} is plain http:// but [object_store] allow_http = false: \
                 use an https:// endpoint, or set allow_http = true",
                endpoint.unwrap_or_default()
            ));
        }
        Ok(allow_http)
    }
}

/// The endpoint `builder` will send to (its S3 endpoint, else its general one).
fn endpoint_of(builder: &AmazonS3Builder) -> Option<String> {
    builder
        .get_config_value(&AmazonS3ConfigKey::S3Endpoint)
        .or_else(|| builder.get_config_value(&AmazonS3ConfigKey::Endpoint))
}

/// Whether `endpoint` is a plain `http://` URL.
fn is_plain_http(endpoint: &str) -> bool {
    endpoint
        .trim_start()
        .get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"))
}

/// `sign_payloads` as set, or by the endpoint's scheme: signed over plain HTTP, unsigned over
/// HTTPS (AWS S3 itself when no endpoint is set).
fn signs_payloads(set: Option<bool>, endpoint: Option<&str>) -> bool {
    set.unwrap_or_else(|| endpoint.is_some_and(is_plain_http))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_signed_over_plain_http_unless_set() {
        assert!(signs_payloads(None, Some("http://127.0.0.1:3900")));
        assert!(signs_payloads(None, Some("HTTP://garage.internal")));
        assert!(!signs_payloads(None, Some("https://s3.internal")));
        assert!(!signs_payloads(None, None), "AWS S3 over https");
        assert!(signs_payloads(Some(true), Some("https://s3.internal")));
        assert!(!signs_payloads(Some(false), Some("http://127.0.0.1:3900")));
    }

    #[test]
    fn a_plain_http_endpoint_with_allow_http_false_is_refused_at_start() {
        let with = |endpoint: &str, allow_http| ObjectStoreConfig {
            bucket: "b".into(),
            endpoint: Some(endpoint.into()),
            region: Some("garage".into()),
            access_key_id: Some("GK0123456789abcdef01234567".into()),
            secret_access_key: Some("0123456789abcdef".into()),
            allow_http,
            ..ObjectStoreConfig::default()
        };
        let e = with("http://127.0.0.1:3900", Some(false))
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("allow_http = false"), "{e}");
        assert!(with("http://127.0.0.1:3900", None).build().is_ok());
        assert!(with("https://s3.internal", Some(false)).build().is_ok());
        assert!(is_plain_http(" HTTP://x") && !is_plain_http("https://x") && !is_plain_http("ht"));
    }

    #[test]
    fn the_description_names_the_store_and_its_url() {
        let s3 = ObjectStoreConfig {
            bucket: "b".into(),
            prefix: "p".into(),
            endpoint: Some("http://127.0.0.1:3900".into()),
            ..ObjectStoreConfig::default()
        };
        assert_eq!(s3.describe(), "bucket b, prefix p at http://127.0.0.1:3900");
        let azure = ObjectStoreConfig {
            service: StoreService::Azure,
            bucket: "c".into(),
            account: Some("acct".into()),
            ..ObjectStoreConfig::default()
        };
        assert_eq!(
            azure.describe(),
            "Azure container c at https://acct.blob.core.windows.net"
        );
        let azurite = ObjectStoreConfig {
            endpoint: Some("http://127.0.0.1:10000/devstoreaccount1".into()),
            ..azure
        };
        assert_eq!(
            azurite.describe(),
            "Azure container c at http://127.0.0.1:10000/devstoreaccount1"
        );
    }

    #[test]
    fn the_part_size_stays_within_s3s_limits() {
        let with = |n| ObjectStoreConfig {
            part_size: Some(n),
            ..ObjectStoreConfig::default()
        };
        assert_eq!(with(1).part_size() as u64, MIN_PART_SIZE);
        assert_eq!(with(16 << 20).part_size() as u64, 16 << 20);
        assert_eq!(with(u64::MAX).part_size() as u64, MAX_PART_SIZE);
        assert_eq!(
            ObjectStoreConfig::default().part_size() as u64,
            DEFAULT_PART_SIZE
        );
    }

    #[test]
    fn on_azure_the_part_size_stays_within_its_block_limits() {
        let with = |n| ObjectStoreConfig {
            service: StoreService::Azure,
            part_size: n,
            ..ObjectStoreConfig::default()
        };
        assert_eq!(with(Some(1)).part_size() as u64, MIN_AZURE_BLOCK_SIZE);
        assert_eq!(with(Some(2 << 20)).part_size() as u64, 2 << 20);
        assert_eq!(
            with(Some(u64::MAX)).part_size() as u64,
            MAX_AZURE_BLOCK_SIZE
        );
        assert_eq!(with(None).part_size() as u64, DEFAULT_AZURE_BLOCK_SIZE);
    }

    #[test]
    fn part_merges_start_at_1_gib_unless_set_and_0_turns_them_off() {
        let with = |n| ObjectStoreConfig {
            merge_parts_from: n,
            ..ObjectStoreConfig::default()
        };
        assert_eq!(with(None).merge_parts_from(), Some(1 << 30));
        assert_eq!(with(Some(0)).merge_parts_from(), None);
        assert_eq!(with(Some(5)).merge_parts_from(), Some(5));
    }
}
