//! The notification itself: the request to the backend, its answer, and the reply made of it.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, CONTENT_LENGTH, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio_util::io::ReaderStream;
use url::Url;

use crate::static_reply::check_static_url;
use crate::{HandlerError, Reply, Upload};

use super::{
    HttpNotifyHandler, Notification, UploadBody, CHUNK, COPY_FILE_TO_DESTINATION,
    NOTIFICATION_REPLY_FILE, ORIGINAL_REQUEST_URL, REQUEST_DATAENTITY, REQUEST_DATAFILE,
    RESPONSE_DATAENTITY, RESPONSE_DATAFILE, RESPONSE_FILE, STATIC_RESPONSE_URL,
};

impl HttpNotifyHandler {
    pub(super) async fn notify(&self, upload: Upload) -> Result<Reply, HandlerError> {
        let url = self.target_for(&upload)?;
        let uri: http::Uri = url
            .as_str()
            .parse()
            .map_err(|e| HandlerError::internal(format!("notification URL {url}: {e}")))?;
        let host = match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => return Err(HandlerError::internal(format!("no host in {url}"))),
        };
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(HOST, header_value(host.as_bytes(), "Host")?)
            .header(
                ORIGINAL_REQUEST_URL,
                header_value(upload.original_url.as_bytes(), "BITS-Original-Request-URL")?,
            );

        let progress = Arc::new(Notify::new());
        let local_failure = Arc::new(AtomicBool::new(false));
        let response_file = absolute(&upload.session_file(RESPONSE_FILE))?;
        let body = match self.config.notification {
            Notification::ByValue => {
                let file = upload.open().await.map_err(|e| {
                    HandlerError::internal(format!("opening upload {}: {e}", upload.path.display()))
                })?;
                builder = builder.header(CONTENT_LENGTH, upload.len);
                UploadBody {
                    stream: Some(ReaderStream::with_capacity(file, CHUNK)),
                    remaining: upload.len,
                    progress: Arc::clone(&progress),
                    local_failure: Arc::clone(&local_failure),
                }
            }
            Notification::ByReference => {
                // A response file left by an earlier attempt must not become this reply.
                match tokio::fs::remove_file(&response_file).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(HandlerError::internal(format!(
                            "removing stale {}: {e}",
                            response_file.display()
                        )))
                    }
                }
                let request_file = absolute(&upload.path)?;
                let request_value = header_value(
                    request_file.as_os_str().as_bytes(),
                    "BITS-Request-DataFile-Name",
                )?;
                let response_value = header_value(
                    response_file.as_os_str().as_bytes(),
                    "BITS-Response-DataFile-Name",
                )?;
                builder = builder
                    .header(CONTENT_LENGTH, 0)
                    .header(REQUEST_DATAFILE, request_value.clone())
                    .header(RESPONSE_DATAFILE, response_value.clone());
                if self.config.also_send_data_entity_headers {
                    builder = builder
                        .header(REQUEST_DATAENTITY, request_value)
                        .header(RESPONSE_DATAENTITY, response_value);
                }
                UploadBody {
                    stream: None,
                    remaining: 0,
                    progress: Arc::clone(&progress),
                    local_failure: Arc::clone(&local_failure),
                }
            }
        };
        let request = builder
            .body(body)
            .map_err(|e| HandlerError::internal(format!("building the notification: {e}")))?;

        tracing::debug!(session_id = %upload.session_id, url = %url,
            mode = ?self.config.notification, "notifying the backend");
        let response = self.send(request, &progress, &local_failure, &url).await?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(HandlerError::status(
                status.as_u16(),
                format!("backend {url} answered {status}"),
            ));
        }
        let commit = response.headers().contains_key(COPY_FILE_TO_DESTINATION);
        let with_commit = |reply: Reply| {
            if commit {
                reply.with_commit_upload()
            } else {
                reply
            }
        };
        if let Some(value) = response.headers().get(STATIC_RESPONSE_URL) {
            let static_url = value
                .to_str()
                .map_err(|_| {
                    HandlerError::internal("BITS-Static-Response-URL is not visible ASCII")
                })?
                .trim();
            check_static_url(static_url).map_err(|reason| {
                HandlerError::internal(format!(
                    "BITS-Static-Response-URL {static_url:?} is not an absolute http(s) URL: {reason}"
                ))
            })?;
            return Ok(with_commit(Reply::static_url(static_url)));
        }

        let body_path = upload.unique_session_file(NOTIFICATION_REPLY_FILE);
        let body_len = match store_body(response.into_body(), &body_path, self.config.timeout).await
        {
            Ok(len) => len,
            Err(e) => {
                let _ = tokio::fs::remove_file(&body_path).await;
                return Err(e);
            }
        };
        let reply = if body_len > 0 {
            Reply::file(body_path)
        } else {
            let _ = tokio::fs::remove_file(&body_path).await;
            match self.config.notification {
                Notification::ByValue => Reply::empty(),
                Notification::ByReference => match tokio::fs::metadata(&response_file).await {
                    Ok(meta) if meta.is_file() => Reply::file(response_file),
                    _ => Reply::empty(),
                },
            }
        };
        Ok(with_commit(reply))
    }

    /// Sends `request` and waits for the response head, failing as unreachable when nothing
    /// happens (no upload bytes taken, no answer) for the timeout.
    async fn send(
        &self,
        request: Request<UploadBody>,
        progress: &Notify,
        local_failure: &AtomicBool,
        url: &Url,
    ) -> Result<http::Response<Incoming>, HandlerError> {
        let timeout = self.config.timeout;
        let response = self.client.request(request);
        tokio::pin!(response);
        let result = loop {
            tokio::select! {
                result = &mut response => break result,
                () = progress.notified() => continue,
                () = tokio::time::sleep(timeout) => {
                    return Err(HandlerError::Unreachable(format!(
                        "backend {url} did not answer within {timeout:?}"
                    )));
                }
            }
        };
        result.map_err(|e| {
            if local_failure.load(Ordering::Relaxed) {
                HandlerError::internal(format!("sending the upload to {url}: {}", chain(&e)))
            } else {
                HandlerError::Unreachable(format!("backend {url}: {}", chain(&e)))
            }
        })
    }
}

pub(super) fn header_value(bytes: &[u8], name: &str) -> Result<HeaderValue, HandlerError> {
    HeaderValue::from_bytes(bytes)
        .map_err(|_| HandlerError::internal(format!("{name} would not be a valid header value")))
}

pub(super) fn absolute(path: &Path) -> Result<PathBuf, HandlerError> {
    std::path::absolute(path)
        .map_err(|e| HandlerError::internal(format!("absolute path of {}: {e}", path.display())))
}

/// An error and its sources, `: `-separated.
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Streams the response body into a new file at `path`; returns its length. Each chunk must
/// arrive within `timeout`.
async fn store_body(
    mut body: Incoming,
    path: &Path,
    timeout: Duration,
) -> Result<u64, HandlerError> {
    let write_err =
        |e: io::Error| HandlerError::internal(format!("writing {}: {e}", path.display()));
    let mut file = tokio::fs::File::create(path).await.map_err(write_err)?;
    let mut len = 0u64;
    loop {
        let frame = match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => {
                return Err(HandlerError::Unreachable(format!(
                    "backend stalled for {timeout:?} sending its response body"
                )))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(HandlerError::Unreachable(format!(
                    "reading the backend's response body: {}",
                    chain(&e)
                )))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            file.write_all(&data).await.map_err(write_err)?;
            len += data.len() as u64;
        }
    }
    file.flush().await.map_err(write_err)?;
    Ok(len)
}
