//! Authentication: who sent a request. Off by default; with it on, every `BITS_POST` and every
//! reply download must carry credentials, and a session belongs to the user who created it.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use http::request::Parts;
use http::HeaderValue;
use sha2::{Digest, Sha256};

use crate::auth_throttle::Throttle;

/// The request carried no acceptable credentials; answer 401 with this challenge.
#[derive(Clone, Debug)]
pub struct AuthChallenge {
    /// The `WWW-Authenticate` values to send.
    pub www_authenticate: Vec<HeaderValue>,
    /// Too many failures from this client or for this user: no check was made, and none will
    /// be for this long (sent as `Retry-After`).
    pub retry_after: Option<Duration>,
}

/// The address of the client a request came from, as a request extension. [`crate::start`]
/// adds it to every request; a host application serving [`crate::BitsService`] itself may
/// add it so that failed logins are also limited per client address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// The future of [`Authenticator::authenticate_async`].
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<String, AuthChallenge>> + Send + 'a>>;

/// Maps a request to a user. Implement it to let a host application's own authentication
/// decide; [`CredentialsAuthenticator`] is the built-in one.
pub trait Authenticator: Send + Sync + 'static {
    /// The user the request authenticates as, or the challenge to send back. It may block
    /// (a password hash check); the service calls [`Authenticator::authenticate_async`].
    fn authenticate(&self, parts: &Parts) -> Result<String, AuthChallenge>;

    /// What the service calls for each request. The default runs
    /// [`Authenticator::authenticate`] in place, which is right for quick checks; override it
    /// when a check is slow, so that it runs off the async worker threads.
    fn authenticate_async<'a>(&'a self, parts: &'a Parts) -> AuthFuture<'a> {
        Box::pin(std::future::ready(self.authenticate(parts)))
    }
}

/// Reading a credentials file failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `user:hash`.
    #[error("{path}:{line}: {why}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

/// HTTP Basic against argon2 password hashes, and bearer tokens known by their SHA-256.
///
/// * users file: one `user:$argon2id$…` line per user (`bitsd hash-password` prints the hash);
/// * tokens file: one `user:<sha256 of the token, hex>` line per token.
///
/// Blank lines and lines starting with `#` are skipped.
///
/// Through [`Authenticator::authenticate_async`], argon2 runs on dedicated `bitsd-auth`
/// threads, at most half the cores at once, never on the async workers. A successful check
/// is remembered for 2 minutes (keyed by a keyed hash of user and password). An unknown user
/// costs the same argon2 check as a known one. After 5 failures from one client address or
/// for one user name, further attempts are refused without a check (401 with `Retry-After`)
/// for 1 s, doubling with each failure up to 60 s; a success, or 15 minutes without a
/// failure, clears the count. Bearer tokens are checked at once (a SHA-256 lookup), with the same back-off per address.
pub struct CredentialsAuthenticator {
    users: HashMap<String, String>,
    tokens: HashMap<[u8; 32], String>,
    realm: String,
    throttle: Throttle,
    /// The hash an unknown user's password is checked against: a real user's, so that it
    /// costs exactly what a known user's check costs.
    dummy: Option<String>,
}

/// A PHC hash with the default parameters, checked for unknown users when there are no users
/// at all.
fn default_dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        // Hashing with the defaults cannot fail; if it did, unknown users would be refused
        // without the work (the only cost: they would be quicker to refuse).
        hash_password("bitsd-dummy-password").unwrap_or_default()
    })
}

/// Checks `password` against `hash`, or against `dummy` when there is no such user (then
/// always false, after the same work).
fn verify(hash: Option<&str>, dummy: Option<&str>, password: &str) -> bool {
    use argon2::PasswordVerifier;
    let (phc, known) = match hash {
        Some(h) => (h, true),
        None => (dummy.unwrap_or_else(|| default_dummy_hash()), false),
    };
    let Ok(parsed) = argon2::PasswordHash::new(phc) else {
        return false;
    };
    let ok = argon2::Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok();
    ok && known
}

/// What a request needs before it is answered.
enum Begin {
    /// The answer is known without an argon2 check.
    Answer(Result<String, AuthChallenge>),
    /// A Basic attempt that needs an argon2 check.
    Check(PendingCheck),
}

/// A Basic attempt that needs an argon2 check.
struct PendingCheck {
    user: String,
    password: String,
    hash: Option<String>,
    key: [u8; 32],
    addr: Option<std::net::IpAddr>,
}

impl std::fmt::Debug for CredentialsAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialsAuthenticator")
            .field("users", &self.users.len())
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

fn read_pairs(path: &Path) -> Result<Vec<(usize, String, String)>, AuthFileError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Read {
        path: name.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, secret)) = line.split_once(':') else {
            return Err(AuthFileError::Line {
                path: name,
                line: i + 1,
                why: "expected user:secret".into(),
            });
        };
        if user.is_empty() || secret.is_empty() {
            return Err(AuthFileError::Line {
                path: name,
                line: i + 1,
                why: "empty user or secret".into(),
            });
        }
        out.push((i + 1, user.to_owned(), secret.to_owned()));
    }
    Ok(out)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Hashes a password for the users file (argon2id, random salt).
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    // 16 random bytes from the OS generator (uuid's v4 source).
    let salt =
        SaltString::encode_b64(uuid::Uuid::new_v4().as_bytes()).map_err(|e| e.to_string())?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

impl CredentialsAuthenticator {
    /// An authenticator with no users and no tokens (refuses everything).
    pub fn new(realm: &str) -> Self {
        CredentialsAuthenticator {
            users: HashMap::new(),
            tokens: HashMap::new(),
            realm: realm.to_owned(),
            throttle: Throttle::new(),
            dummy: None,
        }
    }

    /// Adds the users of a users file.
    pub fn with_users_file(mut self, path: &Path) -> Result<Self, AuthFileError> {
        for (line, user, hash) in read_pairs(path)? {
            if argon2::PasswordHash::new(&hash).is_err() {
                return Err(AuthFileError::Line {
                    path: path.display().to_string(),
                    line,
                    why: "not a PHC password hash (use `bitsd hash-password`)".into(),
                });
            }
            self.dummy.get_or_insert_with(|| hash.clone());
            self.users.insert(user, hash);
        }
        Ok(self)
    }

    /// Adds the tokens of a tokens file.
    pub fn with_tokens_file(mut self, path: &Path) -> Result<Self, AuthFileError> {
        for (line, user, hex) in read_pairs(path)? {
            let digest = decode_hex32(&hex).ok_or_else(|| AuthFileError::Line {
                path: path.display().to_string(),
                line,
                why: "expected 64 hex digits (the token's SHA-256)".into(),
            })?;
            self.tokens.insert(digest, user);
        }
        Ok(self)
    }

    /// Adds one user with a password hash.
    pub fn with_user(mut self, user: &str, phc_hash: &str) -> Self {
        self.dummy.get_or_insert_with(|| phc_hash.to_owned());
        self.users.insert(user.to_owned(), phc_hash.to_owned());
        self
    }

    fn challenge(&self) -> AuthChallenge {
        let realm = self.realm.replace(['"', '\\'], "");
        let mut www_authenticate = Vec::new();
        if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\""))
        {
            www_authenticate.push(v);
        }
        if !self.tokens.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer realm=\"{realm}\"")) {
                www_authenticate.push(v);
            }
        }
        AuthChallenge {
            www_authenticate,
            retry_after: None,
        }
    }

    /// Everything but the argon2 check: the answer when it is known without one, else the
    /// check to make.
    fn begin(&self, parts: &Parts) -> Begin {
        let Some(value) = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return Begin::Answer(Err(self.challenge()));
        };
        let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
        let addr = parts.extensions.get::<ClientAddr>().map(|a| a.0.ip());
        if scheme.eq_ignore_ascii_case("bearer") {
            return Begin::Answer(self.bearer(rest.trim(), addr));
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return Begin::Answer(Err(self.challenge()));
        }
        let Some((user, password)) = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok())
            .and_then(|t| t.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())))
        else {
            return Begin::Answer(Err(self.challenge()));
        };
        let key = self.throttle.key(&user, &password);
        if self.users.contains_key(&user) && self.throttle.is_cached(&key) {
            return Begin::Answer(Ok(user));
        }
        if let Some(left) = self.throttle.blocked(addr, Some(&user)) {
            tracing::info!(user = %user, client = ?addr, retry_after_ms = left.as_millis() as u64,
                "too many failed logins: refused without a check");
            let mut challenge = self.challenge();
            challenge.retry_after = Some(left);
            return Begin::Answer(Err(challenge));
        }
        Begin::Check(PendingCheck {
            hash: self.users.get(&user).cloned(),
            user,
            password,
            key,
            addr,
        })
    }

    /// A bearer token: a SHA-256 lookup, with the same per-address back-off as passwords
    /// (a token names no user, so only the address is counted and refused).
    fn bearer(&self, token: &str, addr: Option<std::net::IpAddr>) -> Result<String, AuthChallenge> {
        if let Some(left) = self.throttle.blocked(addr, None) {
            tracing::info!(client = ?addr, retry_after_ms = left.as_millis() as u64,
                "too many wrong bearer tokens: refused without a check");
            let mut challenge = self.challenge();
            challenge.retry_after = Some(left);
            return Err(challenge);
        }
        match self.tokens.get(&sha256(token.as_bytes())) {
            Some(user) => Ok(user.clone()),
            None => {
                tracing::info!(client = ?addr, "wrong bearer token");
                self.throttle.failed(addr, None);
                Err(self.challenge())
            }
        }
    }

    /// Records the outcome of a check and answers.
    fn finish(&self, check: &PendingCheck, ok: bool) -> Result<String, AuthChallenge> {
        if ok {
            self.throttle.succeeded(check.key, check.addr, &check.user);
            Ok(check.user.clone())
        } else {
            tracing::info!(user = %check.user, client = ?check.addr, "failed login");
            self.throttle.failed(check.addr, Some(&check.user));
            Err(self.challenge())
        }
    }
}

fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Authenticator for CredentialsAuthenticator {
    /// Checks in place (argon2 on the calling thread); for callers outside an async runtime.
    fn authenticate(&self, parts: &Parts) -> Result<String, AuthChallenge> {
        match self.begin(parts) {
            Begin::Answer(answer) => answer,
            Begin::Check(check) => {
                let ok = verify(
                    check.hash.as_deref(),
                    self.dummy.as_deref(),
                    &check.password,
                );
                self.finish(&check, ok)
            }
        }
    }

    /// Checks passwords on a bounded set of dedicated threads.
    fn authenticate_async<'a>(&'a self, parts: &'a Parts) -> AuthFuture<'a> {
        Box::pin(async move {
            match self.begin(parts) {
                Begin::Answer(answer) => answer,
                Begin::Check(check) => {
                    let hash = check.hash.clone();
                    let dummy = self.dummy.clone();
                    let password = check.password.clone();
                    match self
                        .throttle
                        .run(move || verify(hash.as_deref(), dummy.as_deref(), &password))
                        .await
                    {
                        Some(ok) => self.finish(&check, ok),
                        // No check could run (no thread): refused, but not the client's failure.
                        None => Err(self.challenge()),
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(auth: Option<&str>) -> Parts {
        let mut b = http::Request::builder().uri("/x");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn basic_and_bearer() {
        let hash = hash_password("s3cret").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        let digest: String = sha256(b"tok-123")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::fs::write(&tokens, format!("# comment\nrobot:{digest}\n")).unwrap();
        let auth = CredentialsAuthenticator::new("bitsd")
            .with_user("alice", &hash)
            .with_tokens_file(&tokens)
            .unwrap();
        let basic = |u: &str, p: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        };
        assert_eq!(
            auth.authenticate(&parts(Some(&basic("alice", "s3cret"))))
                .unwrap(),
            "alice"
        );
        assert_eq!(
            auth.authenticate(&parts(Some(&basic("alice", "s3cret"))))
                .unwrap(),
            "alice",
            "cached"
        );
        assert!(auth
            .authenticate(&parts(Some(&basic("alice", "wrong"))))
            .is_err());
        assert!(auth
            .authenticate(&parts(Some(&basic("bob", "s3cret"))))
            .is_err());
        assert!(auth.authenticate(&parts(None)).is_err());
        assert_eq!(
            auth.authenticate(&parts(Some("Bearer tok-123"))).unwrap(),
            "robot"
        );
        assert!(auth.authenticate(&parts(Some("Bearer tok-124"))).is_err());
        let challenge = auth.authenticate(&parts(None)).unwrap_err();
        assert!(challenge.www_authenticate[0]
            .to_str()
            .unwrap()
            .starts_with("Basic realm=\"bitsd\""));
    }

    #[test]
    fn bad_files_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let users = dir.path().join("users");
        std::fs::write(&users, "alice:plaintext\n").unwrap();
        let e = CredentialsAuthenticator::new("r")
            .with_users_file(&users)
            .unwrap_err();
        assert!(
            e.to_string()
                .ends_with(":1: not a PHC password hash (use `bitsd hash-password`)"),
            "{e}"
        );
    }
}
