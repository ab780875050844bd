//! `UploadPartCopy`: a part of a multipart upload that the store copies from another object
//! (or a byte range of one), so the bytes never pass through the node.
//!
//! `object_store` has no such call, so this module sends that one request itself: an S3
//! `PUT <bucket>/<key>?partNumber=N&uploadId=ID` with `x-amz-copy-source` and
//! `x-amz-copy-source-range`, signed with `object_store`'s own SigV4 signer and the same
//! credentials as every other request. The rest of the multipart upload (create, streamed
//! parts, complete, abort) goes through `object_store`.
//!
//! A store that does not implement the call answers 501 `NotImplemented` (or 400/403 with
//! such a code): that is a [`CopyError::Refused`], and assembly streams instead from then on.
//! S3 may answer a copy with 200 and an `<Error>` document in the body; that is a failure.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{HeaderValue, Method};
use object_store::aws::{AwsAuthorizer, AwsCredentialProvider};
use object_store::client::{HttpRequest, HttpRequestBody};
use object_store::multipart::PartId;
use object_store::path::Path;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::StorageError;

/// What S3 leaves unencoded in a key of a URL path (and in `x-amz-copy-source`).
pub(crate) const KEY_ENCODE: AsciiSet = NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// Where the bucket is and how requests to it are signed.
#[derive(Clone, Debug)]
pub(crate) struct S3Location {
    /// The bucket's URL, without a trailing slash (`http://127.0.0.1:3900/bucket`).
    pub bucket_endpoint: String,
    /// The bucket's name.
    pub bucket: String,
    /// The region requests are signed for.
    pub region: String,
}

/// Why a part copy did not happen.
#[derive(Debug)]
pub(crate) enum CopyError {
    /// The store does not do part copies (or not for these credentials): stream instead.
    Refused,
    /// The copy failed (the store unreachable, the source missing...).
    Failed(StorageError),
}

impl From<StorageError> for CopyError {
    fn from(e: StorageError) -> Self {
        CopyError::Failed(e)
    }
}

/// Sends `UploadPartCopy` requests.
#[derive(Debug)]
pub(crate) struct PartCopier {
    http: reqwest::Client,
    credentials: AwsCredentialProvider,
    location: S3Location,
    retries: usize,
    /// The store refused a part copy once: assemble by streaming from then on.
    refused: AtomicBool,
}

impl PartCopier {
    pub(crate) fn new(
        location: S3Location,
        credentials: AwsCredentialProvider,
        connect_timeout: Duration,
        timeout: Duration,
        retries: usize,
    ) -> Result<Self, StorageError> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            .build()
            .map_err(|e| StorageError::ObjectStore {
                op: "configure",
                key: location.bucket.clone(),
                why: format!("HTTP client for part copies: {e}"),
            })?;
        Ok(PartCopier {
            http,
            credentials,
            location,
            retries,
            refused: AtomicBool::new(false),
        })
    }

    /// Whether the store refused a part copy before (then callers stream instead).
    pub(crate) fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// Copies bytes `range` of object `source` into part `part_number` (1-based) of the
    /// multipart upload `upload_id` of `dest`. Transient failures (connection, 5xx, 429, an
    /// error document in a 200) are retried a few times: a part copy is idempotent.
    pub(crate) async fn copy_part(
        &self,
        dest: &Path,
        upload_id: &str,
        part_number: usize,
        source: &Path,
        range: Range<u64>,
    ) -> Result<PartId, CopyError> {
        let mut attempt = 0;
        loop {
            match self
                .copy_once(dest, upload_id, part_number, source, range.clone())
                .await
            {
                Err(Attempt::Transient(why)) if attempt < self.retries => {
                    attempt += 1;
                    tracing::debug!(attempt, %why, key = %dest, part_number, "part copy retried");
                    tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
                }
                Err(Attempt::Transient(why)) | Err(Attempt::Fatal(why)) => {
                    return Err(CopyError::Failed(StorageError::ObjectStore {
                        op: "copy part",
                        key: source.to_string(),
                        why,
                    }))
                }
                Err(Attempt::Refused(why)) => {
                    if !self.refused.swap(true, Ordering::Relaxed) {
                        tracing::warn!(%why, "the object store refused UploadPartCopy: uploads are assembled by streaming their bytes through the node from now on");
                    }
                    return Err(CopyError::Refused);
                }
                Ok(part) => return Ok(part),
            }
        }
    }

    async fn copy_once(
        &self,
        dest: &Path,
        upload_id: &str,
        part_number: usize,
        source: &Path,
        range: Range<u64>,
    ) -> Result<PartId, Attempt> {
        let url = format!(
            "{}/{}?partNumber={part_number}&uploadId={}",
            self.location.bucket_endpoint,
            utf8_percent_encode(dest.as_ref(), &KEY_ENCODE),
            utf8_percent_encode(upload_id, NON_ALPHANUMERIC),
        );
        let copy_source = format!(
            "{}/{}",
            self.location.bucket,
            utf8_percent_encode(source.as_ref(), &KEY_ENCODE)
        );
        let header = |v: String| {
            HeaderValue::from_str(&v).map_err(|e| Attempt::Fatal(format!("header {v:?}: {e}")))
        };
        let mut request: HttpRequest = http::Request::builder()
            .method(Method::PUT)
            .uri(&url)
            .body(HttpRequestBody::from(bytes::Bytes::new()))
            .map_err(|e| Attempt::Fatal(format!("request {url}: {e}")))?;
        let headers = request.headers_mut();
        headers.insert("x-amz-copy-source", header(copy_source)?);
        headers.insert(
            "x-amz-copy-source-range",
            header(format!(
                "bytes={}-{}",
                range.start,
                range.end.saturating_sub(1)
            ))?,
        );
        let credential = self
            .credentials
            .get_credential()
            .await
            .map_err(|e| Attempt::Transient(format!("credentials: {e}")))?;
        AwsAuthorizer::new(&credential, "s3", &self.location.region)
            .try_authorize(&mut request, None)
            .map_err(|e| Attempt::Fatal(format!("signing: {e}")))?;
        let sent = self
            .http
            .request(Method::PUT, &url)
            .headers(request.headers().clone())
            .header(http::header::CONTENT_LENGTH, "0")
            .send()
            .await
            .map_err(|e| Attempt::Transient(format!("{e}")))?;
        let status = sent.status();
        let body = sent
            .text()
            .await
            .map_err(|e| Attempt::Transient(format!("reading the answer: {e}")))?;
        let code = xml_element(&body, "Code").unwrap_or_default();
        if status.is_success() && !body.contains("<Error>") {
            return match xml_element(&body, "ETag") {
                Some(e_tag) if !e_tag.is_empty() => Ok(PartId { content_id: e_tag }),
                _ => Err(Attempt::Fatal(format!(
                    "HTTP {status} without an ETag: {}",
                    clip(&body)
                ))),
            };
        }
        let why = format!("HTTP {status} {code}: {}", clip(&body));
        let refused_code = matches!(
            code.as_str(),
            "NotImplemented" | "AccessDenied" | "InvalidRequest" | "MethodNotAllowed"
        );
        Err(
            if status.as_u16() == 501 || (status.is_client_error() && refused_code) {
                Attempt::Refused(why)
            } else if status.is_server_error() || status.as_u16() == 429 || status.is_success() {
                Attempt::Transient(why)
            } else {
                Attempt::Fatal(why)
            },
        )
    }
}

/// One request's outcome, before retries.
enum Attempt {
    Transient(String),
    Refused(String),
    Fatal(String),
}

/// The text of the first `<name>` element of an XML document, unescaped.
fn xml_element(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&format!("</{name}>"))?;
    Some(
        xml[start..end]
            .replace("&quot;", "\"")
            .replace("&#34;", "\"")
            .replace("&apos;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

/// At most 300 characters of an answer, for an error message.
fn clip(body: &str) -> String {
    body.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_and_codes_are_read_from_the_answer() {
        let ok = r#"<?xml version="1.0"?><CopyPartResult><LastModified>x</LastModified><ETag>&quot;9b2cf535f27731c974343645a3985328&quot;</ETag></CopyPartResult>"#;
        assert_eq!(
            xml_element(ok, "ETag").as_deref(),
            Some("\"9b2cf535f27731c974343645a3985328\"")
        );
        let err = "<Error><Code>NotImplemented</Code><Message>no</Message></Error>";
        assert_eq!(xml_element(err, "Code").as_deref(), Some("NotImplemented"));
        assert_eq!(xml_element(err, "ETag"), None);
        assert_eq!(xml_element("<ETag>unterminated", "ETag"), None);
    }

    #[test]
    fn keys_are_encoded_like_object_store_encodes_them() {
        let key = "farm/sessions/a b/frag/00000000000000000000-x+y";
        assert_eq!(
            utf8_percent_encode(key, &KEY_ENCODE).to_string(),
            "farm/sessions/a%20b/frag/00000000000000000000-x%2By"
        );
    }
}
