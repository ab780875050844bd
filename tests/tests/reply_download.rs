//! The reply download (§10) and reply progress, over real TCP against a real server (the
//! checks that also run on a farm are in `bitsd_tests::reply_suite`).
#![allow(clippy::unwrap_used)]

use bitsd_tests::{pattern, reply_suite, TestServer};

async fn progress(server: &TestServer, sid: &str) -> serde_json::Value {
    // Delivery is recorded by a task spawned when the response body ends; give it a moment.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let (status, json) = server.admin_get(&format!("/sessions/{sid}")).await;
    assert_eq!(status, 200);
    json
}

#[tokio::test]
async fn head_full_ranged_resumed_and_past_end() {
    reply_suite::head_full_ranged_resumed_and_past_end(&TestServer::start().await).await;
}

#[tokio::test]
async fn reply_progress_counts_distinct_bytes() {
    let server = TestServer::start().await;
    let sid = reply_suite::reply_progress_counts_distinct_bytes(&server).await;
    // The library API agrees with the admin listener.
    let id = sid.parse().unwrap();
    let p = server
        .server()
        .service()
        .progress(&id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.reply.bytes_transferred, Some(50_000));
    assert_eq!(p.reply.bytes_total, Some(50_000));
}

#[tokio::test]
async fn reply_progress_survives_restart() {
    let server = TestServer::start().await;
    let data = pattern(20_000, 5);
    let (sid, path) = reply_suite::finished_echo(&server, &data).await;
    let mut c = server.connect().await;
    assert_eq!(
        c.get("GET", &path, &[("Range", "bytes=0-4999")])
            .await
            .status,
        206
    );
    assert_eq!(
        progress(&server, &sid).await["reply"]["bytes_transferred"],
        5000
    );
    drop(c);
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |_| {}).await;
    assert_eq!(
        progress(&server, &sid).await["reply"]["bytes_transferred"],
        5000
    );
    let mut c = server.connect().await;
    let rest = c.get("GET", &path, &[("Range", "bytes=5000-")]).await;
    assert_eq!(rest.body, &data[5000..]);
    assert_eq!(
        progress(&server, &sid).await["reply"]["bytes_transferred"],
        20_000
    );
}

#[tokio::test]
async fn empty_reply_is_served_with_zero_length() {
    reply_suite::empty_reply_is_served_with_zero_length(&TestServer::start().await).await;
}

#[tokio::test]
async fn reply_urls_are_not_guessable_across_routes_or_ids() {
    reply_suite::reply_urls_are_not_guessable_across_routes_or_ids(&TestServer::start().await)
        .await;
}

#[tokio::test]
async fn multi_range_serves_the_first_satisfiable_range_and_huge_ends_are_clamped() {
    reply_suite::multi_range_serves_the_first_satisfiable_range_and_huge_ends_are_clamped(
        &TestServer::start().await,
    )
    .await;
}

#[tokio::test]
async fn progress_of_an_aborted_download_counts_what_the_client_acknowledged_not_what_was_sent() {
    let server = TestServer::start().await;
    reply_suite::progress_of_an_aborted_download_counts_what_the_client_acknowledged_not_what_was_sent(
        &server, &server,
    )
    .await;
}
