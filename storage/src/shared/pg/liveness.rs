//! A node's liveness lock: what lets another node take over the assembly of a node that died
//! at once, instead of after its lease (`objects::resume::LEASE`).
//!
//! Once a node first works on an assembly, it opens one PostgreSQL connection of its own
//! (outside its pool) and takes a session advisory lock on it, keyed by a random number drawn
//! for this node ([`NODE_LOCK_CLASS`], key). PostgreSQL holds the lock for as long as that
//! connection lives: a node that is killed, crashes or is stopped loses its connection (the
//! kernel closes the socket; PostgreSQL's backend sees the end of its stream) and with it the
//! lock, within milliseconds.
//!
//! An attempt's holder id ([`PgStateStore::assembly_holder`]) carries the key: a version-8
//! (custom) UUID whose first 32 bits are the key, while the node holds its lock; a random
//! version-4 UUID otherwise. A claim takes an assembly whose lease is still running when its
//! holder id is a version-8 UUID whose lock nobody holds ([`holder_gone`], read from
//! `pg_locks`). Version-4 holders (a node without its lock, or one of schema version 6 in a
//! rolling upgrade) keep the lease's rules only.
//!
//! The lock only makes a takeover faster; what one attempt may record is still decided by the
//! holder column (`assembly.rs`). A live node whose liveness connection broke (PostgreSQL
//! restarted) may see its assembly taken over: its next renewal says so and it stops, as when
//! its lease ran out. A node cut off from PostgreSQL without its connection closing (its
//! machine gone) keeps the lock until PostgreSQL's TCP keepalive notices; its lease runs out
//! first.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, OnceCell};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The first key of every node's liveness lock (PostgreSQL's two-key advisory locks; the
/// second is the node's). ASCII "bitt", beside the sweeper's and the migration's locks.
pub(super) const NODE_LOCK_CLASS: i32 = 0x6269_7474;

/// How long a node waits before it opens its liveness connection again after losing it.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// An SQL condition, true when the holder of the `bitsd_assemblies` row in scope is an attempt
/// of a node whose liveness lock nobody holds (the node is gone). Holder ids that carry no key
/// (version 4) never match.
pub(super) fn holder_gone() -> String {
    format!(
        "(substr(holder::text, 15, 1) = '8' AND NOT EXISTS (
            SELECT 1 FROM pg_locks l
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND l.classid = {NODE_LOCK_CLASS}
               AND l.objid = (('x' || left(holder::text, 8))::bit(32)::int)::oid))"
    )
}

/// A node's liveness lock: started on first use, held on a connection of its own, let go when
/// the last clone of the node's [`super::PgStateStore`] is dropped.
pub(super) struct Liveness {
    config: tokio_postgres::Config,
    timeout: Duration,
    /// The key while the node holds its lock.
    held: Arc<Mutex<Option<i32>>>,
    started: OnceCell<()>,
    /// Ends the connection's task when the store goes (see `Drop`).
    stop: CancellationToken,
}

impl Liveness {
    pub(super) fn new(config: tokio_postgres::Config, timeout: Duration) -> Self {
        Liveness {
            config,
            timeout,
            held: Arc::new(Mutex::new(None)),
            started: OnceCell::new(),
            stop: CancellationToken::new(),
        }
    }

    /// The key of the lock, when the node holds it now.
    fn held_key(&self) -> Option<i32> {
        *self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the lock's connection (once; the first call waits for its first try, at most
    /// the store's call timeout), then gives a new attempt's holder id: a version-8 UUID with
    /// the key while the lock is held, a version-4 UUID otherwise.
    pub(super) async fn holder(&self) -> Uuid {
        self.started
            .get_or_init(|| async {
                let (tried, mut first) = watch::channel(false);
                tokio::spawn(keep(
                    self.config.clone(),
                    self.timeout,
                    self.held.clone(),
                    tried,
                    self.stop.clone(),
                ));
                let _ = tokio::time::timeout(self.timeout, first.wait_for(|t| *t)).await;
            })
            .await;
        match self.held_key() {
            Some(key) => holder_with(key),
            None => Uuid::new_v4(),
        }
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A version-8 UUID whose first 32 bits are `key` (a positive `i32`), the rest random.
fn holder_with(key: i32) -> Uuid {
    let mut bytes = *Uuid::new_v4().as_bytes();
    bytes[..4].copy_from_slice(&key.to_be_bytes());
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// A new random key: positive, so that `pg_locks` shows it as the same number.
fn draw_key() -> i32 {
    let b = Uuid::new_v4();
    let b = b.as_bytes();
    let n = i32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff;
    n.max(1)
}

/// The lock's task: connects, takes the lock, keeps the connection until it ends or the
/// store goes, and starts again. A key someone else holds (another node drew it, or this
/// node's previous connection is not gone yet) is drawn anew.
async fn keep(
    config: tokio_postgres::Config,
    timeout: Duration,
    held: Arc<Mutex<Option<i32>>>,
    tried: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let set = |v: Option<i32>| *held.lock().unwrap_or_else(|e| e.into_inner()) = v;
    let mut key = draw_key();
    while !stop.is_cancelled() {
        let wait = tokio::select! {
            w = hold(&config, timeout, key, &stop, || {
                set(Some(key));
                tried.send_replace(true);
            }) => w,
            () = stop.cancelled() => Wait::Stop,
        };
        set(None);
        tried.send_replace(true);
        match wait {
            Wait::Stop => return,
            Wait::OtherKey => {
                key = draw_key();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Wait::Reconnect => tokio::select! {
                () = tokio::time::sleep(RECONNECT_EVERY) => {}
                () = stop.cancelled() => return,
            },
        }
    }
}

/// What [`hold`] ended with.
enum Wait {
    /// The store went.
    Stop,
    /// Someone else holds the key.
    OtherKey,
    /// The connection failed or ended.
    Reconnect,
}

/// One connection: opens it, takes the lock on `key` (then calls `locked`), and holds it
/// until the connection ends.
async fn hold(
    config: &tokio_postgres::Config,
    timeout: Duration,
    key: i32,
    stop: &CancellationToken,
    locked: impl FnOnce(),
) -> Wait {
    let (client, connection) = match tokio::time::timeout(timeout, config.connect(NoTls)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not open this node's liveness connection to PostgreSQL");
            return Wait::Reconnect;
        }
        Err(_) => {
            tracing::warn!("no answer opening this node's liveness connection to PostgreSQL");
            return Wait::Reconnect;
        }
    };
    let mut connection = std::pin::pin!(connection);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&NODE_LOCK_CLASS, &key];
    let lock = client.query_one("SELECT pg_try_advisory_lock($1, $2)", &params);
    let answer = tokio::select! {
        r = tokio::time::timeout(timeout, lock) => r,
        _ = &mut connection => return Wait::Reconnect,
    };
    match answer {
        Ok(Ok(row)) if row.get::<_, bool>(0) => {}
        Ok(Ok(_)) => return Wait::OtherKey,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not take this node's liveness lock");
            return Wait::Reconnect;
        }
        Err(_) => {
            tracing::warn!("no answer to this node's liveness lock");
            return Wait::Reconnect;
        }
    }
    locked();
    tokio::select! {
        r = &mut connection => {
            tracing::warn!(
                error = ?r.err(),
                "this node's liveness connection to PostgreSQL ended; other nodes may take \
                 over its assemblies until it is back"
            );
            Wait::Reconnect
        }
        () = stop.cancelled() => Wait::Stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_id_carries_its_key_as_a_version_8_uuid() {
        for _ in 0..100 {
            let key = draw_key();
            assert!(key > 0);
            let id = holder_with(key);
            assert_eq!(id.get_version_num(), 8);
            // What `holder_gone` reads: the version digit and the first 8 hex digits.
            let text = id.to_string();
            assert_eq!(&text[14..15], "8");
            assert_eq!(i64::from_str_radix(&text[..8], 16).unwrap(), i64::from(key));
        }
        assert_eq!(Uuid::new_v4().to_string()[14..15].to_string(), "4");
    }
}
