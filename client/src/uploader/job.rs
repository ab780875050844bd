//! A job: what to upload where, where the reply goes, and what comes back.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWrite;
use tokio_util::sync::CancellationToken;

/// Back-off between retries after transient errors: `initial_delay`, doubled after every
/// further consecutive failure up to `max_delay`; the job fails after `max_retries`
/// consecutive failures without progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before the first retry.
    pub initial_delay: Duration,
    /// Upper bound of the delay.
    pub max_delay: Duration,
    /// Consecutive failures (without progress) after which the job gives up with the last error.
    pub max_retries: u32,
}

impl RetryPolicy {
    /// The delay before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(30);
        self.initial_delay
            .saturating_mul(1u32 << shift)
            .min(self.max_delay)
    }
}

impl Default for RetryPolicy {
    /// 1 s, doubling up to 60 s, at most 10 consecutive retries.
    fn default() -> Self {
        RetryPolicy {
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            max_retries: 10,
        }
    }
}

/// Where the reply of an upload-reply job goes.
pub enum ReplyDestination {
    /// A file, written to a temporary file created exclusively beside it (`.<name>.XXXXXX.part`,
    /// never through a planted link) and renamed into place when complete. An existing file is
    /// not replaced unless the job allows it ([`UploadJob::overwrite_reply`]).
    File(PathBuf),
    /// Memory: returned in [`ReplyOutcome::bytes`].
    Memory,
    /// Any writer (e.g. stdout), written in order as the bytes arrive.
    Writer(Box<dyn AsyncWrite + Send + Unpin>),
}

impl std::fmt::Debug for ReplyDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyDestination::File(p) => f.debug_tuple("File").field(p).finish(),
            ReplyDestination::Memory => f.write_str("Memory"),
            ReplyDestination::Writer(_) => f.write_str("Writer(..)"),
        }
    }
}

/// What the job does about a reply.
#[derive(Debug)]
pub enum ReplyMode {
    /// A plain upload job (`BG_JOB_TYPE_UPLOAD`): a `BITS-Reply-URL` is ignored.
    None,
    /// An upload-reply job (`BG_JOB_TYPE_UPLOAD_REPLY`): the final Ack must carry
    /// `BITS-Reply-URL`, and the reply is downloaded to the destination.
    Required(ReplyDestination),
    /// Download the reply if the final Ack offers one, otherwise finish as a plain upload.
    IfOffered(ReplyDestination),
}

/// Stops a running job from elsewhere (a Ctrl-C handler): [`CancelHandle::cancel`] ends it
/// and sends Cancel-Session, so the server forgets the upload ([`ClientError::Cancelled`](crate::ClientError::Cancelled));
/// [`CancelHandle::suspend`] only stops it, as suspending a Windows BITS job does, and leaves
/// the session on the server to be continued later ([`ClientError::Suspended`](crate::ClientError::Suspended)). A `cancel`
/// after a `suspend` wins.
#[derive(Clone, Debug, Default)]
pub struct CancelHandle(
    pub(crate) CancellationToken,
    pub(crate) std::sync::Arc<std::sync::atomic::AtomicU8>,
);

const STOP_SUSPEND: u8 = 1;
const STOP_CANCEL: u8 = 2;

impl CancelHandle {
    /// A new handle, not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests cancellation: the job stops and sends Cancel-Session.
    pub fn cancel(&self) {
        self.1
            .store(STOP_CANCEL, std::sync::atomic::Ordering::SeqCst);
        self.0.cancel();
    }

    /// Requests suspension: the job stops without Cancel-Session; the session stays on the
    /// server (until its expiry) and can be continued with [`UploadJob::resume`].
    pub fn suspend(&self) {
        let _ = self.1.compare_exchange(
            0,
            STOP_SUSPEND,
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        );
        self.0.cancel();
    }

    /// Whether cancellation (or suspension) was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Whether the job was asked to suspend (and not to cancel).
    pub fn is_suspended(&self) -> bool {
        self.1.load(std::sync::atomic::Ordering::SeqCst) == STOP_SUSPEND
    }
}

/// One upload: the remote URL, the local file, the reply mode and a cancel handle.
#[derive(Debug)]
pub struct UploadJob {
    pub(crate) url: String,
    pub(crate) file: PathBuf,
    pub(crate) reply: ReplyMode,
    pub(crate) cancel: CancelHandle,
    pub(crate) overwrite_reply: bool,
    pub(crate) resume: Option<ResumeFrom>,
}

/// A session to continue instead of creating a new one (a job suspended earlier, perhaps by
/// another process): the server's answer to the first Fragment says where to go on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumeFrom {
    /// The `BITS-Session-Id` the server gave the suspended job.
    pub session_id: String,
    /// The offset the server had acknowledged; the first Fragment starts here.
    pub offset: u64,
}

impl UploadJob {
    /// A plain upload of `file` to `url`.
    pub fn new(url: impl Into<String>, file: impl Into<PathBuf>) -> Self {
        UploadJob {
            url: url.into(),
            file: file.into(),
            reply: ReplyMode::None,
            cancel: CancelHandle::new(),
            overwrite_reply: false,
            resume: None,
        }
    }

    /// Makes this an upload-reply job whose reply goes to `dest`.
    pub fn reply_to(mut self, dest: ReplyDestination) -> Self {
        self.reply = ReplyMode::Required(dest);
        self
    }

    /// Downloads a reply to `dest` only if the server offers one.
    pub fn reply_if_offered(mut self, dest: ReplyDestination) -> Self {
        self.reply = ReplyMode::IfOffered(dest);
        self
    }

    /// Whether a [`ReplyDestination::File`] that already exists may be replaced (default: no,
    /// the job fails before it starts uploading).
    pub fn overwrite_reply(mut self, overwrite: bool) -> Self {
        self.overwrite_reply = overwrite;
        self
    }

    /// Continues this session instead of creating a new one. If the server no longer knows it
    /// (`BG_E_SESSION_NOT_FOUND`), the job starts over with a new session, as Windows does.
    pub fn resume(mut self, from: ResumeFrom) -> Self {
        self.resume = Some(from);
        self
    }

    /// Uses this cancel handle (e.g. one shared with a Ctrl-C handler).
    pub fn with_cancel_handle(mut self, cancel: CancelHandle) -> Self {
        self.cancel = cancel;
        self
    }

    /// The job's cancel handle.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }
}

/// The downloaded reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyOutcome {
    /// The `BITS-Reply-URL` it came from.
    pub url: String,
    /// Its size in bytes.
    pub size: u64,
    /// The bytes, for [`ReplyDestination::Memory`].
    pub bytes: Option<Bytes>,
    /// The file, for [`ReplyDestination::File`].
    pub path: Option<PathBuf>,
}

/// A finished upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadOutcome {
    /// The session that completed the upload.
    pub session_id: String,
    /// The URL the final packets went to (the Host-Id rewrite, if one was in use).
    pub url: String,
    /// Bytes uploaded (the file size).
    pub bytes_uploaded: u64,
    /// The fragment size at the end (smaller than configured after 413s).
    pub fragment_size: u64,
    /// How many times the upload restarted with a new Create-Session.
    pub restarts: u32,
    /// How many retries after transient errors it took.
    pub retries: u32,
    /// The reply, for upload-reply jobs.
    pub reply: Option<ReplyOutcome>,
    /// Whether Close-Session was acknowledged.
    pub closed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(700),
            max_retries: 5,
        };
        let d: Vec<u128> = (1..=5).map(|a| p.delay(a).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 700, 700]);
        assert_eq!(p.delay(1000), Duration::from_millis(700));
    }
}
