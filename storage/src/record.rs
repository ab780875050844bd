//! What the meta store keeps about a session.

use std::time::{SystemTime, UNIX_EPOCH};

use bitsd_protocol::{SessionId, UploadProgress};
use serde::{Deserialize, Serialize};

use crate::ByteRanges;

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a session's route does with a finished upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UploadMode {
    /// Plain upload: the file is committed under the files root.
    Upload,
    /// Upload-reply: a reply handler turns the upload into a reply.
    UploadReply,
}

/// Where a session is in its life (§12).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionState {
    /// Fragments are arriving.
    Receiving,
    /// Every byte is held (and, for plain uploads, committed); for upload-reply, no reply yet.
    Complete,
    /// The reply is ready at the reply URL.
    ReplyReady,
    /// Closed by the client; a tombstone.
    Closed,
    /// Cancelled by the client; a tombstone.
    Cancelled,
}

impl SessionState {
    /// Whether the session is over (a tombstone).
    pub fn is_terminal(self) -> bool {
        matches!(self, SessionState::Closed | SessionState::Cancelled)
    }

    /// The name used in logs and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Receiving => "receiving",
            SessionState::Complete => "complete",
            SessionState::ReplyReady => "reply-ready",
            SessionState::Closed => "closed",
            SessionState::Cancelled => "cancelled",
        }
    }
}

/// How the reply is held.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ReplyKind {
    /// In the session's reply file (or its upload file, with `in_upload`).
    Stored {
        /// Size in bytes.
        len: u64,
        /// CRC-32C of the bytes, when it was computed while they were written.
        #[serde(default)]
        crc32c: Option<u32>,
        /// The reply is the session's upload file itself (an echo: the upload is complete and
        /// never changes again, so it needs no second file); see
        /// [`crate::SessionStore::reply_file`].
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        in_upload: bool,
        /// The shared backend's name for the reply's object under the session's prefix
        /// (`reply-<nonce>`): every completion attempt writes an object of its own, and the
        /// record names the one stored first, so an attempt that ran at the same time on
        /// another node never changes the reply a client was handed. `None` on the local
        /// backend (and in farm records written before this field: the object `reply`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        object: Option<String>,
    },
    /// Somewhere else: the reply URL points at it and nothing is stored (§9.2).
    Static,
}

/// A session's reply, once the handler produced it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyRecord {
    /// The `BITS-Reply-URL` handed to the client (the same on every re-sent final fragment).
    pub url: String,
    /// Where the bytes are.
    pub kind: ReplyKind,
    /// When the reply was stored (ms since the epoch; `Last-Modified`).
    pub created_ms: u64,
    /// Distinct reply byte ranges fully written to clients.
    #[serde(default)]
    pub delivered: ByteRanges,
}

impl ReplyRecord {
    /// The reply's size, if the server holds it.
    pub fn len(&self) -> Option<u64> {
        match self.kind {
            ReplyKind::Stored { len, .. } => Some(len),
            ReplyKind::Static => None,
        }
    }

    /// Whether the reply is a stored empty reply.
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }
}

/// One entry of the fragment index: a stored range and its checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FragmentEntry {
    /// File offset of the first byte written.
    pub offset: u64,
    /// Bytes written.
    pub len: u64,
    /// CRC-32C of those bytes.
    pub crc32c: u32,
}

/// Everything the server knows about one session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The session id.
    #[serde(with = "session_id_text")]
    pub id: SessionId,
    /// Prefix of the route the session was created on.
    pub route: String,
    /// Plain upload or upload-reply.
    pub mode: UploadMode,
    /// The job's remote URL, absolute (`BITS-Original-Request-URL` for backends).
    pub remote_url: String,
    /// Where a plain upload is committed, relative to the files root.
    pub destination: Option<String>,
    /// The user who created the session, when authentication is on.
    pub owner: Option<String>,
    /// The client's `Content-Name`, if it sent one.
    pub content_name: Option<String>,
    /// Where the session is in its life.
    pub state: SessionState,
    /// Bytes held contiguously from offset 0 (the last acknowledged offset).
    pub received: u64,
    /// Size of the upload, once the first fragment told it.
    pub total: Option<u64>,
    /// Whether a plain upload has been committed to its destination.
    pub committed: bool,
    /// The reply, once produced.
    pub reply: Option<ReplyRecord>,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// Time of the last successfully processed packet, ms since the epoch.
    pub updated_ms: u64,
}

impl SessionRecord {
    /// A fresh session record in state `Receiving`.
    pub fn new(id: SessionId, route: String, mode: UploadMode, remote_url: String) -> Self {
        let now = now_millis();
        SessionRecord {
            id,
            route,
            mode,
            remote_url,
            destination: None,
            owner: None,
            content_name: None,
            state: SessionState::Receiving,
            received: 0,
            total: None,
            committed: false,
            reply: None,
            created_ms: now,
            updated_ms: now,
        }
    }

    /// The upload progress for the protocol state machine.
    pub fn progress(&self) -> UploadProgress {
        UploadProgress {
            received: self.received,
            total: self.total,
        }
    }

    /// Marks the record as touched now.
    pub fn touch(&mut self) {
        self.updated_ms = now_millis();
    }
}

mod session_id_text {
    use bitsd_protocol::SessionId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &SessionId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SessionId, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
