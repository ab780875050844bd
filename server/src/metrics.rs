//! Prometheus metrics, served as text on the admin listener's `/metrics`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use bitsd_storage::BackendResources;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    packet: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketKindLabels {
    packet: &'static str,
}

/// Buckets of `packet_seconds`: 0.5 ms to about 75 s, each 2.5 times the one before.
fn packet_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.5, 14))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// Gauges of the backend's pooled resources, registered only for those the backend has
/// ([`BackendResources`]).
#[derive(Default)]
struct ResourceGauges {
    /// `postgres_connections{state}`: `max`, `open`, `idle`, `waiting`.
    pool: Option<Family<StateLabels, Gauge>>,
    /// `fragment_memory_bytes{state}`: `limit`, `used`.
    memory: Option<Family<StateLabels, Gauge>>,
}

impl ResourceGauges {
    fn register(registry: &mut Registry, resources: &BackendResources) -> Self {
        let mut gauges = ResourceGauges::default();
        if resources.state_connections.is_some() {
            let family = Family::<StateLabels, Gauge>::default();
            registry.register(
                "postgres_connections",
                "This node's PostgreSQL pool: its limit (max), connections open, of those idle, \
                 and requests waiting for one",
                family.clone(),
            );
            gauges.pool = Some(family);
        }
        if resources.fragment_memory.is_some() {
            let family = Family::<StateLabels, Gauge>::default();
            registry.register(
                "fragment_memory_bytes",
                "This node's budget for fragment bytes in memory (limit) and what is held now \
                 (used)",
                family.clone(),
            );
            gauges.memory = Some(family);
        }
        gauges
    }

    fn set(&self, resources: &BackendResources) {
        let set = |family: &Family<StateLabels, Gauge>, state: &'static str, v: u64| {
            family
                .get_or_create(&StateLabels { state })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        if let (Some(family), Some(pool)) = (&self.pool, resources.state_connections) {
            set(family, "max", pool.max);
            set(family, "open", pool.open);
            set(family, "idle", pool.idle);
            set(family, "waiting", pool.waiting);
        }
        if let (Some(family), Some(memory)) = (&self.memory, resources.fragment_memory) {
            set(family, "limit", memory.limit);
            set(family, "used", memory.used);
        }
    }
}

/// What a fragment did.
#[derive(Clone, Copy, Debug)]
pub(crate) enum FragmentOutcome {
    /// New bytes stored.
    Stored,
    /// Every byte was held already (a resend).
    AlreadyHeld,
    /// 416: the fragment started past what is held.
    Gap,
    /// Refused or failed.
    Failed,
}

/// The server's counters.
pub(crate) struct Metrics {
    registry: Registry,
    packets: Family<PacketLabels, Counter>,
    packet_seconds: Family<PacketKindLabels, Histogram, fn() -> Histogram>,
    errors: Family<CodeLabels, Counter>,
    fragments: Family<OutcomeLabels, Counter>,
    upload_bytes: Counter,
    reply_bytes: Counter,
    handler_seconds: Histogram,
    sessions: Family<StateLabels, Gauge>,
    meta_bytes: Gauge,
    resources: ResourceGauges,
}

impl Metrics {
    /// The counters, with gauges for the pooled resources `resources` shows the backend to
    /// have.
    pub(crate) fn new(resources: &BackendResources) -> Self {
        let mut registry = Registry::with_prefix("bitsd");
        let packets = Family::<PacketLabels, Counter>::default();
        registry.register(
            "packets",
            "BITS_POST packets answered, by packet type and status",
            packets.clone(),
        );
        let packet_seconds =
            Family::<PacketKindLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                packet_buckets,
            );
        registry.register(
            "packet_seconds",
            "Time from a BITS_POST request's arrival to its Ack, body read included, by packet \
             type",
            packet_seconds.clone(),
        );
        let errors = Family::<CodeLabels, Counter>::default();
        registry.register(
            "errors",
            "Error Acks sent, by BITS-Error-Code",
            errors.clone(),
        );
        let fragments = Family::<OutcomeLabels, Counter>::default();
        registry.register("fragments", "Fragments, by outcome", fragments.clone());
        let upload_bytes = Counter::default();
        registry.register(
            "upload_bytes_received",
            "Upload bytes stored and acknowledged",
            upload_bytes.clone(),
        );
        let reply_bytes = Counter::default();
        registry.register(
            "reply_bytes_served",
            "Reply bytes handed to clients",
            reply_bytes.clone(),
        );
        let handler_seconds = Histogram::new(exponential_buckets(0.001, 4.0, 10));
        registry.register(
            "reply_handler_seconds",
            "Reply handler latency",
            handler_seconds.clone(),
        );
        let sessions = Family::<StateLabels, Gauge>::default();
        registry.register(
            "sessions",
            "Sessions in the store, by state",
            sessions.clone(),
        );
        let meta_bytes = Gauge::default();
        registry.register(
            "meta_store_bytes",
            "Size of the meta store (sled) on disk",
            meta_bytes.clone(),
        );
        let resources = ResourceGauges::register(&mut registry, resources);
        Metrics {
            registry,
            packets,
            packet_seconds,
            errors,
            fragments,
            upload_bytes,
            reply_bytes,
            handler_seconds,
            sessions,
            meta_bytes,
            resources,
        }
    }

    pub(crate) fn packet(&self, packet: &str, status: u16, error_code: Option<&str>) {
        self.packets
            .get_or_create(&PacketLabels {
                packet: packet.to_owned(),
                status,
            })
            .inc();
        if let Some(code) = error_code {
            self.errors
                .get_or_create(&CodeLabels {
                    code: code.to_owned(),
                })
                .inc();
        }
    }

    /// One `BITS_POST` of type `packet` answered `elapsed` after it arrived.
    pub(crate) fn packet_latency(&self, packet: &'static str, elapsed: Duration) {
        self.packet_seconds
            .get_or_create(&PacketKindLabels { packet })
            .observe(elapsed.as_secs_f64());
    }

    pub(crate) fn fragment(&self, outcome: FragmentOutcome, stored_bytes: u64) {
        let outcome = match outcome {
            FragmentOutcome::Stored => "stored",
            FragmentOutcome::AlreadyHeld => "already_held",
            FragmentOutcome::Gap => "gap",
            FragmentOutcome::Failed => "failed",
        };
        self.fragments
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.upload_bytes.inc_by(stored_bytes);
    }

    pub(crate) fn reply_served(&self, bytes: u64) {
        self.reply_bytes.inc_by(bytes);
    }

    pub(crate) fn handler_latency(&self, elapsed: Duration) {
        self.handler_seconds.observe(elapsed.as_secs_f64());
    }

    /// The text exposition, after setting the gauges from `states`, `meta_bytes` and
    /// `resources`.
    pub(crate) fn render(
        &self,
        states: &[(&'static str, i64)],
        meta_bytes: Option<u64>,
        resources: &BackendResources,
    ) -> String {
        self.resources.set(resources);
        for (state, n) in states {
            self.sessions.get_or_create(&StateLabels { state }).set(*n);
        }
        if let Some(b) = meta_bytes {
            self.meta_bytes.set(i64::try_from(b).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
