//! Errors as a Windows BITS job reports them: an HRESULT with its name, and the context
//! it came from (`IBackgroundCopyError::GetError`).

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub use bitsd_protocol::HResult;

/// HRESULT values the client reports or recognises (names as in Windows' `bitsmsg.h` and
/// `winerror.h`).
pub mod hresult {
    use super::HResult;

    /// `E_INVALIDARG`: the server refused a header.
    pub const E_INVALIDARG: HResult = HResult(0x8007_0057);
    /// `E_ACCESSDENIED`: no permission, overwrite refused, or uploads disabled.
    pub const E_ACCESSDENIED: HResult = HResult(0x8007_0005);
    /// `E_FAIL`: unspecified failure.
    pub const E_FAIL: HResult = HResult(0x8000_4005);
    /// `BG_E_NETWORK_DISCONNECTED`.
    pub const BG_E_NETWORK_DISCONNECTED: HResult = HResult(0x8020_0010);
    /// `BG_E_MISSING_FILE_SIZE`: the reply URL gave no `Content-Length`.
    pub const BG_E_MISSING_FILE_SIZE: HResult = HResult(0x8020_0011);
    /// `BG_E_INSUFFICIENT_HTTP_SUPPORT`: the server does not speak HTTP/1.1 well enough.
    pub const BG_E_INSUFFICIENT_HTTP_SUPPORT: HResult = HResult(0x8020_0012);
    /// `BG_E_INSUFFICIENT_RANGE_SUPPORT`: the reply URL does not answer ranged GETs correctly.
    pub const BG_E_INSUFFICIENT_RANGE_SUPPORT: HResult = HResult(0x8020_0013);
    /// `BG_E_INVALID_SERVER_RESPONSE`: an Ack broke the protocol (missing or impossible headers).
    pub const BG_E_INVALID_SERVER_RESPONSE: HResult = HResult(0x8020_001b);
    /// `BG_E_LOCAL_FILE_CHANGED`: the file being uploaded changed size during the upload.
    pub const BG_E_LOCAL_FILE_CHANGED: HResult = HResult(0x8020_001d);
    /// `BG_E_SESSION_NOT_FOUND`: the server does not know the session (the client restarts).
    pub const BG_E_SESSION_NOT_FOUND: HResult = HResult(0x8020_001f);
    /// `BG_E_TOO_LARGE`: the upload (or, after shrinking, one fragment) is too large.
    pub const BG_E_TOO_LARGE: HResult = HResult(0x8020_0020);
    /// `BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH`: no upload protocol could be agreed.
    pub const BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH: HResult = HResult(0x8020_0022);
    /// `BG_E_NO_PROGRESS`: the job made no progress within its retry budget.
    pub const BG_E_NO_PROGRESS: HResult = HResult(0x8020_0024);

    /// `BG_E_HTTP_ERROR_<status>`: `0x80190000 + status`.
    pub fn http_error(status: u16) -> HResult {
        HResult::http_error(status)
    }
}

/// The symbolic name of an HRESULT: `BG_E_SESSION_NOT_FOUND`, `E_ACCESSDENIED`,
/// `BG_E_HTTP_ERROR_504`, `HRESULT_FROM_WIN32(112)`, or `HRESULT` for unknown values.
pub fn hresult_name(code: HResult) -> Cow<'static, str> {
    let name = match code.0 {
        0 => "S_OK",
        0x8000_4001 => "E_NOTIMPL",
        0x8000_4005 => "E_FAIL",
        0x8000_ffff => "E_UNEXPECTED",
        0x8007_0005 => "E_ACCESSDENIED",
        0x8007_000e => "E_OUTOFMEMORY",
        0x8007_0057 => "E_INVALIDARG",
        0x8020_0001 => "BG_E_NOT_FOUND",
        0x8020_0002 => "BG_E_INVALID_STATE",
        0x8020_0003 => "BG_E_EMPTY",
        0x8020_0004 => "BG_E_FILE_NOT_AVAILABLE",
        0x8020_0005 => "BG_E_PROTOCOL_NOT_AVAILABLE",
        0x8020_000d => "BG_E_DESTINATION_LOCKED",
        0x8020_000e => "BG_E_VOLUME_CHANGED",
        0x8020_000f => "BG_E_ERROR_INFORMATION_UNAVAILABLE",
        0x8020_0010 => "BG_E_NETWORK_DISCONNECTED",
        0x8020_0011 => "BG_E_MISSING_FILE_SIZE",
        0x8020_0012 => "BG_E_INSUFFICIENT_HTTP_SUPPORT",
        0x8020_0013 => "BG_E_INSUFFICIENT_RANGE_SUPPORT",
        0x8020_0014 => "BG_E_REMOTE_NOT_SUPPORTED",
        0x8020_001b => "BG_E_INVALID_SERVER_RESPONSE",
        0x8020_001c => "BG_E_TOO_MANY_FILES",
        0x8020_001d => "BG_E_LOCAL_FILE_CHANGED",
        0x8020_001f => "BG_E_SESSION_NOT_FOUND",
        0x8020_0020 => "BG_E_TOO_LARGE",
        0x8020_0022 => "BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH",
        0x8020_0024 => "BG_E_NO_PROGRESS",
        c if (0x8019_0000..=0x8019_ffff).contains(&c) => {
            return Cow::Owned(format!("BG_E_HTTP_ERROR_{}", c & 0xffff));
        }
        c if (0x8007_0000..=0x8007_ffff).contains(&c) => {
            return Cow::Owned(format!("HRESULT_FROM_WIN32({})", c & 0xffff));
        }
        _ => "HRESULT",
    };
    Cow::Borrowed(name)
}

/// Where an error came from: Windows' `BG_ERROR_CONTEXT`, carried on the wire in
/// `BITS-Error-Context` (`0x5` server, `0x7` server application).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorContext {
    /// `BG_ERROR_CONTEXT_NONE` (0).
    None,
    /// `BG_ERROR_CONTEXT_UNKNOWN` (1).
    Unknown,
    /// `BG_ERROR_CONTEXT_LOCAL_FILE` (4): the file being uploaded or the reply file.
    LocalFile,
    /// `BG_ERROR_CONTEXT_REMOTE_FILE` (5): the server, while processing the packet.
    RemoteFile,
    /// `BG_ERROR_CONTEXT_GENERAL_TRANSPORT` (6): the network.
    GeneralTransport,
    /// `BG_ERROR_CONTEXT_REMOTE_APPLICATION` (7): the server application (reply handler / backend).
    RemoteApplication,
    /// Any other value.
    Other(u32),
}

impl ErrorContext {
    /// The numeric `BG_ERROR_CONTEXT` value.
    pub fn value(self) -> u32 {
        match self {
            ErrorContext::None => 0,
            ErrorContext::Unknown => 1,
            ErrorContext::LocalFile => 4,
            ErrorContext::RemoteFile => 5,
            ErrorContext::GeneralTransport => 6,
            ErrorContext::RemoteApplication => 7,
            ErrorContext::Other(v) => v,
        }
    }

    /// The context for a numeric value.
    pub fn from_value(v: u32) -> Self {
        match v {
            0 => ErrorContext::None,
            1 => ErrorContext::Unknown,
            4 => ErrorContext::LocalFile,
            5 => ErrorContext::RemoteFile,
            6 => ErrorContext::GeneralTransport,
            7 => ErrorContext::RemoteApplication,
            v => ErrorContext::Other(v),
        }
    }

    /// The Windows name, e.g. `BG_ERROR_CONTEXT_REMOTE_FILE`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorContext::None => "BG_ERROR_CONTEXT_NONE",
            ErrorContext::Unknown => "BG_ERROR_CONTEXT_UNKNOWN",
            ErrorContext::LocalFile => "BG_ERROR_CONTEXT_LOCAL_FILE",
            ErrorContext::RemoteFile => "BG_ERROR_CONTEXT_REMOTE_FILE",
            ErrorContext::GeneralTransport => "BG_ERROR_CONTEXT_GENERAL_TRANSPORT",
            ErrorContext::RemoteApplication => "BG_ERROR_CONTEXT_REMOTE_APPLICATION",
            ErrorContext::Other(_) => "BG_ERROR_CONTEXT",
        }
    }
}

impl fmt::Display for ErrorContext {
    /// `0x` and the value in hex, as on the wire: `0x5`, `0x7`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.value())
    }
}

/// The request that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Request {
    /// A `Ping` packet.
    Ping,
    /// A `Create-Session` packet.
    CreateSession,
    /// A `Fragment` packet.
    Fragment,
    /// A `Close-Session` packet.
    CloseSession,
    /// A `Cancel-Session` packet.
    CancelSession,
    /// The `HEAD` of the reply URL.
    ReplyHead,
    /// A `GET` of the reply URL.
    ReplyGet,
}

impl Request {
    /// `Ping`, `Create-Session`, …, `reply HEAD`, `reply GET`.
    pub fn as_str(self) -> &'static str {
        match self {
            Request::Ping => "Ping",
            Request::CreateSession => "Create-Session",
            Request::Fragment => "Fragment",
            Request::CloseSession => "Close-Session",
            Request::CancelSession => "Cancel-Session",
            Request::ReplyHead => "reply HEAD",
            Request::ReplyGet => "reply GET",
        }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a failed request with this HTTP status is worth retrying.
///
/// Context `0x7` (server application) follows §9.5: 3xx transient except 300–305 and 307;
/// 4xx fatal except 408 and 409; 5xx transient except 501 and 505; anything else transient.
/// Every other context follows the server error table (§2.1): 5xx transient except 501 and
/// 505; 408 transient; everything else (400, 403, 404, 3xx, …) fatal.
pub fn is_transient_status(status: u16, context: ErrorContext) -> bool {
    match context {
        ErrorContext::RemoteApplication => match status {
            300..=305 | 307 => false,
            300..=399 => true,
            408 | 409 => true,
            400..=499 => false,
            501 | 505 => false,
            _ => true,
        },
        _ => match status {
            408 => true,
            501 | 505 => false,
            500..=599 => true,
            _ => false,
        },
    }
}

/// A BITS error: what `IBackgroundCopyError::GetError` would return, plus the HTTP details.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitsFailure {
    code: HResult,
    context: ErrorContext,
    status: Option<u16>,
    request: Option<Request>,
    transient: bool,
    detail: Option<String>,
}

impl BitsFailure {
    /// A failure from an HTTP response: `status`, its `BITS-Error-Code` and context, classified
    /// by [`is_transient_status`].
    pub fn from_response(
        request: Request,
        status: u16,
        code: HResult,
        context: ErrorContext,
    ) -> Self {
        BitsFailure {
            code,
            context,
            status: Some(status),
            request: Some(request),
            transient: is_transient_status(status, context),
            detail: None,
        }
    }

    /// A fatal failure the client itself detected (protocol violations, missing sizes, …).
    pub fn fatal(code: HResult, context: ErrorContext, request: Option<Request>) -> Self {
        BitsFailure {
            code,
            context,
            status: None,
            request,
            transient: false,
            detail: None,
        }
    }

    /// The same failure with the HTTP status it arrived with.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// The same failure with an explanation.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The HRESULT.
    pub fn code(&self) -> HResult {
        self.code
    }

    /// The HRESULT's symbolic name ([`hresult_name`]).
    pub fn name(&self) -> Cow<'static, str> {
        hresult_name(self.code)
    }

    /// Where the error came from.
    pub fn context(&self) -> ErrorContext {
        self.context
    }

    /// The HTTP status of the response, if there was one.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// The request that failed.
    pub fn request(&self) -> Option<Request> {
        self.request
    }

    /// Whether the client retries after this error (`BG_JOB_STATE_TRANSIENT_ERROR`) rather than
    /// giving up (`BG_JOB_STATE_ERROR`).
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// Extra explanation, if any.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// Name, code, context, status, request and detail on one line, e.g.
    /// `E_ACCESSDENIED (0x80070005), context 0x5 (BG_ERROR_CONTEXT_REMOTE_FILE), HTTP 403 on Create-Session`.
    pub fn describe(&self) -> String {
        let mut s = format!("{self}, context {} ({})", self.context, self.context.name());
        if let Some(status) = self.status {
            s.push_str(&format!(", HTTP {status}"));
        }
        if let Some(r) = self.request {
            s.push_str(&format!(" on {r}"));
        }
        if let Some(d) = &self.detail {
            s.push_str(": ");
            s.push_str(d);
        }
        s
    }
}

impl fmt::Display for BitsFailure {
    /// `NAME (0xcode)`, e.g. `BG_E_SESSION_NOT_FOUND (0x8020001f)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.code)
    }
}

/// Why an upload (or its reply download) failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A BITS error: an error Ack, an HTTP error, or a protocol violation the client detected.
    /// Displayed as `NAME (0xcode), context …`.
    #[error("{}", .0.describe())]
    Bits(BitsFailure),
    /// The server could not be reached, the connection dropped, or a response timed out.
    #[error("{request} to {url}: {message}")]
    Transport {
        /// The request that failed.
        request: Request,
        /// The URL it was sent to.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The connection cannot work however often it is tried (like Windows, the client does
    /// not retry): the server's TLS certificate is not trusted, or the two ends speak different
    /// protocols (`http://` to a TLS port, `https://` to a plain one). The message says what
    /// to change.
    #[error("{request} to {url}: {message}")]
    Connection {
        /// The request that failed.
        request: Request,
        /// The URL it was sent to.
        url: String,
        /// What went wrong and what to do about it.
        message: String,
    },
    /// The local file could not be read, or the reply could not be written.
    #[error("{}: {source}", .path.display())]
    LocalFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The URL is not an absolute `http://` or `https://` URL the client can use.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// The job was cancelled through its [`CancelHandle`](crate::CancelHandle).
    #[error("cancelled")]
    Cancelled,
    /// The job was suspended through its [`CancelHandle`](crate::CancelHandle): no
    /// Cancel-Session was sent, so the session can be continued with
    /// [`UploadJob::resume`](crate::UploadJob::resume).
    #[error("suspended at byte {offset}")]
    Suspended {
        /// The session to continue (`None` if none had been created yet).
        session_id: Option<String>,
        /// The last offset the server acknowledged.
        offset: u64,
    },
}

impl ClientError {
    /// Whether the client would retry after this error.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Bits(f) => f.is_transient(),
            ClientError::Transport { .. } => true,
            _ => false,
        }
    }

    /// The BITS failure, if this is one.
    pub fn bits(&self) -> Option<&BitsFailure> {
        match self {
            ClientError::Bits(f) => Some(f),
            _ => None,
        }
    }

    /// The HRESULT of a BITS failure.
    pub fn hresult(&self) -> Option<HResult> {
        self.bits().map(BitsFailure::code)
    }

    /// The context of a BITS failure.
    pub fn context(&self) -> Option<ErrorContext> {
        self.bits().map(BitsFailure::context)
    }

    /// Whether this is `BG_E_SESSION_NOT_FOUND` (the client restarts with a new session).
    pub fn is_session_not_found(&self) -> bool {
        self.hresult() == Some(hresult::BG_E_SESSION_NOT_FOUND)
    }

    pub(crate) fn transport(request: Request, url: &str, message: impl fmt::Display) -> Self {
        ClientError::Transport {
            request,
            url: url.to_owned(),
            message: message.to_string(),
        }
    }

    pub(crate) fn connection(request: Request, url: &str, message: impl fmt::Display) -> Self {
        ClientError::Connection {
            request,
            url: url.to_owned(),
            message: message.to_string(),
        }
    }

    pub(crate) fn timeout(request: Request, url: &str, after: Duration) -> Self {
        Self::transport(request, url, format!("no response within {after:?}"))
    }

    pub(crate) fn invalid_response(
        request: Request,
        status: u16,
        detail: impl Into<String>,
    ) -> Self {
        ClientError::Bits(
            BitsFailure::fatal(
                hresult::BG_E_INVALID_SERVER_RESPONSE,
                ErrorContext::RemoteFile,
                Some(request),
            )
            .with_status(status)
            .with_detail(detail),
        )
    }
}

impl From<BitsFailure> for ClientError {
    fn from(f: BitsFailure) -> Self {
        ClientError::Bits(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            hresult_name(hresult::BG_E_SESSION_NOT_FOUND),
            "BG_E_SESSION_NOT_FOUND"
        );
        assert_eq!(hresult_name(HResult(0x8019_01f8)), "BG_E_HTTP_ERROR_504");
        assert_eq!(
            hresult_name(HResult(0x8007_0070)),
            "HRESULT_FROM_WIN32(112)"
        );
        let f = BitsFailure::from_response(
            Request::Fragment,
            500,
            hresult::BG_E_SESSION_NOT_FOUND,
            ErrorContext::RemoteFile,
        );
        assert_eq!(f.to_string(), "BG_E_SESSION_NOT_FOUND (0x8020001f)");
        assert!(ClientError::Bits(f)
            .to_string()
            .starts_with("BG_E_SESSION_NOT_FOUND (0x8020001f), context 0x5"));
    }

    #[test]
    fn remote_application_classification() {
        let app = ErrorContext::RemoteApplication;
        for s in [300, 301, 302, 303, 304, 305, 307] {
            assert!(!is_transient_status(s, app), "{s}");
        }
        for s in [306, 308, 399] {
            assert!(is_transient_status(s, app), "{s}");
        }
        for s in [400, 401, 403, 404, 410, 413, 499] {
            assert!(!is_transient_status(s, app), "{s}");
        }
        for s in [408, 409] {
            assert!(is_transient_status(s, app), "{s}");
        }
        for s in [500, 502, 503, 504, 599] {
            assert!(is_transient_status(s, app), "{s}");
        }
        for s in [501, 505] {
            assert!(!is_transient_status(s, app), "{s}");
        }
        assert!(is_transient_status(600, app));
        assert!(is_transient_status(100, app));
    }

    #[test]
    fn server_classification() {
        let srv = ErrorContext::RemoteFile;
        for s in [400, 401, 403, 404, 409, 501, 505, 301] {
            assert!(!is_transient_status(s, srv), "{s}");
        }
        for s in [408, 500, 502, 503, 504] {
            assert!(is_transient_status(s, srv), "{s}");
        }
    }
}
