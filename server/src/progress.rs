//! [`SessionProgress`]: the upload and reply byte counts of one session, as the admin API and
//! the embedding API report them.

use bitsd_storage::SessionRecord;

/// Upload and reply progress of one session: the numbers behind the client's
/// `BG_JOB_PROGRESS` and `BG_JOB_REPLY_PROGRESS`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SessionProgress {
    /// The session id (braced).
    pub id: String,
    /// `receiving`, `complete`, `reply-ready`, `closed` or `cancelled`.
    pub state: &'static str,
    /// The job's remote URL.
    pub url: String,
    /// Upload bytes.
    pub upload: UploadBytes,
    /// Reply bytes.
    pub reply: ReplyBytes,
}

/// Upload side of [`SessionProgress`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct UploadBytes {
    /// Bytes held contiguously (the last acknowledged offset).
    pub bytes_received: u64,
    /// Size of the upload, once known.
    pub bytes_total: Option<u64>,
}

/// Reply side of [`SessionProgress`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReplyBytes {
    /// Size of the stored reply, once there is one.
    pub bytes_total: Option<u64>,
    /// Distinct reply bytes fully handed to clients (re-downloads count once).
    pub bytes_transferred: Option<u64>,
}

impl SessionProgress {
    pub(crate) fn of(record: &SessionRecord) -> Self {
        let reply = record.reply.as_ref();
        SessionProgress {
            id: record.id.to_string(),
            state: record.state.as_str(),
            url: record.remote_url.clone(),
            upload: UploadBytes {
                bytes_received: record.received,
                bytes_total: record.total,
            },
            reply: ReplyBytes {
                bytes_total: reply.and_then(|r| r.len()),
                bytes_transferred: reply.and_then(|r| r.len().map(|_| r.delivered.covered())),
            },
        }
    }
}
