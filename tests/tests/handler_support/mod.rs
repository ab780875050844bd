//! Helpers shared by the handler test files (handlers_*.rs): the hyper backend playing the IIS
//! server application, routes built from config-file handler specs, and a BITS job driven
//! with exact bytes and an explicit `Host`.
#![allow(dead_code, unused_imports)]

mod backend;
mod job;

pub use backend::{Answer, Backend, Seen};
pub use job::{assert_app_error, assert_final_ok, post, request, Job};

use std::collections::BTreeMap;
use std::time::Duration;

use bitsd::config::{build_handler, HandlerSpec, NotificationMode};
use bitsd::Route;
use bitsd_tests::{url_path, RawClient, TestServer};

/// The `Host` the raw client sends, so the host of every remote URL and reply URL.
pub const HOST: &str = "bits.example.test";

// ---------------------------------------------------------------------------------------------
// Routes and BITS client helpers.
// ---------------------------------------------------------------------------------------------

/// An upload-reply route with the handler a config-file spec describes (the same path the
/// `bitsd --config` routes take).
pub fn spec_route(prefix: &str, spec: HandlerSpec) -> Route {
    Route::upload_reply_shared(prefix, build_handler(&spec).unwrap())
}

pub fn http_route(prefix: &str, url: String, mode: NotificationMode, timeout_secs: u64) -> Route {
    spec_route(
        prefix,
        HandlerSpec::Http {
            url,
            notification: Some(mode),
            timeout_secs: Some(timeout_secs),
            data_entity_headers: false,
        },
    )
}

pub fn command_route(
    prefix: &str,
    program: &str,
    args: &[&str],
    failure_status: Option<u16>,
) -> Route {
    spec_route(
        prefix,
        HandlerSpec::Command {
            program: program.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            timeout_secs: Some(10),
            failure_status,
            env: BTreeMap::new(),
            pass_env: Vec::new(),
        },
    )
}

pub async fn start(routes: Vec<Route>) -> TestServer {
    TestServer::start_with(move |cfg| cfg.routes = routes).await
}
/// GETs a reply by its absolute URL from the server; asserts 200 and returns the body.
pub async fn fetch_reply(c: &mut RawClient, url: &str) -> Vec<u8> {
    let res = c.get("GET", &url_path(url), &[]).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        res.header("content-length"),
        Some(res.body.len().to_string().as_str())
    );
    res.body
}

pub async fn progress(server: &TestServer, sid: &str) -> serde_json::Value {
    // Delivery is recorded by a task spawned when the response body ends.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, json) = server.admin_get(&format!("/sessions/{sid}")).await;
    assert_eq!(status, 200, "{json}");
    json
}

pub fn reply_url_prefix(prefix: &str) -> String {
    format!("http://{HOST}{prefix}BITS-Sessions/")
}
