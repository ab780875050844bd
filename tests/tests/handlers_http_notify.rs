//! The HTTP notification handler end to end through the server (§6.2, §12): a real hyper
//! backend playing the IIS server application, notified by value and by reference, with a
//! relative notification URL, a static response URL and copy to destination.
#![allow(clippy::unwrap_used)]

mod handler_support;

use std::path::{Path, PathBuf};

use bitsd::config::NotificationMode;
use bitsd_tests::{pattern, url_path, TestServer};

use handler_support::*;

// ---------------------------------------------------------------------------------------------
// HTTP notification, by value.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn by_value_notification_carries_the_upload_and_its_body_is_the_reply() {
    let backend = Backend::start(|seen| {
        let mut reply = b"reply to ".to_vec();
        reply.extend(seen.body.iter().rev());
        Answer::ok(reply)
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
    let data = pattern(200_000, 11);
    let path = "/app/reports/q.bin?ACCOUNT=873112";
    let job = Job::start(&mut c, HOST, path, data.clone(), 65_536).await;
    assert_eq!(backend.count(), 0, "no notification before the last byte");
    let p = progress(&server, &job.sid).await;
    assert_eq!(p["state"], "receiving");
    assert_eq!(p["reply"]["bytes_total"], serde_json::Value::Null);

    let fin = job.finish(&mut c).await;
    let url = assert_final_ok(&fin, &job);
    assert!(url.starts_with(&reply_url_prefix("/app/")), "{url}");
    assert_eq!(url_path(&url), job.reply_path("/app/"));

    // Exactly one notification, exactly as §9.1 describes it.
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    let n = &seen[0];
    assert_eq!(n.method, "POST");
    assert_eq!(n.target, "/handle?ACCOUNT=873112", "query string appended");
    assert_eq!(n.header("host"), Some(backend.addr.to_string().as_str()));
    assert_eq!(
        n.header("bits-original-request-url"),
        Some(format!("http://{HOST}{path}").as_str())
    );
    assert_eq!(n.header("content-length"), Some("200000"));
    assert_eq!(n.header("bits-packet-type"), None);
    assert_eq!(n.header("bits-request-datafile-name"), None);
    assert_eq!(n.header("bits-response-datafile-name"), None);
    assert_eq!(n.header("transfer-encoding"), None);
    assert!(n.body == data, "the notification body is the upload");

    let mut expected = b"reply to ".to_vec();
    expected.extend(data.iter().rev());
    let head = c.get("HEAD", &url_path(&url), &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(expected.len().to_string().as_str())
    );
    assert!(fetch_reply(&mut c, &url).await == expected);

    // No BITS-Copy-File-To-Destination: the upload is not committed.
    assert!(!server.data_dir().join("files/reports/q.bin").exists());

    let close = job.close(&mut c).await;
    close.assert_ack();
    assert_eq!(close.status, 200);
    assert_eq!(c.get("GET", &url_path(&url), &[]).await.status, 404);
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn empty_upload_and_empty_backend_body_give_an_empty_reply() {
    let backend = Backend::start(|_| Answer::ok(Vec::new())).await;
    let server = start(vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByValue,
        10,
    )])
    .await;
    let mut c = server.connect().await;
    let job = Job::start(&mut c, HOST, "/app/empty.bin", Vec::new(), 4096).await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("content-length"), Some("0"));
    assert!(seen[0].body.is_empty());
    let head = c.get("HEAD", &url_path(&url), &[]).await;
    assert_eq!(
        (head.status, head.header("content-length")),
        (200, Some("0"))
    );
    assert!(fetch_reply(&mut c, &url).await.is_empty());
    let p = progress(&server, &job.sid).await;
    assert_eq!(p["reply"]["bytes_total"], 0);
}

// ---------------------------------------------------------------------------------------------
// HTTP notification, by reference.
// ---------------------------------------------------------------------------------------------

/// The backend of the by-reference tests: reads the request file, and answers per the remote
/// URL's file name: `file.bin` writes the reversed upload to the response file, `both.bin`
/// writes the file and answers with a body too, `none.bin` writes nothing.
fn by_reference_script(seen: &Seen) -> Answer {
    let request = PathBuf::from(seen.header("bits-request-datafile-name").unwrap());
    let response = PathBuf::from(seen.header("bits-response-datafile-name").unwrap());
    let upload = std::fs::read(&request).unwrap();
    let original = seen.header("bits-original-request-url").unwrap();
    let mut reversed = upload.clone();
    reversed.reverse();
    if original.contains("/file.bin") {
        std::fs::write(&response, &reversed).unwrap();
        Answer::ok(Vec::new())
    } else if original.contains("/both.bin") {
        std::fs::write(&response, &reversed).unwrap();
        Answer::ok(b"the body wins".to_vec())
    } else {
        Answer::ok(Vec::new())
    }
}

#[tokio::test]
async fn by_reference_backend_reads_the_request_file_and_writes_the_response_file() {
    let backend = Backend::start(by_reference_script).await;
    let server = start(vec![http_route(
        "/ref/",
        backend.url("/handle.asp?from=bits"),
        NotificationMode::ByReference,
        10,
    )])
    .await;
    let data_dir = std::path::absolute(server.data_dir()).unwrap();
    let mut c = server.connect().await;
    let data = pattern(150_000, 12);

    let job = Job::start(
        &mut c,
        HOST,
        "/ref/file.bin?ACCOUNT=873112",
        data.clone(),
        50_000,
    )
    .await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    let n = &seen[0];
    assert_eq!(n.method, "POST");
    assert_eq!(n.target, "/handle.asp?from=bits&ACCOUNT=873112");
    assert_eq!(n.header("content-length"), Some("0"));
    assert!(n.body.is_empty());
    assert_eq!(n.header("bits-packet-type"), None);
    assert_eq!(
        n.header("bits-original-request-url"),
        Some(format!("http://{HOST}/ref/file.bin?ACCOUNT=873112").as_str())
    );
    for name in ["bits-request-datafile-name", "bits-response-datafile-name"] {
        let p = Path::new(n.header(name).unwrap());
        assert!(p.is_absolute(), "{name}: {}", p.display());
        assert!(
            p.starts_with(&data_dir),
            "{name}: {} not under {}",
            p.display(),
            data_dir.display()
        );
    }
    assert_eq!(n.header("bits-request-dataentity-name"), None);
    let mut reversed = data.clone();
    reversed.reverse();
    assert!(
        fetch_reply(&mut c, &url).await == reversed,
        "the response file is the reply"
    );
    assert_eq!(job.close(&mut c).await.status, 200);

    // A non-empty response body wins over the response file (the REC of §9.2).
    let job = Job::start(&mut c, HOST, "/ref/both.bin", data.clone(), 50_000).await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    assert_eq!(fetch_reply(&mut c, &url).await, b"the body wins");

    // Neither a body nor a file: an empty reply, still with a reply URL (§10).
    let job = Job::start(&mut c, HOST, "/ref/none.bin", data.clone(), 50_000).await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    assert!(fetch_reply(&mut c, &url).await.is_empty());
    assert_eq!(backend.count(), 3);
}

// ---------------------------------------------------------------------------------------------
// Relative notification URL, static response URL, copy to destination.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn relative_notification_url_resolves_against_the_servers_own_url() {
    // `handle.asp` resolves against the directory of the remote URL as the server names it
    // (its public URL, here the backend's address), never against the client's `Host`
    // (tests/tests/security_urls.rs has the hostile case).
    let backend = Backend::start(|seen| Answer::ok(format!("{} bytes", seen.body.len()))).await;
    let public = format!("http://{}", backend.addr);
    let server = {
        let public = public.clone();
        TestServer::start_with(move |cfg| {
            cfg.routes = vec![http_route(
                "/app/",
                "handle.asp".to_owned(),
                NotificationMode::ByValue,
                10,
            )];
            cfg.public_base_url = Some(public);
        })
        .await
    };
    let host = "client-chosen.example.test";
    let mut c = server.connect().await;
    let data = pattern(5000, 13);
    let job = Job::start(&mut c, host, "/app/sub/q.bin?ACCOUNT=873112", data, 4096).await;
    let fin = job.finish(&mut c).await;
    let url = assert_final_ok(&fin, &job);
    assert!(
        url.starts_with(&format!("{public}/app/BITS-Sessions/")),
        "{url}"
    );
    let seen = backend.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/app/sub/handle.asp?ACCOUNT=873112");
    // The backend is still told the remote URL the client used.
    assert_eq!(
        seen[0].header("bits-original-request-url"),
        Some(format!("http://{host}/app/sub/q.bin?ACCOUNT=873112").as_str())
    );
    assert_eq!(fetch_reply(&mut c, &url).await, b"5000 bytes");
}

#[tokio::test]
async fn static_response_url_becomes_the_reply_url_and_nothing_is_stored() {
    const STATIC: &str = "http://cdn.example.test/replies/common.bin";
    let backend = Backend::start(|_| {
        Answer::ok(b"ignored".to_vec()).with_header("BITS-Static-Response-URL", STATIC)
    })
    .await;
    let server = start(vec![http_route(
        "/app/",
        backend.url("/handle"),
        NotificationMode::ByReference,
        10,
    )])
    .await;
    let mut c = server.connect().await;
    let job = Job::start(&mut c, HOST, "/app/q.bin", pattern(3000, 14), 1000).await;
    let fin = job.finish(&mut c).await;
    assert_eq!(assert_final_ok(&fin, &job), STATIC);

    let p = progress(&server, &job.sid).await;
    assert_eq!(p["state"], "reply-ready");
    assert_eq!(p["reply"]["bytes_total"], serde_json::Value::Null, "{p}");
    assert_eq!(
        p["reply"]["bytes_transferred"],
        serde_json::Value::Null,
        "{p}"
    );
    // The server serves no reply of its own for this session.
    assert_eq!(
        c.get("GET", &job.reply_path("/app/"), &[]).await.status,
        404
    );

    // A re-sent final fragment: the same URL, no second notification.
    assert_eq!(assert_final_ok(&job.finish(&mut c).await, &job), STATIC);
    assert_eq!(backend.count(), 1);
    assert_eq!(job.close(&mut c).await.status, 200);
}

#[tokio::test]
async fn copy_file_to_destination_also_commits_the_upload() {
    let backend = Backend::start(|_| {
        Answer::ok(b"stored".to_vec()).with_header("BITS-Copy-File-To-Destination", "1")
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
    let data = pattern(70_000, 15);
    let job = Job::start(&mut c, HOST, "/app/in/q.bin", data.clone(), 30_000).await;
    let url = assert_final_ok(&job.finish(&mut c).await, &job);
    assert_eq!(fetch_reply(&mut c, &url).await, b"stored");
    let committed = server.data_dir().join("files").join("in").join("q.bin");
    assert!(std::fs::read(&committed).unwrap() == data);
    // Idempotent: a re-sent final fragment neither notifies nor fails on the existing file.
    assert_eq!(assert_final_ok(&job.finish(&mut c).await, &job), url);
    assert_eq!(backend.count(), 1);
    assert_eq!(job.close(&mut c).await.status, 200);
    assert!(
        std::fs::read(&committed).unwrap() == data,
        "Close keeps the committed file"
    );
}
