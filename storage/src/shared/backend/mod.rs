//! The shared (farm) backend: [`SharedBackend`], PostgreSQL for session state and an object
//! store for bytes, behind [`SessionBackend`]. Any node continues any session: nothing about
//! a session is kept only on a node (a node's memory of the sessions it wrote last is a hint
//! that saves a fragment's load, checked by the fragment's commit: `recent.rs`).
//!
//! The crash-safe order of each verb:
//!
//! - create: one PostgreSQL insert, durable on return.
//! - fragment: the object's key is recorded as pending in PostgreSQL by the statement that
//!   loads the session (`load_for_fragment`; or, when the new bytes start elsewhere than the
//!   packet's first byte or the node skipped the load on a remembered record, while the body
//!   streams) into its own object
//!   (`…/frag/<offset>-<nonce>`), and that row is committed **before** the
//!   object is completed (before its single PUT, or the completion of its multipart upload:
//!   nothing is visible at the key earlier); commit then completes the object (durable on
//!   the store's write quorum), **then** one PostgreSQL
//!   statement advances `received` only if it still equals the offset the node read, records
//!   the object in the fragment index and drops the pending row. A lost commit's object stays
//!   pending until the sweeper deletes it; readers never see it (they follow the index).
//! - publish: the fragments are assembled into `<prefix>/files/<path>` (server-side copy for
//!   one fragment), then the record is stored `committed` in PostgreSQL. Without overwrites an
//!   existing destination is refused (checked with a HEAD before and after the session's
//!   publish marker goes in: a pending row for the destination key, written before the
//!   assembly, whose unique key lets one session at a time publish there), unless this
//!   session's own marker says a crashed attempt of the same session wrote it.
//! - reply: streamed into `<prefix>/sessions/<id>/reply-<nonce>` (whole or absent; an object
//!   per completion attempt, the record names the one stored first: `completion.rs`), served
//!   by range; a reply that is the upload itself (echo) is assembled there from the fragment
//!   objects (`handler_files.rs`).
//! - reply progress: `int8multirange` union in PostgreSQL.
//! - end: the row becomes a tombstone (durable), then the Ack; the session's objects that
//!   PostgreSQL knows (never a published file) are deleted in the background, without a
//!   listing, and a committed upload's publish marker (left by a node that died before it
//!   dropped it) is forgotten; the sweeper's purge of the tombstone lists the prefix and deletes the rest
//!   (and everything, if this node died first).
//! - purge: the session's objects are deleted, then the row goes.
//! - sweep: a PostgreSQL advisory lock held by one node.

mod coalesce;
mod completion;
mod gc;
mod handler_files;
mod journal;
mod merge_rule;
mod orphans;
mod readiness;
mod recent;
mod session_map;
mod sinks;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bitsd_protocol::SessionId;

use super::objects::{self, Access, ObjectKey, ObjectStoreConfig, Objects};
use super::pg::{CasOutcome, CreateOutcome, Limits, PgOptions, PgStateStore};
use crate::backend::{
    ByteStream, CreateLimits, FragmentPlan, FragmentSink, FragmentSlot, LimitedCreate, LiveCounts,
    LocalUpload, ReplySink, SessionBackend, SweepLock,
};
use crate::{CommitOutcome, ReplyKind, SessionRecord, SessionState, StorageError};
pub use coalesce::Coalesced;
use coalesce::Coalescer;
use journal::ReplyJournals;
pub use merge_rule::{COALESCE_SPAN, MAX_PART_SPAN, MAX_RUN, MIN_RUN};
use recent::RecentSessions;
use sinks::{reply_object, PendingRow, ReservedKey, SharedFragment, SharedReply};

/// Sessions in PostgreSQL, bytes in an object store (see the module docs).
#[derive(Clone, Debug)]
pub struct SharedBackend {
    state: PgStateStore,
    objects: Objects,
    scratch: PathBuf,
    orphan_scan: std::sync::Arc<orphans::OrphanSchedule>,
    /// Merges small fragments behind the upload (`None`: `coalesce_fragments = false`).
    coalescer: Option<Coalescer>,
    /// The sessions this node created or committed a fragment of last (a hint that saves a
    /// fragment's load; see `recent.rs`).
    recent: RecentSessions,
    /// Reply assemblies whose journals wait for their replies' records (`journal.rs`).
    reply_journals: ReplyJournals,
    /// The store's last answer to `/readyz`'s access check (`readiness.rs`).
    store_access: std::sync::Arc<readiness::StoreAccess>,
}

impl SharedBackend {
    /// Connects to PostgreSQL at `postgres_url` (creating or migrating the schema) and to the
    /// object store `store` describes, which is asked once whether it takes the bucket and
    /// credentials ([`Objects::access`]): a refusal (a wrong key, secret, region or
    /// bucket) is an error here; a store that does not answer is only logged, since packets
    /// get a transient error until it does. `scratch` is a local directory for temporary
    /// copies of uploads handed to reply handlers that need a file (created if missing).
    pub async fn connect(
        postgres_url: &str,
        pg: PgOptions,
        store: &ObjectStoreConfig,
        scratch: PathBuf,
    ) -> Result<Self, StorageError> {
        let objects = Objects::new(store)?;
        let state = PgStateStore::connect(postgres_url, pg).await?;
        match objects.access().await {
            Access::Granted => {}
            Access::NoAnswer(e) => tracing::warn!(
                error = %e,
                "the object store did not answer at start; fragments get 503 until it does"
            ),
            Access::Refused(e) => return Err(e),
        }
        Ok(Self::from_parts(state, objects, scratch))
    }

    /// A backend over components already connected.
    pub fn from_parts(state: PgStateStore, objects: Objects, scratch: PathBuf) -> Self {
        let coalescer = objects
            .coalesce_fragments()
            .then(|| Coalescer::new(state.clone(), objects.clone()));
        SharedBackend {
            state,
            objects,
            scratch,
            orphan_scan: Default::default(),
            coalescer,
            recent: RecentSessions::default(),
            reply_journals: Default::default(),
            store_access: Default::default(),
        }
    }

    /// The PostgreSQL state store.
    pub fn state(&self) -> &PgStateStore {
        &self.state
    }

    /// The object store.
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// The object of a stored reply, or why the record names none bitsd would give.
    fn stored_reply(&self, id: &SessionId, kind: &ReplyKind) -> Result<ObjectKey, StorageError> {
        reply_object(&self.objects, id, kind).ok_or_else(|| StorageError::Corrupt {
            key: format!("bitsd_sessions {id}"),
            why: format!("the reply names no object of the session: {kind:?}"),
        })
    }

    async fn record(&self, id: &SessionId) -> Result<SessionRecord, StorageError> {
        self.state.load(id).await?.ok_or_else(|| {
            StorageError::StateStore(format!("session {id} has no record; its upload is gone"))
        })
    }

    /// The upload's fragments, as the object store's assembly wants them.
    async fn fragments(
        &self,
        id: &SessionId,
    ) -> Result<Vec<objects::FragmentObject>, StorageError> {
        self.state
            .fragments(id)
            .await?
            .into_iter()
            .map(|f| {
                let key = ObjectKey::parse(&f.object_key).ok_or_else(|| StorageError::Corrupt {
                    key: "bitsd_fragments".into(),
                    why: format!("object key {:?} is not a valid key", f.object_key),
                })?;
                Ok(objects::FragmentObject {
                    offset: f.entry.offset,
                    len: f.entry.len,
                    key,
                })
            })
            .collect()
    }
}

/// Whether `destination` is a relative path of normal components only.
fn valid_destination(destination: &str) -> bool {
    let parts: Vec<&str> = destination.split('/').filter(|p| !p.is_empty()).collect();
    !parts.is_empty()
        && parts
            .iter()
            .all(|p| *p != "." && *p != ".." && !p.contains('\\') && !p.contains('\0'))
}

#[async_trait]
impl SessionBackend for SharedBackend {
    fn kind(&self) -> &'static str {
        "shared"
    }

    async fn create(&self, record: &SessionRecord) -> Result<(), StorageError> {
        if self.state.create(record).await? {
            self.recent.remember(record);
            Ok(())
        } else {
            Err(StorageError::StateStore(format!(
                "session id {} exists already",
                record.id
            )))
        }
    }

    async fn create_within(
        &self,
        record: &SessionRecord,
        limits: CreateLimits,
    ) -> Result<LimitedCreate, StorageError> {
        let limits = Limits {
            total: limits.total,
            per_user: limits.per_user,
        };
        Ok(match self.state.create_limited(record, limits).await? {
            CreateOutcome::Created => {
                self.recent.remember(record);
                LimitedCreate::Created
            }
            CreateOutcome::TotalLimit => LimitedCreate::TotalLimit,
            CreateOutcome::UserLimit => LimitedCreate::UserLimit,
            CreateOutcome::Exists => {
                return Err(StorageError::StateStore(format!(
                    "session id {} exists already",
                    record.id
                )))
            }
        })
    }

    async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>, StorageError> {
        self.state.load(id).await
    }

    /// The PostgreSQL pool and the fragment memory budget of this node.
    fn resources(&self) -> crate::BackendResources {
        crate::BackendResources {
            state_connections: Some(self.state.pool()),
            fragment_memory: Some(self.objects.fragment_memory().budget()),
        }
    }

    /// PostgreSQL answers, and the object store has not refused this node's key (see
    /// `readiness.rs`: a store that does not answer leaves the node ready).
    async fn ready(&self) -> Result<(), StorageError> {
        self.state
            .load(&SessionId::from_uuid(uuid::Uuid::nil()))
            .await?;
        self.store_access.check(&self.objects).await
    }

    /// No round trip when this node remembers the session and the fragment starts at or past
    /// the remembered offset (see `recent.rs`: the fragment's pending row then goes in while
    /// its body streams, and its commit's compare-and-set catches a record gone stale or an
    /// offset that is not the session's). Otherwise one round trip: the record, and the
    /// fragment's object key recorded as pending (only while the session is live), so the
    /// fragment's write needs no insert of its own.
    async fn load_for_fragment(
        &self,
        id: &SessionId,
        first: u64,
    ) -> Result<(Option<SessionRecord>, Option<FragmentSlot>), StorageError> {
        if let Some(record) = self.recent.for_fragment(id, first) {
            return Ok((Some(record), None));
        }
        let key = self.objects.fragment_key(id, first);
        let (record, reserved) = self.state.load_reserving(id, key.as_str()).await?;
        let slot = reserved.then(|| {
            FragmentSlot::new(ReservedKey {
                id: *id,
                offset: first,
                key: Some(key),
                state: self.state.clone(),
            })
        });
        Ok((record, slot))
    }

    /// A tombstone (the session ended meanwhile on some node) stays one, and a reply another
    /// node stored first stays the reply (this record's own reply object is then deleted:
    /// `completion.rs`); the caller sees either on its next load.
    async fn save(&self, record: &SessionRecord) -> Result<(), StorageError> {
        if let CasOutcome::Raced(stored) = self.state.put(record).await? {
            self.discard_lost_reply(record, &stored).await;
        }
        if record.state == SessionState::ReplyReady {
            self.forget_reply_journal(&record.id).await;
        }
        Ok(())
    }

    async fn save_lazy(&self, record: &SessionRecord) -> Result<(), StorageError> {
        self.save(record).await
    }

    /// Only `updated_ms`, and only forwards: writing the whole record would put this node's
    /// read of the session over what another node stored since (a completion, for one:
    /// tests/tests/farm_held_touch.rs).
    async fn touch(&self, record: &SessionRecord) -> Result<(), StorageError> {
        self.state.touch(&record.id, record.updated_ms).await
    }

    async fn flush(&self) -> Result<(), StorageError> {
        Ok(()) // every PostgreSQL write is durable on return
    }

    async fn begin_fragment(
        &self,
        id: &SessionId,
        plan: FragmentPlan,
    ) -> Result<Box<dyn FragmentSink>, StorageError> {
        let key = self.objects.fragment_key(id, plan.write_at);
        // Room in the node's fragment memory first: a fragment refused for want of it
        // leaves no pending row behind.
        let writer = self.objects.fragment_writer(key.clone(), plan.len).await?;
        // The pending row goes in while the body streams (one PostgreSQL round trip off the
        // fragment's latency); the commit waits for it BEFORE it completes the object, so an
        // object whose commit never happens is always known to the sweeper: nothing is
        // visible at the key until `ObjectWriter::finish`.
        let pending = PendingRow::insert(&self.state, *id, key.as_str().to_string());
        Ok(Box::new(SharedFragment {
            id: *id,
            state: self.state.clone(),
            writer,
            objects: self.objects.clone(),
            pending,
            coalescer: self.coalescer.clone(),
            recent: self.recent.clone(),
        }))
    }

    async fn begin_reserved_fragment(
        &self,
        id: &SessionId,
        plan: FragmentPlan,
        slot: FragmentSlot,
    ) -> Result<Box<dyn FragmentSink>, StorageError> {
        let mut reserved = slot.downcast::<ReservedKey>().ok();
        let key = reserved
            .as_mut()
            .and_then(|reserved| reserved.take_for(id, plan.write_at));
        let Some(key) = key else {
            // Reserved for another offset (the fragment overlaps held bytes): the unused
            // reservation is forgotten; this fragment records its own key.
            drop(reserved);
            return self.begin_fragment(id, plan).await;
        };
        let writer = match self.objects.fragment_writer(key.clone(), plan.len).await {
            Ok(writer) => writer,
            Err(e) => {
                // No room in the node's fragment memory: the reservation goes unused and
                // is forgotten when dropped.
                if let Some(reserved) = reserved.as_mut() {
                    reserved.key = Some(key);
                }
                return Err(e);
            }
        };
        Ok(Box::new(SharedFragment {
            id: *id,
            state: self.state.clone(),
            writer,
            objects: self.objects.clone(),
            pending: PendingRow::already_inserted(),
            coalescer: self.coalescer.clone(),
            recent: self.recent.clone(),
        }))
    }

    async fn publish_upload(
        &self,
        id: &SessionId,
        destination: &str,
        allow_overwrite: bool,
    ) -> Result<CommitOutcome, StorageError> {
        let record = self.record(id).await?;
        if record.committed {
            return Ok(CommitOutcome::Committed);
        }
        if !valid_destination(destination) {
            return Ok(CommitOutcome::DestinationInvalid);
        }
        match self.publish(id, record, destination, allow_overwrite).await {
            Ok(CommitOutcome::Committed) => Ok(CommitOutcome::Committed),
            // Another node may have completed this very session meanwhile (a client's re-sent
            // final fragment on another node, while this node still answered the first): its
            // file is in place, or its marker stood in the way, or it deleted the fragment
            // objects this assembly read. The session is committed then, and that is the
            // answer (tests/tests/farm_completion_race.rs).
            lost => match self.record(id).await {
                Ok(r) if r.committed => Ok(CommitOutcome::Committed),
                _ => lost,
            },
        }
    }

    /// PostgreSQL keeps offsets and totals as `bigint`.
    fn max_upload_size(&self) -> u64 {
        i64::MAX.unsigned_abs()
    }

    /// S3 keys hold up to [`objects::MAX_KEY_LEN`] bytes, and the destination's key is
    /// `<prefix>/files/<path>` with the characters keys avoid percent-encoded.
    fn destination_too_long(&self, destination: &str) -> Option<String> {
        let len = self.objects.file_key(destination).as_str().len();
        (len > objects::MAX_KEY_LEN).then(|| {
            format!(
                "the destination's object key would be {len} bytes long; the limit is {}",
                objects::MAX_KEY_LEN
            )
        })
    }

    async fn destination_exists(&self, destination: &str) -> bool {
        if !valid_destination(destination) {
            return false;
        }
        self.objects
            .head(&self.objects.file_key(destination))
            .await
            .is_ok()
    }

    async fn read_upload(&self, id: &SessionId) -> Result<ByteStream, StorageError> {
        let record = self.record(id).await?;
        let fragments = self.fragments(id).await?;
        let name = self.objects.session_prefix(id);
        self.objects.read_upload(&fragments, record.received, &name)
    }

    async fn upload_file(&self, id: &SessionId) -> Result<LocalUpload, StorageError> {
        self.upload_copy(id).await
    }

    async fn upload_unread(&self, id: &SessionId) -> Result<LocalUpload, StorageError> {
        Ok(self.upload_unmade(id))
    }

    async fn begin_reply(&self, id: &SessionId) -> Result<Box<dyn ReplySink>, StorageError> {
        let (key, name) = self.objects.reply_key(id);
        Ok(Box::new(SharedReply {
            writer: self.objects.reply_writer(key),
            name,
        }))
    }

    async fn store_reply_file(
        &self,
        id: &SessionId,
        src: &Path,
    ) -> Result<ReplyKind, StorageError> {
        if self.is_the_upload_itself(id, src).await {
            return self.reply_itself(id).await;
        }
        self.put_file(id, src).await
    }

    async fn read_reply(
        &self,
        id: &SessionId,
        kind: &ReplyKind,
        start: u64,
        len: u64,
    ) -> Result<ByteStream, StorageError> {
        if len == 0 || !matches!(kind, ReplyKind::Stored { .. }) {
            return Ok(Box::pin(futures_util::stream::empty()));
        }
        let key = self.stored_reply(id, kind)?;
        let read = self.objects.read(&key, Some(start..start + len)).await?;
        Ok(read.stream)
    }

    async fn reply_redirect(
        &self,
        id: &SessionId,
        kind: &ReplyKind,
        method: &http::Method,
    ) -> Result<Option<String>, StorageError> {
        let Some(ttl) = self.objects.presigned_reply_ttl() else {
            return Ok(None);
        };
        if !matches!(kind, ReplyKind::Stored { .. })
            || !(method == http::Method::GET || method == http::Method::HEAD)
        {
            return Ok(None);
        }
        let key = self.stored_reply(id, kind)?;
        self.objects
            .presigned_url(method.clone(), &key, ttl)
            .await
            .map(Some)
    }

    async fn record_reply_delivered(
        &self,
        id: &SessionId,
        created_ms: u64,
        start: u64,
        end: u64,
    ) -> Result<Option<SessionRecord>, StorageError> {
        self.state
            .record_reply_delivered(id, created_ms, start, end)
            .await
    }

    async fn end_session(
        &self,
        record: &mut SessionRecord,
        state: SessionState,
    ) -> Result<(), StorageError> {
        self.recent.forget(&record.id);
        self.reply_journals.take(&record.id);
        match self.state.close(&record.id, state).await? {
            CasOutcome::Committed(r) | CasOutcome::Raced(r) => *record = r,
            CasOutcome::Missing => record.state = state,
        }
        // The tombstone is durable first: no node takes another fragment of this session, and
        // the Ack needs nothing more. Its objects go in the background (published files lie
        // under files/ and stay): the Close's latency is one PostgreSQL commit, not a LIST and
        // a DeleteObjects. Should this node die first, or the store refuse, the sweeper's
        // purge of the tombstone (after the session timeout) deletes them.
        let (this, id) = (self.clone(), record.id);
        let reply = record
            .reply
            .as_ref()
            .and_then(|r| reply_object(&self.objects, &id, &r.kind));
        // A node that died between recording the upload committed and dropping its publish
        // marker left the marker (a retry answers from the record and never publishes
        // again); kept, it would refuse other sessions that destination once its file is
        // gone, until the tombstone expires. Only a committed session's: an uncommitted one's
        // marker still tells a crashed attempt's file from someone else's.
        let marker = record
            .destination
            .as_deref()
            .filter(|d| record.committed && valid_destination(d))
            .map(|d| self.objects.file_key(d));
        tokio::spawn(async move {
            if let Err(e) = this.abort_recorded_assemblies(&id).await {
                tracing::warn!(session = %id, error = %e, "aborting an ended session's unfinished assembly failed; the sweeper does it with the tombstone");
            }
            if let Err(e) = this.delete_known_objects(&id, reply).await {
                tracing::warn!(session = %id, error = %e, "deleting an ended session's objects failed; the sweeper deletes them with the tombstone");
            }
            if let Some(marker) = marker {
                if let Err(e) = this
                    .state
                    .forget_own_pending_object(&id, marker.as_str())
                    .await
                {
                    tracing::warn!(session = %id, error = %e, "a committed session's publish marker stays until its tombstone expires");
                }
            }
        });
        Ok(())
    }

    async fn purge(&self, id: &SessionId) -> Result<(), StorageError> {
        self.recent.forget(id);
        self.reply_journals.take(id);
        // Before the rows go (with the session's): their uploads' parts are named nowhere else.
        self.abort_recorded_assemblies(id).await?;
        self.objects.delete_session(id).await?;
        self.state.remove(id).await?;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<SessionRecord>, StorageError> {
        self.state.list().await
    }

    async fn list_page(
        &self,
        after: Option<SessionId>,
        limit: usize,
    ) -> Result<Vec<SessionRecord>, StorageError> {
        self.state.list_page(after.as_ref(), limit).await
    }

    async fn count_live(&self) -> Result<LiveCounts, StorageError> {
        let (total, per_user) = self.state.live_counts().await?;
        Ok(LiveCounts { total, per_user })
    }

    async fn count_by_state(
        &self,
    ) -> Result<std::collections::HashMap<SessionState, u64>, StorageError> {
        self.state.count_by_state().await
    }

    async fn idle_sessions(
        &self,
        updated_before_ms: u64,
        limit: usize,
    ) -> Result<Vec<SessionRecord>, StorageError> {
        self.state.idle_sessions(updated_before_ms, limit).await
    }

    async fn try_sweep_lock(&self) -> Result<Option<SweepLock>, StorageError> {
        Ok(self.state.try_sweeper_lock().await?.map(SweepLock::new))
    }

    async fn collect_garbage(&self, grace: std::time::Duration) -> Result<usize, StorageError> {
        Ok(self.collect_pending_objects(grace).await? + self.collect_orphans_if_due(grace).await?)
    }
}
