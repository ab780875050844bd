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
//! [`FaultInjectingService`] applies a plan around a [`BitsService`]. It is a hyper `Service`
//! whose error makes hyper close the connection without an answer (the "drop" faults); it also
//! records the [`Transcript`] of every request and answer.
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

use crate::config::line_col;
use crate::packets::discard_unread;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bitsd_protocol::{
    header, Ack, BitsError, ContentRange, ErrorContext, HResult, PacketType, SessionId,
};
use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use serde::Deserialize;
use toml::Spanned;

use crate::body::ResponseBody;
use crate::config::ConfigError;
use crate::service::BoxError;
use crate::transcript::{header_map, rfc3339, Transcript, TranscriptEntry};
use crate::BitsService;

/// How long a truncated answer waits, after its last byte went out, before the connection is
/// closed: enough for the connection to flush those bytes to the client.
const CUT_FLUSH_DELAY: Duration = Duration::from_millis(100);

/// What a fault rule matches: a `BITS_POST` packet type or a reply download request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultPacket {
    /// `Ping`.
    Ping,
    /// `Create-Session` (its `nth` counts over the whole server).
    CreateSession,
    /// `Fragment`.
    Fragment,
    /// `Close-Session`.
    CloseSession,
    /// `Cancel-Session`.
    CancelSession,
    /// `GET` of a reply URL (any `GET` on an upload route).
    Get,
    /// `HEAD` of a reply URL.
    Head,
}

impl FaultPacket {
    /// The name used in plans and transcripts.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultPacket::Ping => "Ping",
            FaultPacket::CreateSession => "Create-Session",
            FaultPacket::Fragment => "Fragment",
            FaultPacket::CloseSession => "Close-Session",
            FaultPacket::CancelSession => "Cancel-Session",
            FaultPacket::Get => "GET",
            FaultPacket::Head => "HEAD",
        }
    }

    /// Whether occurrences are counted per session (all but Ping and Create-Session).
    fn per_session(self) -> bool {
        !matches!(self, FaultPacket::Ping | FaultPacket::CreateSession)
    }

    fn of_packet_type(t: PacketType) -> Self {
        match t {
            PacketType::Ping => FaultPacket::Ping,
            PacketType::CreateSession => FaultPacket::CreateSession,
            PacketType::Fragment => FaultPacket::Fragment,
            PacketType::CloseSession => FaultPacket::CloseSession,
            PacketType::CancelSession => FaultPacket::CancelSession,
        }
    }
}

impl fmt::Display for FaultPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FaultPacket {
    type Err = String;

    /// Case-insensitive; `GET` and `HEAD` may also be written `Reply-GET` / `Reply-HEAD`.
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let t = t
            .strip_prefix("reply-")
            .or_else(|| t.strip_prefix("Reply-"))
            .or_else(|| t.strip_prefix("REPLY-"))
            .unwrap_or(t);
        [
            FaultPacket::Ping,
            FaultPacket::CreateSession,
            FaultPacket::Fragment,
            FaultPacket::CloseSession,
            FaultPacket::CancelSession,
            FaultPacket::Get,
            FaultPacket::Head,
        ]
        .into_iter()
        .find(|p| p.as_str().eq_ignore_ascii_case(t))
        .ok_or_else(|| {
            format!(
                "unknown packet {s:?} (Ping, Create-Session, Fragment, Close-Session, \
                 Cancel-Session, GET, HEAD)"
            )
        })
    }
}

/// What a fault does to the request it fires on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// `drop`: close the connection without processing or answering the request.
    Drop,
    /// `drop-after=BYTES` (Fragment): let the server read only the first `bytes` of the
    /// fragment's body, then close the connection; nothing is acknowledged.
    DropAfter {
        /// Body bytes the server reads.
        bytes: u64,
    },
    /// `lose-ack`: process the request normally (the fragment is stored, the session created
    /// or closed), then close the connection instead of sending the answer.
    LoseAck,
    /// `status=S[,code=0x…][,context=0x5|0x7]`: answer with status `S` without processing.
    /// A `BITS_POST` gets an Ack with `BITS-Error-Code` (default `0x80190000 + S`,
    /// `code=none` for no BITS error headers) and `BITS-Error-Context` (default `0x5`);
    /// a reply download gets a plain HTTP answer.
    Status {
        /// The HTTP status.
        status: u16,
        /// `BITS-Error-Code` (`None`: no BITS error headers).
        code: Option<HResult>,
        /// `BITS-Error-Context`.
        context: ErrorContext,
    },
    /// `too-large=ABOVE` (Fragment): fragments longer than `above` bytes get 413
    /// `BG_E_TOO_LARGE`; the client must send smaller ones.
    TooLarge {
        /// The largest fragment that passes.
        above: u64,
    },
    /// `resync=OFFSET` (Fragment): answer 416 with `BITS-Received-Content-Range: OFFSET`
    /// (`BITS-Error-Code: 0x0`) without storing anything; the client must continue there.
    /// It does not fire on a fragment that starts at `OFFSET` (that 416 would contradict
    /// itself).
    Resync {
        /// The offset the client is told to continue from.
        offset: u64,
    },
    /// `forget-session` (Fragment, Close-Session, Cancel-Session): purge the session, answer
    /// 500 `BG_E_SESSION_NOT_FOUND`; the client must start over with Create-Session.
    ForgetSession,
    /// `delay-ack=MS`: process the request, then hold the answer back for `ms` milliseconds.
    DelayAck {
        /// The delay.
        ms: u64,
    },
    /// `fail-handler=S` (the Fragment that completes the upload): the fragment is stored and
    /// processed, but the Ack says the reply handler failed with status `S` (§9.5): status
    /// `S`, `0x80190000 + S`, context `0x7`, `BITS-Received-Content-Range` = the total, no
    /// `BITS-Reply-URL`. (413 becomes 500, as a real handler's would.)
    FailHandler {
        /// The handler's status.
        status: u16,
    },
    /// `truncate=BYTES` (GET): send only the first `bytes` of the reply body, then close the
    /// connection.
    Truncate {
        /// Body bytes sent.
        bytes: u64,
    },
    /// `stall=MS[,after=BYTES]` (GET): send `after` bytes of the body (default 0), then nothing
    /// for `ms` milliseconds, then the rest.
    Stall {
        /// The pause.
        ms: u64,
        /// Body bytes sent before it.
        after: u64,
    },
    /// `expire-session` (Fragment, Close-Session, Cancel-Session, GET, HEAD): remove the
    /// session exactly as the session timeout would (data, reply, tombstone), then let the
    /// server answer the request, which now finds no session (500 `BG_E_SESSION_NOT_FOUND`,
    /// or 404 for the reply).
    ExpireSession,
}

impl FaultAction {
    /// The action's name in plans and transcripts.
    pub fn kind(&self) -> &'static str {
        match self {
            FaultAction::Drop => "drop",
            FaultAction::DropAfter { .. } => "drop-after",
            FaultAction::LoseAck => "lose-ack",
            FaultAction::Status { .. } => "status",
            FaultAction::TooLarge { .. } => "too-large",
            FaultAction::Resync { .. } => "resync",
            FaultAction::ForgetSession => "forget-session",
            FaultAction::DelayAck { .. } => "delay-ack",
            FaultAction::FailHandler { .. } => "fail-handler",
            FaultAction::Truncate { .. } => "truncate",
            FaultAction::Stall { .. } => "stall",
            FaultAction::ExpireSession => "expire-session",
        }
    }

    /// The packets this action can apply to.
    pub fn applies_to(&self, packet: FaultPacket) -> bool {
        use FaultPacket as P;
        match self {
            FaultAction::Drop
            | FaultAction::LoseAck
            | FaultAction::Status { .. }
            | FaultAction::DelayAck { .. } => true,
            FaultAction::DropAfter { .. }
            | FaultAction::TooLarge { .. }
            | FaultAction::Resync { .. }
            | FaultAction::FailHandler { .. } => packet == P::Fragment,
            FaultAction::ForgetSession => {
                matches!(packet, P::Fragment | P::CloseSession | P::CancelSession)
            }
            FaultAction::ExpireSession => matches!(
                packet,
                P::Fragment | P::CloseSession | P::CancelSession | P::Get | P::Head
            ),
            FaultAction::Truncate { .. } | FaultAction::Stall { .. } => packet == P::Get,
        }
    }

    fn packets_text(&self) -> &'static str {
        match self {
            FaultAction::Drop
            | FaultAction::LoseAck
            | FaultAction::Status { .. }
            | FaultAction::DelayAck { .. } => "any packet",
            FaultAction::DropAfter { .. }
            | FaultAction::TooLarge { .. }
            | FaultAction::Resync { .. }
            | FaultAction::FailHandler { .. } => "Fragment",
            FaultAction::ForgetSession => "Fragment, Close-Session, Cancel-Session",
            FaultAction::ExpireSession => "Fragment, Close-Session, Cancel-Session, GET, HEAD",
            FaultAction::Truncate { .. } | FaultAction::Stall { .. } => "GET",
        }
    }
}

/// The parameter `ACTION=VALUE` sets in the compact form.
fn primary_param(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "drop-after" | "truncate" => "bytes",
        "delay-ack" | "stall" => "ms",
        "status" | "fail-handler" => "status",
        "too-large" => "above",
        "resync" => "offset",
        _ => return None,
    })
}

/// The parameters an action takes.
fn params_of(kind: &str) -> &'static [&'static str] {
    match kind {
        "drop-after" | "truncate" => &["bytes"],
        "delay-ack" => &["ms"],
        "stall" => &["ms", "after"],
        "status" => &["status", "code", "context"],
        "fail-handler" => &["status"],
        "too-large" => &["above"],
        "resync" => &["offset"],
        _ => &[],
    }
}

/// One rule of a fault plan.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultRule {
    /// The request kind it matches.
    pub packet: FaultPacket,
    /// Only the nth such request (from 1) of a session; of the whole server for Ping and
    /// Create-Session. `None`: every one.
    pub nth: Option<u64>,
    /// Fire only with this probability (drawn from the plan's seeded generator).
    pub probability: Option<f64>,
    /// How many times it fires at most; 0: no limit.
    pub times: u32,
    /// Only requests whose URL path starts with this.
    pub path: Option<String>,
    /// A label for logs and transcripts (default: the rule in compact form).
    pub name: Option<String>,
    /// What it does.
    pub action: FaultAction,
}

impl FaultRule {
    /// A rule firing once on the first matching request.
    pub fn new(packet: FaultPacket, action: FaultAction) -> Self {
        FaultRule {
            packet,
            nth: None,
            probability: None,
            times: 1,
            path: None,
            name: None,
            action,
        }
    }

    /// Only the nth occurrence (from 1).
    pub fn nth(mut self, n: u64) -> Self {
        self.nth = Some(n);
        self
    }

    /// Fires at most `times` times (0: no limit).
    pub fn times(mut self, times: u32) -> Self {
        self.times = times;
        self
    }

    /// Fires with this probability.
    pub fn probability(mut self, p: f64) -> Self {
        self.probability = Some(p);
        self
    }

    /// Checks that the parts fit together.
    pub fn validate(&self) -> Result<(), String> {
        if self.nth == Some(0) {
            return Err("nth counts from 1".into());
        }
        if let Some(p) = self.probability {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("probability must be between 0 and 1, not {p}"));
            }
        }
        if !self.action.applies_to(self.packet) {
            return Err(format!(
                "{} does not apply to {} (only to {})",
                self.action.kind(),
                self.packet,
                self.action.packets_text()
            ));
        }
        match &self.action {
            FaultAction::Status {
                status,
                code,
                context,
            } => {
                if !(300..=599).contains(status) {
                    return Err(format!("status must be 300..=599, not {status}"));
                }
                let download = matches!(self.packet, FaultPacket::Get | FaultPacket::Head);
                let bits_headers = (code.is_some() && *code != Some(HResult::http_error(*status)))
                    || *context != ErrorContext::Server;
                if download && bits_headers {
                    return Err(
                        "code and context apply to BITS packets; a reply download gets a plain HTTP status"
                            .into(),
                    );
                }
            }
            FaultAction::FailHandler { status } if !(300..=599).contains(status) => {
                return Err(format!(
                    "fail-handler status must be 300..=599, not {status}"
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// The label used in logs and transcripts.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.to_string())
    }
}

impl fmt::Display for FaultRule {
    /// The compact form, e.g. `Fragment#3:drop-after=1000` (parses back to the same rule).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.packet)?;
        if let Some(n) = self.nth {
            write!(f, "#{n}")?;
        }
        write!(f, ":{}", self.action.kind())?;
        match &self.action {
            FaultAction::Drop
            | FaultAction::LoseAck
            | FaultAction::ForgetSession
            | FaultAction::ExpireSession => {}
            FaultAction::DropAfter { bytes } | FaultAction::Truncate { bytes } => {
                write!(f, "={bytes}")?
            }
            FaultAction::Status {
                status,
                code,
                context,
            } => {
                write!(f, "={status}")?;
                match code {
                    None => write!(f, ",code=none")?,
                    Some(c) if *c != HResult::http_error(*status) => write!(f, ",code={c}")?,
                    Some(_) => {}
                }
                if *context != ErrorContext::Server {
                    write!(f, ",context={}", context.as_str())?;
                }
            }
            FaultAction::TooLarge { above } => write!(f, "={above}")?,
            FaultAction::Resync { offset } => write!(f, "={offset}")?,
            FaultAction::DelayAck { ms } => write!(f, "={ms}")?,
            FaultAction::FailHandler { status } => write!(f, "={status}")?,
            FaultAction::Stall { ms, after } => {
                write!(f, "={ms}")?;
                if *after != 0 {
                    write!(f, ",after={after}")?;
                }
            }
        }
        if let Some(p) = self.probability {
            write!(f, ",p={p}")?;
        }
        if self.times != 1 {
            write!(f, ",times={}", self.times)?;
        }
        if let Some(path) = &self.path {
            write!(f, ",path={path}")?;
        }
        if let Some(name) = &self.name {
            write!(f, ",name={name}")?;
        }
        Ok(())
    }
}

impl FromStr for FaultRule {
    type Err = String;

    /// Parses the compact form `PACKET[#NTH]:ACTION[=VALUE][,KEY=VALUE]…`.
    fn from_str(s: &str) -> Result<Self, String> {
        let usage =
            "expected PACKET[#NTH]:ACTION[=VALUE][,KEY=VALUE]..., e.g. Fragment#3:drop-after=1000";
        let (head, rest) = s.split_once(':').ok_or_else(|| usage.to_owned())?;
        let mut spec = RuleSpec::default();
        match head.split_once('#') {
            Some((packet, nth)) => {
                spec.packet = packet.to_owned();
                spec.set("nth", nth)?;
            }
            None => spec.packet = head.to_owned(),
        }
        let mut items = rest.split(',');
        let first = items.next().unwrap_or("").trim();
        let (action, value) = match first.split_once('=') {
            Some((a, v)) => (a.trim(), Some(v.trim())),
            None => (first, None),
        };
        if action.is_empty() {
            return Err(usage.to_owned());
        }
        spec.action = action.to_owned();
        if let Some(v) = value {
            let key = primary_param(&action.to_ascii_lowercase())
                .ok_or_else(|| format!("{action} takes no value"))?;
            spec.set(key, v)?;
        }
        for item in items {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?}: expected KEY=VALUE"))?;
            spec.set(k.trim(), v.trim())?;
        }
        spec.into_rule()
    }
}

/// A rule as written (TOML table or compact form), before it is checked.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: Option<String>,
    #[serde(default)]
    packet: String,
    nth: Option<u64>,
    probability: Option<f64>,
    times: Option<u32>,
    path: Option<String>,
    #[serde(default)]
    action: String,
    bytes: Option<u64>,
    ms: Option<u64>,
    status: Option<u16>,
    code: Option<String>,
    context: Option<String>,
    above: Option<u64>,
    offset: Option<u64>,
    after: Option<u64>,
}

fn number<T: FromStr>(key: &str, v: &str) -> Result<T, String> {
    v.trim()
        .replace('_', "")
        .parse()
        .map_err(|_| format!("{key}: not a number: {v:?}"))
}

fn parse_code(v: &str) -> Result<Option<HResult>, String> {
    let t = v.trim();
    if t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let digits = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    u32::from_str_radix(digits, 16)
        .map(|c| Some(HResult(c)))
        .map_err(|_| format!("code: expected a hex HRESULT like 0x80070005, or none: {v:?}"))
}

fn parse_context(v: &str) -> Result<ErrorContext, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "0x5" | "5" | "server" | "remote-file" => Ok(ErrorContext::Server),
        "0x7" | "7" | "application" | "remote-application" => Ok(ErrorContext::ServerApplication),
        _ => Err(format!("context: expected 0x5 or 0x7: {v:?}")),
    }
}

impl RuleSpec {
    fn set(&mut self, key: &str, v: &str) -> Result<(), String> {
        match key.to_ascii_lowercase().as_str() {
            "name" => self.name = Some(v.to_owned()),
            "nth" => self.nth = Some(number(key, v)?),
            "p" | "probability" => self.probability = Some(number(key, v)?),
            "times" => self.times = Some(number(key, v)?),
            "path" => self.path = Some(v.to_owned()),
            "bytes" => self.bytes = Some(number(key, v)?),
            "ms" => self.ms = Some(number(key, v)?),
            "status" => self.status = Some(number(key, v)?),
            "code" => self.code = Some(v.to_owned()),
            "context" => self.context = Some(v.to_owned()),
            "above" => self.above = Some(number(key, v)?),
            "offset" => self.offset = Some(number(key, v)?),
            "after" => self.after = Some(number(key, v)?),
            _ => return Err(format!("unknown key {key:?}")),
        }
        Ok(())
    }

    fn into_rule(self) -> Result<FaultRule, String> {
        let packet: FaultPacket = self.packet.parse()?;
        let kind = self.action.trim().to_ascii_lowercase();
        let need = |name: &str, v: Option<u64>| {
            v.ok_or_else(|| format!("{kind} needs {name} (e.g. {kind}={name}_value)"))
        };
        let action = match kind.as_str() {
            "drop" => FaultAction::Drop,
            "drop-after" => FaultAction::DropAfter {
                bytes: need("bytes", self.bytes)?,
            },
            "lose-ack" => FaultAction::LoseAck,
            "status" => {
                let status = self
                    .status
                    .ok_or_else(|| "status needs a status (status=503)".to_owned())?;
                let code = match &self.code {
                    Some(c) => parse_code(c)?,
                    None => Some(HResult::http_error(status)),
                };
                let context = match &self.context {
                    Some(c) => parse_context(c)?,
                    None => ErrorContext::Server,
                };
                if code.is_none() && self.context.is_some() {
                    return Err("context needs a code (code=none sends neither)".into());
                }
                FaultAction::Status {
                    status,
                    code,
                    context,
                }
            }
            "too-large" => FaultAction::TooLarge {
                above: need("above", self.above)?,
            },
            "resync" => FaultAction::Resync {
                offset: need("offset", self.offset)?,
            },
            "forget-session" => FaultAction::ForgetSession,
            "delay-ack" => FaultAction::DelayAck {
                ms: need("ms", self.ms)?,
            },
            "fail-handler" => FaultAction::FailHandler {
                status: self
                    .status
                    .ok_or_else(|| "fail-handler needs a status (fail-handler=503)".to_owned())?,
            },
            "truncate" => FaultAction::Truncate {
                bytes: need("bytes", self.bytes)?,
            },
            "stall" => FaultAction::Stall {
                ms: need("ms", self.ms)?,
                after: self.after.unwrap_or(0),
            },
            "expire-session" => FaultAction::ExpireSession,
            "" => return Err("a rule needs an action".into()),
            other => {
                return Err(format!(
                    "unknown action {other:?} (drop, drop-after, lose-ack, status, too-large, \
                     resync, forget-session, delay-ack, fail-handler, truncate, stall, expire-session)"
                ))
            }
        };
        let given = [
            ("bytes", self.bytes.is_some()),
            ("ms", self.ms.is_some()),
            ("status", self.status.is_some()),
            ("code", self.code.is_some()),
            ("context", self.context.is_some()),
            ("above", self.above.is_some()),
            ("offset", self.offset.is_some()),
            ("after", self.after.is_some()),
        ];
        let allowed = params_of(&kind);
        if let Some((name, _)) = given
            .iter()
            .find(|(name, present)| *present && !allowed.contains(name))
        {
            return Err(format!("{name} does not apply to {kind}"));
        }
        let rule = FaultRule {
            packet,
            nth: self.nth,
            probability: self.probability,
            times: self.times.unwrap_or(1),
            path: self.path,
            name: self.name,
            action,
        };
        rule.validate()?;
        Ok(rule)
    }
}

/// A seeded list of fault rules.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultPlan {
    /// Seed of the probability draws.
    pub seed: u64,
    /// The rules, tried in order; the first that fires is the request's only fault.
    pub rules: Vec<FaultRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    seed: Option<u64>,
    #[serde(default, rename = "rule")]
    rules: Vec<Spanned<RuleSpec>>,
}

impl FaultPlan {
    /// An empty plan with this seed.
    pub fn new(seed: u64) -> Self {
        FaultPlan {
            seed,
            rules: Vec::new(),
        }
    }

    /// Adds a rule.
    pub fn rule(mut self, rule: FaultRule) -> Self {
        self.rules.push(rule);
        self
    }

    /// A plan from compact rules (`--fault` syntax).
    pub fn from_specs(seed: u64, specs: &[&str]) -> Result<Self, String> {
        let mut plan = FaultPlan::new(seed);
        for s in specs {
            plan.rules
                .push(s.parse().map_err(|e| format!("fault {s:?}: {e}"))?);
        }
        Ok(plan)
    }

    /// Parses a plan file's text; `name` is used in errors, which name the line.
    pub fn parse(text: &str, name: &str) -> Result<Self, ConfigError> {
        let error = |offset: Option<usize>, message: String| {
            let (line, column) = offset.map_or((0, 0), |o| line_col(text, o));
            ConfigError {
                file: name.to_owned(),
                line,
                column,
                message,
            }
        };
        let file: PlanFile = toml::from_str(text)
            .map_err(|e| error(e.span().map(|s| s.start), e.message().trim().to_owned()))?;
        let mut plan = FaultPlan::new(file.seed.unwrap_or(0));
        for spanned in file.rules {
            let offset = spanned.span().start;
            let rule = spanned
                .into_inner()
                .into_rule()
                .map_err(|m| error(Some(offset), format!("[[rule]]: {m}")))?;
            plan.rules.push(rule);
        }
        Ok(plan)
    }

    /// Reads and parses a plan file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            message: format!("cannot read the fault plan: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Whether it has no rule.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Checks every rule.
    pub fn validate(&self) -> Result<(), String> {
        for (i, r) in self.rules.iter().enumerate() {
            r.validate()
                .map_err(|e| format!("fault rule {} ({r}): {e}", i + 1))?;
        }
        Ok(())
    }
}

/// SplitMix64: small, fast and good enough for fault probabilities; one stream per rule.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug)]
struct RuleState {
    fired: u32,
    rng: SplitMix64,
}

/// Occurrence counters and rule state, behind one lock.
#[derive(Debug)]
struct PlanState {
    counts: HashMap<(FaultPacket, Option<String>), u64>,
    rules: Vec<RuleState>,
}

/// A fault that fired.
#[derive(Clone, Debug)]
struct Fired {
    label: String,
    action: FaultAction,
}

/// The error of a request whose fault closes the connection: hyper drops the connection
/// without an answer.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by fault rule {rule}")]
pub struct ConnectionDropped {
    /// The rule that fired.
    pub rule: String,
}

/// A fault plan that does not fit together.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FaultPlanError(pub String);

/// What the fault layer knows about a request before it is served.
struct Facts {
    seq: u64,
    arrived: Instant,
    time_ms: u64,
    method: String,
    path_and_query: String,
    path: String,
    packet: Option<FaultPacket>,
    label: String,
    session_text: Option<String>,
    session_key: Option<String>,
    session_id: Option<SessionId>,
    raw_session: Option<HeaderValue>,
    range_text: Option<String>,
    fragment: Option<ContentRange>,
    headers: Option<std::collections::BTreeMap<String, String>>,
}

/// The session named by a reply URL path (`…/BITS-Sessions/{id}/response`).
fn reply_session(path: &str) -> Option<&str> {
    let rest = &path[path.find("/BITS-Sessions/")? + "/BITS-Sessions/".len()..];
    rest.strip_suffix("/response")
}

impl Facts {
    fn of<B>(req: &Request<B>, seq: u64, with_headers: bool) -> Self {
        let method = req.method().clone();
        let headers = req.headers();
        let path = req.uri().path().to_owned();
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or_else(|| path.clone(), |p| p.as_str().to_owned());
        let text = |name: &http::HeaderName| {
            headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let raw_session = headers.get(header::BITS_SESSION_ID).cloned();
        let (packet, label, session_text) = if method.as_str() == "BITS_POST" {
            let packet = text(&header::BITS_PACKET_TYPE)
                .and_then(|t| t.parse::<PacketType>().ok())
                .map(FaultPacket::of_packet_type);
            let label = packet.map_or("invalid".to_owned(), |p| p.as_str().to_owned());
            (packet, label, text(&header::BITS_SESSION_ID))
        } else if method == Method::GET || method == Method::HEAD {
            let packet = if method == Method::GET {
                FaultPacket::Get
            } else {
                FaultPacket::Head
            };
            let session = reply_session(&path).map(|s| {
                s.parse::<SessionId>()
                    .map_or_else(|_| s.to_owned(), |id| id.to_string())
            });
            (Some(packet), packet.as_str().to_owned(), session)
        } else {
            (None, method.as_str().to_owned(), None)
        };
        let session_id = session_text
            .as_deref()
            .and_then(|s| s.parse::<SessionId>().ok());
        let session_key = match packet {
            Some(p) if p.per_session() => Some(
                session_id
                    .map(|id| id.to_string())
                    .or_else(|| session_text.clone())
                    .unwrap_or_default(),
            ),
            _ => None,
        };
        let (range_text, fragment) = match packet {
            Some(FaultPacket::Fragment) => {
                let r = text(&http::header::CONTENT_RANGE);
                let parsed = r.as_deref().and_then(|v| v.parse::<ContentRange>().ok());
                (r, parsed)
            }
            Some(FaultPacket::Get | FaultPacket::Head) => (text(&http::header::RANGE), None),
            _ => (None, None),
        };
        Facts {
            seq,
            arrived: Instant::now(),
            time_ms: now_ms(),
            method: method.as_str().to_owned(),
            path_and_query,
            path,
            packet,
            label,
            session_text,
            session_key,
            session_id,
            raw_session,
            range_text,
            fragment,
            headers: with_headers.then(|| header_map(headers, true)),
        }
    }
}

/// A [`BitsService`] with a fault plan applied and, optionally, a transcript recorded. Cheap to
/// clone; every clone shares the plan's counters and the transcript.
#[derive(Clone)]
pub struct FaultInjectingService {
    inner: BitsService,
    plan: Arc<FaultPlan>,
    state: Arc<Mutex<PlanState>>,
    transcript: Option<Transcript>,
}

impl fmt::Debug for FaultInjectingService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultInjectingService")
            .field("plan", &self.plan)
            .field("transcript", &self.transcript)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl FaultInjectingService {
    /// Wraps `inner` with `plan` (checked here), recording into `transcript` if given.
    pub fn new(
        inner: BitsService,
        plan: FaultPlan,
        transcript: Option<Transcript>,
    ) -> Result<Self, FaultPlanError> {
        plan.validate().map_err(FaultPlanError)?;
        let rules = (0..plan.rules.len() as u64)
            .map(|i| RuleState {
                fired: 0,
                rng: SplitMix64(plan.seed ^ (i + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)),
            })
            .collect();
        Ok(FaultInjectingService {
            inner,
            plan: Arc::new(plan),
            state: Arc::new(Mutex::new(PlanState {
                counts: HashMap::new(),
                rules,
            })),
            transcript,
        })
    }

    /// The wrapped service.
    pub fn inner(&self) -> &BitsService {
        &self.inner
    }

    /// The plan.
    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    /// The transcript, if one is recorded.
    pub fn transcript(&self) -> Option<&Transcript> {
        self.transcript.as_ref()
    }

    /// How many times each rule has fired so far, in plan order.
    pub fn fired(&self) -> Vec<u32> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.rules.iter().map(|r| r.fired).collect()
    }

    /// Counts the request and picks the fault that fires on it, if any.
    fn decide(&self, facts: &Facts) -> Option<Fired> {
        let packet = facts.packet?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let n = {
            let c = st
                .counts
                .entry((packet, facts.session_key.clone()))
                .or_insert(0);
            *c += 1;
            *c
        };
        for (i, rule) in self.plan.rules.iter().enumerate() {
            if rule.packet != packet
                || rule.nth.is_some_and(|nth| nth != n)
                || rule
                    .path
                    .as_deref()
                    .is_some_and(|p| !facts.path.starts_with(p))
            {
                continue;
            }
            match (&rule.action, facts.fragment) {
                (FaultAction::TooLarge { above }, Some(r)) if r.len <= *above => continue,
                (FaultAction::TooLarge { .. }, None) => continue,
                (FaultAction::FailHandler { .. }, Some(r)) if !r.is_final() => continue,
                (FaultAction::FailHandler { .. }, None) => continue,
                // A 416 naming the very offset the fragment starts at would contradict itself.
                (FaultAction::Resync { offset }, Some(r)) if r.first == *offset => continue,
                _ => {}
            }
            let state = &mut st.rules[i];
            if rule.times != 0 && state.fired >= rule.times {
                continue;
            }
            if let Some(p) = rule.probability {
                if state.rng.next_f64() >= p {
                    continue;
                }
            }
            state.fired += 1;
            return Some(Fired {
                label: rule.label(),
                action: rule.action.clone(),
            });
        }
        None
    }

    /// Serves one request with the plan applied.
    pub async fn handle<B>(
        &self,
        req: Request<B>,
    ) -> Result<Response<FaultResponseBody>, ConnectionDropped>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let seq = self.transcript.as_ref().map_or(0, Transcript::next_seq);
        let facts = Facts::of(&req, seq, self.transcript.is_some());
        let fired = self.decide(&facts);
        // Records the request when it is answered, or, if hyper drops this future because the
        // client went away first, when it is dropped.
        let mut rec = Recorder {
            svc: self.clone(),
            facts,
            fired: fired.clone(),
            produced: None,
            armed: true,
        };
        let Some(fired) = fired else {
            let res = self.inner.handle(req).await;
            return Ok(rec.answer(res, None));
        };
        tracing::info!(
            fault = %fired.label,
            packet = %rec.facts.label,
            session = rec.facts.session_text.as_deref().unwrap_or(""),
            "fault injected"
        );
        let dropped = || ConnectionDropped {
            rule: fired.label.clone(),
        };
        match fired.action.clone() {
            FaultAction::Drop => {
                drop(req);
                rec.finish(
                    None,
                    false,
                    "connection closed without processing or answering the request".into(),
                );
                Err(dropped())
            }
            FaultAction::DropAfter { bytes } => {
                let cut = Arc::new(AtomicBool::new(false));
                let req = req.map(|b| CutBody::new(b, bytes, cut.clone()));
                let res = self.inner.handle(req).await;
                if cut.load(Ordering::SeqCst) {
                    rec.finish(
                        None,
                        false,
                        format!(
                            "request body cut after {bytes} bytes and the connection closed; nothing acknowledged"
                        ),
                    );
                } else {
                    rec.finish(
                        Some(head(&res)),
                        false,
                        format!(
                            "the body was not longer than {bytes} bytes: processed, then the connection closed without the answer"
                        ),
                    );
                }
                Err(dropped())
            }
            FaultAction::LoseAck => {
                let res = self.inner.handle(req).await;
                rec.finish(
                    Some(head(&res)),
                    false,
                    "processed; the connection closed instead of sending this answer".into(),
                );
                Err(dropped())
            }
            FaultAction::Status {
                status,
                code,
                context,
            } => {
                discard_unread(req.into_body()).await;
                let status_code =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let res = if matches!(rec.facts.packet, Some(FaultPacket::Get | FaultPacket::Head))
                {
                    empty_response(status_code)
                } else {
                    let ack = match code {
                        Some(code) => {
                            Ack::error(&BitsError::new(status_code, code, context, "injected"))
                        }
                        None => Ack::with_status(status_code),
                    };
                    echo(ack, &rec.facts).into_response()
                };
                Ok(rec.answer(res, Some("answered without processing the request".into())))
            }
            FaultAction::TooLarge { above } => {
                discard_unread(req.into_body()).await;
                let len = rec.facts.fragment.map_or(0, |r| r.len);
                let ack = Ack::error(&BitsError::fragment_too_large(len, above));
                let res = echo(ack, &rec.facts).into_response();
                Ok(rec.answer(
                    res,
                    Some(format!(
                        "fragment of {len} bytes refused (above {above}); nothing stored"
                    )),
                ))
            }
            FaultAction::Resync { offset } => {
                discard_unread(req.into_body()).await;
                let ack = Ack::with_status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::BITS_ERROR_CODE, HeaderValue::from_static("0x0"))
                    .header(header::BITS_ERROR_CONTEXT, HeaderValue::from_static("0x5"))
                    .received(offset);
                let res = echo(ack, &rec.facts).into_response();
                Ok(rec.answer(
                    res,
                    Some(format!(
                        "416 asking the client to continue at {offset}; nothing stored"
                    )),
                ))
            }
            FaultAction::ForgetSession => {
                discard_unread(req.into_body()).await;
                let removed = self.remove(&rec.facts).await;
                let ack = Ack::error(&BitsError::session_not_found());
                let res = echo(ack, &rec.facts).into_response();
                let detail = if removed {
                    "session purged; answered session-not-found"
                } else {
                    "no such session to purge; answered session-not-found"
                };
                Ok(rec.answer(res, Some(detail.into())))
            }
            FaultAction::DelayAck { ms } => {
                let res = self.inner.handle(req).await;
                rec.produced = Some((res.status(), res.headers().clone()));
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(rec.answer(res, Some(format!("processed; answer held back {ms} ms"))))
            }
            FaultAction::FailHandler { status } => {
                let res = self.inner.handle(req).await;
                if !res.status().is_success() {
                    return Ok(rec.answer(
                        res,
                        Some(
                            "the server's own answer was not a success; passed through unchanged"
                                .into(),
                        ),
                    ));
                }
                let total = rec.facts.fragment.map_or(0, |r| r.total);
                let ack = Ack::error(&BitsError::backend_status(status)).received(total);
                let res = echo(ack, &rec.facts).into_response();
                Ok(rec.answer(
                    res,
                    Some(format!(
                        "fragment stored; the Ack reports a reply handler failure with status {status}"
                    )),
                ))
            }
            FaultAction::Truncate { bytes } => {
                let res = self.inner.handle(req).await;
                rec.finish(
                    Some(head(&res)),
                    true,
                    format!("body cut after {bytes} bytes, then the connection closed"),
                );
                Ok(res.map(|b| FaultResponseBody::truncate(b, bytes)))
            }
            FaultAction::Stall { ms, after } => {
                let res = self.inner.handle(req).await;
                rec.finish(
                    Some(head(&res)),
                    true,
                    format!("body paused for {ms} ms after {after} bytes"),
                );
                Ok(res.map(|b| FaultResponseBody::stall(b, after, Duration::from_millis(ms))))
            }
            FaultAction::ExpireSession => {
                let removed = self.remove(&rec.facts).await;
                let res = self.inner.handle(req).await;
                let detail = if removed {
                    "session removed as by the session timeout, then the request was served"
                } else {
                    "no such session to remove; the request was served"
                };
                Ok(rec.answer(res, Some(detail.into())))
            }
        }
    }

    /// Removes the request's session (purged like the session timeout does).
    async fn remove(&self, facts: &Facts) -> bool {
        let Some(id) = facts.session_id else {
            return false;
        };
        match self.inner.remove_session(&id).await {
            Ok(removed) => removed,
            Err(e) => {
                tracing::error!(error = %e, session = %id, "fault: removing the session failed");
                false
            }
        }
    }

    fn record(
        &self,
        facts: &Facts,
        res: Option<(StatusCode, &HeaderMap)>,
        fired: Option<&Fired>,
        answered: bool,
        detail: Option<String>,
    ) {
        let Some(transcript) = &self.transcript else {
            return;
        };
        let get = |name: &http::HeaderName| {
            res.and_then(|(_, h)| h.get(name))
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let session = facts.session_text.clone().or_else(|| {
            (facts.packet == Some(FaultPacket::CreateSession))
                .then(|| get(&header::BITS_SESSION_ID))
                .flatten()
        });
        let entry = TranscriptEntry {
            seq: facts.seq,
            time: rfc3339(facts.time_ms),
            time_ms: facts.time_ms,
            elapsed_ms: u64::try_from(facts.arrived.elapsed().as_millis()).unwrap_or(u64::MAX),
            method: facts.method.clone(),
            path: facts.path_and_query.clone(),
            packet: facts.label.clone(),
            session,
            request_headers: facts.headers.clone().unwrap_or_default(),
            range: facts.range_text.clone(),
            status: res.map(|(s, _)| s.as_u16()),
            error_code: get(&header::BITS_ERROR_CODE),
            error_context: get(&header::BITS_ERROR_CONTEXT),
            received: get(&header::BITS_RECEIVED_CONTENT_RANGE).and_then(|v| v.trim().parse().ok()),
            reply_url: get(&header::BITS_REPLY_URL),
            response_headers: res.map(|(_, h)| header_map(h, false)).unwrap_or_default(),
            fault: fired.map(|f| f.action.kind().to_owned()),
            rule: fired.map(|f| f.label.clone()),
            answered,
            detail,
        };
        transcript.record(&entry);
    }
}

/// Writes a request's transcript line exactly once: when it is answered, or when hyper drops
/// the request's future because the client went away first.
struct Recorder {
    svc: FaultInjectingService,
    facts: Facts,
    fired: Option<Fired>,
    /// The answer the server produced but has not sent yet (`delay-ack`).
    produced: Option<(StatusCode, HeaderMap)>,
    armed: bool,
}

impl Recorder {
    fn finish(&mut self, res: Option<(StatusCode, &HeaderMap)>, answered: bool, detail: String) {
        self.armed = false;
        self.svc.record(
            &self.facts,
            res,
            self.fired.as_ref(),
            answered,
            Some(detail),
        );
    }

    /// Records an answer that goes out whole and hands it to hyper.
    fn answer(
        &mut self,
        res: Response<ResponseBody>,
        detail: Option<String>,
    ) -> Response<FaultResponseBody> {
        self.armed = false;
        self.svc.record(
            &self.facts,
            Some(head(&res)),
            self.fired.as_ref(),
            true,
            detail,
        );
        res.map(FaultResponseBody::pass)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if self.armed {
            let produced = self.produced.take();
            self.svc.record(
                &self.facts,
                produced.as_ref().map(|(s, h)| (*s, h)),
                self.fired.as_ref(),
                false,
                Some("the client closed the connection before the answer was sent".into()),
            );
        }
    }
}

fn head<B>(res: &Response<B>) -> (StatusCode, &HeaderMap) {
    (res.status(), res.headers())
}

/// Echoes the request's session id on an Ack the fault layer makes.
fn echo(ack: Ack, facts: &Facts) -> Ack {
    match &facts.raw_session {
        Some(raw) => ack.echo_session(raw),
        None => ack,
    }
}

fn empty_response(status: StatusCode) -> Response<ResponseBody> {
    let mut res = Response::new(ResponseBody::empty());
    *res.status_mut() = status;
    res.headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    res
}

/// A request body that ends with an error after `limit` bytes (`drop-after`).
struct CutBody<B> {
    inner: Pin<Box<B>>,
    remaining: u64,
    cut: Arc<AtomicBool>,
}

impl<B> CutBody<B> {
    fn new(inner: B, limit: u64, cut: Arc<AtomicBool>) -> Self {
        CutBody {
            inner: Box::pin(inner),
            remaining: limit,
            cut,
        }
    }
}

impl<B> Body for CutBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.remaining == 0 && (this.cut.load(Ordering::SeqCst) || !this.inner.is_end_stream()) {
            this.cut.store(true, Ordering::SeqCst);
            return Poll::Ready(Some(Err("request body cut by the fault plan".into())));
        }
        match ready!(this.inner.as_mut().poll_frame(cx)) {
            None => Poll::Ready(None),
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    let n = data.remaining() as u64;
                    let take = n.min(this.remaining);
                    let bytes = data.copy_to_bytes(take as usize);
                    this.remaining -= take;
                    if take < n {
                        this.cut.store(true, Ordering::SeqCst);
                    }
                    Poll::Ready(Some(Ok(Frame::data(bytes))))
                }
                Err(frame) => Poll::Ready(Some(Ok(
                    frame.map_data(|mut d| d.copy_to_bytes(d.remaining()))
                ))),
            },
        }
    }
}

/// What the fault layer does to a response body.
enum BodyFault {
    Pass,
    /// Close the connection once `at` bytes went out.
    Truncate {
        at: u64,
    },
    /// Pause `pause` once `after` bytes went out.
    Stall {
        after: u64,
        pause: Duration,
        done: bool,
    },
}

/// The response body of a [`FaultInjectingService`]: the server's body, passed through, cut
/// short (`truncate`) or paused (`stall`).
pub struct FaultResponseBody {
    inner: ResponseBody,
    fault: BodyFault,
    sent: u64,
    pending: Option<Bytes>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl fmt::Debug for FaultResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultResponseBody")
            .field("inner", &self.inner)
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

impl FaultResponseBody {
    fn with(inner: ResponseBody, fault: BodyFault) -> Self {
        FaultResponseBody {
            inner,
            fault,
            sent: 0,
            pending: None,
            sleep: None,
        }
    }

    /// The server's body unchanged.
    pub fn pass(inner: ResponseBody) -> Self {
        Self::with(inner, BodyFault::Pass)
    }

    /// The first `bytes` of the body, then an error that makes hyper close the connection.
    pub fn truncate(inner: ResponseBody, bytes: u64) -> Self {
        Self::with(inner, BodyFault::Truncate { at: bytes })
    }

    /// The body with a pause of `pause` after its first `after` bytes.
    pub fn stall(inner: ResponseBody, after: u64, pause: Duration) -> Self {
        Self::with(
            inner,
            BodyFault::Stall {
                after,
                pause,
                done: false,
            },
        )
    }

    /// The byte count at which the fault acts next, if it still has to.
    fn limit(&self) -> Option<u64> {
        match self.fault {
            BodyFault::Pass => None,
            BodyFault::Truncate { at } => Some(at),
            BodyFault::Stall { after, done, .. } => (!done).then_some(after),
        }
    }
}

impl Body for FaultResponseBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(sleep) = this.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                this.sleep = None;
                match &mut this.fault {
                    BodyFault::Truncate { .. } => {
                        return Poll::Ready(Some(Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "reply truncated by the fault plan",
                        ))))
                    }
                    BodyFault::Stall { done, .. } => *done = true,
                    BodyFault::Pass => {}
                }
            }
            let limit = this.limit();
            let finished = this.pending.is_none() && this.inner.is_end_stream();
            if let Some(limit) = limit {
                if this.sent >= limit && !finished {
                    let wait = match this.fault {
                        BodyFault::Stall { pause, .. } => pause,
                        _ => CUT_FLUSH_DELAY,
                    };
                    this.sleep = Some(Box::pin(tokio::time::sleep(wait)));
                    continue;
                }
            }
            let mut chunk = match this.pending.take() {
                Some(p) => p,
                None => match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                    None => return Poll::Ready(None),
                    Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(d) => d,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    },
                },
            };
            if let Some(limit) = limit {
                let room = limit.saturating_sub(this.sent);
                if chunk.len() as u64 > room {
                    this.pending = Some(chunk.split_off(room as usize));
                }
            }
            this.sent += chunk.len() as u64;
            if chunk.is_empty() {
                continue;
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.sleep.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let pending = self.pending.as_ref().map_or(0, |p| p.len() as u64);
        match self.inner.size_hint().exact() {
            Some(n) => SizeHint::with_exact(n + pending),
            None => SizeHint::default(),
        }
    }
}

type FaultFuture =
    Pin<Box<dyn Future<Output = Result<Response<FaultResponseBody>, ConnectionDropped>> + Send>>;

impl<B> hyper::service::Service<Request<B>> for FaultInjectingService
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<FaultResponseBody>;
    type Error = ConnectionDropped;
    type Future = FaultFuture;

    fn call(&self, req: Request<B>) -> Self::Future {
        let svc = self.clone();
        Box::pin(async move { svc.handle(req).await })
    }
}

impl<B> tower_service::Service<Request<B>> for FaultInjectingService
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<FaultResponseBody>;
    type Error = ConnectionDropped;
    type Future = FaultFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        hyper::service::Service::call(&*self, req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_rules_round_trip() {
        for s in [
            "Fragment#3:drop-after=1000",
            "Fragment#2:lose-ack",
            "Create-Session#1:status=403,code=0x80070005",
            "Fragment:status=502,code=none",
            "Fragment:status=500,code=0x80004005,context=0x7",
            "Fragment:too-large=65536,times=0",
            "Fragment#2:resync=0",
            "Fragment#3:forget-session",
            "Close-Session#1:delay-ack=1500",
            "Fragment:fail-handler=503,times=2",
            "GET#1:truncate=1000",
            "GET:stall=2000,after=4096",
            "HEAD#1:expire-session",
            "Ping:drop,p=0.5,times=3,path=/echo/",
        ] {
            let rule: FaultRule = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(rule.to_string(), s);
            assert_eq!(rule.to_string().parse::<FaultRule>().unwrap(), rule);
        }
        let r: FaultRule = "fragment#3:DROP-AFTER=1_000".parse().unwrap();
        assert_eq!(r.action, FaultAction::DropAfter { bytes: 1000 });
        assert_eq!(r.nth, Some(3));
        let r: FaultRule = "reply-get:truncate=5".parse().unwrap();
        assert_eq!(r.packet, FaultPacket::Get);
    }

    #[test]
    fn compact_errors_explain() {
        for (s, want) in [
            ("Fragment", "expected PACKET"),
            ("Fragment:explode", "unknown action"),
            ("Frag:lose-ack", "unknown packet"),
            ("Fragment#0:lose-ack", "from 1"),
            ("Fragment:drop-after", "needs bytes"),
            ("Create-Session:truncate=5", "only to GET"),
            ("Ping:forget-session", "does not apply to Ping"),
            ("Fragment:lose-ack=3", "takes no value"),
            ("Fragment:lose-ack,ms=3", "ms does not apply"),
            ("Fragment:status=200", "300..=599"),
            ("Fragment:lose-ack,p=2", "between 0 and 1"),
            ("GET:status=503,code=0x80004005", "plain HTTP status"),
            ("HEAD:status=503,context=0x7", "plain HTTP status"),
            ("Fragment:lose-ack,bogus=1", "unknown key"),
        ] {
            let e = s.parse::<FaultRule>().unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn plan_files_name_the_line() {
        let plan = FaultPlan::parse(
            "seed = 42\n\n[[rule]]\npacket = \"Fragment\"\nnth = 3\naction = \"drop-after\"\nbytes = 1000\n\n\
             [[rule]]\npacket = \"GET\"\naction = \"stall\"\nms = 10\nafter = 5\ntimes = 0\n",
            "faults.toml",
        )
        .unwrap();
        assert_eq!(plan.seed, 42);
        assert_eq!(
            plan.rules[0],
            FaultRule::new(
                FaultPacket::Fragment,
                FaultAction::DropAfter { bytes: 1000 }
            )
            .nth(3)
        );
        assert_eq!(plan.rules[1].to_string(), "GET:stall=10,after=5,times=0");
        let e = FaultPlan::parse(
            "seed = 1\n[[rule]]\npacket = \"Fragment\"\naction = \"truncate\"\nbytes = 1\n",
            "f.toml",
        )
        .unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("f.toml", 2), "{e}");
        assert!(e.message.contains("only to GET"), "{e}");
        let e =
            FaultPlan::parse("[[rule]]\npacket = \"Fragment\"\nnht = 3\n", "f.toml").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
    }

    #[test]
    fn draws_are_seeded() {
        let draws = |seed: u64| {
            let mut r = SplitMix64(seed);
            (0..8).map(|_| r.next_f64()).collect::<Vec<_>>()
        };
        assert_eq!(draws(42), draws(42));
        assert_ne!(draws(42), draws(43));
        assert!(draws(7).iter().all(|x| (0.0..1.0).contains(x)));
    }
}
