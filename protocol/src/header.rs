//! Names of the headers the BITS upload protocol uses (all lower case; HTTP header names
//! compare case-insensitively).

use http::header::HeaderName;

/// `BITS-Packet-Type`: the packet kind on requests, always `Ack` on responses.
pub const BITS_PACKET_TYPE: HeaderName = HeaderName::from_static("bits-packet-type");
/// `BITS-Session-Id`: the id the server issued at Create-Session.
pub const BITS_SESSION_ID: HeaderName = HeaderName::from_static("bits-session-id");
/// `BITS-Supported-Protocols`: the protocol GUIDs a client offers at Create-Session.
pub const BITS_SUPPORTED_PROTOCOLS: HeaderName =
    HeaderName::from_static("bits-supported-protocols");
/// `BITS-Protocol`: the protocol GUID the server chose (Create-Session Ack).
pub const BITS_PROTOCOL: HeaderName = HeaderName::from_static("bits-protocol");
/// `BITS-Received-Content-Range`: the next offset the server wants (Fragment Acks).
pub const BITS_RECEIVED_CONTENT_RANGE: HeaderName =
    HeaderName::from_static("bits-received-content-range");
/// `BITS-Reply-URL`: where an upload-reply client downloads its reply (final Fragment Ack).
pub const BITS_REPLY_URL: HeaderName = HeaderName::from_static("bits-reply-url");
/// `BITS-Error-Code`: the HRESULT of a failure, `0x` and hex digits.
pub const BITS_ERROR_CODE: HeaderName = HeaderName::from_static("bits-error-code");
/// `BITS-Error-Context`: `0x5` (server) or `0x7` (server application).
pub const BITS_ERROR_CONTEXT: HeaderName = HeaderName::from_static("bits-error-context");
/// `BITS-Host-Id`: the farm node that should receive the rest of the session.
pub const BITS_HOST_ID: HeaderName = HeaderName::from_static("bits-host-id");
/// `BITS-Host-Id-Fallback-Timeout`: seconds before the client falls back to the original host.
pub const BITS_HOST_ID_FALLBACK_TIMEOUT: HeaderName =
    HeaderName::from_static("bits-host-id-fallback-timeout");
/// `Content-Name`: the client's local file name (first fragment, informational).
pub const CONTENT_NAME: HeaderName = HeaderName::from_static("content-name");
/// `BITS-Original-Request-URL`: the job's remote URL, sent to a notification backend.
pub const BITS_ORIGINAL_REQUEST_URL: HeaderName =
    HeaderName::from_static("bits-original-request-url");
/// `BITS-Request-DataFile-Name`: by-reference path of the upload (backend notification).
pub const BITS_REQUEST_DATAFILE_NAME: HeaderName =
    HeaderName::from_static("bits-request-datafile-name");
/// `BITS-Response-DataFile-Name`: by-reference path of the reply (backend notification).
pub const BITS_RESPONSE_DATAFILE_NAME: HeaderName =
    HeaderName::from_static("bits-response-datafile-name");
/// `BITS-Static-Response-URL`: the backend's reply is this URL (backend response).
pub const BITS_STATIC_RESPONSE_URL: HeaderName =
    HeaderName::from_static("bits-static-response-url");
/// `BITS-Copy-File-To-Destination`: the backend asks for the upload to be committed too.
pub const BITS_COPY_FILE_TO_DESTINATION: HeaderName =
    HeaderName::from_static("bits-copy-file-to-destination");

/// `X-Bitsd-Error-Message`: bitsd's own addition to a refused packet's Ack (4xx): one line of
/// printable ASCII saying why, for clients to show a person (`BITS-Error-Code` stays the
/// machine-readable reason). Not part of the BITS protocol; Windows ignores it.
pub const BITSD_ERROR_MESSAGE: HeaderName = HeaderName::from_static("x-bitsd-error-message");
