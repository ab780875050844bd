//! The test server mode: a fault plan that makes bitsd misbehave on purpose, the way networks,
//! proxies and servers do, so that people who write or test BITS clients can check their
//! client's recovery (`bitsd --fault-plan FILE`, `bitsd --fault SPEC`).
//!
//! A [`FaultPlan`] is a seed and a list of [`FaultRule`]s. Each rule matches one kind of
//! request ([`FaultPacket`]: a `BITS_POST` packet type, or the reply download's `GET` / `HEAD`),
//! optionally only its `nth` occurrence in a session (Ping and Create-Session: overall), a URL
//! path prefix, and a probability drawn from the seeded generator; it fires `times` times
//! (default 1, 0 = every time) and then does one [`FaultAction`]. Rules are tried in order and
//! the first that fires is the only fault of that request.
//!
//! [`FaultInjectingService`] applies a plan around a [`BitsService`](crate::BitsService). It is
//! a hyper `Service` whose error makes hyper close the connection without an answer (the "drop"
//! faults); it also records the [`Transcript`](crate::transcript::Transcript) of every request and answer.
//!
//! Compact form (`--fault`): `PACKET[#NTH]:ACTION[=VALUE][,KEY=VALUE]…`, for example
//! `Fragment#3:drop-after=1000`, `Fragment:too-large=65536,times=0`,
//! `Create-Session#1:status=403,code=0x80070005`, `GET#1:truncate=1000`,
//! `Fragment:lose-ack,p=0.25,times=3`. The TOML form has the same keys:
//!
//! ```toml
//! seed = 42
//!
//! [[rule]]
//! packet = "Fragment"
//! nth = 3
//! action = "drop-after"
//! bytes = 1000
//! ```
//!
//! Determinism: with the same seed and the same sequence of requests the same faults fire.
//! Every rule draws from its own generator, and only when everything else about it matched.
//!
//! Where things are: `plan.rs` holds the plan's types (packets, actions, rules), `parse.rs` the
//! compact and TOML parsers, `service.rs` the injecting service, `firing.rs` which rule fires
//! (seeded draws), `occurrences.rs` the bounded occurrence counters, `facts.rs` what is known of a request before it is
//! served, `actions.rs` what each action does to a request, `cut_request.rs` the request body
//! of `drop-after`, `response_body.rs` the response body of `truncate` and `stall`, and
//! `record.rs` the transcript line of every request.

mod actions;
mod cut_request;
mod facts;
mod firing;
mod occurrences;
mod parse;
mod plan;
mod record;
mod response_body;
mod service;

pub use plan::{FaultAction, FaultPacket, FaultPlan, FaultPlanError, FaultRule};
pub use response_body::FaultResponseBody;
pub use service::{ConnectionDropped, FaultInjectingService};
