//! The `[object_store]` configuration and the S3 client built from it.

use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{ClientOptions, RetryConfig};

use crate::StorageError;

/// S3's smallest part of a multipart upload (all but the last part).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

/// Default part size, and the size below which an object is written with one PUT.
pub const DEFAULT_PART_SIZE: u64 = 8 * 1024 * 1024;

/// Where the farm's bytes live: an S3-compatible bucket (the `[object_store]` table).
///
/// Unset credentials and region come from the usual environment variables
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` /
/// `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`), then from the instance's metadata service.
#[derive(Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectStoreConfig {
    /// The bucket (required).
    pub bucket: String,
    /// Every key starts with this (`/`-separated, may be empty).
    pub prefix: String,
    /// The S3 endpoint URL, for stores other than AWS (`http://127.0.0.1:3900` for a local
    /// Garage); unset means AWS S3 of `region`.
    pub endpoint: Option<String>,
    /// The region to sign requests for (Garage's default is `garage`).
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Session token of temporary credentials.
    pub session_token: Option<String>,
    /// Allow a plain-HTTP endpoint (default: true when `endpoint` starts with `http://`).
    pub allow_http: Option<bool>,
    /// Address buckets as `https://<bucket>.<endpoint>` instead of `<endpoint>/<bucket>`.
    pub virtual_hosted_style: bool,
    /// Part size of multipart uploads in bytes, also the size from which one object is
    /// written as a multipart upload (default 8 MiB, at least 5 MiB).
    pub part_size: Option<u64>,
    /// Connect timeout in milliseconds (default 2000).
    pub connect_timeout_ms: Option<u64>,
    /// Timeout of one request in seconds (default 60).
    pub request_timeout_secs: Option<u64>,
    /// Retries of a failed idempotent request, with exponential back-off (default 3).
    pub max_retries: Option<usize>,
    /// Stop retrying a request after this many seconds (default 10).
    pub retry_timeout_secs: Option<u64>,
}

impl std::fmt::Debug for ObjectStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("ObjectStoreConfig")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redact(&self.secret_access_key))
            .field("session_token", &redact(&self.session_token))
            .field("allow_http", &self.allow_http)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .field("part_size", &self.part_size)
            .finish_non_exhaustive()
    }
}

impl ObjectStoreConfig {
    /// The effective part size (the configured one, at least [`MIN_PART_SIZE`]).
    pub fn part_size(&self) -> usize {
        let size = self
            .part_size
            .unwrap_or(DEFAULT_PART_SIZE)
            .max(MIN_PART_SIZE);
        usize::try_from(size).unwrap_or(usize::MAX)
    }

    pub(crate) fn build(&self) -> Result<AmazonS3, StorageError> {
        let refuse = |why: String| StorageError::ObjectStore {
            op: "configure",
            key: self.bucket.clone(),
            why,
        };
        if self.bucket.is_empty() {
            return Err(refuse(
                "no bucket configured: set [object_store] bucket".into(),
            ));
        }
        // The HTTP client's TLS needs a process-wide rustls provider; bitsd uses ring
        // everywhere (a provider installed earlier by the embedding program stays).
        let _ = rustls::crypto::ring::default_provider().install_default();

        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&self.bucket);
        let mut allow_http = false;
        if let Some(endpoint) = &self.endpoint {
            allow_http = endpoint.starts_with("http://");
            builder = builder.with_endpoint(endpoint);
        }
        let allow_http = self.allow_http.unwrap_or(allow_http);
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
        let client = ClientOptions::new()
            .with_connect_timeout(Duration::from_millis(
                self.connect_timeout_ms.unwrap_or(2000),
            ))
            .with_timeout(Duration::from_secs(self.request_timeout_secs.unwrap_or(60)))
            .with_allow_http(allow_http);
        let retry = RetryConfig {
            max_retries: self.max_retries.unwrap_or(3),
            retry_timeout: Duration::from_secs(self.retry_timeout_secs.unwrap_or(10)),
            ..RetryConfig::default()
        };
        builder
            .with_client_options(client)
            .with_allow_http(allow_http)
            .with_virtual_hosted_style_request(self.virtual_hosted_style)
            .with_retry(retry)
            .build()
            .map_err(|e| refuse(e.to_string()))
    }
}
