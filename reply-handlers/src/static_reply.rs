//! The `static` handler: every client gets the same reply.

use std::path::{Path, PathBuf};

use crate::{HandlerConfigError, HandlerError, Reply, ReplyFuture, ReplyHandler, Upload};

/// What a [`StaticHandler`] replies with.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    File(PathBuf),
    Url(String),
}

/// Replies to every upload with the same configured file, or with the same absolute URL
/// (`BITS-Reply-URL` then points there and nothing is stored, like a backend's
/// `BITS-Static-Response-URL`, §9.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticHandler {
    target: Target,
}

impl StaticHandler {
    /// Every reply is a copy of the file at `path`. The file is looked up at each completion,
    /// so it may be replaced while the server runs; if it is missing (or not a regular file)
    /// the handler fails with status 500.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        StaticHandler {
            target: Target::File(path.into()),
        }
    }

    /// Every reply is the existing resource at `url`, which must be an absolute `http` or
    /// `https` URL (§9.2: relative static URLs are not allowed). The client downloads the reply
    /// from there, so it must be reachable by the client.
    pub fn url(url: impl Into<String>) -> Result<Self, HandlerConfigError> {
        let url = url.into().trim().to_owned();
        check_static_url(&url).map_err(|reason| HandlerConfigError::InvalidUrl {
            url: url.clone(),
            reason,
        })?;
        Ok(StaticHandler {
            target: Target::Url(url),
        })
    }

    /// The configured file, if this handler replies with a file.
    pub fn reply_file(&self) -> Option<&Path> {
        match &self.target {
            Target::File(p) => Some(p),
            Target::Url(_) => None,
        }
    }

    /// The configured URL, if this handler replies with a static URL.
    pub fn reply_url(&self) -> Option<&str> {
        match &self.target {
            Target::File(_) => None,
            Target::Url(u) => Some(u),
        }
    }
}

/// Checks that `url` is an absolute `http`/`https` URL with a host; says why not.
pub(crate) fn check_static_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url.trim()).map_err(|e| e.to_string())?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("scheme {:?} is not http or https", parsed.scheme()));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("no host".into());
    }
    Ok(())
}

impl ReplyHandler for StaticHandler {
    fn reads_upload(&self) -> bool {
        false
    }

    fn reply(&self, _upload: Upload) -> ReplyFuture {
        let target = self.target.clone();
        Box::pin(async move {
            match target {
                Target::Url(url) => Ok(Reply::static_url(url)),
                Target::File(path) => match tokio::fs::metadata(&path).await {
                    Ok(meta) if meta.is_file() => Ok(Reply::file(path)),
                    Ok(_) => Err(HandlerError::internal(format!(
                        "static reply {} is not a regular file",
                        path.display()
                    ))),
                    Err(e) => Err(HandlerError::internal(format!(
                        "static reply {}: {e}",
                        path.display()
                    ))),
                },
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_urls_must_be_absolute_http() {
        assert!(StaticHandler::url("http://cdn.example/reply.bin").is_ok());
        assert!(StaticHandler::url("https://cdn.example:8443/r?x=1").is_ok());
        for bad in [
            "/reply.bin",
            "reply.bin",
            "ftp://h/x",
            "file:///etc/passwd",
            "",
        ] {
            let err = StaticHandler::url(bad).unwrap_err();
            assert!(
                matches!(err, HandlerConfigError::InvalidUrl { .. }),
                "{bad}: {err:?}"
            );
        }
    }
}
