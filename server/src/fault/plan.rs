//! The fault plan's types: what a rule matches ([`FaultPacket`]), what it does
//! ([`FaultAction`]), the rule itself and the seeded plan.

use std::fmt;

use bitsd_protocol::{ErrorContext, HResult, PacketType};

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
    pub(super) fn per_session(self) -> bool {
        !matches!(self, FaultPacket::Ping | FaultPacket::CreateSession)
    }

    pub(super) fn of_packet_type(t: PacketType) -> Self {
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

/// A seeded list of fault rules.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultPlan {
    /// Seed of the probability draws.
    pub seed: u64,
    /// The rules, tried in order; the first that fires is the request's only fault.
    pub rules: Vec<FaultRule>,
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

/// A fault plan that does not fit together.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FaultPlanError(pub String);
