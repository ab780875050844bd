//! The reply download of an upload-reply job, done the way a BITS download job does it (§10):
//! HEAD for the size, ranged GETs, resume from the bytes held after an interruption.

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue, ACCEPT, ACCEPT_ENCODING, CONTENT_LENGTH, RANGE};
use http::Method;
use http_body_util::BodyExt;
use tokio::io::{AsyncSeekExt, AsyncWrite, AsyncWriteExt};

use crate::error::{hresult, BitsFailure, ClientError, ErrorContext, HResult, Request};
use crate::progress::{JobEvent, JobState};
use crate::target::Target;
use crate::uploader::{with_cancel, ReplyDestination, ReplyOutcome, Run};

enum Sink {
    File {
        /// The temporary file, created exclusively (random name, `O_EXCL`, never through a
        /// link) beside the destination; removed when dropped unless persisted.
        tmp: tempfile::TempPath,
        path: PathBuf,
        file: tokio::fs::File,
        overwrite: bool,
    },
    Memory {
        buf: BytesMut,
        cap: u64,
    },
    Writer(Box<dyn AsyncWrite + Send + Unpin>),
}

impl Sink {
    async fn open(dest: ReplyDestination, overwrite: bool, cap: u64) -> Result<Sink, ClientError> {
        Ok(match dest {
            ReplyDestination::File(path) => {
                let dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
                    _ => PathBuf::from("."),
                };
                let mut prefix = std::ffi::OsString::from(".");
                prefix.push(path.file_name().unwrap_or_default());
                prefix.push(".");
                let named = tempfile::Builder::new()
                    .prefix(&prefix)
                    .suffix(".part")
                    .tempfile_in(&dir)
                    .map_err(|source| ClientError::LocalFile {
                        path: dir.clone(),
                        source,
                    })?;
                let (file, tmp) = named.into_parts();
                Sink::File {
                    tmp,
                    path,
                    file: tokio::fs::File::from_std(file),
                    overwrite,
                }
            }
            ReplyDestination::Memory => Sink::Memory {
                buf: BytesMut::new(),
                cap,
            },
            ReplyDestination::Writer(w) => Sink::Writer(w),
        })
    }

    fn path(&self) -> PathBuf {
        match self {
            Sink::File { tmp, .. } => tmp.to_path_buf(),
            _ => PathBuf::from("<reply output>"),
        }
    }

    async fn write(&mut self, data: &[u8]) -> Result<(), ClientError> {
        let r = match self {
            Sink::File { file, .. } => file.write_all(data).await,
            Sink::Memory { buf, cap } => {
                if buf.len() as u64 + data.len() as u64 > *cap {
                    return Err(memory_cap(*cap, buf.len() as u64 + data.len() as u64));
                }
                buf.extend_from_slice(data);
                Ok(())
            }
            Sink::Writer(w) => w.write_all(data).await,
        };
        r.map_err(|source| ClientError::LocalFile {
            path: self.path(),
            source,
        })
    }

    async fn finish(self) -> Result<(Option<Bytes>, Option<PathBuf>), ClientError> {
        match self {
            Sink::File {
                tmp,
                path,
                mut file,
                overwrite,
            } => {
                let io = |source| ClientError::LocalFile {
                    path: tmp.to_path_buf(),
                    source,
                };
                file.flush().await.map_err(io)?;
                file.sync_all().await.map_err(io)?;
                drop(file);
                let dest = path.clone();
                let persisted = tokio::task::spawn_blocking(move || {
                    if overwrite {
                        tmp.persist(&dest)
                    } else {
                        tmp.persist_noclobber(&dest)
                    }
                })
                .await
                .map_err(|e| ClientError::LocalFile {
                    path: path.clone(),
                    source: std::io::Error::other(e),
                })?;
                persisted.map_err(|e| {
                    let source = if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                        std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            "the reply file appeared during the download; remove it or pass --force to replace it",
                        )
                    } else {
                        e.error
                    };
                    ClientError::LocalFile {
                        path: path.clone(),
                        source,
                    }
                })?;
                Ok((None, Some(path)))
            }
            Sink::Memory { buf, .. } => Ok((Some(buf.freeze()), None)),
            Sink::Writer(mut w) => {
                w.flush().await.map_err(|source| ClientError::LocalFile {
                    path: PathBuf::from("<reply output>"),
                    source,
                })?;
                Ok((None, None))
            }
        }
    }

    /// Empties the sink for a download that starts over.
    async fn restart(&mut self) -> Result<(), ClientError> {
        let path = self.path();
        let io = |source| ClientError::LocalFile {
            path: path.clone(),
            source,
        };
        match self {
            Sink::File { file, .. } => {
                file.set_len(0).await.map_err(io)?;
                file.seek(std::io::SeekFrom::Start(0)).await.map_err(io)?;
                Ok(())
            }
            Sink::Memory { buf, .. } => {
                buf.clear();
                Ok(())
            }
            Sink::Writer(_) => Err(io(std::io::Error::other(
                "the reply changed during the download and part of the old one was already \
                 written to the output; run the job again",
            ))),
        }
    }

    async fn abandon(self) {
        if let Sink::File { tmp, file, .. } = self {
            drop(file);
            let _ = tokio::task::spawn_blocking(move || tmp.close()).await;
        }
    }
}

fn memory_cap(cap: u64, size: u64) -> ClientError {
    BitsFailure::fatal(
        hresult::BG_E_TOO_LARGE,
        ErrorContext::LocalFile,
        Some(Request::ReplyGet),
    )
    .with_detail(format!(
        "the reply ({size} bytes) is larger than the in-memory limit of {cap} bytes; \
         download it to a file instead"
    ))
    .into()
}

fn range_error(request: Request, status: u16, detail: impl Into<String>) -> ClientError {
    BitsFailure::fatal(
        hresult::BG_E_INSUFFICIENT_RANGE_SUPPORT,
        ErrorContext::RemoteFile,
        Some(request),
    )
    .with_status(status)
    .with_detail(detail)
    .into()
}

fn missing_size(request: Request, status: u16, detail: impl Into<String>) -> ClientError {
    BitsFailure::fatal(
        hresult::BG_E_MISSING_FILE_SIZE,
        ErrorContext::RemoteFile,
        Some(request),
    )
    .with_status(status)
    .with_detail(detail)
    .into()
}

fn http_failure(request: Request, status: u16) -> ClientError {
    BitsFailure::from_response(
        request,
        status,
        HResult::http_error(status),
        ErrorContext::RemoteFile,
    )
    .into()
}

fn content_length(headers: &HeaderMap) -> Option<Result<u64, ()>> {
    headers.get(CONTENT_LENGTH).map(|v| {
        v.to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or(())
    })
}

/// `Content-Range: bytes a-b/total` of a 206.
fn content_range(headers: &HeaderMap) -> Option<(u64, u64, u64)> {
    let v = headers
        .get(http::header::CONTENT_RANGE)?
        .to_str()
        .ok()?
        .trim();
    let (unit, spec) = v.split_once(' ')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let (range, total) = spec.trim().split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let a = a.trim().parse().ok()?;
    let b = b.trim().parse().ok()?;
    let total = total.trim().parse().ok()?;
    (a <= b && b < total).then_some((a, b, total))
}

fn base_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(ACCEPT, HeaderValue::from_static("*/*"));
    h.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    h
}

/// What identifies one version of the reply: its length and `Last-Modified`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Version {
    size: u64,
    last_modified: Option<String>,
}

fn last_modified(headers: &HeaderMap) -> Option<String> {
    headers
        .get(http::header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
}

async fn head(run: &mut Run, target: &Target) -> Result<Version, ClientError> {
    let req = Request::ReplyHead;
    let parts = run
        .http
        .send_ack(req, Method::HEAD, target, base_headers(), Bytes::new())
        .await?;
    let status = parts.status.as_u16();
    if status != 200 {
        return Err(http_failure(req, status));
    }
    match content_length(&parts.headers) {
        Some(Ok(size)) => Ok(Version {
            size,
            last_modified: last_modified(&parts.headers),
        }),
        Some(Err(())) => Err(missing_size(req, status, "unparsable Content-Length")),
        None => Err(missing_size(
            req,
            status,
            "the reply URL answers HEAD without Content-Length",
        )),
    }
}

/// Outcome of one GET.
enum Got {
    /// The body ended as announced.
    Done,
    /// The reply is not the one the download began with (another length or `Last-Modified`):
    /// the download starts over.
    Changed(String),
    /// The transfer broke off (transient); bytes written so far are kept.
    Interrupted(ClientError),
}

async fn get(
    run: &mut Run,
    target: &Target,
    sink: &mut Sink,
    held: &mut u64,
    version: &Version,
) -> Result<Got, ClientError> {
    let req = Request::ReplyGet;
    let size = version.size;
    let end = match run.cfg.reply_chunk_size {
        Some(n) => size.min(held.saturating_add(n)) - 1,
        None => size - 1,
    };
    let mut headers = base_headers();
    headers.insert(
        RANGE,
        HeaderValue::from_str(&format!("bytes={}-{end}", *held)).map_err(|e| {
            ClientError::InvalidUrl {
                url: target.to_string(),
                reason: e.to_string(),
            }
        })?,
    );
    let resp = match run
        .http
        .send(req, Method::GET, target, headers, Bytes::new())
        .await
    {
        Ok(r) => r,
        Err(e) if e.is_transient() => return Ok(Got::Interrupted(e)),
        Err(e) => return Err(e),
    };
    let status = resp.status().as_u16();
    if matches!(status, 200 | 206) {
        let now = last_modified(resp.headers());
        if version.last_modified.is_some() && now != version.last_modified {
            run.http.reset();
            return Ok(Got::Changed(format!(
                "Last-Modified changed from {:?} to {:?}",
                version.last_modified.as_deref().unwrap_or(""),
                now.as_deref().unwrap_or("")
            )));
        }
        if status == 206 {
            if let Some((_, _, total)) = content_range(resp.headers()) {
                if total != size {
                    run.http.reset();
                    return Ok(Got::Changed(format!(
                        "the reply's length changed from {size} to {total} bytes"
                    )));
                }
            }
        }
    }
    let expect = match status {
        206 => {
            let Some((a, b, total)) = content_range(resp.headers()) else {
                run.http.reset();
                return Err(range_error(
                    req,
                    status,
                    "206 without a usable Content-Range",
                ));
            };
            if a != *held || b > end || total != size {
                run.http.reset();
                return Err(range_error(
                    req,
                    status,
                    format!(
                        "asked for bytes {}-{end}/{size}, got Content-Range bytes {a}-{b}/{total}",
                        *held
                    ),
                ));
            }
            let expect = b - a + 1;
            if let Some(cl) = content_length(resp.headers()) {
                if cl != Ok(expect) {
                    run.http.reset();
                    return Err(range_error(
                        req,
                        status,
                        "Content-Length does not match Content-Range",
                    ));
                }
            }
            expect
        }
        200 => {
            if *held != 0 {
                run.http.reset();
                return Err(range_error(
                    req,
                    status,
                    format!(
                        "asked to resume at byte {}, got the whole reply (200)",
                        *held
                    ),
                ));
            }
            match content_length(resp.headers()) {
                Some(Ok(n)) if n == size => size,
                Some(Ok(n)) => {
                    run.http.reset();
                    return Err(range_error(
                        req,
                        status,
                        format!("HEAD said {size} bytes, GET sends {n}"),
                    ));
                }
                _ => {
                    run.http.reset();
                    return Err(missing_size(req, status, "200 without Content-Length"));
                }
            }
        }
        _ => {
            run.http.reset();
            let e = http_failure(req, status);
            return if e.is_transient() {
                Ok(Got::Interrupted(e))
            } else {
                Err(e)
            };
        }
    };
    let timeout = run.http.request_timeout();
    let url = target.to_string();
    let mut body = resp.into_body();
    let mut got = 0u64;
    loop {
        let frame = match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => {
                run.http.reset();
                return Ok(Got::Interrupted(ClientError::timeout(req, &url, timeout)));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                run.http.reset();
                return Ok(Got::Interrupted(ClientError::transport(req, &url, e)));
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if got + data.len() as u64 > expect {
            run.http.reset();
            return Err(range_error(
                req,
                status,
                "more bytes than the range announced",
            ));
        }
        sink.write(&data).await?;
        got += data.len() as u64;
        *held += data.len() as u64;
        run.failures = 0;
        run.progress.reply.bytes_transferred = *held;
        run.report();
    }
    if got < expect {
        run.http.reset();
        return Ok(Got::Interrupted(ClientError::transport(
            req,
            &url,
            format!("body ended after {got} of {expect} bytes"),
        )));
    }
    Ok(Got::Done)
}

/// Downloads the reply at `url` (relative URLs resolve against `base`) into `dest`.
pub(crate) async fn download(
    run: &mut Run,
    base: &Target,
    url: &str,
    dest: ReplyDestination,
    overwrite: bool,
) -> Result<ReplyOutcome, ClientError> {
    let target = base.resolve(url)?;
    let token = run.cancel_token();
    let is_memory = matches!(dest, ReplyDestination::Memory);
    let mut dest = Some(dest);
    let mut sink: Option<Sink> = None;
    let mut restarts = 0u32;
    loop {
        run.set_state(JobState::Transferring);
        let version = loop {
            match with_cancel(&token, head(run, &target)).await {
                Ok(v) => break v,
                Err(e) => run.recover(e).await?,
            }
        };
        let size = version.size;
        run.failures = 0;
        run.progress.reply.bytes_total = size;
        run.progress.reply.bytes_transferred = 0;
        run.report();
        run.event(JobEvent::ReplyStarted {
            url: target.to_string(),
            size,
        });
        if is_memory && size > run.cfg.max_memory_reply {
            if let Some(s) = sink.take() {
                s.abandon().await;
            }
            return Err(memory_cap(run.cfg.max_memory_reply, size));
        }
        let mut s = match (sink.take(), dest.take()) {
            (Some(s), _) => s,
            (None, Some(d)) => Sink::open(d, overwrite, run.cfg.max_memory_reply).await?,
            (None, None) => return Err(ClientError::Cancelled),
        };
        match fetch(run, &target, &mut s, &version).await {
            Ok(None) => {
                let (bytes, path) = s.finish().await?;
                return Ok(ReplyOutcome {
                    url: target.to_string(),
                    size,
                    bytes,
                    path,
                });
            }
            Ok(Some(changed)) => {
                restarts += 1;
                let restart = if restarts > 3 {
                    Err(range_error(
                        Request::ReplyGet,
                        206,
                        format!("the reply keeps changing during the download: {changed}"),
                    ))
                } else {
                    s.restart().await
                };
                if let Err(e) = restart {
                    s.abandon().await;
                    return Err(e);
                }
                run.event(JobEvent::ReplyResumed { offset: 0 });
                sink = Some(s);
            }
            Err(e) => {
                s.abandon().await;
                return Err(e);
            }
        }
    }
}

/// Downloads until the sink holds `version.size` bytes; `Some(why)` when the reply changed
/// and the download must start over.
async fn fetch(
    run: &mut Run,
    target: &Target,
    sink: &mut Sink,
    version: &Version,
) -> Result<Option<String>, ClientError> {
    let token = run.cancel_token();
    let mut held = 0u64;
    let mut interrupted = false;
    while held < version.size {
        if interrupted {
            run.event(JobEvent::ReplyResumed { offset: held });
        }
        run.set_state(JobState::Transferring);
        match with_cancel(&token, get(run, target, sink, &mut held, version)).await? {
            Got::Done => interrupted = false,
            Got::Changed(why) => return Ok(Some(why)),
            Got::Interrupted(e) => {
                interrupted = true;
                run.recover(e).await?;
            }
        }
    }
    Ok(None)
}
