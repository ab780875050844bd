//! Replays the packet exchanges of EXAMPLES.md, kept as data in `fixtures/examples/*.json`,
//! against a real server (format: `fixtures/README.md`; the runner is
//! `bitsd_tests::examples`, shared with `farm_examples.rs`).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bitsd_tests::examples::{replay, LocalServers};

#[tokio::test]
async fn a_full_upload_reply_job() {
    replay("a.json", "A", Arc::new(LocalServers)).await;
}

#[tokio::test]
async fn b_resumed_upload() {
    replay("b.json", "B", Arc::new(LocalServers)).await;
}

#[tokio::test]
async fn c_cancel() {
    replay("c.json", "C", Arc::new(LocalServers)).await;
}

#[tokio::test]
async fn d_error_cases() {
    replay("d.json", "D", Arc::new(LocalServers)).await;
}
