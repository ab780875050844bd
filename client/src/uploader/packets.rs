//! The BITS packets (Ping, Create-Session, Fragment) and what their Acks say.

use std::path::PathBuf;
use std::time::Duration;

use bitsd_protocol::header as h;
use bitsd_protocol::{ContentRange, BITS_1_5_UPLOAD_PROTOCOL};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::retry::*;
use super::session::*;
use crate::error::{hresult, BitsFailure, ClientError, ErrorContext, HResult, Request};
use crate::progress::JobEvent;
use crate::target::Target;

/// An Ack (or any response to a packet): status and headers.
pub(crate) struct Ack {
    pub(crate) status: u16,
    pub(crate) headers: HeaderMap,
    /// The server's explanation of an error (a short text body), if it sent one.
    pub(crate) explanation: Option<String>,
}

impl Ack {
    pub(crate) fn header(&self, name: &HeaderName) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    }

    pub(crate) fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub(crate) fn is_ack(&self) -> bool {
        self.header(&h::BITS_PACKET_TYPE)
            .is_some_and(|v| v.eq_ignore_ascii_case("ack"))
    }

    /// `BITS-Error-Code`, if present and parsable.
    pub(crate) fn error_code(&self) -> Option<HResult> {
        let v = self.header(&h::BITS_ERROR_CODE)?;
        parse_hex(v).map(HResult)
    }

    /// The failure this response reports: its `BITS-Error-Code` and `BITS-Error-Context`, or
    /// `BG_E_HTTP_ERROR_<status>` in the server context when it carries none.
    pub(crate) fn failure(&self, request: Request) -> BitsFailure {
        let code = match self.error_code() {
            Some(c) if c != HResult::OK => c,
            _ => HResult::http_error(self.status),
        };
        let context = self
            .header(&h::BITS_ERROR_CONTEXT)
            .and_then(parse_hex)
            .map(ErrorContext::from_value)
            .unwrap_or(ErrorContext::RemoteFile);
        let failure = BitsFailure::from_response(request, self.status, code, context);
        let hint = match (self.status, request) {
            (401, _) => Some(
                "the server requires authentication: pass --user and --password (or \
                 BITSD_PASSWORD), or check them if you did",
            ),
            (403, Request::CreateSession) => Some(
                "the server refused to start the upload: the file may already exist on a route \
                 that does not allow overwrites, or this account may not upload there",
            ),
            _ => None,
        };
        match (&self.explanation, hint) {
            (Some(why), _) => failure.with_detail(format!("the server says: {why}")),
            (None, Some(hint)) => failure.with_detail(hint),
            (None, None) => failure,
        }
    }

    pub(crate) fn received(&self) -> Option<Result<u64, ()>> {
        self.header(&h::BITS_RECEIVED_CONTENT_RANGE)
            .map(|v| v.parse::<u64>().map_err(|_| ()))
    }
}

pub(crate) fn parse_hex(v: &str) -> Option<u32> {
    let v = v.trim();
    let digits = v
        .strip_prefix("0x")
        .or_else(|| v.strip_prefix("0X"))
        .unwrap_or(v);
    if digits.is_empty() {
        return None;
    }
    u32::from_str_radix(digits, 16).ok()
}

pub(crate) fn offered_protocol() -> String {
    format!("{{{BITS_1_5_UPLOAD_PROTOCOL}}}")
}

pub(crate) fn same_guid(a: &str, b: &str) -> bool {
    let strip = |s: &str| {
        s.trim()
            .trim_start_matches('{')
            .trim_end_matches('}')
            .to_ascii_lowercase()
    };
    strip(a) == strip(b)
}

/// The file being uploaded.
pub(crate) struct Source {
    pub(crate) file: tokio::fs::File,
    pub(crate) path: PathBuf,
    pub(crate) total: u64,
}

pub(crate) enum FragmentResult {
    Acked {
        received: Option<u64>,
        reply_url: Option<String>,
    },
    Gap(u64),
    TooLarge,
}

impl Run {
    pub(crate) async fn packet(
        &mut self,
        request: Request,
        target: &Target,
        session_id: Option<&HeaderValue>,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<Ack, ClientError> {
        let packet_type = match request {
            Request::Ping => "Ping",
            Request::CreateSession => "Create-Session",
            Request::Fragment => "Fragment",
            Request::CloseSession => "Close-Session",
            Request::CancelSession => "Cancel-Session",
            // Not packets; never sent through here.
            Request::ReplyHead | Request::ReplyGet => "Ping",
        };
        headers.insert(h::BITS_PACKET_TYPE, HeaderValue::from_static(packet_type));
        if let Some(id) = session_id {
            headers.insert(h::BITS_SESSION_ID, id.clone());
        }
        let method = Method::from_bytes(b"BITS_POST").map_err(|e| ClientError::InvalidUrl {
            url: target.to_string(),
            reason: e.to_string(),
        })?;
        let parts = self
            .http
            .send_ack(request, method, target, headers, body)
            .await?;
        Ok(Ack {
            status: parts.status.as_u16(),
            explanation: parts
                .extensions
                .get::<crate::http::ErrorText>()
                .map(|t| t.0.clone()),
            headers: parts.headers,
        })
    }

    pub(crate) async fn ping(&mut self, target: &Target) -> Result<(), ClientError> {
        let ack = self
            .packet(Request::Ping, target, None, HeaderMap::new(), Bytes::new())
            .await?;
        if ack.is_success() {
            Ok(())
        } else {
            Err(ack.failure(Request::Ping).into())
        }
    }

    pub(crate) async fn create_session(
        &mut self,
        original: &Target,
    ) -> Result<Session, ClientError> {
        let offered = offered_protocol();
        let mut headers = HeaderMap::new();
        headers.insert(
            h::BITS_SUPPORTED_PROTOCOLS,
            HeaderValue::from_str(&offered).map_err(|e| ClientError::InvalidUrl {
                url: original.to_string(),
                reason: e.to_string(),
            })?,
        );
        let ack = self
            .packet(
                Request::CreateSession,
                original,
                None,
                headers,
                Bytes::new(),
            )
            .await?;
        let req = Request::CreateSession;
        if !ack.is_success() {
            return Err(ack.failure(req).into());
        }
        if !ack.is_ack() {
            return Err(ClientError::invalid_response(
                req,
                ack.status,
                "response is not a BITS Ack (no BITS-Packet-Type: Ack)",
            ));
        }
        let protocol = ack.header(&h::BITS_PROTOCOL).unwrap_or("").to_owned();
        if !same_guid(&protocol, &offered) {
            return Err(BitsFailure::fatal(
                hresult::BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH,
                ErrorContext::RemoteFile,
                Some(req),
            )
            .with_status(ack.status)
            .with_detail(format!("offered {offered}, server chose {protocol:?}"))
            .into());
        }
        let id = match ack.headers.get(&h::BITS_SESSION_ID) {
            Some(v) if !v.as_bytes().is_empty() => v.clone(),
            _ => {
                return Err(ClientError::invalid_response(
                    req,
                    ack.status,
                    "Create-Session Ack carries no BITS-Session-Id",
                ))
            }
        };
        let mut session = Session::new(
            String::from_utf8_lossy(id.as_bytes()).into_owned(),
            original.clone(),
        );
        session.id_header = id;
        self.event(JobEvent::SessionCreated {
            session_id: session.id.clone(),
            protocol: protocol.clone(),
        });
        if let Some(host_id) = ack.header(&h::BITS_HOST_ID).filter(|v| !v.is_empty()) {
            let target = original
                .with_host_id(host_id)
                .map_err(|e| ClientError::invalid_response(req, ack.status, e.to_string()))?;
            let fallback = ack
                .header(&h::BITS_HOST_ID_FALLBACK_TIMEOUT)
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs);
            self.event(JobEvent::HostIdRedirect {
                url: target.to_string(),
                fallback_timeout: fallback,
            });
            self.http.trust_redirect(&target);
            session.target = target;
            session.needs_ping = true;
            session.host_id = Some(HostId {
                fallback,
                first_failure: None,
            });
        }
        Ok(session)
    }

    pub(crate) async fn read_fragment(
        src: &mut Source,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, ClientError> {
        let (file, path, total) = (&mut src.file, src.path.as_path(), src.total);
        let io = |source: std::io::Error| ClientError::LocalFile {
            path: path.to_owned(),
            source,
        };
        let now = file.metadata().await.map_err(io)?.len();
        if now != total {
            return Err(BitsFailure::fatal(
                hresult::BG_E_LOCAL_FILE_CHANGED,
                ErrorContext::LocalFile,
                Some(Request::Fragment),
            )
            .with_detail(format!(
                "{} changed size from {total} to {now} bytes during the upload",
                path.display()
            ))
            .into());
        }
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(io)?;
        let len = usize::try_from(len).map_err(|_| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "fragment larger than memory",
            ))
        })?;
        let mut buf = vec![0u8; len];
        file.read_exact(&mut buf).await.map_err(io)?;
        Ok(Bytes::from(buf))
    }

    pub(crate) async fn fragment(
        &mut self,
        target: &Target,
        session_id: &HeaderValue,
        range: ContentRange,
        content_name: Option<&HeaderValue>,
        body: Bytes,
    ) -> Result<FragmentResult, ClientError> {
        let req = Request::Fragment;
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_RANGE,
            HeaderValue::from_str(&range.to_string()).map_err(|e| ClientError::InvalidUrl {
                url: target.to_string(),
                reason: e.to_string(),
            })?,
        );
        if let Some(name) = content_name {
            headers.insert(h::CONTENT_NAME, name.clone());
        }
        let ack = self
            .packet(req, target, Some(session_id), headers, body)
            .await?;
        match ack.status {
            413 => Ok(FragmentResult::TooLarge),
            416 => match ack.received() {
                Some(Ok(r)) => Ok(FragmentResult::Gap(r)),
                _ => Err(ClientError::invalid_response(
                    req,
                    416,
                    "416 without a usable BITS-Received-Content-Range",
                )),
            },
            s if (200..300).contains(&s) => {
                if !ack.is_ack() {
                    return Err(ClientError::invalid_response(
                        req,
                        s,
                        "response is not a BITS Ack (no BITS-Packet-Type: Ack)",
                    ));
                }
                let received = match ack.received() {
                    None => None,
                    Some(Ok(r)) => Some(r),
                    Some(Err(())) => {
                        return Err(ClientError::invalid_response(
                            req,
                            s,
                            "unparsable BITS-Received-Content-Range",
                        ))
                    }
                };
                let reply_url = ack
                    .header(&h::BITS_REPLY_URL)
                    .filter(|v| !v.is_empty())
                    .map(str::to_owned);
                Ok(FragmentResult::Acked {
                    received,
                    reply_url,
                })
            }
            _ => Err(ack.failure(req).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(crate) fn hex_codes_and_guids() {
        assert_eq!(parse_hex("0x8020001f"), Some(0x8020_001f));
        assert_eq!(parse_hex("0X5"), Some(5));
        assert_eq!(parse_hex("7"), Some(7));
        assert_eq!(parse_hex("0x"), None);
        assert!(same_guid(
            "{7DF0354D-249B-430F-820D-3D2A9BEF4931}",
            &offered_protocol()
        ));
        assert_eq!(offered_protocol(), "{7df0354d-249b-430f-820d-3d2a9bef4931}");
    }
}
