//! Cut-through PUT: a fragment shorter than the part size is sent to the store while its
//! body arrives, instead of after its last byte.
//!
//! `object_store` puts a whole payload: the PUT of a fragment could start only once the node
//! had received all of it and hashed it for the signature. Here the node opens the PUT at the
//! fragment's first byte with the fragment's length (known from its Content-Range) as
//! `Content-Length`, signed with `x-amz-content-sha256: UNSIGNED-PAYLOAD` by `object_store`'s
//! own SigV4 signer, and forwards body frames as they come.
//!
//! It is only ever a shortcut; the writer keeps every byte as before, so that at its finish
//! anything that went wrong with the stream (a refused unsigned payload, a store timing out a
//! slow client's trickle, a connection reset) ends in the ordinary PUT of the held bytes.
//! **The last byte is held back** until [`StreamPut::finish`]: the store cannot complete the
//! object before the caller allows it (the shared backend's fragment commit first makes its
//! pending-object row durable). A stream that is dropped or aborted never sends its last
//! byte, so the store never sees a complete body and stores nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method};
use object_store::aws::{AwsAuthorizer, AwsCredentialProvider};
use object_store::client::{HttpRequest, HttpRequestBody};
use object_store::{ObjectStore, ObjectStoreExt};
use percent_encoding::utf8_percent_encode;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::part_copy::{S3Location, KEY_ENCODE};
use super::ObjectKey;
use crate::StorageError;

/// Body frames queued for the store at most (back-pressure on the client beyond that).
const QUEUED_FRAMES: usize = 8;

/// Opens cut-through PUTs to one bucket.
pub(crate) struct StreamPutter {
    http: reqwest::Client,
    /// The ordinary (signed) client of the same bucket, to tell a refused unsigned payload
    /// from credentials the store refuses altogether.
    store: Arc<dyn ObjectStore>,
    credentials: AwsCredentialProvider,
    location: S3Location,
    /// How long the store may take to answer once the last byte went out.
    answer_within: Duration,
    /// The store refused an unsigned payload once: fragments are stored and forwarded.
    refused: AtomicBool,
}

impl std::fmt::Debug for StreamPutter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamPutter")
            .field("bucket", &self.location.bucket)
            .field("refused", &self.refused)
            .finish_non_exhaustive()
    }
}

impl StreamPutter {
    pub(crate) fn new(
        store: Arc<dyn ObjectStore>,
        location: S3Location,
        credentials: AwsCredentialProvider,
        connect_timeout: Duration,
        answer_within: Duration,
    ) -> Result<Self, StorageError> {
        // No timeout on the whole request: it lasts as long as the client takes to send
        // the fragment. A store that gives up on a slow body fails the stream, and the
        // fragment is then stored the ordinary way.
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .build()
            .map_err(|e| StorageError::ObjectStore {
                op: "configure",
                key: location.bucket.clone(),
                why: format!("HTTP client for streamed PUTs: {e}"),
            })?;
        Ok(StreamPutter {
            http,
            store,
            credentials,
            location,
            answer_within,
            refused: AtomicBool::new(false),
        })
    }

    /// Whether fragments are streamed (not after the store refused an unsigned payload).
    pub(crate) fn enabled(&self) -> bool {
        !self.refused.load(Ordering::Relaxed)
    }

    /// Opens the PUT of `len` bytes at `key`; its body is what [`StreamPut::send`] is given.
    pub(crate) fn start(self: &Arc<Self>, key: &ObjectKey, len: u64) -> StreamPut {
        let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUED_FRAMES);
        let putter = Arc::clone(self);
        let key = key.as_str().to_string();
        let request = tokio::spawn(async move {
            let body = futures_util::stream::poll_fn(move |cx| {
                rx.poll_recv(cx)
                    .map(|frame| frame.map(Ok::<Bytes, std::io::Error>))
            });
            putter
                .send(&key, len, reqwest::Body::wrap_stream(body))
                .await
        });
        StreamPut {
            tx: Some(tx),
            request: Some(request),
            putter: Arc::clone(self),
            len,
            sent: 0,
            last: None,
            failed: false,
        }
    }

    /// Signs and sends the PUT; its outcome once the store answered.
    async fn send(&self, key: &str, len: u64, body: reqwest::Body) -> Result<(), Failure> {
        let url = format!(
            "{}/{}",
            self.location.bucket_endpoint,
            utf8_percent_encode(key, &KEY_ENCODE)
        );
        let mut request: HttpRequest = http::Request::builder()
            .method(Method::PUT)
            .uri(&url)
            .body(HttpRequestBody::from(Bytes::new()))
            .map_err(|e| Failure::Other(format!("request {url}: {e}")))?;
        let credential = self
            .credentials
            .get_credential()
            .await
            .map_err(|e| Failure::Other(format!("credentials: {e}")))?;
        AwsAuthorizer::new(&credential, "s3", &self.location.region)
            .with_sign_payload(false)
            .try_authorize(&mut request, None)
            .map_err(|e| Failure::Other(format!("signing: {e}")))?;
        let answer = self
            .http
            .request(Method::PUT, &url)
            .headers(request.headers().clone())
            .header(
                http::header::CONTENT_LENGTH,
                HeaderValue::from_str(&len.to_string())
                    .map_err(|e| Failure::Other(e.to_string()))?,
            )
            .body(body)
            .send()
            .await
            .map_err(|e| Failure::Other(format!("{e}")))?;
        let status = answer.status();
        if status.is_success() {
            return Ok(());
        }
        let text = answer.text().await.unwrap_or_default();
        let code = |c: &str| text.contains(&format!("<Code>{c}</Code>"));
        let why = format!(
            "HTTP {status}: {}",
            text.chars().take(300).collect::<String>()
        );
        let mut refused = status.as_u16() == 501
            || (status.is_client_error()
                && (code("NotImplemented") || code("InvalidRequest") || code("InvalidArgument")));
        if !refused && status.is_client_error() && code("AccessDenied") {
            // A bucket policy may deny unsigned payloads, but wrong credentials are denied
            // too: only when a signed request with the same credentials is let through
            // (a HEAD of the key, not found since this PUT failed) was it the payload.
            refused = self.signed_requests_pass(key).await;
        }
        Err(if refused {
            Failure::Refused(why)
        } else {
            Failure::Other(why)
        })
    }

    /// Whether the store lets a signed request with these credentials through (a HEAD of
    /// `key` answered, found or not).
    async fn signed_requests_pass(&self, key: &str) -> bool {
        // The key came from an `ObjectKey`'s path: it parses as it is.
        let Ok(path) = object_store::path::Path::parse(key) else {
            return false;
        };
        match self.store.head(&path).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => true,
            Err(e) => {
                tracing::debug!(error = %e, "a signed HEAD was refused too: the credentials, not the unsigned payload");
                false
            }
        }
    }
}

/// Why a streamed PUT did not store the object.
#[derive(Debug)]
enum Failure {
    /// The store does not take unsigned payloads (it takes signed ones).
    Refused(String),
    /// Anything else (the store unreachable, a timeout, a reset).
    Other(String),
}

/// One cut-through PUT in progress (see the module documentation).
#[derive(Debug)]
pub(crate) struct StreamPut {
    tx: Option<mpsc::Sender<Bytes>>,
    request: Option<JoinHandle<Result<(), Failure>>>,
    putter: Arc<StreamPutter>,
    len: u64,
    sent: u64,
    /// The frame that ends the body, held back until `finish`.
    last: Option<Bytes>,
    /// The stream broke: the writer stores its held bytes the ordinary way.
    failed: bool,
}

impl Drop for StreamPut {
    /// The request is dropped with its body unfinished: the store sees fewer bytes than
    /// `Content-Length` and stores nothing.
    fn drop(&mut self) {
        if let Some(request) = self.request.take() {
            request.abort();
        }
    }
}

impl StreamPut {
    /// Forwards `bytes` (the next body bytes); the frame that reaches the announced length is
    /// held back for [`StreamPut::finish`]. Bytes past the announced length break the stream.
    pub(crate) async fn send(&mut self, bytes: Bytes) {
        if self.failed || bytes.is_empty() {
            return;
        }
        let end = self.sent + bytes.len() as u64;
        if end > self.len || self.last.is_some() {
            self.fail();
            return;
        }
        if end == self.len {
            self.last = Some(bytes);
            self.sent = end;
            return;
        }
        self.sent = end;
        let sent = match &self.tx {
            Some(tx) => tx.send(bytes).await.is_ok(),
            None => false,
        };
        if !sent {
            // The request ended early (the store answered or the connection broke).
            self.fail();
        }
    }

    fn fail(&mut self) {
        self.failed = true;
        self.tx = None;
        if let Some(request) = self.request.take() {
            request.abort();
        }
    }

    /// Sends the held-back last frame and waits for the store's answer: `true` when the
    /// object is stored. `false` when the stream broke or the store did not store it (the
    /// caller then stores the held bytes itself, at the same key).
    pub(crate) async fn finish(mut self) -> bool {
        if self.failed || self.sent != self.len {
            return false;
        }
        let (Some(tx), Some(last)) = (self.tx.take(), self.last.take()) else {
            return false;
        };
        if tx.send(last).await.is_err() {
            return false;
        }
        drop(tx);
        let Some(mut request) = self.request.take() else {
            return false;
        };
        let answer = tokio::time::timeout(self.putter.answer_within, &mut request).await;
        if answer.is_err() {
            // No answer in time: the request goes (the caller stores the bytes itself).
            request.abort();
        }
        match answer {
            Ok(Ok(Ok(()))) => true,
            Ok(Ok(Err(Failure::Refused(why)))) => {
                if !self.putter.refused.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%why, "the object store refused an unsigned streamed PUT: fragments are stored after their last byte from now on");
                }
                false
            }
            Ok(Ok(Err(Failure::Other(why)))) => {
                tracing::debug!(%why, "streamed PUT failed; storing the fragment the ordinary way");
                false
            }
            // The task panicked or was cancelled, or the store did not answer in time.
            Ok(Err(_)) | Err(_) => false,
        }
    }
}
