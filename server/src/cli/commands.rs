//! The small subcommands of `bitsd`: hash-password, completions, man, healthcheck.

use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

/// `bitsd hash-password`: on a terminal, asks twice without echo; otherwise reads one line
/// of standard input. Prints the argon2id hash for a users file.
pub fn hash_password() -> ExitCode {
    let password = if std::io::stdin().is_terminal() {
        match prompt_twice() {
            Ok(p) => p,
            Err(message) => {
                eprintln!("bitsd: {message}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        let mut line = String::new();
        if std::io::stdin().read_line(&mut line).is_err() {
            eprintln!("bitsd: cannot read the password from standard input");
            return ExitCode::FAILURE;
        }
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    if password.is_empty() {
        eprintln!("bitsd: the password is empty; type one at the prompt or pipe one line");
        return ExitCode::FAILURE;
    }
    match bitsd::auth::hash_password(&password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bitsd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn prompt_twice() -> Result<String, String> {
    let first = rpassword::prompt_password("Password: ")
        .map_err(|e| format!("cannot read the password: {e}"))?;
    let second = rpassword::prompt_password("Again: ")
        .map_err(|e| format!("cannot read the password: {e}"))?;
    if first != second {
        return Err("the two passwords differ; nothing printed".to_owned());
    }
    Ok(first)
}

/// `bitsd completions SHELL`: the shell's completion script on standard output.
pub fn completions(shell: clap_complete::Shell, mut command: clap::Command) -> ExitCode {
    clap_complete::generate(shell, &mut command, "bitsd", &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// `bitsd man`: the man page (roff) on standard output.
pub fn man(command: clap::Command) -> ExitCode {
    let mut out = Vec::new();
    if let Err(e) = clap_mangen::Man::new(command).render(&mut out) {
        eprintln!("bitsd: cannot render the man page: {e}");
        return ExitCode::FAILURE;
    }
    if std::io::stdout().write_all(&out).is_err() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// `bitsd healthcheck`: `GET /healthz` on the admin listener; exit 0 on a 200 within five
/// seconds, 1 otherwise (for a container's HEALTHCHECK, without curl in the image).
pub fn healthcheck(admin: SocketAddr) -> ExitCode {
    match probe(admin) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bitsd: healthcheck of http://{admin}/healthz failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn probe(admin: SocketAddr) -> Result<(), String> {
    let timeout = Duration::from_secs(5);
    let mut stream =
        std::net::TcpStream::connect_timeout(&admin, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        match stream.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(e.to_string()),
        }
    }
    let status = String::from_utf8_lossy(&head[..got]);
    if status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        Err(format!(
            "answer {:?}",
            status.lines().next().unwrap_or_default()
        ))
    }
}
