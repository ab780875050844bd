//! The admin listener: session progress as JSON (`GET /sessions`, `GET /sessions/{id}`),
//! Prometheus metrics (`GET /metrics`), liveness (`GET /healthz`), readiness (`GET /readyz`)
//! and, in the test server mode, the transcript (`GET /transcript`).
//! It binds to loopback by default and must not be exposed to clients: [`crate::start`] refuses
//! another address unless allowed, and an admin token guards everything but the probes.

use std::convert::Infallible;

use bitsd_protocol::SessionId;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};

use sha2::{Digest, Sha256};

use crate::body::ResponseBody;
use crate::service::plain;
use crate::transcript::Transcript;
use crate::BitsService;

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<ResponseBody> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            let len = bytes.len();
            let mut res = Response::new(ResponseBody::full(Bytes::from(bytes)));
            *res.status_mut() = status;
            res.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            res.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
            res
        }
        Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "serialization failed\n"),
    }
}

/// The admin API's bearer token, kept as its SHA-256.
#[derive(Clone)]
pub(crate) struct AdminToken([u8; 32]);

impl AdminToken {
    pub(crate) fn new(token: &str) -> Self {
        AdminToken(Sha256::digest(token.as_bytes()).into())
    }

    fn admits<B>(&self, req: &Request<B>) -> bool {
        req.headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| Sha256::digest(token.trim().as_bytes()))
            })
            .is_some_and(|digest| digest.as_slice() == self.0)
    }
}

/// Answers one admin request after checking the token (if one is set): `/healthz` and
/// `/readyz` are open, everything else needs `Authorization: Bearer <token>`.
pub(crate) async fn handle_admin_guarded<B>(
    bits: BitsService,
    transcript: Option<Transcript>,
    token: Option<AdminToken>,
    req: Request<B>,
) -> Result<Response<ResponseBody>, Infallible> {
    let path = req.uri().path().trim_end_matches('/');
    let probe = path == "/healthz" || path == "/readyz";
    if let Some(token) = &token {
        if !probe && !token.admits(&req) {
            let mut res = plain(StatusCode::UNAUTHORIZED, "admin token required\n");
            res.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"bitsd-admin\""),
            );
            return Ok(res);
        }
    }
    handle_admin_with(bits, transcript, req).await
}

/// Default and largest number of sessions in one `/sessions` page.
const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 1000;

/// `limit` and `after` of a `/sessions` query.
fn page_query(query: Option<&str>) -> Result<(usize, Option<SessionId>), &'static str> {
    let mut limit = PAGE_DEFAULT;
    let mut after = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
        match k {
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or("limit must be a positive number\n")?
                    .min(PAGE_MAX);
            }
            "after" => after = Some(v.parse().map_err(|_| "after must be a session id\n")?),
            _ => {}
        }
    }
    Ok((limit, after))
}

/// Answers one admin request.
pub async fn handle_admin<B>(
    bits: BitsService,
    req: Request<B>,
) -> Result<Response<ResponseBody>, Infallible> {
    handle_admin_with(bits, None, req).await
}

/// Answers one admin request; with a transcript, `GET /transcript` serves its lines so far
/// (`application/x-ndjson`), otherwise it is 404.
pub async fn handle_admin_with<B>(
    bits: BitsService,
    transcript: Option<Transcript>,
    req: Request<B>,
) -> Result<Response<ResponseBody>, Infallible> {
    if req.method() != Method::GET {
        return Ok(plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n",
        ));
    }
    let path = req.uri().path().trim_end_matches('/');
    let res = if path == "/healthz" {
        plain(StatusCode::OK, "ok\n")
    } else if path == "/readyz" {
        if bits.ready().await {
            plain(StatusCode::OK, "ready\n")
        } else {
            plain(StatusCode::SERVICE_UNAVAILABLE, "store not ready\n")
        }
    } else if path == "/metrics" {
        match bits.metrics_text().await {
            Ok(text) => {
                let len = text.len();
                let mut res = Response::new(ResponseBody::full(Bytes::from(text)));
                res.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                res.headers_mut()
                    .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
                res
            }
            Err(e) => storage_failure(&e, "metrics failed"),
        }
    } else if path == "/transcript" {
        match &transcript {
            Some(t) => {
                let text = t.ndjson();
                let len = text.len();
                let mut res = Response::new(ResponseBody::full(Bytes::from(text)));
                res.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-ndjson"),
                );
                res.headers_mut()
                    .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
                res
            }
            None => plain(
                StatusCode::NOT_FOUND,
                "no transcript: start bitsd with --transcript FILE\n",
            ),
        }
    } else if path == "/sessions" {
        match page_query(req.uri().query()) {
            Err(why) => plain(StatusCode::BAD_REQUEST, why),
            Ok((limit, after)) => match bits.progress_page(after.as_ref(), limit).await {
                Ok((page, next)) => {
                    let mut res = json(StatusCode::OK, &page);
                    if let Some(next) = next {
                        let link = format!(
                            "</sessions?after={}&limit={limit}>; rel=\"next\"",
                            next.simple()
                        );
                        if let Ok(v) = HeaderValue::from_str(&link) {
                            res.headers_mut().insert(http::header::LINK, v);
                        }
                    }
                    res
                }
                Err(e) => storage_failure(&e, "listing sessions failed"),
            },
        }
    } else if let Some(id) = path.strip_prefix("/sessions/") {
        let id = percent_encoding::percent_decode_str(id).decode_utf8_lossy();
        match id.parse::<SessionId>() {
            Err(_) => plain(StatusCode::NOT_FOUND, "no such session\n"),
            Ok(id) => match bits.progress(&id).await {
                Ok(Some(p)) => json(StatusCode::OK, &p),
                Ok(None) => plain(StatusCode::NOT_FOUND, "no such session\n"),
                Err(e) => storage_failure(&e, "session lookup failed"),
            },
        }
    } else {
        plain(StatusCode::NOT_FOUND, "not found\n")
    };
    Ok(res)
}

/// The answer when the store failed: 503 (try again) when it was unreachable for now, as a
/// BITS packet gets, else 500; logged with `what` failed.
fn storage_failure(e: &bitsd_storage::StorageError, what: &str) -> Response<ResponseBody> {
    tracing::error!(error = %e, "admin: {what}");
    if e.is_transient() {
        plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage unavailable for now; try again\n",
        )
    } else {
        plain(StatusCode::INTERNAL_SERVER_ERROR, "storage failure\n")
    }
}
