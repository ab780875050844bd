//! What a node's backend holds of its pooled resources right now, for `/metrics`.

/// A node's use of its backend's pooled resources at one moment: the connections to the
/// state store (the farm's PostgreSQL pool) and the memory budget for fragment bytes
/// (`[object_store] fragment_memory`). Each field is `None` where the backend has no such
/// resource (the local backend has neither), so a metric is shown only where it means
/// something.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendResources {
    /// Connections to the state store: the pool's limit, how many are open, how many of
    /// those are idle, and how many requests wait for one.
    pub state_connections: Option<ConnectionPool>,
    /// Bytes of fragment memory: the budget and how much of it is held now.
    pub fragment_memory: Option<MemoryBudget>,
}

/// A connection pool's state (see [`BackendResources::state_connections`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionPool {
    /// The most connections the pool opens.
    pub max: u64,
    /// Connections open now, busy or idle.
    pub open: u64,
    /// Open connections no request holds.
    pub idle: u64,
    /// Requests waiting for a connection.
    pub waiting: u64,
}

/// A memory budget's state (see [`BackendResources::fragment_memory`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryBudget {
    /// The budget, bytes.
    pub limit: u64,
    /// Bytes reserved or held now.
    pub used: u64,
}
