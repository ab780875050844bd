//! The plan's two written forms: the compact `--fault` rule and the TOML plan file.

use std::path::Path;
use std::str::FromStr;

use bitsd_protocol::{ErrorContext, HResult};
use serde::Deserialize;
use toml::Spanned;

use super::plan::{FaultAction, FaultPacket, FaultPlan, FaultRule};
use crate::config::{line_col, ConfigError};

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    seed: Option<u64>,
    #[serde(default, rename = "rule")]
    rules: Vec<Spanned<RuleSpec>>,
}
impl FaultPlan {
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
}
