//! The shared (farm) backend ([`SharedBackend`]) and its components: PostgreSQL for session
//! state, an object store for bytes.
mod backend;
pub mod objects;
pub mod pg;

pub use backend::{Coalesced, SharedBackend, COALESCE_SPAN, MIN_RUN};
