//! The `digest` handler: the reply is a small JSON receipt with the upload's SHA-256.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::{HandlerError, Reply, ReplyFuture, ReplyHandler, Upload};

/// Size of the read buffer the upload is hashed through.
const CHUNK: usize = 64 * 1024;

/// The JSON receipt [`DigestHandler`] replies with.
///
/// Serialized with its fields in this order, e.g.
/// `{"session_id":"{…}","size":5,"sha256":"2cf2…","received":"2024-05-01T12:00:00Z","content_name":null}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestReceipt {
    /// The session id, in braces (`{xxxxxxxx-…}`).
    pub session_id: String,
    /// The number of bytes received.
    pub size: u64,
    /// SHA-256 of the upload, 64 lower-case hex digits.
    pub sha256: String,
    /// When the receipt was made: RFC 3339, UTC, whole seconds (`2024-05-01T12:00:00Z`).
    pub received: String,
    /// The client's `Content-Name`, or `null`.
    pub content_name: Option<String>,
}

/// Replies with a [`DigestReceipt`] of the upload: its size and SHA-256, computed by streaming
/// the upload file (never loaded whole).
#[derive(Clone, Copy, Debug, Default)]
pub struct DigestHandler;

impl DigestHandler {
    /// A digest handler.
    pub fn new() -> Self {
        DigestHandler
    }
}

/// Streams the first `upload.len` bytes of the upload through SHA-256.
async fn hash_upload(upload: &Upload) -> Result<(u64, [u8; 32]), HandlerError> {
    let mut file = upload.open().await.map_err(|e| {
        HandlerError::internal(format!("opening upload {}: {e}", upload.path.display()))
    })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).await.map_err(|e| {
            HandlerError::internal(format!("reading upload {}: {e}", upload.path.display()))
        })?;
        let Some(chunk) = buf.get(..n) else {
            return Err(HandlerError::internal("read past the buffer"));
        };
        if chunk.is_empty() {
            break;
        }
        hasher.update(chunk);
        size += n as u64;
    }
    if size != upload.len {
        return Err(HandlerError::internal(format!(
            "upload {} holds {size} bytes, expected {}",
            upload.path.display(),
            upload.len
        )));
    }
    Ok((size, hasher.finalize().into()))
}

/// Lower-case hex of `bytes`.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

impl ReplyHandler for DigestHandler {
    fn reply(&self, upload: Upload) -> ReplyFuture {
        Box::pin(async move {
            let (size, digest) = hash_upload(&upload).await?;
            let receipt = DigestReceipt {
                session_id: upload.session_id.to_string(),
                size,
                sha256: to_hex(&digest),
                received: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                content_name: upload.content_name.clone(),
            };
            let json = serde_json::to_vec(&receipt)
                .map_err(|e| HandlerError::internal(format!("serializing receipt: {e}")))?;
            Ok(Reply::bytes(json))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_and_padded() {
        assert_eq!(to_hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(to_hex(&[]), "");
    }

    #[tokio::test]
    async fn short_upload_file_is_an_internal_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upload");
        std::fs::write(&path, b"abc").unwrap();
        let upload = Upload {
            session_id: bitsd_protocol::SessionId::random(),
            original_url: "http://h/digest/x".into(),
            server_url: None,
            content_name: None,
            len: 10,
            path,
            session_dir: dir.path().to_path_buf(),
        };
        let err = DigestHandler.reply(upload).await.unwrap_err();
        assert!(
            matches!(err, HandlerError::Status { status: 500, .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn missing_upload_file_is_an_internal_error() {
        let dir = tempfile::tempdir().unwrap();
        let upload = Upload {
            session_id: bitsd_protocol::SessionId::random(),
            original_url: "http://h/digest/x".into(),
            server_url: None,
            content_name: None,
            len: 1,
            path: dir.path().join("nope"),
            session_dir: dir.path().to_path_buf(),
        };
        let err = DigestHandler.reply(upload).await.unwrap_err();
        assert!(
            matches!(err, HandlerError::Status { status: 500, .. }),
            "{err:?}"
        );
    }
}
