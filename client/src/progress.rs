//! Progress and state as Windows reports them for an upload job.

use std::fmt;
use std::time::Duration;

/// `BG_SIZE_UNKNOWN`: `(UINT64)-1`, the reply size before the reply download has begun.
pub const BG_SIZE_UNKNOWN: u64 = u64::MAX;

/// The job state (`BG_JOB_STATE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobState {
    /// `BG_JOB_STATE_QUEUED`: not started yet.
    Queued,
    /// `BG_JOB_STATE_CONNECTING`: contacting the server (Ping, Create-Session).
    Connecting,
    /// `BG_JOB_STATE_TRANSFERRING`: sending fragments or downloading the reply.
    Transferring,
    /// `BG_JOB_STATE_TRANSIENT_ERROR`: waiting to retry after a recoverable error.
    TransientError,
    /// `BG_JOB_STATE_ERROR`: a fatal error stopped the job.
    Error,
    /// `BG_JOB_STATE_TRANSFERRED`: upload (and reply) complete, session not yet closed.
    Transferred,
    /// `BG_JOB_STATE_ACKNOWLEDGED`: complete and the session closed.
    Acknowledged,
    /// `BG_JOB_STATE_CANCELLED`: cancelled.
    Cancelled,
    /// `BG_JOB_STATE_SUSPENDED`: stopped without cancelling; the session stays on the server.
    Suspended,
}

impl JobState {
    /// The Windows name without prefix: `TRANSFERRED`, `TRANSIENT_ERROR`, …
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "QUEUED",
            JobState::Connecting => "CONNECTING",
            JobState::Transferring => "TRANSFERRING",
            JobState::TransientError => "TRANSIENT_ERROR",
            JobState::Error => "ERROR",
            JobState::Transferred => "TRANSFERRED",
            JobState::Acknowledged => "ACKNOWLEDGED",
            JobState::Cancelled => "CANCELLED",
            JobState::Suspended => "SUSPENDED",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `BG_JOB_PROGRESS` of an upload job: the upload file only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobProgress {
    /// Size of the file being uploaded.
    pub bytes_total: u64,
    /// Bytes the server has acknowledged (`BITS-Received-Content-Range`); a resync can move it
    /// backwards, a session restart back to 0.
    pub bytes_transferred: u64,
}

/// `BG_JOB_REPLY_PROGRESS` of an upload-reply job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyProgress {
    /// [`BG_SIZE_UNKNOWN`] until the reply download has begun, then the reply size.
    pub bytes_total: u64,
    /// Reply bytes downloaded so far.
    pub bytes_transferred: u64,
}

/// A snapshot of a job: its state and the two progress numbers Windows shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// The job state.
    pub state: JobState,
    /// `BG_JOB_PROGRESS`.
    pub upload: JobProgress,
    /// `BG_JOB_REPLY_PROGRESS`.
    pub reply: ReplyProgress,
}

impl Progress {
    pub(crate) fn new() -> Self {
        Progress {
            state: JobState::Queued,
            upload: JobProgress {
                bytes_total: 0,
                bytes_transferred: 0,
            },
            reply: ReplyProgress {
                bytes_total: BG_SIZE_UNKNOWN,
                bytes_transferred: 0,
            },
        }
    }
}

/// Something that happened on the way: how the client recovered, or where it went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobEvent {
    /// Create-Session succeeded.
    SessionCreated {
        /// The session id the server issued.
        session_id: String,
        /// The protocol GUID the server chose.
        protocol: String,
    },
    /// The Create-Session Ack carried `BITS-Host-Id`: later packets go to this URL (after a Ping).
    HostIdRedirect {
        /// The URL with the Host-Id as its host.
        url: String,
        /// `BITS-Host-Id-Fallback-Timeout`, if the server sent one.
        fallback_timeout: Option<Duration>,
    },
    /// The Host-Id host stayed unreachable longer than the fallback timeout; back to this URL.
    HostIdFallback {
        /// The original URL.
        url: String,
    },
    /// The server answered 413: fragments are now this size.
    FragmentSizeReduced {
        /// The size of the refused fragment.
        from: u64,
        /// The new fragment size.
        to: u64,
    },
    /// The server asked for another offset than the client's next one (200 or 416 with
    /// `BITS-Received-Content-Range`).
    Resync {
        /// Where the client would have continued.
        from: u64,
        /// Where the server wants it to continue.
        to: u64,
    },
    /// `BG_E_SESSION_NOT_FOUND`: the client starts over with a new Create-Session from offset 0.
    SessionRestarted {
        /// The session the server no longer knows.
        old_session_id: String,
    },
    /// A transient error; the client retries after `delay`.
    Retrying {
        /// Consecutive failures so far.
        attempt: u32,
        /// The back-off before the next try.
        delay: Duration,
        /// The error, as displayed.
        error: String,
    },
    /// The server acknowledged the whole upload.
    UploadComplete {
        /// `BITS-Reply-URL`, if the final Ack carried one.
        reply_url: Option<String>,
    },
    /// The reply download learned the reply size (HEAD).
    ReplyStarted {
        /// The reply URL.
        url: String,
        /// The reply size.
        size: u64,
    },
    /// The reply download continues from `offset` after an interruption.
    ReplyResumed {
        /// Bytes already held.
        offset: u64,
    },
    /// Close-Session was acknowledged (or the server no longer knew the session).
    SessionClosed {
        /// The session.
        session_id: String,
    },
    /// Cancel-Session was sent for this session.
    SessionCancelled {
        /// The session.
        session_id: String,
    },
}

/// Receives a job's progress and events. Called on the task that runs the job, so it should
/// return quickly.
pub trait ProgressObserver: Send + Sync {
    /// The state or one of the progress numbers changed.
    fn progress(&self, progress: &Progress);

    /// Something happened (recovery steps, redirects). Ignored by default.
    fn event(&self, event: &JobEvent) {
        let _ = event;
    }
}

impl<F> ProgressObserver for F
where
    F: Fn(&Progress) + Send + Sync,
{
    fn progress(&self, progress: &Progress) {
        self(progress)
    }
}
