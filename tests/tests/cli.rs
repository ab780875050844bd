//! The `bitsd` command line as a newcomer meets it: completions and man page, a password
//! prompt that does not echo, size suffixes, and startup errors that say what is wrong.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};

use bitsd_tests::{bitsd_binary, BitsdProcess};

fn bitsd(args: &[&str]) -> Output {
    Command::new(bitsd_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn completions_and_man_page_come_from_the_command_line_definitions() {
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let out = bitsd(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        // The subcommands and flags are in it.
        for word in ["check-config", "hash-password", "upload", "data-dir"] {
            assert!(script.contains(word), "{shell} lacks {word}");
        }
    }
    assert!(!bitsd(&["completions", "cmd.exe"]).status.success());
    let out = bitsd(&["man"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains(".TH bitsd 1"), "{page}");
    assert!(page.contains("\\-\\-max\\-fragment\\-size"), "{page}");
}

#[test]
fn hash_password_on_a_terminal_prompts_without_echo() {
    if Command::new("script").arg("--version").output().is_err() {
        bitsd_tests::skip::skipped(
            "`script` (util-linux) is not installed; no pseudo-terminal to test with",
        );
        return;
    }
    // `script` runs bitsd on a pseudo-terminal and feeds it what we write; whatever the
    // terminal would show comes back on its stdout.
    let command = format!("{} hash-password", bitsd_binary().display());
    let mut child = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        for _ in 0..2 {
            std::thread::sleep(std::time::Duration::from_millis(400));
            stdin.write_all(b"tr0ub4dor\n").unwrap();
            stdin.flush().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(400));
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("Password:"), "{shown}");
    assert!(shown.contains("$argon2id$"), "{shown}");
    assert!(
        !shown.contains("tr0ub4dor"),
        "the password was echoed: {shown}"
    );
}

#[test]
fn size_flags_take_suffixes_and_bad_sizes_say_what_to_write() {
    let out = bitsd(&[
        "--max-fragment-size",
        "64M",
        "--max-upload-size",
        "1GiB",
        "--help",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bitsd(&["--max-fragment-size", "64Q"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("unknown size unit"), "{err}");
    assert!(err.contains("1GiB"), "{err}");
    // And the server really uses them: a fragment over 1K is refused with 413.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bitsd.toml");
    std::fs::write(
        &config,
        "max_fragment_size = \"1K\"\nmax_upload_size = \"2KiB\"\n",
    )
    .unwrap();
    let proc = BitsdProcess::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = bitsd_tests::RawClient::connect(proc.addr).await;
        let sid = c.create_session("/upload/s.bin").await;
        let data = bitsd_tests::pattern(2048, 1);
        let res = c.fragment("/upload/s.bin", &sid, &data, 0, 1025).await;
        assert_eq!(res.status, 413, "{res:?}");
        let res = c.fragment("/upload/s.bin", &sid, &data, 0, 1024).await;
        assert_eq!(res.status, 200, "{res:?}");
    });
}

#[test]
fn config_errors_say_what_is_wrong_and_where() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    // An unquoted string.
    let bad = write("bad.toml", "data_dir = \"d\"\nlisten = 127.0.0.1:8080\n");
    let err = stderr(&bitsd(&["--config", &bad]));
    assert!(err.contains("bad.toml:2:"), "{err}");
    assert!(err.contains("string values need quotes"), "{err}");
    assert!(err.contains("listen = \"127.0.0.1:8080\""), "{err}");
    let err = stderr(&bitsd(&["check-config", &bad]));
    assert!(err.contains("string values need quotes"), "{err}");
    // A missing file: no made-up 0:0 position.
    let missing = dir.path().join("nope.toml");
    let err = stderr(&bitsd(&["--config", missing.to_str().unwrap()]));
    assert!(!err.contains(":0:0"), "{err}");
    assert!(
        err.contains("nope.toml: cannot read the configuration file: no such file"),
        "{err}"
    );
    // A missing users file: the line of its key, not the top of the file.
    let auth = write(
        "auth.toml",
        "data_dir = \"d\"\n\n[auth]\nrealm = \"x\"\nusers_file = \"/no/such/users\"\n",
    );
    let err = stderr(&bitsd(&["--config", &auth]));
    assert!(err.contains("auth.toml:5:1: users_file"), "{err}");
    assert!(err.contains("/no/such/users"), "{err}");
    let err = stderr(&bitsd(&["--users-file", "/no/such/users"]));
    assert!(err.contains("--users-file"), "{err}");
}

#[test]
fn check_config_refuses_a_presigned_validity_no_signature_lasts_and_shows_a_valid_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = |secs: u64| {
        let p = dir.path().join(format!("p{secs}.toml"));
        std::fs::write(
            &p,
            format!(
                "[storage]\nbackend = \"shared\"\npostgres_url = \"postgres://u:p@127.0.0.1:1/d\"\n\n\
                 [object_store]\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9\"\n\
                 presigned_reply_secs = {secs}\n"
            ),
        )
        .unwrap();
        p.to_str().unwrap().to_owned()
    };
    let out = bitsd(&["check-config", &config(700_000)]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("presigned_reply_secs must be at most 604800"),
        "{err}"
    );
    let out = bitsd(&["check-config", &config(900)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("redirected to presigned store URLs valid 900 s"),
        "{text}"
    );
}

#[test]
fn data_directory_problems_are_named_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    // In use by another bitsd.
    let data = dir.path().join("data");
    let first = BitsdProcess::start(&data, &[]);
    let second = bitsd(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--no-admin",
    ]);
    assert!(!second.status.success());
    let err = stderr(&second);
    assert!(err.contains("in use by another bitsd"), "{err}");
    assert!(err.contains(data.to_str().unwrap()), "{err}");
    assert!(!err.contains("WouldBlock"), "{err}");
    drop(first);
    // A plain file where the directory should be.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = stderr(&bitsd(&[
        "--data-dir",
        file.to_str().unwrap(),
        "--no-admin",
    ]));
    assert!(err.contains("is a file, not a directory"), "{err}");
    assert!(err.contains(file.to_str().unwrap()), "{err}");
}

#[cfg(unix)]
#[test]
fn permission_denied_names_the_path() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let target = locked.join("data");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let mut command = if root {
        // root ignores permissions: run as nobody, which needs setpriv.
        if Command::new("setpriv").arg("--version").output().is_err() {
            bitsd_tests::skip::skipped("running as root without setpriv to drop privileges");
            return;
        }
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bitsd_binary());
        c
    } else {
        Command::new(bitsd_binary())
    };
    let out = command
        .arg("--data-dir")
        .arg(&target)
        .args(["--listen", "127.0.0.1:0", "--no-admin"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("permission denied"), "{err}");
    assert!(err.contains(target.to_str().unwrap()), "{err}");
}

#[test]
fn a_port_in_use_is_named_as_such() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = bitsd(&[
        "--listen",
        &addr,
        "--no-admin",
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot listen on {addr}: the address is in use")),
        "{err}"
    );
}
