//! A client for the Microsoft BITS upload and upload-reply protocol, behaving like the Windows
//! BITS client (section numbers refer to `shared/protocol/BITS-UPLOAD.md`).
//!
//! [`BitsUploader`] runs upload jobs: an optional Ping, Create-Session with protocol
//! negotiation, Fragments (halved on 413, resynchronised from `BITS-Received-Content-Range`
//! on 200 and 416), a new Create-Session from offset 0 on `BG_E_SESSION_NOT_FOUND`, Host-Id
//! redirection with its Ping and fallback timer (§8), retries with exponential back-off on
//! transient errors and dropped connections, the §9.5 classification of server-application
//! (context `0x7`) errors, and Close-Session at the end. Upload-reply jobs follow
//! `BITS-Reply-URL` and download the reply like a BITS download job (§10): HEAD for the size,
//! ranged GETs, resume after an interruption.
//!
//! Errors carry the HRESULT Windows would report, by name and code
//! (`BG_E_SESSION_NOT_FOUND (0x8020001f)`), and its context. Progress is reported as the two
//! numbers Windows shows, `BG_JOB_PROGRESS` and `BG_JOB_REPLY_PROGRESS`.
//!
//! Credentials (HTTP Basic) are sent only after the origin the job names answers 401, and only
//! to that origin (and `https` Host-Id nodes it redirects to), never pre-emptively. Failures no
//! retry can fix (an untrusted TLS certificate, `http://` to a TLS port) are fatal at once
//! ([`ClientError::Connection`]). A job can be cancelled (Cancel-Session) or suspended and
//! resumed later in another process ([`CancelHandle::suspend`], [`UploadJob::resume`]).
//!
//! Nothing here depends on the bitsd server: only on the sans-I/O `bitsd-protocol` crate for
//! header names and value types. `http://` and `https://` (rustls).
//!
//! ```no_run
//! # async fn run() -> Result<(), bitsd_client::ClientError> {
//! use bitsd_client::{BitsUploader, ReplyDestination, RetryPolicy, UploadJob};
//! use std::time::Duration;
//!
//! let uploader = BitsUploader::builder()
//!     .fragment_size(4 * 1024 * 1024)
//!     .retry_policy(RetryPolicy {
//!         initial_delay: Duration::from_secs(2),
//!         max_delay: Duration::from_secs(120),
//!         max_retries: 20,
//!     })
//!     .observer(std::sync::Arc::new(|p: &bitsd_client::Progress| {
//!         eprintln!("{} {}/{}", p.state, p.upload.bytes_transferred, p.upload.bytes_total)
//!     }))
//!     .build();
//! let job = UploadJob::new("http://127.0.0.1:8080/echo/query.bin", "query.bin")
//!     .reply_to(ReplyDestination::File("reply.bin".into()));
//! let cancel = job.cancel_handle(); // cancel.cancel() from elsewhere sends Cancel-Session
//! let outcome = uploader.run(job).await?;
//! # drop(cancel); let _ = outcome;
//! # Ok(()) }
//! ```

mod cli;
mod error;
mod http;
mod progress;
mod reply;
mod target;
mod tls;
mod uploader;

pub use cli::{parse_duration, parse_size, reply_output, run_upload_cli, ReplyOutput, UploadArgs};
pub use error::{
    hresult, hresult_name, is_transient_status, BitsFailure, ClientError, ErrorContext, HResult,
    Request,
};
pub use progress::{
    JobEvent, JobProgress, JobState, Progress, ProgressObserver, ReplyProgress, BG_SIZE_UNKNOWN,
};
pub use uploader::{
    BitsUploader, BitsUploaderBuilder, CancelHandle, ReplyDestination, ReplyMode, ReplyOutcome,
    ResumeFrom, RetryPolicy, UploadJob, UploadOutcome, DEFAULT_FRAGMENT_SIZE,
    DEFAULT_MAX_MEMORY_REPLY,
};
