//! Session limits on the shared backend are counted in PostgreSQL, for the whole farm: nodes
//! on one database never hold more live sessions together than `max_sessions`, nor one user
//! more than `max_sessions_per_user`, and a session ended on one node frees its slot on every
//! other. Skips with a printed reason when PostgreSQL or Garage is not installed.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bitsd::storage::shared::pg::{CreateOutcome, Limits, PgOptions, PgStateStore};
use bitsd::{
    CredentialsAuthenticator, SessionLimits, SharedAuthenticator, SharedStorage, StorageConfig,
};
use bitsd_tests::farm_servers::FarmServers;
use bitsd_tests::{RawClient, RawResponse, TestServer, PROTOCOL};

/// `n` nodes on one database and bucket with `limits` (and users alice and bob, by bearer token).
async fn nodes(
    n: usize,
    limits: SessionLimits,
) -> Option<(Vec<TestServer>, PgStateStore, FarmServers)> {
    let servers = FarmServers::start().await?;
    let shared = SharedStorage {
        postgres_url: servers.postgres_url.clone(),
        postgres_max_connections: 8,
        postgres_timeout: Duration::from_secs(5),
        postgres_open_commit: std::time::Duration::from_secs(60),
        object_store: servers.garage.object_store_config("limits"),
    };
    // Bearer tokens (a SHA-256 check) rather than passwords: argon2 in a debug build is too
    // slow for two dozen Creates at once.
    let tokens = tempfile::NamedTempFile::new().unwrap();
    let lines: String = ["alice", "bob"]
        .iter()
        .map(|u| {
            let digest = bitsd_tests::sha256_hex(token(u).as_bytes());
            format!("{u}:{digest}\n")
        })
        .collect();
    std::fs::write(tokens.path(), lines).unwrap();
    let auth = Arc::new(
        CredentialsAuthenticator::new("bitsd-test")
            .with_tokens_file(tokens.path())
            .unwrap(),
    );
    let mut started = Vec::new();
    for _ in 0..n {
        let s = shared.clone();
        let auth = Arc::clone(&auth);
        started.push(
            TestServer::start_with(move |c| {
                c.storage = StorageConfig::Shared(Box::new(s));
                c.session_limits = limits;
                c.auth = Some(SharedAuthenticator(auth));
            })
            .await,
        );
    }
    let state = PgStateStore::connect(&servers.postgres_url, PgOptions::default())
        .await
        .unwrap();
    Some((started, state, servers))
}

fn token(user: &str) -> String {
    format!("{user}-token-0123456789")
}

fn bearer(user: &str) -> String {
    format!("Bearer {}", token(user))
}

async fn create(c: &mut RawClient, user: &str) -> RawResponse {
    c.bits_post(
        "/echo/limits",
        &[
            ("BITS-Packet-Type", "Create-Session"),
            ("BITS-Supported-Protocols", PROTOCOL),
            ("Authorization", &bearer(user)),
        ],
        b"",
    )
    .await
}

fn limits(total: usize, per_user: usize) -> SessionLimits {
    SessionLimits {
        max_sessions: Some(total),
        max_sessions_per_user: Some(per_user),
        ..SessionLimits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_limit_holds_across_nodes_and_a_close_on_one_frees_a_slot_on_another() {
    let Some((nodes, state, _servers)) = nodes(3, limits(4, 100)).await else {
        return;
    };
    let mut clients = Vec::new();
    for n in &nodes {
        clients.push(RawClient::connect(n.addr()).await);
    }
    // Creates spread over the three nodes: exactly four succeed.
    let mut sessions = Vec::new();
    for i in 0..4 {
        let res = create(
            &mut clients[i % 3],
            if i % 2 == 0 { "alice" } else { "bob" },
        )
        .await;
        res.assert_ack();
        sessions.push((i % 3, res.header("bits-session-id").unwrap().to_owned()));
    }
    // The farm is full for every node: 503 with ERROR_TOO_MANY_SESS.
    for c in clients.iter_mut() {
        create(c, "bob").await.assert_error(503, "0x80070045");
    }
    assert_eq!(state.live_count().await.unwrap(), 4);

    // A Close on node 0 (of a session created on node 0) frees a slot for a Create on node 1.
    let (on, sid) = &sessions[0];
    assert_eq!(*on, 0);
    let close = clients[2]
        .bits_post(
            "/echo/limits",
            &[
                ("BITS-Packet-Type", "Close-Session"),
                ("BITS-Session-Id", sid),
                ("Authorization", &bearer("alice")),
            ],
            b"",
        )
        .await;
    close.assert_ack();
    create(&mut clients[1], "alice").await.assert_ack();
    // And the farm is full again, for every node.
    for c in clients.iter_mut() {
        create(c, "alice").await.assert_error(503, "0x80070045");
    }
    assert_eq!(state.live_count().await.unwrap(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_user_limit_holds_across_nodes() {
    let Some((nodes, state, _servers)) = nodes(3, limits(100, 2)).await else {
        return;
    };
    let mut a = RawClient::connect(nodes[0].addr()).await;
    let mut b = RawClient::connect(nodes[1].addr()).await;
    let mut c = RawClient::connect(nodes[2].addr()).await;
    create(&mut a, "alice").await.assert_ack();
    create(&mut b, "alice").await.assert_ack();
    // Alice's third, on a node that has seen none of hers: refused.
    create(&mut c, "alice")
        .await
        .assert_error(503, "0x80070045");
    create(&mut a, "alice")
        .await
        .assert_error(503, "0x80070045");
    // Bob has his own allowance, on any node.
    create(&mut c, "bob").await.assert_ack();
    assert_eq!(state.live_count_of("alice").await.unwrap(), 2);
    assert_eq!(state.live_count_of("bob").await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_creates_on_two_nodes_never_pass_the_limits() {
    const TOTAL: usize = 5;
    const PER_USER: usize = 3;
    let Some((nodes, state, _servers)) = nodes(2, limits(TOTAL, PER_USER)).await else {
        return;
    };
    // 24 Creates at once, half on each node, alice and bob alternating; each on a connection
    // of its own so they really overlap.
    let mut tasks = Vec::new();
    for i in 0..24 {
        let addr = nodes[i % 2].addr();
        let user = if (i / 2) % 2 == 0 { "alice" } else { "bob" };
        tasks.push(tokio::spawn(async move {
            let mut c = RawClient::connect(addr).await;
            (user, create(&mut c, user).await)
        }));
    }
    let mut created = std::collections::HashMap::<&str, usize>::new();
    for t in tasks {
        let (user, res) = t.await.unwrap();
        match res.status {
            200 => *created.entry(user).or_default() += 1,
            503 => res.assert_error(503, "0x80070045"),
            other => panic!("unexpected answer {other}: {res:?}"),
        }
    }
    let total: usize = created.values().sum();
    assert_eq!(total, TOTAL, "exactly the limit succeeded: {created:?}");
    assert!(
        created.values().all(|&n| n <= PER_USER),
        "no user past its limit: {created:?}"
    );
    assert_eq!(state.live_count().await.unwrap(), TOTAL as u64);
}

/// Far from the total limit creates take its lock shared and run side by side; within
/// PostgreSQL's `max_connections` of it they take it exclusive. Creates racing across that
/// boundary on two nodes' pools still stop exactly at the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_creates_across_the_shared_and_exclusive_paths_stop_exactly_at_the_limit() {
    let pg = match tokio::task::spawn_blocking(bitsd_tests::pg::PgCluster::shared)
        .await
        .unwrap()
    {
        Ok(pg) => pg,
        Err(why) => {
            return bitsd_tests::skip::missing(bitsd_tests::skip::Needs::Postgresql, why);
        }
    };
    let url = {
        let pg = Arc::clone(&pg);
        tokio::task::spawn_blocking(move || pg.fresh_database())
            .await
            .unwrap()
    };
    let options = PgOptions {
        max_connections: 16,
        ..PgOptions::default()
    };
    let nodes = [
        PgStateStore::connect(&url, options.clone()).await.unwrap(),
        PgStateStore::connect(&url, options).await.unwrap(),
    ];
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let max_connections: u64 = client
        .query_one("SELECT current_setting('max_connections')::int8", &[])
        .await
        .unwrap()
        .get::<_, i64>(0) as u64;
    // The first 30 creates may take the shared path, the rest must go one at a time.
    let limit = max_connections + 30;
    let tries = limit as usize + 40;
    let barrier = Arc::new(tokio::sync::Barrier::new(32));
    let mut tasks = Vec::new();
    for t in 0..32 {
        let store = nodes[t % 2].clone();
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut outcomes = Vec::new();
            for _ in (t..tries).step_by(32) {
                let record = bitsd_tests::pg::session_record(None);
                let limits = Limits {
                    total: Some(limit),
                    per_user: None,
                };
                outcomes.push(store.create_limited(&record, limits).await.unwrap());
            }
            outcomes
        }));
    }
    let mut created = 0;
    let mut refused = 0;
    for t in tasks {
        for outcome in t.await.unwrap() {
            match outcome {
                CreateOutcome::Created => created += 1,
                CreateOutcome::TotalLimit => refused += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(created, limit, "exactly the limit was created");
    assert_eq!(refused, 40);
    assert_eq!(nodes[0].live_count().await.unwrap(), limit);
}
