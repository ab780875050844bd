//! The README, docs/ and the shipped example configuration say only what is true: every code
//! block runs (TOML through the real configuration parser, `bitsd` command lines through the
//! real binary's argument parser, Rust as verbatim excerpts of the compiled examples) or is
//! marked `illustration`; relative links resolve; the minimum Rust version covers every locked
//! dependency; the example configuration loads and lists every documented key.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use bitsd::config::ConfigFile;
use bitsd_tests::bitsd_binary;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// README.md and every docs/*.md, with their text.
fn documents() -> Vec<(PathBuf, String)> {
    let mut files = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect()
}

/// A fenced code block: its info string, first line number and text.
struct Block {
    info: String,
    line: usize,
    text: String,
}

fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut current: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            match current.take() {
                Some(block) => out.push(block),
                None => {
                    current = Some(Block {
                        info: info.trim().to_owned(),
                        line: i + 1,
                        text: String::new(),
                    })
                }
            }
        } else if let Some(block) = current.as_mut() {
            block.text.push_str(line);
            block.text.push('\n');
        }
    }
    assert!(current.is_none(), "an unclosed code block");
    out
}

/// Splits a command line as a POSIX shell would for plain words, '...' and "...".
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => word.extend(chars.next()),
                        c => word.push(c),
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '#' if !in_word => break,
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// Loads configuration text with the real parser, as `bitsd --config` does.
fn load_config(text: &str, name: &str) -> Result<bitsd::ServerConfig, String> {
    let mut config = bitsd::ServerConfig::default();
    ConfigFile::parse(text, name)
        .and_then(|parsed| parsed.apply(text, name, &mut config))
        .map_err(|e| e.to_string())?;
    Ok(config)
}

fn check_toml(text: &str, name: &str) -> Result<(), String> {
    if text.contains("[[rule]]") {
        bitsd::FaultPlan::parse(text, name)
            .map(|_| ())
            .map_err(|e| e.to_string())
    } else {
        load_config(text, name).map(|_| ())
    }
}

/// Runs every `bitsd` command line of a block through the real argument parser (`--help`
/// appended: clap validates every argument before it, then prints help and exits 0).
fn check_sh(text: &str, name: &str) -> Result<(), String> {
    let joined = text.replace("\\\n", " ");
    for line in joined.lines() {
        let words = shell_words(line);
        let Some(first) = words.first() else { continue };
        if first != "bitsd" {
            return Err(format!(
                "{name}: `{line}` is not a bitsd command: mark the block `sh illustration`"
            ));
        }
        let out = std::process::Command::new(bitsd_binary())
            .args(&words[1..])
            .arg("--help")
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!(
                "{name}: `{line}` is refused: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

/// The lines of a block that are a plain `bitsd` command (no pipes, redirections or
/// substitutions) parse.
fn check_bitsd_lines(text: &str, name: &str) -> Result<(), String> {
    let plain: String = text
        .replace("\\\n", " ")
        .lines()
        .filter(|l| l.starts_with("bitsd ") && !l.contains(['|', '<', '>', '$', '…']))
        .map(|l| format!("{l}\n"))
        .collect();
    check_sh(&plain, name)
}

/// A Rust block must appear verbatim in one of the compiled examples.
fn check_rust(text: &str, name: &str) -> Result<(), String> {
    let dir = repo().join("server").join("examples");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let source = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        if source.contains(text) {
            return Ok(());
        }
    }
    Err(format!(
        "{name}: this Rust block is not an excerpt of server/examples/*.rs"
    ))
}

#[test]
fn every_code_block_runs_or_is_marked_illustration() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for (path, text) in documents() {
        for block in blocks(&text) {
            let name = format!("{}:{}", path.display(), block.line);
            let mut info = block.info.split_whitespace();
            let lang = info.next().unwrap_or("");
            if info.any(|w| w == "illustration") {
                // Illustrations may mix in other programs, but their plain `bitsd` command
                // lines still have to parse.
                if lang == "sh" {
                    if let Err(e) = check_bitsd_lines(&block.text, &name) {
                        problems.push(e);
                    }
                }
                continue;
            }
            let result = match lang {
                "toml" => check_toml(&block.text, &name),
                "sh" => check_sh(&block.text, &name),
                "rust" => check_rust(&block.text, &name),
                other => Err(format!(
                    "{name}: a ```{other} block neither runs in this test nor is marked illustration"
                )),
            };
            checked += 1;
            if let Err(e) = result {
                problems.push(e);
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked >= 8, "only {checked} blocks checked");
}

#[test]
fn the_checker_refuses_what_is_wrong() {
    // The checks above would pass vacuously if they accepted anything: they do not.
    assert!(check_toml("listen = 127.0.0.1:8080\n", "t").is_err());
    assert!(check_toml(
        "[[route]]\nprefix = \"/a/\"\nmode = \"upload-reply\"\n",
        "t"
    )
    .is_err());
    assert!(check_toml("[[rule]]\npacket = \"GET\"\naction = \"resync\"\n", "t").is_err());
    assert!(check_sh("bitsd --no-such-flag\n", "t").is_err());
    assert!(check_sh("curl http://x/\n", "t").is_err());
    assert!(check_rust("fn not_in_any_example() {}\n", "t").is_err());
    assert!(check_bitsd_lines("cp a b\nbitsd --listen nowhere\n", "t").is_err());
    assert!(check_bitsd_lines("cp a b\nbitsd man | less\n", "t").is_ok());
    assert_eq!(
        shell_words(r#"bitsd --fault "Fragment#2:lose-ack" 'a b' # comment"#),
        ["bitsd", "--fault", "Fragment#2:lose-ack", "a b"]
    );
}

#[test]
fn docs_do_not_point_outside_the_repository() {
    for (path, text) in documents() {
        assert!(
            !text.contains('§'),
            "{}: \"§\" points at a document no clone has",
            path.display()
        );
        assert!(!text.contains("shared/protocol"), "{}", path.display());
        // Relative links resolve.
        let dir = path.parent().unwrap();
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let target = &rest[..rest.find(')').unwrap_or(rest.len())];
            if target.starts_with("http") || target.starts_with('#') || target.contains(' ') {
                continue;
            }
            let file = target.split('#').next().unwrap();
            assert!(
                dir.join(file).exists(),
                "{}: broken link {target}",
                path.display()
            );
        }
    }
}

#[test]
fn the_readme_keeps_the_two_commands() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(readme.contains("cargo run --release "), "{readme}");
    assert!(
        readme.contains("cargo test --workspace --locked "),
        "{readme}"
    );
    // What the comment says .ci/run adds is what .ci/run runs.
    let ci = std::fs::read_to_string(repo().join(".ci").join("run")).unwrap();
    for step in [
        "cargo fmt",
        "cargo clippy",
        "cargo doc",
        "cargo test --workspace --locked",
    ] {
        assert!(ci.contains(step), ".ci/run lacks {step}");
    }
    assert!(readme.contains(".ci/run adds fmt, clippy and cargo doc"));
}

#[test]
fn the_minimum_rust_version_covers_every_locked_dependency() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let metadata = |offline: bool| {
        let mut args = vec!["metadata", "--format-version", "1", "--locked"];
        if offline {
            args.push("--offline");
        }
        std::process::Command::new(&cargo)
            .args(args)
            .current_dir(repo())
            .output()
            .unwrap()
    };
    // Offline first; a fresh machine may lack the manifests of other platforms' crates
    // (never built here), which cargo then fetches from the registry.
    let mut out = metadata(true);
    if !out.status.success() {
        out = metadata(false);
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // "1.89" and "1.89.0" are the same version: compare three parts.
    let version = |v: &str| -> Vec<u64> {
        let mut parts: Vec<u64> = v.split('.').map(|p| p.parse().unwrap_or(0)).collect();
        parts.resize(3, 0);
        parts
    };
    let ours = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "bitsd")
        .and_then(|p| p["rust_version"].as_str())
        .expect("bitsd has a rust-version")
        .to_owned();
    for p in meta["packages"].as_array().unwrap() {
        if let Some(needed) = p["rust_version"].as_str() {
            assert!(
                version(needed) <= version(&ours),
                "{} {} needs Rust {needed}, Cargo.toml says {ours}",
                p["name"],
                p["version"]
            );
        }
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let said = ours.trim_end_matches(".0");
    assert!(
        readme.contains(&format!("Rust **{said} or newer**")),
        "the README names another minimum than {ours}"
    );
}

fn example() -> String {
    std::fs::read_to_string(repo().join("bitsd.example.toml")).unwrap()
}

#[test]
fn the_example_configuration_loads_and_its_routes_work_as_shipped() {
    let text = example();
    let config = load_config(&text, "bitsd.example.toml").unwrap();
    let prefixes: Vec<_> = config
        .routes
        .iter()
        .map(|r| r.prefix().to_owned())
        .collect();
    assert_eq!(prefixes, ["/upload/", "/echo/", "/receipt/", "/sum/"]);
    assert_eq!(config.limits.max_fragment_size, 64 << 20);
    assert_eq!(config.session_limits.min_free_disk, 64 << 20);
    // The keys commented out are spelled right and typed right: uncommented, the file still
    // parses (files it names need not exist for a parse).
    let uncommented: String = text
        .lines()
        .map(|l| {
            let t = l.strip_prefix("# ").unwrap_or(l);
            let key_like = t.starts_with('[')
                || t.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                });
            if key_like {
                t.to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        uncommented.contains("\n[auth]\nusers_file"),
        "{uncommented}"
    );
    if let Err(e) = ConfigFile::parse(&uncommented, "uncommented example") {
        panic!("{e}\n{uncommented}");
    }
}

#[test]
fn the_example_configuration_has_every_documented_key() {
    let text = example();
    let docs = std::fs::read_to_string(repo().join("docs").join("configuration.md")).unwrap();
    let section = docs
        .split("## Keys and flags")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("docs/configuration.md has a \"Keys and flags\" section");
    let table = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| l.split('|').nth(1).unwrap().to_owned());
    let mut missing = Vec::new();
    for cell in table {
        for key in cell.split('`').skip(1).step_by(2) {
            for key in key.split([',', ' ']).filter(|k| !k.is_empty()) {
                let key = key.trim_start_matches("[auth]").trim();
                if key.is_empty() || key.starts_with('[') {
                    continue;
                }
                let written = text.lines().any(|l| {
                    let l = l.trim_start_matches("# ").trim_start();
                    l.starts_with(&format!("{key} ")) || l.starts_with(&format!("{key}="))
                });
                if !written {
                    missing.push(key.to_owned());
                }
            }
        }
    }
    // Keys of other places in the example: per-route handler parameters.
    for fragment in [
        "env = {",
        "pass_env = [",
        "data_entity_headers",
        "allow_overwrites = false",
    ] {
        if !text.contains(fragment) {
            missing.push(fragment.to_owned());
        }
    }
    assert!(missing.is_empty(), "bitsd.example.toml lacks {missing:?}");
}
