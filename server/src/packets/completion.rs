//! The completion step (§6): once the last byte of an upload is held, commit a plain upload
//! to its destination, or run the route's reply handler and store its reply.

use bitsd_protocol::{Ack, BitsError};
use bitsd_reply_handlers::{ReplyBody, Upload};
use bitsd_storage::{
    now_millis, ByteRanges, CommitOutcome, ReplyKind, ReplyRecord, SessionRecord, SessionState,
    UploadMode,
};
use futures_util::StreamExt;
use http::request::Parts;
use http::HeaderValue;

use super::fragment::Failure;
use crate::request_url::RequestOrigin;
use crate::routes::Route;
use crate::service::{storage_failure, Shared};

/// The completion step, idempotent (§6.2): commit a plain upload, or produce and store the
/// reply of an upload-reply session once, then Ack with the total (and the reply URL).
pub(super) async fn complete(
    shared: &Shared,
    route: &Route,
    parts: &Parts,
    record: &mut SessionRecord,
) -> Result<Ack, Failure> {
    let id = record.id;
    let total = record.received;
    let at_total = |error: BitsError| Failure {
        error,
        received: Some(total),
    };
    match route.mode() {
        UploadMode::Upload => {
            commit(shared, route, record).await.map_err(at_total)?;
            Ok(Ack::ok().session(&id).received(total))
        }
        UploadMode::UploadReply => {
            if record.reply.is_none() {
                produce_reply(shared, route, parts, record)
                    .await
                    .map_err(at_total)?;
            }
            let url = record
                .reply
                .as_ref()
                .map(|r| r.url.as_str())
                .unwrap_or_default();
            let url = HeaderValue::from_str(url).map_err(|_| {
                at_total(BitsError::internal(
                    bitsd_protocol::HResult::E_FAIL,
                    "reply URL is not a header value",
                ))
            })?;
            Ok(Ack::ok().session(&id).received(total).reply_url(url))
        }
    }
}

/// Commits the upload to its destination unless that is done already.
async fn commit(
    shared: &Shared,
    route: &Route,
    record: &mut SessionRecord,
) -> Result<(), BitsError> {
    if record.committed {
        return Ok(());
    }
    let Some(dest) = record.destination.clone() else {
        return Err(BitsError::access_denied(
            "the URL names a directory, not a file",
        ));
    };
    let outcome = shared
        .store
        .commit_upload(&record.id, &dest, route.overwrites_allowed())
        .await
        .map_err(storage_failure)?;
    match outcome {
        CommitOutcome::Committed => {
            record.committed = true;
            record.touch();
            shared.store.save(record).await.map_err(storage_failure)?;
            tracing::info!(destination = %dest, "upload committed");
            Ok(())
        }
        CommitOutcome::DestinationExists => Err(BitsError::access_denied(format!(
            "{dest} exists and overwrites are off"
        ))),
        CommitOutcome::DestinationInvalid => Err(BitsError::access_denied(format!(
            "{dest} is not a file that can be written"
        ))),
    }
}

/// Runs the route's reply handler and stores its reply durably before recording it.
async fn produce_reply(
    shared: &Shared,
    route: &Route,
    parts: &Parts,
    record: &mut SessionRecord,
) -> Result<(), BitsError> {
    let handler = route.handler().ok_or_else(|| {
        BitsError::internal(
            bitsd_protocol::HResult::E_FAIL,
            "upload-reply route without handler",
        )
    })?;
    let upload = Upload {
        session_id: record.id,
        original_url: record.remote_url.clone(),
        content_name: record.content_name.clone(),
        len: record.received,
        path: shared.store.upload_path(&record.id),
        session_dir: shared.store.session_dir(&record.id),
    };
    let started = std::time::Instant::now();
    // The handler runs in its own task: a panic there fails this attempt, not the server.
    // `reply` itself is called inside the task too, so a panic before the handler returns
    // its future is caught as well.
    let handler = handler.clone();
    let reply = match tokio::spawn(async move { handler.reply(upload).await }).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "reply handler failed");
            return Err(BitsError::from(e));
        }
        Err(e) => {
            tracing::error!(error = %e, "reply handler panicked or was cancelled");
            return Err(BitsError::backend_status(500));
        }
    };
    shared.metrics.handler_latency(started.elapsed());
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, body = ?reply.body, "reply handler answered");
    if reply.commit_upload {
        commit(shared, route, record).await?;
    }
    let id = record.id;
    let store = &shared.store;
    let kind = match reply.body {
        ReplyBody::StaticUrl(url) => {
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || HeaderValue::from_str(&url).is_err()
            {
                return Err(BitsError::backend_status(500));
            }
            record.reply = Some(ReplyRecord {
                url,
                kind: ReplyKind::Static,
                created_ms: now_millis(),
                delivered: ByteRanges::new(),
            });
            None
        }
        ReplyBody::File(path) => Some(
            store
                .reply_from_file(&id, &path)
                .await
                .map_err(storage_failure)?,
        ),
        ReplyBody::Empty => {
            let (len, crc32c) = store
                .reply_writer(&id)
                .await
                .map_err(storage_failure)?
                .finish()
                .await
                .map_err(storage_failure)?;
            Some(ReplyKind::Stored {
                len,
                crc32c: Some(crc32c),
                in_upload: false,
            })
        }
        ReplyBody::Bytes(bytes) => {
            let mut w = store.reply_writer(&id).await.map_err(storage_failure)?;
            w.write(&bytes).await.map_err(storage_failure)?;
            let (len, crc32c) = w.finish().await.map_err(storage_failure)?;
            Some(ReplyKind::Stored {
                len,
                crc32c: Some(crc32c),
                in_upload: false,
            })
        }
        ReplyBody::Stream { len, mut stream } => {
            let mut w = store.reply_writer(&id).await.map_err(storage_failure)?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    tracing::warn!(error = %e, "reply stream failed");
                    BitsError::backend_status(500)
                })?;
                w.write(&chunk).await.map_err(storage_failure)?;
            }
            if w.len() != len {
                tracing::warn!(
                    promised = len,
                    got = w.len(),
                    "reply stream length differs from its promise"
                );
                return Err(BitsError::backend_status(500));
            }
            let (len, crc32c) = w.finish().await.map_err(storage_failure)?;
            Some(ReplyKind::Stored {
                len,
                crc32c: Some(crc32c),
                in_upload: false,
            })
        }
    };
    if let Some(kind) = kind {
        let base = RequestOrigin::of(parts, &shared.urls).reply_base(&shared.urls);
        let url = format!("{base}{}", route.reply_path(&id.simple()));
        record.reply = Some(ReplyRecord {
            url,
            kind,
            created_ms: now_millis(),
            delivered: ByteRanges::new(),
        });
    }
    record.state = SessionState::ReplyReady;
    record.touch();
    store.save(record).await.map_err(storage_failure)?;
    Ok(())
}
