//! The shared (farm) backend ([`SharedBackend`]) and its components: PostgreSQL for session
//! state, an object store for bytes.
mod backend;
pub mod objects;
pub mod pg;

pub use backend::{Coalesced, SharedBackend, COALESCE_SPAN, MAX_PART_SPAN, MAX_RUN, MIN_RUN};
