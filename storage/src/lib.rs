//! Durable session storage for bitsd.
//!
//! Two places hold a session: a [`MetaStore`] (sled by default, [`SledMetaStore`]) keeps the
//! session records, the fragment index and the bytes of small fragments and replies (below
//! [`SessionStore::inline_below`], group-committed with their offsets), and plain per-session
//! files keep the other bytes (`<data>/sessions/<id>/upload` and `…/reply`). [`SessionStore`] ties them together and
//! enforces the order that makes every Ack safe: bytes are written and `sync_data`'d first,
//! then the new offset is committed to the meta store and flushed, and only then may the
//! server acknowledge (an offset never becomes durable before its bytes). A plain upload is
//! published only after its completion is durable, as a second link of its synced file. On
//! open, the meta store is authoritative: file bytes past the recorded length are cut off
//! (never those of a published file), fragments committed without a sync are checked against
//! their CRC-32C, and every open session resumes where its last Ack left it. Everything the
//! store creates is private to the server's user (directories 0700, files 0600).
//!
//! The service talks to its storage through [`SessionBackend`], the backend-neutral seam;
//! [`SessionStore`] is its local implementation.
//!
//! ```text
//! <data>/meta/                 sled: session records, fragment index, tombstones, small bytes
//! <data>/sessions/<id>/upload  upload bytes, written at their offsets
//! <data>/sessions/<id>/reply   reply bytes (when the reply is stored here)
//! <data>/files/<path>          committed plain uploads
//! ```

mod backend;
mod error;
mod fragment_writer;
mod fs_util;
mod group_flush;
mod handle_cache;
mod inline;
mod meta;
mod publish;
mod record;
mod recovery;
mod reply_progress;
mod reply_writer;
mod session_store;
pub mod shared;
mod sled_meta;

pub use backend::{
    BackendResources, ByteStream, ConnectionPool, CreateLimits, FragmentCommit, FragmentPlan,
    FragmentSink, FragmentSlot, LimitedCreate, LiveCounts, LocalUpload, MemoryBudget, ReplySink,
    SessionBackend, SweepLock,
};
pub use error::StorageError;
pub use fragment_writer::{FragmentDurability, FragmentWriter, COPY_BELOW, GATHER_BYTES};
pub use handle_cache::HANDLE_CACHE_SIZE;
pub use inline::{INLINE_BELOW, INLINE_UPLOAD_MAX};
pub use meta::{FlushTicket, MetaStore};
pub use publish::CommitOutcome;
pub use record::{
    now_millis, FragmentEntry, ReplyKind, ReplyRecord, SessionRecord, SessionState, UploadMode,
};
pub use reply_progress::ByteRanges;
pub use reply_writer::ReplyWriter;
pub use session_store::SessionStore;
pub use sled_meta::SledMetaStore;
