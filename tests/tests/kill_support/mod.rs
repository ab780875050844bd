//! The end of a kill-point run (`farm_kill_points.rs`): the killed nodes' leftovers are
//! collected, and what may remain goes with the expired tombstones.

use std::time::{Duration, Instant};

use bitsd::storage::SessionBackend;
use bitsd_tests::shared_backend::{backend_on, listed_keys};

use super::{Bench, PREFIX};

impl Bench {
    /// Waits until the bucket holds no fragment object and PostgreSQL no pending row:
    /// what the killed nodes left is collected by the second node's sweeper (or went with
    /// the publish or the Close); then stops the second node.
    pub(super) async fn end(mut self) {
        let sessions = self.objects.sessions_prefix();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let frags: Vec<String> = listed_keys(&self.objects, &sessions)
                .await
                .into_iter()
                .filter(|k| k.contains("/frag/"))
                .collect();
            let pending: i64 = self
                .pg
                .query_one("SELECT count(*) FROM bitsd_pending_objects", &[])
                .await
                .unwrap()
                .get(0);
            if frags.is_empty() && pending == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "stray fragment objects {frags:?}, {pending} pending rows"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop(self.node2.take());
        // What may be left: the reply object a killed node stored and never recorded (no
        // pending row names it; Close deletes the recorded one). It goes with the session's
        // tombstone when that expires: the sweeper's purge, run here.
        let left = listed_keys(&self.objects, &sessions).await;
        let scratch = tempfile::tempdir().unwrap();
        let store = self.servers.garage.object_store_config(PREFIX);
        let backend = backend_on(&self.servers.postgres_url, &store, scratch.path()).await;
        for key in &left {
            assert!(key.contains("/reply-"), "a stray object: {key} of {left:?}");
            let id = key.split('/').nth(2).unwrap().parse().unwrap();
            let r = self.record(&id).await;
            assert!(r.state.is_terminal(), "{key}: {r:?}");
            backend.purge(&id).await.unwrap();
        }
        assert_eq!(
            listed_keys(&self.objects, &sessions).await,
            Vec::<String>::new()
        );
    }
}
