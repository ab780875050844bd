//! The packet exchanges of EXAMPLES.md, kept as data in `fixtures/examples/*.json` (format:
//! `fixtures/README.md`), replayed against a [`Target`]: one local server
//! (`tests/examples.rs`) or a farm of nodes on the shared backend behind a load balancer
//! (`tests/farm_examples.rs`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::{fixtures_dir, pattern, url_path, RawClient, RawResponse, PROTOCOL};

mod target;

pub use target::{LocalServers, Target, Targets};

/// Host header sent with every request unless a step names its own.
const HOST: &str = "bits.example.test";
/// Size and seed of the upload payload that `{"upload": [first, len]}` slices.
const UPLOAD_LEN: usize = 10_000;
const UPLOAD_SEED: u64 = 1;

/// One fixture file: one EXAMPLES.md section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    section: String,
    #[allow(dead_code)]
    title: String,
    scenarios: Vec<Scenario>,
}

/// Steps replayed in order against one fresh server.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    name: String,
    #[allow(dead_code)]
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    config: Option<ScenarioConfig>,
    steps: Vec<Step>,
}

/// Server settings a scenario needs (every node of a target gets them).
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioConfig {
    /// `limits.max_upload_size`.
    pub max_upload_size: Option<u64>,
    /// `limits.max_fragment_size`.
    pub max_fragment_size: Option<u64>,
}

impl ScenarioConfig {
    /// Applies the settings to a server's configuration.
    pub fn apply(&self, cfg: &mut bitsd::ServerConfig) {
        if let Some(max) = self.max_upload_size {
            cfg.limits.max_upload_size = max;
        }
        if let Some(max) = self.max_fragment_size {
            cfg.limits.max_fragment_size = max;
        }
    }
}

/// Exactly one of: `request` (+ `response`), `put_file`, `expect_file`, `expect_no_file`,
/// `expect_dir_empty`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    #[serde(default)]
    name: Option<String>,
    /// Send the request on a new connection.
    #[serde(default)]
    new_connection: bool,
    request: Option<Request>,
    response: Option<Expect>,
    put_file: Option<Content>,
    expect_file: Option<Content>,
    expect_no_file: Option<String>,
    expect_dir_empty: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    #[serde(default = "bits_post")]
    method: String,
    path: String,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    body: Option<Content>,
}

fn bits_post() -> String {
    "BITS_POST".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    status: u16,
    /// Headers that must be present exactly once with exactly this value.
    #[serde(default)]
    headers: Vec<(String, String)>,
    /// Headers that must be present with any value.
    #[serde(default)]
    present: Vec<String>,
    /// Headers that must not be present.
    #[serde(default)]
    absent: Vec<String>,
    /// Headers whose value must start with a prefix.
    #[serde(default)]
    starts_with: Vec<(String, String)>,
    /// Headers that must be present with a value other than this one.
    #[serde(default)]
    not_equal: Vec<(String, String)>,
    /// Variable name → header whose value it takes.
    #[serde(default)]
    capture: BTreeMap<String, String>,
    /// The exact response body.
    #[serde(default)]
    body: Option<Content>,
}

/// Bytes: a slice of the upload payload, a text, or a (slice of a) pattern; `path` only for
/// file steps.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Content {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    upload: Option<(usize, usize)>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    pattern: Option<(usize, u64)>,
    #[serde(default)]
    range: Option<(usize, usize)>,
}

impl Content {
    fn bytes(&self) -> Result<Vec<u8>, String> {
        let kinds = [
            self.upload.is_some(),
            self.text.is_some(),
            self.pattern.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() > 1 {
            return Err(format!("content names more than one source: {self:?}"));
        }
        let slice = |data: Vec<u8>, (first, len): (usize, usize)| -> Result<Vec<u8>, String> {
            data.get(first..first + len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| format!("slice {first}+{len} outside {} bytes", data.len()))
        };
        let whole = if let Some(range) = self.upload {
            if self.range.is_some() {
                return Err("`range` applies to `pattern` only".to_owned());
            }
            return slice(pattern(UPLOAD_LEN, UPLOAD_SEED), range);
        } else if let Some(text) = &self.text {
            text.as_bytes().to_vec()
        } else if let Some((len, seed)) = self.pattern {
            pattern(len, seed)
        } else {
            Vec::new()
        };
        match self.range {
            Some(range) => slice(whole, range),
            None => Ok(whole),
        }
    }

    fn file_path(&self) -> Result<&str, String> {
        self.path
            .as_deref()
            .ok_or_else(|| format!("file step without `path`: {self:?}"))
    }
}

type Vars = BTreeMap<String, String>;

/// Replaces `{NAME}` and `{NAME:path}` (the path of an absolute URL) for variable-like names;
/// anything else in braces (GUIDs) is left as it is.
fn subst(template: &str, vars: &Vars) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return Ok(out);
        };
        let inner = &after[..close];
        let (name, filter) = match inner.split_once(':') {
            Some((n, f)) => (n, Some(f)),
            None => (inner, None),
        };
        let is_var = !name.is_empty()
            && name.starts_with(|c: char| c.is_ascii_uppercase())
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if is_var {
            let value = vars
                .get(name)
                .ok_or_else(|| format!("undefined variable {{{name}}} in {template:?}"))?;
            match filter {
                None => out.push_str(value),
                Some("path") => out.push_str(&url_path(value)),
                Some(f) => return Err(format!("unknown filter `{f}` in {template:?}")),
            }
        } else {
            out.push('{');
            out.push_str(inner);
            out.push('}');
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn build_request(method: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> Vec<u8> {
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        head.push_str(&format!("Host: {HOST}\r\n"));
    }
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    let bodyless = method == "GET" || method == "HEAD";
    if !has("content-length") && !has("transfer-encoding") && (!bodyless || !body.is_empty()) {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// All values of a header (case-insensitive name).
fn values<'a>(res: &'a RawResponse, name: &str) -> Vec<&'a str> {
    let name = name.to_ascii_lowercase();
    res.headers
        .iter()
        .filter(|(n, _)| *n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Status, headers and body length, without the body bytes.
fn summary(res: &RawResponse) -> String {
    let headers: Vec<String> = res
        .headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}"))
        .collect();
    format!(
        "{} [{}] body {} bytes",
        res.status,
        headers.join(", "),
        res.body.len()
    )
}

fn compare_bytes(what: &str, expected: &[u8], got: &[u8]) -> Result<(), String> {
    if expected == got {
        return Ok(());
    }
    let first_diff = expected
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(got.len()));
    Err(format!(
        "{what}: expected {} bytes, got {} bytes, first difference at offset {first_diff}",
        expected.len(),
        got.len()
    ))
}

/// Checks one response; returns every mismatch. Captures into `vars`.
fn check_response(
    is_bits_post: bool,
    expect: &Expect,
    res: &RawResponse,
    vars: &mut Vars,
) -> Result<Vec<String>, String> {
    let mut errors = Vec::new();
    if is_bits_post {
        // The Ack invariants of every BITS_POST response (what `RawResponse::assert_ack` checks).
        if values(res, "bits-packet-type") != ["Ack"] {
            errors.push("not an Ack: BITS-Packet-Type is not exactly `Ack`".to_owned());
        }
        if values(res, "content-length") != ["0"] {
            errors.push("Ack without exactly one `Content-Length: 0`".to_owned());
        }
        if !res.body.is_empty() {
            errors.push(format!("Ack with a {}-byte body", res.body.len()));
        }
        if !values(res, "transfer-encoding").is_empty() {
            errors.push("Ack with Transfer-Encoding".to_owned());
        }
        // §2: BITS-Error-Code only on failures, and BITS-Error-Context exactly with it.
        let code = values(res, "bits-error-code");
        let context = values(res, "bits-error-context");
        if res.status == 200 && !code.is_empty() {
            errors.push(format!("200 Ack with BITS-Error-Code {code:?}"));
        }
        if code.is_empty() != context.is_empty() {
            errors.push(format!(
                "BITS-Error-Code {code:?} and BITS-Error-Context {context:?} must come together"
            ));
        }
        if errors.is_empty() {
            res.assert_ack();
        }
    }
    if res.status != expect.status {
        errors.push(format!(
            "status: expected {}, got {}",
            expect.status, res.status
        ));
    }
    for (name, value) in &expect.headers {
        let want = subst(value, vars)?;
        let got = values(res, name);
        if got != [want.as_str()] {
            errors.push(format!("header {name}: expected {want:?}, got {got:?}"));
        }
    }
    for name in &expect.present {
        if values(res, name).is_empty() {
            errors.push(format!("header {name}: expected present, is absent"));
        }
    }
    for name in &expect.absent {
        let got = values(res, name);
        if !got.is_empty() {
            errors.push(format!("header {name}: expected absent, got {got:?}"));
        }
    }
    for (name, prefix) in &expect.starts_with {
        let prefix = subst(prefix, vars)?;
        let got = values(res, name);
        if got.len() != 1 || !got[0].starts_with(&prefix) {
            errors.push(format!(
                "header {name}: expected one value starting with {prefix:?}, got {got:?}"
            ));
        }
    }
    for (name, other) in &expect.not_equal {
        let other = subst(other, vars)?;
        let got = values(res, name);
        if got.len() != 1 || got[0] == other {
            errors.push(format!(
                "header {name}: expected one value other than {other:?}, got {got:?}"
            ));
        }
    }
    if let Some(body) = &expect.body {
        if let Err(e) = compare_bytes("body", &body.bytes()?, &res.body) {
            errors.push(e);
        }
    }
    for (var, name) in &expect.capture {
        match res.header(name) {
            Some(v) => {
                vars.insert(var.clone(), v.to_owned());
            }
            None => errors.push(format!("capture {var}: header {name} is absent")),
        }
    }
    Ok(errors)
}

/// Runs one step; `Err` describes why it failed.
async fn run_step(
    target: &dyn Target,
    conn: &mut Option<RawClient>,
    step: &Step,
    vars: &mut Vars,
) -> Result<(), String> {
    let actions = [
        step.request.is_some(),
        step.put_file.is_some(),
        step.expect_file.is_some(),
        step.expect_no_file.is_some(),
        step.expect_dir_empty.is_some(),
    ];
    if actions.iter().filter(|a| **a).count() != 1 {
        return Err("a step needs exactly one action".to_owned());
    }
    if step.request.is_some() != step.response.is_some() {
        return Err("`request` and `response` go together".to_owned());
    }
    let checked = |rel: &str| -> Result<(), String> {
        let p = Path::new(rel);
        if p.is_absolute() || p.components().any(|c| c.as_os_str() == "..") {
            return Err(format!("path {rel:?} must stay inside the data dir"));
        }
        Ok(())
    };
    if let Some(file) = &step.put_file {
        let rel = file.file_path()?;
        checked(rel)?;
        return target.put_file(rel, file.bytes()?).await;
    }
    if let Some(file) = &step.expect_file {
        let rel = file.file_path()?;
        checked(rel)?;
        let got = target
            .read_file(rel)
            .await?
            .ok_or_else(|| format!("expect_file {rel}: no such file"))?;
        return compare_bytes(&format!("expect_file {rel}"), &file.bytes()?, &got);
    }
    if let Some(rel) = &step.expect_no_file {
        checked(rel)?;
        return if target.read_file(rel).await?.is_some() {
            Err(format!("expect_no_file {rel}: the file exists"))
        } else {
            Ok(())
        };
    }
    if let Some(rel) = &step.expect_dir_empty {
        checked(rel)?;
        // A farm deletes an ended session's objects right after the Ack, in the background
        // (one node deletes its files before the Ack): empty within 10 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let names = target.list_dir(rel).await?;
            if names.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "expect_dir_empty {rel}: holds {names:?} after 10 s"
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let (Some(req), Some(expect)) = (&step.request, &step.response) else {
        unreachable!("checked above");
    };
    let path = subst(&req.path, vars)?;
    let headers = req
        .headers
        .iter()
        .map(|(n, v)| Ok((n.clone(), subst(v, vars)?)))
        .collect::<Result<Vec<_>, String>>()?;
    let body = match &req.body {
        Some(b) => b.bytes()?,
        None => Vec::new(),
    };
    if step.new_connection || conn.is_none() {
        *conn = Some(RawClient::connect(target.addr()).await);
    }
    let client = conn.as_mut().unwrap();
    let res = client
        .send(&build_request(&req.method, &path, &headers, &body))
        .await;
    // A response announcing `Connection: close` ends this connection.
    if values(&res, "connection")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("close"))
    {
        *conn = None;
    }
    let errors = check_response(req.method == "BITS_POST", expect, &res, vars)?;
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} {path}\n      {}\n      response: {}",
            req.method,
            errors.join("\n      "),
            summary(&res)
        ))
    }
}

/// Runs a scenario on a fresh target; stops at its first failing step.
async fn run_scenario(scenario: Scenario, targets: Arc<dyn Targets>) -> Result<(), String> {
    let config = scenario.config.unwrap_or_default();
    let target = targets.start(config).await?;
    let mut vars = Vars::new();
    vars.insert("PROTOCOL".to_owned(), PROTOCOL.to_owned());
    let mut conn = None;
    let requests = scenario
        .steps
        .iter()
        .filter(|s| s.request.is_some())
        .count();
    for (i, step) in scenario.steps.iter().enumerate() {
        let name = step.name.as_deref().unwrap_or("");
        run_step(target.as_ref(), &mut conn, step, &mut vars)
            .await
            .map_err(|e| format!("step {} `{name}`: {e}", i + 1))?;
    }
    drop(conn);
    target.finish(requests).await
}

/// Loads `fixtures/examples/<file>` and replays every scenario, each on a fresh target from
/// `targets`; fails listing every failed scenario.
pub async fn replay(file: &str, section: &str, targets: Arc<dyn Targets>) {
    let path = fixtures_dir().join("examples").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let fixture: Fixture = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    assert_eq!(fixture.section, section, "{path:?}");
    assert!(!fixture.scenarios.is_empty(), "{path:?} has no scenarios");
    let total = fixture.scenarios.len();
    let mut failures = Vec::new();
    for scenario in fixture.scenarios {
        let name = scenario.name.clone();
        // A panic inside (e.g. the connection closed early) fails only this scenario.
        let outcome = match tokio::spawn(run_scenario(scenario, Arc::clone(&targets))).await {
            Ok(r) => r,
            Err(e) => Err(match e.try_into_panic() {
                Ok(p) => p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .map_or_else(|| "panicked".to_owned(), |m| format!("panicked: {m}")),
                Err(e) => format!("task failed: {e}"),
            }),
        };
        match outcome {
            Ok(()) => eprintln!("ok      {file}: {name}"),
            Err(e) => {
                eprintln!("FAILED  {file}: {name}\n    {e}");
                failures.push(format!("{name}\n    {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} scenarios in {file} failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}
