//! The protocol error: what the client sees when a packet fails (§2.1).

use std::borrow::Cow;
use std::fmt;

use http::StatusCode;

/// A Windows HRESULT as carried in `BITS-Error-Code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HResult(pub u32);

impl HResult {
    /// `S_OK`; sent as `0x0` with the 416 gap Ack (§5.3).
    pub const OK: HResult = HResult(0);
    /// `E_INVALIDARG`: a header breaks the message rules.
    pub const E_INVALIDARG: HResult = HResult(0x8007_0057);
    /// `E_ACCESSDENIED`: no permission, overwrite refused, uploads disabled.
    pub const E_ACCESSDENIED: HResult = HResult(0x8007_0005);
    /// `HRESULT_FROM_WIN32(ERROR_PATH_NOT_FOUND)`.
    pub const E_PATH_NOT_FOUND: HResult = HResult(0x8007_0003);
    /// `HRESULT_FROM_WIN32(ERROR_DISK_FULL)`.
    pub const E_DISK_FULL: HResult = HResult(0x8007_0070);
    /// `E_FAIL`: an unspecified internal failure.
    pub const E_FAIL: HResult = HResult(0x8000_4005);
    /// `BG_E_SESSION_NOT_FOUND`: the session id is unknown, expired or deleted.
    pub const BG_E_SESSION_NOT_FOUND: HResult = HResult(0x8020_001f);
    /// `BG_E_TOO_LARGE`: the upload (or one fragment) is larger than the server accepts.
    pub const BG_E_TOO_LARGE: HResult = HResult(0x8020_0020);

    /// `BG_E_HTTP_ERROR_<status>`: `0x80190000 + status`.
    pub fn http_error(status: u16) -> HResult {
        HResult(0x8019_0000 + u32::from(status))
    }

    /// `HRESULT_FROM_WIN32(code)` for a Win32 error number.
    pub fn from_win32(code: u32) -> HResult {
        if code == 0 {
            HResult::OK
        } else {
            HResult(0x8007_0000 | (code & 0xffff))
        }
    }
}

impl fmt::Display for HResult {
    /// `0x` and 8 lower-case hex digits; zero is written `0x0` as in §5.3.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            f.write_str("0x0")
        } else {
            write!(f, "0x{:08x}", self.0)
        }
    }
}

/// Where an error came from, as carried in `BITS-Error-Context`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorContext {
    /// `0x5`: the server itself, while processing the packet (`BG_ERROR_CONTEXT_REMOTE_FILE`).
    Server,
    /// `0x7`: the server application / reply handler (`BG_ERROR_CONTEXT_REMOTE_APPLICATION`).
    ServerApplication,
}

impl ErrorContext {
    /// The header value: `0x5` or `0x7`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorContext::Server => "0x5",
            ErrorContext::ServerApplication => "0x7",
        }
    }
}

/// A failed packet: the HTTP status, `BITS-Error-Code` and `BITS-Error-Context` of its Ack,
/// plus a human-readable reason for logs (never sent on the wire).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitsError {
    status: StatusCode,
    code: HResult,
    context: ErrorContext,
    reason: Cow<'static, str>,
}

impl BitsError {
    /// An error with every part chosen by the caller.
    pub fn new(
        status: StatusCode,
        code: HResult,
        context: ErrorContext,
        reason: impl Into<Cow<'static, str>>,
    ) -> Self {
        BitsError {
            status,
            code,
            context,
            reason: reason.into(),
        }
    }

    /// 400 `E_INVALIDARG`: a header breaks the message rules.
    pub fn invalid_arg(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            HResult::E_INVALIDARG,
            ErrorContext::Server,
            reason,
        )
    }

    /// 500 `BG_E_SESSION_NOT_FOUND`: unknown, expired or deleted session.
    pub fn session_not_found() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            HResult::BG_E_SESSION_NOT_FOUND,
            ErrorContext::Server,
            "session not found",
        )
    }

    /// 403 `E_ACCESSDENIED`: the destination cannot be written (exists, not allowed, escapes the root).
    pub fn access_denied(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            HResult::E_ACCESSDENIED,
            ErrorContext::Server,
            reason,
        )
    }

    /// 501 `E_ACCESSDENIED`: uploads are not enabled on this URL.
    pub fn uploads_disabled() -> Self {
        Self::new(
            StatusCode::NOT_IMPLEMENTED,
            HResult::E_ACCESSDENIED,
            ErrorContext::Server,
            "uploads are not enabled on this URL",
        )
    }

    /// 400 `BG_E_TOO_LARGE`: the whole upload is larger than the configured maximum (never 413, §2.1).
    pub fn upload_too_large(total: u64, max: u64) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            HResult::BG_E_TOO_LARGE,
            ErrorContext::Server,
            format!("upload of {total} bytes exceeds the maximum upload size of {max} bytes"),
        )
    }

    /// 413 `BG_E_TOO_LARGE`: one fragment is larger than the server takes; the client shrinks its fragments.
    pub fn fragment_too_large(len: u64, max: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            HResult::BG_E_TOO_LARGE,
            ErrorContext::Server,
            format!("fragment of {len} bytes exceeds the maximum fragment size of {max} bytes"),
        )
    }

    /// The reply handler / backend answered with `status` (§9.5): that status relayed,
    /// `0x80190000 + status`, context `0x7`. A status the client would misread is replaced by
    /// 500 (transient): 401 and 407 (the client would take them as a challenge to its own
    /// credentials), 413 (it would shrink fragments forever), 416 (it would resync), and
    /// anything outside 300..=599.
    pub fn backend_status(status: u16) -> Self {
        let relayed = match status {
            // Statuses a BITS client reads as something other than a backend failure:
            // 401/407 as a challenge to its own credentials, 413 as "send smaller fragments"
            // (an endless loop), 416 as a resync to `BITS-Received-Content-Range` (§2.1, §9.5).
            401 | 407 | 413 | 416 => 500,
            300..=599 => status,
            _ => 500,
        };
        let status = StatusCode::from_u16(relayed).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self::new(
            status,
            HResult::http_error(relayed),
            ErrorContext::ServerApplication,
            format!("server application failed with status {relayed}"),
        )
    }

    /// 504 `0x801901f8`, context `0x7`: the backend was unreachable or timed out (transient).
    pub fn backend_unreachable(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            HResult::http_error(504),
            ErrorContext::ServerApplication,
            reason,
        )
    }

    /// 500 with the given HRESULT: an internal failure such as an I/O error (transient for the client).
    pub fn internal(code: HResult, reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            code,
            ErrorContext::Server,
            reason,
        )
    }

    /// The HTTP status of the Ack.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The `BITS-Error-Code` value.
    pub fn code(&self) -> HResult {
        self.code
    }

    /// The `BITS-Error-Context` value.
    pub fn context(&self) -> ErrorContext {
        self.context
    }

    /// Why it failed, for logs and operators (not sent to the client).
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for BitsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} (context {}): {}",
            self.status.as_u16(),
            self.code,
            self.context.as_str(),
            self.reason
        )
    }
}

impl std::error::Error for BitsError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hresult_format() {
        assert_eq!(HResult::E_INVALIDARG.to_string(), "0x80070057");
        assert_eq!(HResult::OK.to_string(), "0x0");
        assert_eq!(HResult::http_error(504).to_string(), "0x801901f8");
        assert_eq!(HResult::http_error(403).to_string(), "0x80190193");
        assert_eq!(HResult::from_win32(112), HResult::E_DISK_FULL);
    }

    #[test]
    fn backend_status_never_413() {
        assert_eq!(
            BitsError::backend_status(413).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        for special in [401, 407, 416] {
            assert_eq!(
                BitsError::backend_status(special).status(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "{special}"
            );
        }
        assert_eq!(
            BitsError::backend_status(409).status(),
            StatusCode::CONFLICT
        );
        assert_eq!(BitsError::backend_status(409).code(), HResult(0x8019_0199));
        assert_eq!(
            BitsError::backend_status(200).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            BitsError::backend_status(403).context(),
            ErrorContext::ServerApplication
        );
    }
}
