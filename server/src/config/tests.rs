//! Tests of loading and applying configuration files.

use super::*;
use crate::ServerConfig;

fn apply(text: &str) -> Result<ServerConfig, ConfigError> {
    let mut config = ServerConfig::default();
    ConfigFile::parse(text, "test.toml")?.apply(text, "test.toml", &mut config)?;
    Ok(config)
}

#[test]
fn empty_file_keeps_defaults() {
    let c = apply("").unwrap();
    assert_eq!(c.listen, ServerConfig::default().listen);
    assert_eq!(c.routes.len(), 2);
}

#[test]
fn keys_and_routes() {
    let c = apply(
        "listen = \"127.0.0.1:9999\"\ndata_dir = \"/tmp/x\"\nadmin_listen = \"off\"\nmax_upload_size = 10\n\
         [[route]]\nprefix = \"/drop/\"\nmode = \"upload\"\nallow_overwrites = true\n\
         [[route]]\nprefix = \"/e/\"\nmode = \"upload-reply\"\nhandler = { kind = \"echo\" }\n",
    )
    .unwrap();
    assert_eq!(c.listen.port(), 9999);
    assert_eq!(c.admin_listen, None);
    assert_eq!(c.limits.max_upload_size, 10);
    assert_eq!(c.routes.len(), 2);
    assert!(c.routes[0].overwrites_allowed());
    let c = apply("inline_below = \"16KiB\"\n").unwrap();
    assert_eq!(c.inline_below, 16 * 1024);
    let c = apply("fsync = \"on-close\"\n").unwrap();
    assert_eq!(c.fsync, crate::FsyncPolicy::OnClose);
    assert!(apply("fsync = \"sometimes\"\n").is_err());
}

#[test]
fn the_issue_example_works_as_written() {
    let c = apply(
        r#"listen = "127.0.0.1:8080"
data_dir = "./bitsd-data"

[[route]]
prefix = "/app/"
mode = "upload-reply"
handler = { kind = "http", url = "http://127.0.0.1:9000/handle", notification = "by-value", timeout_secs = 300 }

[[route]]
prefix = "/sum/"
mode = "upload-reply"
handler = { kind = "command", program = "sha256sum", args = [] }

[[route]]
prefix = "/drop/"
mode = "upload"
"#,
    )
    .unwrap();
    let prefixes: Vec<_> = c.routes.iter().map(|r| r.prefix().to_owned()).collect();
    assert_eq!(prefixes, ["/app/", "/sum/", "/drop/"]);
    let e = apply("[[route]]\nprefix = \"/a/\"\nmode = \"upload-reply\"\nhandler = { kind = \"http\", url = \"https://x/\" }\n").unwrap_err();
    assert_eq!(e.line, 1, "{e}");
    assert!(e.message.contains("http"), "{e}");
    let e = apply(
        "[[route]]\nprefix = \"/a/\"\nmode = \"upload-reply\"\nhandler = { kind = \"static\" }\n",
    )
    .unwrap_err();
    assert!(e.message.contains("exactly one"), "{e}");
}

#[test]
fn test_mode_keys() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("faults.toml");
    std::fs::write(
        &plan,
        "seed = 7\n[[rule]]\npacket = \"Fragment\"\nnth = 2\naction = \"lose-ack\"\n",
    )
    .unwrap();
    let c = apply(&format!(
        "fault_plan = {:?}\ntranscript = \"t.jsonl\"\n",
        plan.display().to_string()
    ))
    .unwrap();
    let p = c.fault_plan.unwrap();
    assert_eq!(p.seed, 7);
    assert_eq!(p.rules[0].to_string(), "Fragment#2:lose-ack");
    assert_eq!(
        c.transcript.unwrap().file.as_deref(),
        Some(Path::new("t.jsonl"))
    );
    // A bad plan is reported with the plan's own file and line.
    std::fs::write(
        &plan,
        "[[rule]]\npacket = \"GET\"\naction = \"resync\"\noffset = 1\n",
    )
    .unwrap();
    let e = apply(&format!("fault_plan = {:?}\n", plan.display().to_string())).unwrap_err();
    assert!(e.file.ends_with("faults.toml"), "{e}");
    assert_eq!(e.line, 1, "{e}");
    assert!(e.message.contains("only to Fragment"), "{e}");
}

#[test]
fn errors_name_the_line() {
    let e = apply("listen = \"127.0.0.1:1\"\nbogus = 1\n").unwrap_err();
    assert_eq!((e.file.as_str(), e.line), ("test.toml", 2), "{e}");
    assert!(e.message.contains("bogus"), "{e}");
    let e = apply("\n\n[[route]]\nprefix = \"/a/\"\nmode = \"upload-reply\"\n").unwrap_err();
    assert_eq!(e.line, 3, "{e}");
    assert!(e.message.contains("needs a handler"), "{e}");
    let e = apply("[[route]]\nprefix = \"/a/\"\nmode = \"sideways\"\n").unwrap_err();
    assert_eq!(e.line, 3, "{e}");
    let e = apply("listen = \"nope\"\n").unwrap_err();
    assert_eq!(e.line, 1, "{e}");
    let e = apply("[[route]]\nprefix = \"/a/\"\nmode = \"upload\"\n[[route]]\nprefix = \"/a\"\nmode = \"upload\"\n").unwrap_err();
    assert!(e.message.contains("two routes"), "{e}");
    assert_eq!(e.line, 4, "{e}");
}
