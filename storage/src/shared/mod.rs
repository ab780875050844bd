//! Components of the shared (farm) backend: PostgreSQL for session state, an object store for bytes.
pub mod objects;
pub mod pg;
