//! Reply handlers: what turns a finished upload into a reply (upload-reply sessions).
//!
//! A handler implements [`ReplyHandler`]; any `Fn(Upload) -> impl Future<Output = Result<Reply,
//! HandlerError>>` closure already does. The server calls it once the last byte of an
//! upload-reply session is durable, stores the [`Reply`] crash-safely, and answers the final
//! fragment with `BITS-Reply-URL`. A [`HandlerError`] becomes the final Ack's error with
//! context `0x7`, as a failing IIS backend would (§9.5), and the client re-sends the final
//! fragment later, which runs the handler again.
//!
//! Built-in handlers:
//!
//! | handler | reply |
//! |---|---|
//! | [`EchoHandler`] | the upload itself, byte for byte |
//! | [`DigestHandler`] | a small JSON receipt with the upload's size and SHA-256 ([`DigestReceipt`]) |
//! | [`StaticHandler`] | the same configured file, or the same absolute URL, for every client |
//! | [`CommandHandler`] | the stdout of a program that reads the upload on stdin ([`CommandConfig`]) |
//! | [`HttpNotifyHandler`] | what an HTTP backend answers to the IIS-compatible notification of §9 ([`HttpNotifyConfig`]) |
//!
//! Handlers that produce a reply larger than memory write it to a file in
//! [`Upload::session_dir`] and return [`Reply::file`]. Each run writes a file of its own there
//! ([`Upload::unique_session_file`]): `command-reply.<unique>.tmp` ([`COMMAND_REPLY_FILE`],
//! [`CommandHandler`]) and `notification-reply.<unique>.tmp` ([`NOTIFICATION_REPLY_FILE`],
//! [`HttpNotifyHandler`]); the backend of a by-reference notification writes
//! [`RESPONSE_FILE`]. The server must not use names of these forms for its own files in that
//! directory.
//!
//! ```
//! use bitsd_reply_handlers::{Reply, ReplyHandler, Upload, HandlerError};
//!
//! // A closure is a handler: reply with the upload's size.
//! let handler = |upload: Upload| async move {
//!     Ok::<_, HandlerError>(Reply::bytes(format!("{} bytes", upload.len)))
//! };
//! fn assert_handler(_: &impl ReplyHandler) {}
//! assert_handler(&handler);
//! ```

mod command;
mod digest;
mod echo;
mod http_notify;
mod static_reply;

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use bitsd_protocol::{BitsError, SessionId};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use tokio::io::AsyncReadExt;

pub use command::{CommandConfig, CommandHandler, COMMAND_REPLY_FILE};
pub use digest::{DigestHandler, DigestReceipt};
pub use echo::EchoHandler;
pub use http_notify::{
    HttpNotifyConfig, HttpNotifyHandler, Notification, NOTIFICATION_REPLY_FILE, RESPONSE_FILE,
};
pub use static_reply::StaticHandler;

/// A finished upload, as a handler sees it.
#[derive(Clone, Debug)]
pub struct Upload {
    /// The session id.
    pub session_id: SessionId,
    /// The job's remote URL, absolute, with its query string. Its scheme and host come from
    /// the client (`Host`, or an absolute-form request target): informational only, never a
    /// place to send anything to.
    pub original_url: String,
    /// The job's remote URL under a name the server chose itself (its configured public URL,
    /// or its listener's address) with the path and query the client sent: what relative
    /// notification URLs resolve against. `None` when the server has no such name.
    pub server_url: Option<String>,
    /// The client's `Content-Name`, if it sent one.
    pub content_name: Option<String>,
    /// Size of the upload in bytes.
    pub len: u64,
    /// The file holding the upload. Read it; do not modify or move it.
    pub path: PathBuf,
    /// A private directory of this session (it exists and is writable) where the handler may
    /// create files, e.g. a reply too large for memory, or the response file of a
    /// by-reference notification (§9.1). The server removes it with the session.
    pub session_dir: PathBuf,
}

impl Upload {
    /// The path of a file named `name` in [`Upload::session_dir`].
    pub fn session_file(&self, name: &str) -> PathBuf {
        self.session_dir.join(name)
    }

    /// A path in [`Upload::session_dir`] that no other call returns, even in another process:
    /// `name` with a unique part inserted before its extension (`command-reply.tmp` becomes
    /// `command-reply.<unique>.tmp`). Two runs of a handler for the same session (a retry
    /// while an abandoned run still writes) then never write the same file.
    pub fn unique_session_file(&self, name: &str) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let unique = format!("{:x}-{nanos:x}-{n}", std::process::id());
        let file = match name.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() => format!("{stem}.{unique}.{ext}"),
            _ => format!("{name}.{unique}"),
        };
        self.session_dir.join(file)
    }

    /// Opens the upload for reading: exactly [`Upload::len`] bytes at most.
    pub async fn open(&self) -> io::Result<tokio::io::Take<tokio::fs::File>> {
        Ok(tokio::fs::File::open(&self.path).await?.take(self.len))
    }

    /// Reads the whole upload into memory, refusing uploads over `limit` bytes.
    pub async fn read_to_vec(&self, limit: u64) -> io::Result<Vec<u8>> {
        if self.len > limit {
            return Err(io::Error::other(format!(
                "upload of {} bytes is over the {limit}-byte limit",
                self.len
            )));
        }
        let mut out = Vec::with_capacity(self.len as usize);
        self.open().await?.read_to_end(&mut out).await?;
        Ok(out)
    }
}

/// Where a reply's bytes come from.
pub enum ReplyBody {
    /// No reply (an empty reply is still served, §10).
    Empty,
    /// Bytes in memory.
    Bytes(Bytes),
    /// A file, copied into the session's reply.
    File(PathBuf),
    /// A stream of exactly `len` bytes.
    Stream {
        /// The exact number of bytes the stream yields.
        len: u64,
        /// The bytes.
        stream: BoxStream<'static, io::Result<Bytes>>,
    },
    /// An existing absolute URL: `BITS-Reply-URL` points there and nothing is stored (§9.2).
    StaticUrl(String),
}

impl std::fmt::Debug for ReplyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyBody::Empty => f.write_str("Empty"),
            ReplyBody::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            ReplyBody::File(p) => write!(f, "File({})", p.display()),
            ReplyBody::Stream { len, .. } => write!(f, "Stream({len} bytes)"),
            ReplyBody::StaticUrl(u) => write!(f, "StaticUrl({u})"),
        }
    }
}

/// What a handler returns.
#[derive(Debug)]
pub struct Reply {
    /// The reply's bytes.
    pub body: ReplyBody,
    /// Also commit the upload to the route's destination (`BITS-Copy-File-To-Destination`, §6.1).
    pub commit_upload: bool,
}

impl Reply {
    fn of(body: ReplyBody) -> Self {
        Reply {
            body,
            commit_upload: false,
        }
    }

    /// An empty reply.
    pub fn empty() -> Self {
        Self::of(ReplyBody::Empty)
    }

    /// A reply held in memory.
    pub fn bytes(bytes: impl Into<Bytes>) -> Self {
        Self::of(ReplyBody::Bytes(bytes.into()))
    }

    /// A reply copied from a file.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self::of(ReplyBody::File(path.into()))
    }

    /// A reply streamed from `stream`, which must yield exactly `len` bytes.
    pub fn stream(len: u64, stream: BoxStream<'static, io::Result<Bytes>>) -> Self {
        Self::of(ReplyBody::Stream { len, stream })
    }

    /// A reply that lives at an existing absolute URL.
    pub fn static_url(url: impl Into<String>) -> Self {
        Self::of(ReplyBody::StaticUrl(url.into()))
    }

    /// Also commit the upload to its destination.
    pub fn with_commit_upload(mut self) -> Self {
        self.commit_upload = true;
        self
    }
}

/// Why a handler failed; the client sees it as a server-application error (context `0x7`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// The handler (or backend) answered with this HTTP status.
    #[error("reply handler failed with status {status}: {message}")]
    Status {
        /// The status the client should see (relayed per §9.5; 413 becomes 500).
        status: u16,
        /// What went wrong, for the log.
        message: String,
    },
    /// The backend could not be reached or did not answer in time (504, transient).
    #[error("reply handler unreachable: {0}")]
    Unreachable(String),
}

impl HandlerError {
    /// A failure with the given status.
    pub fn status(status: u16, message: impl Into<String>) -> Self {
        HandlerError::Status {
            status,
            message: message.into(),
        }
    }

    /// An internal failure (500).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::status(500, message)
    }
}

impl From<HandlerError> for BitsError {
    fn from(e: HandlerError) -> Self {
        match e {
            HandlerError::Status { status, .. } => BitsError::backend_status(status),
            HandlerError::Unreachable(why) => BitsError::backend_unreachable(why),
        }
    }
}

/// A handler's configuration cannot work; returned by the handlers' constructors.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerConfigError {
    /// A URL that does not parse, or is not of the kind required.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as configured.
        url: String,
        /// Why it is refused.
        reason: String,
    },
    /// An `https` notification URL: BITSServerNotificationURL is HTTP only (§7).
    #[error("notification URL {0:?} uses https; backend notifications are HTTP only")]
    HttpsNotification(String),
    /// Another setting that cannot work (an empty program, a zero timeout, …).
    #[error("invalid handler configuration: {0}")]
    Invalid(String),
}

/// The future a handler returns.
pub type ReplyFuture = Pin<Box<dyn Future<Output = Result<Reply, HandlerError>> + Send>>;

/// Turns a finished upload into a reply.
pub trait ReplyHandler: Send + Sync + 'static {
    /// Produces the reply for `upload`. Called once per completion attempt; a re-sent final
    /// fragment after a success does not call it again.
    fn reply(&self, upload: Upload) -> ReplyFuture;

    /// Whether the handler reads the file at [`Upload::path`] (or uses
    /// [`Upload::session_dir`]). A handler that only hands the path back (echo) or ignores
    /// the upload (static) says `false`, and the server may then make neither that file (a
    /// small upload is held in the meta store, not in a file) nor that directory (the shared
    /// backend makes nothing on disk). The default: `true`.
    fn reads_upload(&self) -> bool {
        true
    }
}

impl<F, Fut> ReplyHandler for F
where
    F: Fn(Upload) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Reply, HandlerError>> + Send + 'static,
{
    fn reply(&self, upload: Upload) -> ReplyFuture {
        Box::pin(self(upload))
    }
}
