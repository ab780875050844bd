//! The HTTP notification handler when the backend fails (§9.5) and when the final fragment is
//! re-sent (§6.2): relayed error statuses, timeouts, dropped connections, retries after a
//! failure and no repeat after a success.
#![allow(clippy::unwrap_used)]

mod handler_support;

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitsd::config::NotificationMode;
use bitsd_tests::{pattern, url_path, TestServer};
use sha2::{Digest, Sha256};

use handler_support::*;

// ---------------------------------------------------------------------------------------------
// Backend failures (§9.5).
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn backend_error_statuses_are_relayed_with_context_7() {
    let answer = Arc::new(AtomicU16::new(200));
    let backend = {
        let answer = Arc::clone(&answer);
        Backend::start(move |_| Answer::status(answer.load(Ordering::SeqCst))).await
    };
    let server = start(vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByValue,
        10,
    )])
    .await;
    let mut c = server.connect().await;
    let cases = [
        (403, 403, "0x80190193"),
        (409, 409, "0x80190199"),
        (500, 500, "0x801901f4"),
        (503, 503, "0x801901f7"),
        (404, 404, "0x80190194"),
        // Never 413: the client would shrink its fragments forever (§2.1).
        (413, 500, "0x801901f4"),
        // Never 401/407 (a challenge to the client's own credentials, without
        // WWW-Authenticate) nor 416 (a resync): a transient backend failure instead (§9.5).
        (401, 500, "0x801901f4"),
        (407, 500, "0x801901f4"),
        (416, 500, "0x801901f4"),
    ];
    for (i, (backend_status, status, code)) in cases.into_iter().enumerate() {
        answer.store(backend_status, Ordering::SeqCst);
        let job = Job::start(
            &mut c,
            HOST,
            "/app/q.bin",
            pattern(10_000, 20 + i as u64),
            4096,
        )
        .await;
        let fin = job.finish(&mut c).await;
        assert_app_error(&fin, &job, status, code);
        assert_eq!(backend.count(), i + 1, "backend {backend_status}");
        let p = progress(&server, &job.sid).await;
        assert_eq!(p["state"], "complete", "{p}");
        assert_eq!(p["upload"]["bytes_received"], 10_000);
        assert_eq!(p["reply"]["bytes_total"], serde_json::Value::Null, "{p}");
        assert_eq!(
            c.get("GET", &job.reply_path("/app/"), &[]).await.status,
            404
        );
    }
}

#[tokio::test]
async fn slow_backend_past_the_timeout_is_504() {
    let backend =
        Backend::start(|_| Answer::Slow(Duration::from_secs(5), Box::new(Answer::ok("late"))))
            .await;
    let server = start(vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByValue,
        1,
    )])
    .await;
    let mut c = server.connect().await;
    let job = Job::start(&mut c, HOST, "/app/q.bin", pattern(10_000, 30), 4096).await;
    let started = Instant::now();
    let fin = job.finish(&mut c).await;
    let elapsed = started.elapsed();
    assert_app_error(&fin, &job, 504, "0x801901f8");
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(4),
        "timed out after {elapsed:?}"
    );
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn dropped_connection_and_unreachable_backend_are_504() {
    let backend = Backend::start(|_| Answer::Drop).await;
    // A port nobody listens on: bound, never listening, and held until the test ends (a
    // port merely freed again can be taken by another test's server meanwhile, which then
    // answers 404).
    let reserved =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    reserved
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let closed = reserved.local_addr().unwrap().as_socket().unwrap();
    let server = start(vec![
        http_route(
            "/app/",
            backend.url("/handle"),
            NotificationMode::ByValue,
            5,
        ),
        http_route(
            "/gone/",
            format!("http://{closed}/handle"),
            NotificationMode::ByValue,
            5,
        ),
    ])
    .await;
    let mut c = server.connect().await;
    let job = Job::start(&mut c, HOST, "/app/q.bin", pattern(10_000, 31), 4096).await;
    assert_app_error(&job.finish(&mut c).await, &job, 504, "0x801901f8");
    assert_eq!(backend.count(), 1);

    let job = Job::start(&mut c, HOST, "/gone/q.bin", pattern(10_000, 32), 4096).await;
    let started = Instant::now();
    assert_app_error(&job.finish(&mut c).await, &job, 504, "0x801901f8");
    assert!(started.elapsed() < Duration::from_secs(4));
}

// ---------------------------------------------------------------------------------------------
// Re-sent final fragments (§6.2): retry after failure, no repeat after success.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn resent_final_fragment_after_a_failure_notifies_again() {
    let calls = Arc::new(AtomicUsize::new(0));
    let backend = {
        let calls = Arc::clone(&calls);
        Backend::start(move |seen| match calls.fetch_add(1, Ordering::SeqCst) {
            0 => Answer::status(503),
            1 => Answer::Drop,
            _ => Answer::ok(Sha256::digest(&seen.body).to_vec()),
        })
        .await
    };
    let server = start(vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByValue,
        5,
    )])
    .await;
    let mut c = server.connect().await;
    let data = pattern(100_000, 40);
    let job = Job::start(
        &mut c,
        HOST,
        "/app/q.bin?ACCOUNT=873112",
        data.clone(),
        32_768,
    )
    .await;
    assert_app_error(&job.finish(&mut c).await, &job, 503, "0x801901f7");
    assert_eq!(backend.count(), 1);
    assert_app_error(&job.finish(&mut c).await, &job, 504, "0x801901f8");
    assert_eq!(backend.count(), 2);
    let p = progress(&server, &job.sid).await;
    assert_eq!(p["state"], "complete");
    assert_eq!(p["reply"]["bytes_total"], serde_json::Value::Null);

    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    assert_eq!(backend.count(), 3);
    // Every attempt carried the whole upload: it was kept across the failures.
    for n in backend.seen() {
        assert!(n.body == data);
        assert_eq!(n.target, "/handle?ACCOUNT=873112");
    }
    assert_eq!(
        fetch_reply(&mut c, &url).await,
        Sha256::digest(&data).to_vec()
    );
    assert_eq!(assert_final_ok(&job.finish(&mut c).await, &job), url);
    assert_eq!(backend.count(), 3);
}

#[tokio::test]
async fn successful_notification_is_not_repeated_even_across_a_restart() {
    let backend =
        Backend::start(|seen| Answer::ok(format!("receipt for {} bytes", seen.body.len()))).await;
    let routes = vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByValue,
        10,
    )];
    let server = start(routes.clone()).await;
    let mut c = server.connect().await;
    let data = pattern(60_000, 41);
    let job = Job::start(&mut c, HOST, "/app/q.bin?ACCOUNT=873112", data, 16_384).await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    assert_eq!(backend.count(), 1);
    // The Ack was "lost": the client re-sends the final fragment.
    assert_eq!(assert_final_ok(&job.finish(&mut c).await, &job), url);
    assert_eq!(backend.count(), 1);

    drop(c);
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, move |cfg| cfg.routes = routes).await;
    let mut c = server.connect().await;
    assert_eq!(assert_final_ok(&job.finish(&mut c).await, &job), url);
    assert_eq!(
        backend.count(),
        1,
        "no second notification after the restart"
    );
    assert_eq!(fetch_reply(&mut c, &url).await, b"receipt for 60000 bytes");
    let close = job.close(&mut c).await;
    close.assert_ack();
    assert_eq!(close.status, 200);
    assert_eq!(c.get("GET", &url_path(&url), &[]).await.status, 404);
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn hangup_during_a_notification_does_not_notify_again() {
    let backend = Backend::start(|seen| {
        Answer::Slow(
            Duration::from_millis(1500),
            Box::new(Answer::ok(Sha256::digest(&seen.body).to_vec())),
        )
    })
    .await;
    let server = start(vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByValue,
        10,
    )])
    .await;
    let mut c = server.connect().await;
    let data = pattern(50_000, 42);
    let job = Job::start(&mut c, HOST, "/app/q.bin", data.clone(), 32_768).await;
    let last = job.fragment_request(job.last_start(), data.len() - job.last_start(), None);
    // The final fragment, then a hang-up while the backend works on the notification.
    c.write(&last).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend.count() == 0 {
        assert!(Instant::now() < deadline, "no notification");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The client re-sends: it gets the answer of the notification in flight.
    let mut c = server.connect().await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    assert_eq!(backend.count(), 1, "exactly one notification");
    assert_eq!(
        fetch_reply(&mut c, &url).await,
        Sha256::digest(&data).to_vec()
    );
    assert_eq!(assert_final_ok(&job.finish(&mut c).await, &job), url);
    assert_eq!(backend.count(), 1);
}
