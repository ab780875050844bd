//! The admin listener: session progress as JSON (`GET /sessions`, `GET /sessions/{id}`),
//! Prometheus metrics (`GET /metrics`), liveness (`GET /healthz`), readiness (`GET /readyz`)
//! and, in the test server mode, the transcript (`GET /transcript`).
//! It binds to loopback by default and must not be exposed to clients.

use std::convert::Infallible;

use bitsd_protocol::SessionId;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};

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
            Err(e) => {
                tracing::error!(error = %e, "admin: metrics failed");
                plain(StatusCode::INTERNAL_SERVER_ERROR, "storage failure\n")
            }
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
        match bits.all_progress().await {
            Ok(all) => json(StatusCode::OK, &all),
            Err(e) => {
                tracing::error!(error = %e, "admin: listing sessions failed");
                plain(StatusCode::INTERNAL_SERVER_ERROR, "storage failure\n")
            }
        }
    } else if let Some(id) = path.strip_prefix("/sessions/") {
        let id = percent_encoding::percent_decode_str(id).decode_utf8_lossy();
        match id.parse::<SessionId>() {
            Err(_) => plain(StatusCode::NOT_FOUND, "no such session\n"),
            Ok(id) => match bits.progress(&id).await {
                Ok(Some(p)) => json(StatusCode::OK, &p),
                Ok(None) => plain(StatusCode::NOT_FOUND, "no such session\n"),
                Err(e) => {
                    tracing::error!(error = %e, "admin: session lookup failed");
                    plain(StatusCode::INTERNAL_SERVER_ERROR, "storage failure\n")
                }
            },
        }
    } else {
        plain(StatusCode::NOT_FOUND, "not found\n")
    };
    Ok(res)
}
