//! The `echo` handler: the reply is the upload.

use crate::{Reply, ReplyFuture, ReplyHandler, Upload};

/// Replies with the upload itself, byte for byte.
#[derive(Clone, Copy, Debug, Default)]
pub struct EchoHandler;

impl ReplyHandler for EchoHandler {
    fn reply(&self, upload: Upload) -> ReplyFuture {
        Box::pin(async move { Ok(Reply::file(upload.path)) })
    }

    fn reads_upload(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ReplyBody;

    #[tokio::test]
    async fn echo_replies_with_the_upload_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upload");
        std::fs::write(&path, b"hello").unwrap();
        let upload = Upload {
            session_id: bitsd_protocol::SessionId::random(),
            original_url: "http://h/echo/x".into(),
            server_url: None,
            content_name: None,
            len: 5,
            path: path.clone(),
            session_dir: dir.path().to_path_buf(),
        };
        assert_eq!(upload.read_to_vec(10).await.unwrap(), b"hello");
        let reply = EchoHandler.reply(upload).await.unwrap();
        match reply.body {
            ReplyBody::File(p) => assert_eq!(p, path),
            other => panic!("{other:?}"),
        }
    }
}
