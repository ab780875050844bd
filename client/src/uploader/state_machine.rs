//! The job's run: Create-Session, Fragments until the server holds the file, the reply,
//! Close-Session.

use bitsd_protocol::ContentRange;
use http::header::HeaderValue;

use super::job::*;
use super::packets::*;
use super::retry::*;
use super::session::*;
use crate::error::{hresult, BitsFailure, ClientError, ErrorContext, Request};
use crate::progress::{JobEvent, JobState};
use crate::target::Target;

/// The reply part of a job, without the destination.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyWanted {
    No,
    Required,
    IfOffered,
}

impl ReplyWanted {
    pub(crate) fn of(mode: &ReplyMode) -> Self {
        match mode {
            ReplyMode::None => ReplyWanted::No,
            ReplyMode::Required(_) => ReplyWanted::Required,
            ReplyMode::IfOffered(_) => ReplyWanted::IfOffered,
        }
    }
}

impl Run {
    pub(crate) async fn execute(&mut self, job: UploadJob) -> Result<UploadOutcome, ClientError> {
        // Taken apart so no reference to the (not `Sync`) reply writer lives across an await.
        let UploadJob {
            url,
            file: path,
            reply,
            cancel: _,
            overwrite_reply,
            resume,
        } = job;
        let original = Target::parse(&url)?;
        self.http.set_origin(&original);
        if let ReplyMode::Required(ReplyDestination::File(out)) = &reply {
            if !overwrite_reply && tokio::fs::symlink_metadata(out).await.is_ok() {
                return Err(ClientError::LocalFile {
                    path: out.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "the reply file already exists; remove it or pass --force to replace it",
                    ),
                });
            }
        }
        let io = |source: std::io::Error| ClientError::LocalFile {
            path: path.clone(),
            source,
        };
        let file = tokio::fs::File::open(&path).await.map_err(io)?;
        let total = file.metadata().await.map_err(io)?.len();
        let mut src = Source {
            file,
            path: path.clone(),
            total,
        };
        self.progress.upload.bytes_total = total;
        self.report();
        self.set_state(JobState::Connecting);
        if self.cfg.ping_first {
            loop {
                let token = self.cancel.clone();
                match with_cancel(&token, self.ping(&original)).await {
                    Ok(()) => break,
                    Err(e) => self.recover(e).await?,
                }
            }
            self.failures = 0;
        }

        let mut session = None;
        let mut start = 0;
        if let Some(from) = resume {
            let mut s = Session::new(from.session_id.clone(), original.clone());
            s.id_header =
                HeaderValue::from_str(&from.session_id).map_err(|_| ClientError::InvalidUrl {
                    url: url.clone(),
                    reason: format!(
                        "session id {:?} cannot be sent in a header",
                        from.session_id
                    ),
                })?;
            // At the end already (suspended during the reply): re-send the final fragment,
            // whose Ack carries the reply URL again.
            start = if from.offset >= total {
                total - self.cfg.fragment_size.max(1).min(total)
            } else {
                from.offset
            };
            s.acked = start;
            self.set_uploaded(start);
            session = Some(s);
        }
        let mut frag = self.cfg.fragment_size.max(1);
        let r = self
            .upload_loop(
                &mut session,
                start,
                &mut src,
                ReplyWanted::of(&reply),
                &original,
                &mut frag,
            )
            .await;
        self.session = session;
        let reply_url = r?;
        self.failures = 0;
        self.event(JobEvent::UploadComplete {
            reply_url: reply_url.clone(),
        });

        let reply = match (reply_url, reply) {
            (Some(url), ReplyMode::Required(dest) | ReplyMode::IfOffered(dest)) => {
                let base = self
                    .session
                    .as_ref()
                    .map(|s| s.target.clone())
                    .unwrap_or_else(|| original.clone());
                Some(crate::reply::download(self, &base, &url, dest, overwrite_reply).await?)
            }
            _ => None,
        };
        self.set_state(JobState::Transferred);

        let Some(session) = self.session.take() else {
            return Err(ClientError::Cancelled);
        };
        let closed = match self
            .end_session(
                Request::CloseSession,
                &session,
                true,
                self.cfg.retry.max_retries,
            )
            .await
        {
            Ok(()) => true,
            Err(ClientError::Cancelled) => {
                self.session = Some(session);
                return Err(ClientError::Cancelled);
            }
            Err(e) => {
                tracing::warn!(error = %e, "Close-Session failed");
                false
            }
        };
        self.set_state(JobState::Acknowledged);
        Ok(UploadOutcome {
            session_id: session.id.clone(),
            url: session.target.to_string(),
            bytes_uploaded: total,
            fragment_size: frag,
            restarts: self.restarts,
            retries: self.retries,
            reply,
            closed,
        })
    }

    /// Ping, Create-Session and Fragments until the server holds the whole file. Returns the
    /// reply URL, if the job wants one and the final Ack carried it.
    pub(crate) async fn upload_loop(
        &mut self,
        session: &mut Option<Session>,
        start: u64,
        src: &mut Source,
        wanted: ReplyWanted,
        original: &Target,
        frag: &mut u64,
    ) -> Result<Option<String>, ClientError> {
        let token = self.cancel.clone();
        let total = src.total;
        let content_name = src
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| HeaderValue::from_str(n).ok());
        let want_reply = wanted != ReplyWanted::No;
        let reply_required = wanted == ReplyWanted::Required;
        let mut offset = start;
        let mut restarts_without_progress = 0u32;
        loop {
            if token.is_cancelled() {
                return Err(ClientError::Cancelled);
            }
            let Some(s) = session.as_mut() else {
                self.set_state(JobState::Connecting);
                match with_cancel(&token, self.create_session(original)).await {
                    Ok(new) => {
                        offset = 0;
                        self.set_uploaded(0);
                        *session = Some(new);
                    }
                    Err(e) => self.recover(e).await?,
                }
                continue;
            };
            if s.needs_ping {
                let target = s.target.clone();
                match with_cancel(&token, self.ping(&target)).await {
                    Ok(()) => {
                        s.needs_ping = false;
                        s.reachable();
                    }
                    Err(e) => {
                        self.note_failure(s, &e);
                        self.recover(e).await?;
                    }
                }
                continue;
            }
            self.set_state(JobState::Transferring);
            let len = (*frag).min(total - offset);
            let range = if total == 0 {
                ContentRange::empty_upload()
            } else {
                ContentRange::new(offset, offset + len - 1, total).ok_or_else(|| {
                    ClientError::invalid_response(
                        Request::Fragment,
                        0,
                        format!("cannot send bytes {offset}+{len} of {total}"),
                    )
                })?
            };
            let body = Self::read_fragment(src, offset, len).await?;
            let name = if offset == 0 {
                content_name.as_ref()
            } else {
                None
            };
            let target = s.target.clone();
            let id = s.id_header.clone();
            let r = with_cancel(&token, self.fragment(&target, &id, range, name, body)).await;
            let end = offset + len;
            match r {
                Err(e) if e.is_session_not_found() => {
                    restarts_without_progress += 1;
                    if restarts_without_progress > self.cfg.retry.max_retries {
                        return Err(e);
                    }
                    self.restarts += 1;
                    self.event(JobEvent::SessionRestarted {
                        old_session_id: s.id.clone(),
                    });
                    // No session: the next turn sends Create-Session and starts from 0.
                    *session = None;
                }
                Err(e) => {
                    self.note_failure(s, &e);
                    self.recover(e).await?;
                }
                Ok(FragmentResult::TooLarge) => {
                    s.reachable();
                    if len <= 1 {
                        return Err(BitsFailure::fatal(
                            hresult::BG_E_TOO_LARGE,
                            ErrorContext::RemoteFile,
                            Some(Request::Fragment),
                        )
                        .with_status(413)
                        .with_detail("the server refuses even a one-byte fragment")
                        .into());
                    }
                    let to = len / 2;
                    self.event(JobEvent::FragmentSizeReduced { from: len, to });
                    *frag = to;
                }
                Ok(FragmentResult::Gap(received)) => {
                    s.reachable();
                    if received > total || received == offset {
                        return Err(ClientError::invalid_response(
                            Request::Fragment,
                            416,
                            format!(
                                "416 asks for offset {received} (sent {offset}, total {total})"
                            ),
                        ));
                    }
                    self.event(JobEvent::Resync {
                        from: offset,
                        to: received,
                    });
                    if received > s.acked {
                        s.acked = received;
                        self.failures = 0;
                        restarts_without_progress = 0;
                    } else {
                        self.no_progress(Request::Fragment, 416)?;
                    }
                    offset = received;
                    self.set_uploaded(received);
                }
                Ok(FragmentResult::Acked {
                    received,
                    reply_url,
                }) => {
                    s.reachable();
                    let received = received.unwrap_or(end);
                    if received > total {
                        return Err(ClientError::invalid_response(
                            Request::Fragment,
                            200,
                            format!(
                                "BITS-Received-Content-Range {received} is past the end ({total})"
                            ),
                        ));
                    }
                    if received != end {
                        self.event(JobEvent::Resync {
                            from: end,
                            to: received,
                        });
                    }
                    if received > s.acked || total == 0 {
                        s.acked = received;
                        self.failures = 0;
                        restarts_without_progress = 0;
                    } else if received <= offset {
                        self.no_progress(Request::Fragment, 200)?;
                    }
                    offset = received;
                    self.set_uploaded(received);
                    if received == total {
                        if !want_reply {
                            return Ok(None);
                        }
                        if let Some(url) = reply_url {
                            return Ok(Some(url));
                        }
                        if end == total {
                            if reply_required {
                                return Err(ClientError::invalid_response(
                                    Request::Fragment,
                                    200,
                                    "the final Ack of an upload-reply job carries no BITS-Reply-URL",
                                ));
                            }
                            return Ok(None);
                        }
                        // The server already holds everything but this was not the final
                        // fragment: re-send the final one to learn the reply URL (§6.2).
                        offset = total - (*frag).min(total);
                    }
                }
            }
        }
    }

    /// A transport failure on the Host-Id target may trigger the fallback to the original URL.
    pub(crate) fn note_failure(&self, s: &mut Session, e: &ClientError) {
        if matches!(e, ClientError::Transport { .. }) {
            if s.unreachable() {
                self.event(JobEvent::HostIdFallback {
                    url: s.target.to_string(),
                });
            }
        } else {
            s.reachable();
        }
    }
}
