//! What PostgreSQL does during a farm measurement: write transactions (transaction ids
//! assigned) and WAL bytes, and samples of `pg_stat_activity` (what each of
//! the farm's busy backends waits on) and `pg_locks` (ungranted locks: one session's work
//! waiting on another's).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::client::Result;

/// How often the sampler looks.
const EVERY: Duration = Duration::from_millis(20);

/// What the sampler saw.
#[derive(Clone, Debug, Default)]
pub struct PgSeen {
    /// Samples taken.
    pub samples: u64,
    /// Backend-samples of the farm's database that were active (running a statement).
    pub active: u64,
    /// Backend-samples waiting on a heavyweight lock (`wait_event_type = 'Lock'`).
    pub lock_waits: u64,
    /// Ungranted rows of `pg_locks` summed over the samples.
    pub ungranted: u64,
    /// Active backend-samples by `wait_event_type:wait_event` (`CPU` when not waiting).
    pub waits: BTreeMap<String, u64>,
    /// Lock-waiting backend-samples by `waiting statement ← statement of the first backend
    /// it waits for` (each cut to its first words): which work waits on which.
    pub lock_statements: BTreeMap<String, u64>,
    /// Write transactions committed in the cluster (transaction ids assigned; read-only
    /// statements take none and are not counted).
    pub commits: u64,
    /// WAL written, in bytes.
    pub wal_bytes: u64,
}

impl PgSeen {
    /// The most frequent wait events, as `event share%`, comma-separated.
    pub fn top_waits(&self, n: usize) -> String {
        let mut v: Vec<_> = self.waits.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        let total = self.active.max(1) as f64;
        v.iter()
            .take(n)
            .map(|(k, c)| format!("{k} {:.0}%", **c as f64 * 100.0 / total))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A connection to the farm's database for looking on.
pub struct PgWatch {
    client: Arc<tokio_postgres::Client>,
}

impl PgWatch {
    /// Connects (no TLS: the cluster is on loopback).
    pub async fn connect(url: &str) -> Result<PgWatch> {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(PgWatch {
            client: Arc::new(client),
        })
    }

    /// The next transaction id to be assigned (only transactions that write get one; this
    /// reads it without taking one) and the WAL position, in bytes.
    async fn counters(&self) -> Result<(u64, u64)> {
        let row = self
            .client
            .query_one(
                "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8, \
                 (pg_current_wal_lsn() - '0/0')::int8",
                &[],
            )
            .await?;
        Ok((
            u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
            u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
        ))
    }

    /// Runs `work` while sampling every 20 ms; returns its output and what was seen.
    pub async fn watch<T>(
        &self,
        work: impl std::future::Future<Output = T>,
    ) -> Result<(T, PgSeen)> {
        let before = self.counters().await?;
        let seen = Arc::new(Mutex::new(PgSeen::default()));
        let stop = tokio_util::sync::CancellationToken::new();
        let sampler = {
            let (client, seen, stop) = (Arc::clone(&self.client), Arc::clone(&seen), stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    if let Ok(rows) = client
                        .query(
                            "SELECT coalesce(a.wait_event_type || ':' || a.wait_event, 'CPU'), \
                             CASE WHEN a.wait_event_type = 'Lock' THEN \
                               left(regexp_replace(a.query, '\\s+', ' ', 'g'), 60) || ' <- ' || \
                               coalesce((SELECT left(regexp_replace(b.query, '\\s+', ' ', 'g'), \
                               60) || ' [' || b.state || ']' FROM pg_stat_activity b \
                               WHERE b.pid = (pg_blocking_pids(a.pid))[1]), '?') END \
                             FROM pg_stat_activity a WHERE a.datname = current_database() \
                             AND a.state = 'active' AND a.pid <> pg_backend_pid()",
                            &[],
                        )
                        .await
                    {
                        let ungranted = client
                            .query_one("SELECT count(*) FROM pg_locks WHERE NOT granted", &[])
                            .await
                            .map_or(0, |r| r.get::<_, i64>(0));
                        let mut s = seen.lock().await;
                        s.samples += 1;
                        s.ungranted += u64::try_from(ungranted).unwrap_or(0);
                        for r in rows {
                            let w: String = r.get(0);
                            s.active += 1;
                            if w.starts_with("Lock:") {
                                s.lock_waits += 1;
                                let on: Option<String> = r.get(1);
                                *s.lock_statements.entry(on.unwrap_or_default()).or_default() += 1;
                            }
                            *s.waits.entry(w).or_default() += 1;
                        }
                    }
                    tokio::time::sleep(EVERY).await;
                }
            })
        };
        let out = work.await;
        stop.cancel();
        let _ = sampler.await;
        let after = self.counters().await?;
        let mut seen = seen.lock().await.clone();
        // Only the farm writes to this cluster (the sampler only reads).
        seen.commits = after.0.saturating_sub(before.0);
        seen.wal_bytes = after.1.saturating_sub(before.1);
        Ok((out, seen))
    }
}
