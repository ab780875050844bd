//! The shared (farm) backend's components: state in PostgreSQL, bytes in an object store.
pub mod pg;
