//! The storage seam: [`SessionBackend`], what the service asks of whatever holds its sessions.
//!
//! Its verbs follow the protocol, not a storage engine: create a session, load it, save it,
//! receive a fragment and commit it, publish a complete plain upload, read the upload, store
//! a reply and read it back by range, count reply bytes delivered, end a session, purge it,
//! list and count sessions, and sweep expired ones under a lock only one node holds. The
//! service holds an `Arc<dyn SessionBackend>` and never learns which backend it runs on.
//!
//! Every verb states what is durable when it returns; each backend documents, beside its
//! code, the crash-safe order by which it keeps that promise. The local backend
//! ([`crate::SessionStore`]: sled + files) is in `local.rs`.
//!
//! **The one rule every backend keeps:** an offset is acknowledged only after its bytes are
//! durable, and it advances only from the value the committing node read
//! ([`FragmentSink::commit`] is a compare-and-set), so two nodes racing on one session can
//! never both advance it.

mod local;
mod resources;

pub use resources::{BackendResources, ConnectionPool, MemoryBudget};

use std::collections::HashMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use async_trait::async_trait;
use bitsd_protocol::SessionId;
use bytes::Bytes;
use futures_util::Stream;

use crate::{
    CommitOutcome, FragmentDurability, ReplyKind, SessionRecord, SessionState, StorageError,
};

/// Bytes read from a backend (an upload or a reply range), in order.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, StorageError>> + Send + 'static>>;

/// What a fragment about to be received looks like, so the backend can prepare for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentPlan {
    /// Upload offset of the first new byte (the session's `received` when the decision was
    /// taken).
    pub write_at: u64,
    /// New bytes the fragment will bring.
    pub len: u64,
    /// How durable the bytes and the offset must be when [`FragmentSink::commit`] returns.
    pub durability: FragmentDurability,
}

/// Something a backend prepared for a fragment's bytes while it loaded the session (see
/// [`SessionBackend::load_for_fragment`]): handed back to
/// [`SessionBackend::begin_reserved_fragment`]. Dropping it unused releases what it holds.
pub struct FragmentSlot(Box<dyn std::any::Any + Send + Sync>);

impl FragmentSlot {
    /// A slot holding `held` (the backend's own type).
    pub fn new(held: impl std::any::Any + Send + Sync) -> Self {
        FragmentSlot(Box::new(held))
    }

    /// What the slot holds, if it is a `T` (else the slot back).
    pub fn downcast<T: std::any::Any>(self) -> Result<Box<T>, Self> {
        self.0.downcast::<T>().map_err(FragmentSlot)
    }
}

impl Debug for FragmentSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FragmentSlot")
    }
}

/// How a fragment's commit ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FragmentCommit {
    /// The bytes are stored as the plan's durability asked, and the record with the new
    /// offset is stored: the Ack may go out.
    Committed,
    /// The stored offset was no longer the one the caller read (another node or request
    /// committed first, or the session ended): nothing of this commit counts. `current` is
    /// the record that won (`None`: the session is gone). The caller answers with the
    /// winner's offset.
    Lost {
        /// The record as it is now stored.
        current: Option<Box<SessionRecord>>,
    },
}

/// A fragment on its way into the backend: body frames go in with [`FragmentSink::write`],
/// and [`FragmentSink::commit`] makes them count. Dropping a sink without committing stores
/// nothing the protocol can see (the bytes lie past the acknowledged offset and are cut or
/// collected).
///
/// A sink keeps a bounded amount of the body in memory, whatever the frames' sizes.
#[async_trait]
pub trait FragmentSink: Send + Debug {
    /// Accepts the next body bytes (after every byte accepted so far).
    async fn write(&mut self, bytes: Bytes) -> Result<(), StorageError>;

    /// Bytes accepted so far.
    fn written(&self) -> u64;

    /// Commits the fragment: first its bytes become durable (as the plan's durability asks),
    /// **then** `record` (which carries the new `received`, state and progress) is stored,
    /// but only if the stored record is live and its `received` still equals `expected` (the
    /// offset the caller read). Returns [`FragmentCommit::Lost`] with the stored record
    /// otherwise. With [`FragmentDurability::Durable`] the record is durable on return; with
    /// [`FragmentDurability::BytesDurable`] the bytes are, and the caller makes the record
    /// durable with its next [`SessionBackend::save`] (or [`SessionBackend::flush`]).
    async fn commit(
        self: Box<Self>,
        expected: u64,
        record: &SessionRecord,
    ) -> Result<FragmentCommit, StorageError>;
}

/// A reply on its way into the backend, stored whole or not at all.
#[async_trait]
pub trait ReplySink: Send + Debug {
    /// Appends reply bytes.
    async fn write(&mut self, bytes: Bytes) -> Result<(), StorageError>;

    /// Bytes written so far.
    fn len(&self) -> u64;

    /// Whether nothing was written yet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes the reply durable under the session's reply name and says how it is held (a
    /// reader never sees part of it). The caller then records it with
    /// [`SessionBackend::save`].
    async fn finish(self: Box<Self>) -> Result<ReplyKind, StorageError>;
}

/// A complete upload as a local file, for the code that needs a path (the command handler, a
/// by-reference notification). A backend that does not keep uploads on local disk downloads
/// it to a temporary file, which is removed when this value is dropped.
#[derive(Debug)]
pub struct LocalUpload {
    /// The upload's bytes, exactly `received` of them. Read only: never write to it.
    pub path: PathBuf,
    /// A private directory a reply handler may make files in; a file made there can be handed
    /// to [`SessionBackend::store_reply_file`].
    pub work_dir: PathBuf,
    /// Removed on drop (a temporary copy), when set.
    remove_on_drop: Option<PathBuf>,
}

impl LocalUpload {
    /// An upload the backend keeps at `path` itself (nothing is removed on drop).
    pub fn kept(path: PathBuf, work_dir: PathBuf) -> Self {
        LocalUpload {
            path,
            work_dir,
            remove_on_drop: None,
        }
    }

    /// A temporary copy: `remove` (a file or directory holding `path` and `work_dir`) is
    /// removed when the value is dropped.
    pub fn temporary(path: PathBuf, work_dir: PathBuf, remove: PathBuf) -> Self {
        LocalUpload {
            path,
            work_dir,
            remove_on_drop: Some(remove),
        }
    }
}

impl Drop for LocalUpload {
    fn drop(&mut self) {
        if let Some(p) = self.remove_on_drop.take() {
            let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
        }
    }
}

/// Live (not ended) sessions, in total and per owner.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveCounts {
    /// Live sessions of every owner (and of none).
    pub total: u64,
    /// Live sessions per owner (sessions without an owner are not in the map).
    pub per_user: HashMap<String, u64>,
}

impl LiveCounts {
    /// Counts the live sessions among `records`.
    pub fn from_records<'a>(records: impl IntoIterator<Item = &'a SessionRecord>) -> Self {
        let mut counts = LiveCounts::default();
        for r in records.into_iter().filter(|r| !r.state.is_terminal()) {
            counts.total += 1;
            if let Some(owner) = &r.owner {
                *counts.per_user.entry(owner.clone()).or_default() += 1;
            }
        }
        counts
    }
}

/// Live-session limits a backend that counts sessions itself checks at Create-Session (see
/// [`SessionBackend::create_within`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CreateLimits {
    /// Most live sessions in total (of every node sharing the backend); `None`: no limit.
    pub total: Option<u64>,
    /// Most live sessions of one owner; `None`: no limit. Sessions without an owner count
    /// only toward the total.
    pub per_user: Option<u64>,
}

/// What [`SessionBackend::create_within`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitedCreate {
    /// The backend does not count sessions: nothing was written, the caller counts and
    /// calls [`SessionBackend::create`].
    NotCounted,
    /// The session exists now, durably, within the limits.
    Created,
    /// The total limit is reached; nothing was written.
    TotalLimit,
    /// The owner's limit is reached; nothing was written.
    UserLimit,
}

/// The sweeper's lock: while it is held, no other node (or task) sweeps. Released on drop.
pub struct SweepLock {
    _held: Box<dyn Send + Sync>,
}

impl SweepLock {
    /// A lock held as long as `held` lives.
    pub fn new(held: impl Send + Sync + 'static) -> Self {
        SweepLock {
            _held: Box::new(held),
        }
    }
}

impl Debug for SweepLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SweepLock")
    }
}

/// Where a server's sessions live: records, upload bytes, published files, replies.
///
/// "Durable" means: survives a crash of the process and of the machine (and, for a shared
/// backend, of any one node) once the call returns. Every method may be called from any task
/// of any node; the backend serialises what must be serialised (see
/// [`FragmentSink::commit`]). The service still takes its own per-session lock on one node,
/// so a backend sees at most one writer per session per node.
#[async_trait]
pub trait SessionBackend: Send + Sync + Debug + 'static {
    /// A short name for logs and metrics (`"local"`, `"shared"`).
    fn kind(&self) -> &'static str;

    /// Creates a new session's record, durably, before returning: the Create-Session Ack
    /// that follows must survive a crash.
    async fn create(&self, record: &SessionRecord) -> Result<(), StorageError>;

    /// The record of `id`, if there is one (live or tombstone).
    async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>, StorageError>;

    /// Whether this node can serve packets now (what `/readyz` answers); `Err` says why not.
    /// The default loads a session that does not exist, which asks the session store.
    async fn ready(&self) -> Result<(), StorageError> {
        self.load(&SessionId::from_uuid(uuid::Uuid::nil()))
            .await
            .map(|_| ())
    }

    /// The record of `id` for a Fragment whose first byte is at upload offset `first`, and
    /// possibly a [`FragmentSlot`] the backend prepared in the same step for the fragment's
    /// bytes (the shared backend records the object key as pending in the same PostgreSQL
    /// round trip). The default is [`SessionBackend::load`] and no slot.
    async fn load_for_fragment(
        &self,
        id: &SessionId,
        first: u64,
    ) -> Result<(Option<SessionRecord>, Option<FragmentSlot>), StorageError> {
        let _ = first;
        Ok((self.load(id).await?, None))
    }

    /// Stores `record` durably (and everything saved before it, such as a
    /// [`FragmentDurability::BytesDurable`] commit).
    async fn save(&self, record: &SessionRecord) -> Result<(), StorageError>;

    /// Stores `record` without waiting for durability (idle-time touches and the like: losing
    /// it in a crash must be harmless).
    async fn save_lazy(&self, record: &SessionRecord) -> Result<(), StorageError>;

    /// Records that the session of `record` was just active (its `updated_ms`, what the idle
    /// sweep reads), without waiting for durability: a packet that changed nothing else (a
    /// re-sent fragment already held). A backend shared by several nodes writes only the
    /// time, never the rest of `record`, which may be stale (another node may have moved the
    /// session on since this one read it). The default stores `record` with
    /// [`SessionBackend::save_lazy`], right where one process holds every session's lock.
    async fn touch(&self, record: &SessionRecord) -> Result<(), StorageError> {
        self.save_lazy(record).await
    }

    /// Makes every earlier change durable.
    async fn flush(&self) -> Result<(), StorageError>;

    /// Starts receiving a fragment of session `id` as `plan` describes.
    async fn begin_fragment(
        &self,
        id: &SessionId,
        plan: FragmentPlan,
    ) -> Result<Box<dyn FragmentSink>, StorageError>;

    /// [`SessionBackend::begin_fragment`] with the slot [`SessionBackend::load_for_fragment`]
    /// gave for this fragment. The default drops the slot and begins as usual.
    async fn begin_reserved_fragment(
        &self,
        id: &SessionId,
        plan: FragmentPlan,
        slot: FragmentSlot,
    ) -> Result<Box<dyn FragmentSink>, StorageError> {
        drop(slot);
        self.begin_fragment(id, plan).await
    }

    /// Publishes a complete plain upload at `destination` (relative to the upload root, made
    /// of normal components only), atomically: the published object is whole or absent,
    /// never partial. The session's record must say it is complete, and that must be durable
    /// before anything is published. Idempotent: a retry after a crash that finds this
    /// session's upload already published returns [`CommitOutcome::Committed`].
    async fn publish_upload(
        &self,
        id: &SessionId,
        destination: &str,
        allow_overwrite: bool,
    ) -> Result<CommitOutcome, StorageError>;

    /// Whether `destination` (relative to the upload root) exists already.
    async fn destination_exists(&self, destination: &str) -> bool;

    /// The complete upload of `id` as a stream (`received` bytes from offset 0).
    async fn read_upload(&self, id: &SessionId) -> Result<ByteStream, StorageError>;

    /// The complete upload of `id` as a local file (see [`LocalUpload`]).
    async fn upload_file(&self, id: &SessionId) -> Result<LocalUpload, StorageError>;

    /// The complete upload of `id` as a [`LocalUpload`] whose file and work directory need not
    /// exist, for a reply handler that uses neither (it hands the path back, as echo does, or
    /// ignores it);
    /// [`SessionBackend::store_reply_file`] accepts that path as "the upload itself". The
    /// default is [`SessionBackend::upload_file`].
    async fn upload_unread(&self, id: &SessionId) -> Result<LocalUpload, StorageError> {
        self.upload_file(id).await
    }

    /// Starts storing the reply of session `id` (replacing none that is recorded: a reply is
    /// written once per completion attempt, under a name of its own, until it is finished).
    async fn begin_reply(&self, id: &SessionId) -> Result<Box<dyn ReplySink>, StorageError>;

    /// Stores the file at `src` (made by a reply handler) as the reply of `id`, durably, and
    /// says how it is held.
    async fn store_reply_file(&self, id: &SessionId, src: &Path)
        -> Result<ReplyKind, StorageError>;

    /// `len` bytes of the stored reply `kind` of `id`, from byte `start`.
    async fn read_reply(
        &self,
        id: &SessionId,
        kind: &ReplyKind,
        start: u64,
        len: u64,
    ) -> Result<ByteStream, StorageError>;

    /// The stored reply as a local file the server may read directly, when the backend keeps
    /// it as one (a fast path for downloads; `None` means: use [`SessionBackend::read_reply`]).
    fn reply_local_path(&self, id: &SessionId, kind: &ReplyKind) -> Option<PathBuf> {
        let _ = (id, kind);
        None
    }

    /// A URL at which the client may send `method` (GET or HEAD) for the stored reply `kind`
    /// of `id` to the backend's store itself, for a while, when the backend hands reply
    /// downloads off (the shared backend with `presigned_reply_secs`). `None`: the server
    /// serves the reply (the default). The caller has checked the session, its route and its
    /// owner.
    async fn reply_redirect(
        &self,
        id: &SessionId,
        kind: &ReplyKind,
        method: &http::Method,
    ) -> Result<Option<String>, StorageError> {
        let _ = (id, kind, method);
        Ok(None)
    }

    /// Adds `[start, end)` to the delivered ranges of the reply of `id` made at `created_ms`
    /// (a reply produced again later is counted afresh), counting each byte once whichever
    /// node served it. Not durable on return (progress). Returns the updated record, `None`
    /// when the session or that reply is gone.
    async fn record_reply_delivered(
        &self,
        id: &SessionId,
        created_ms: u64,
        start: u64,
        end: u64,
    ) -> Result<Option<SessionRecord>, StorageError>;

    /// Ends a session (Close or Cancel): its bytes go, and its record stays as a tombstone in
    /// `state`. `record` is updated to what was stored.
    async fn end_session(
        &self,
        record: &mut SessionRecord,
        state: SessionState,
    ) -> Result<(), StorageError>;

    /// Removes every trace of a session: bytes, reply, record and tombstone.
    async fn purge(&self, id: &SessionId) -> Result<(), StorageError>;

    /// Every record, tombstones included.
    async fn list(&self) -> Result<Vec<SessionRecord>, StorageError>;

    /// At most `limit` records whose ids follow `after` (all when `None`), in id order (the
    /// order of the id's 16 bytes), tombstones included.
    async fn list_page(
        &self,
        after: Option<SessionId>,
        limit: usize,
    ) -> Result<Vec<SessionRecord>, StorageError>;

    /// Creates `record`'s session unless `limits` are reached, counting the live sessions of
    /// every node that shares this backend (exactly, not per node). A backend whose sessions
    /// belong to one node answers [`LimitedCreate::NotCounted`] (the default) and writes
    /// nothing; the caller then counts in memory and calls [`SessionBackend::create`].
    async fn create_within(
        &self,
        record: &SessionRecord,
        limits: CreateLimits,
    ) -> Result<LimitedCreate, StorageError> {
        let _ = (record, limits);
        Ok(LimitedCreate::NotCounted)
    }

    /// Live sessions, in total and per owner.
    async fn count_live(&self) -> Result<LiveCounts, StorageError> {
        Ok(LiveCounts::from_records(&self.list().await?))
    }

    /// How many records (live and tombstones) are in each state, for `/metrics`. The default
    /// counts [`SessionBackend::list`]; a backend that can count without reading every record
    /// (a shared one: one `GROUP BY` query) overrides it.
    async fn count_by_state(&self) -> Result<HashMap<SessionState, u64>, StorageError> {
        let mut counts = HashMap::new();
        for record in self.list().await? {
            *counts.entry(record.state).or_insert(0) += 1;
        }
        Ok(counts)
    }

    /// At most `limit` records (live and tombstones) untouched since `updated_before_ms`
    /// (milliseconds since the epoch), oldest first: the sweeper's candidates. The default
    /// filters [`SessionBackend::list`]; a shared backend reads only these rows (an index on
    /// the update time).
    async fn idle_sessions(
        &self,
        updated_before_ms: u64,
        limit: usize,
    ) -> Result<Vec<SessionRecord>, StorageError> {
        let mut idle: Vec<SessionRecord> = self
            .list()
            .await?
            .into_iter()
            .filter(|r| r.updated_ms < updated_before_ms)
            .collect();
        idle.sort_by_key(|r| r.updated_ms);
        idle.truncate(limit);
        Ok(idle)
    }

    /// Takes the sweeper's lock if no one (no other node, no other task) holds it; `None`
    /// when someone does. Sweep (list, check expiry, purge) only while holding it.
    async fn try_sweep_lock(&self) -> Result<Option<SweepLock>, StorageError>;

    /// Deletes what fragment writes left behind without a commit (a race lost to another
    /// node, a node or client gone mid-fragment) once it is older than `grace`; a writer still
    /// sending after `grace` has its commit refused and the client re-sends the fragment.
    /// Call only while holding the sweeper's lock. Returns how many objects went. Backends
    /// whose lost writes leave nothing behind do nothing (the default).
    async fn collect_garbage(&self, grace: std::time::Duration) -> Result<usize, StorageError> {
        let _ = grace;
        Ok(0)
    }

    /// The local directory plain uploads are published under, when the backend has one
    /// (free-space and name-length checks).
    fn files_root(&self) -> Option<&Path> {
        None
    }

    /// The largest upload, in bytes, the backend can record (a `Content-Range` total past it
    /// is answered as one over `max_upload_size`); `u64::MAX` when it has no limit of its own.
    fn max_upload_size(&self) -> u64 {
        u64::MAX
    }

    /// Why `destination` (relative to the upload root) is too long for the backend to
    /// publish, when a limit of the backend's own forbids it (an object store's key length);
    /// `None` when it fits. Checked at Create-Session, beside the checks of
    /// [`SessionBackend::files_root`]'s file system.
    fn destination_too_long(&self, destination: &str) -> Option<String> {
        let _ = destination;
        None
    }

    /// Bytes the backend's state takes on disk, if it can tell (metrics).
    fn size_on_disk(&self) -> Option<u64> {
        None
    }

    /// What this node holds now of the backend's pooled resources (metrics); the default
    /// has none.
    fn resources(&self) -> BackendResources {
        BackendResources::default()
    }
}
