//! Authentication: who sent a request. Off by default; with it on, every `BITS_POST` and every
//! reply download must carry credentials, and a session belongs to the user who created it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use base64::Engine;
use http::request::Parts;
use http::HeaderValue;
use sha2::{Digest, Sha256};

/// The request carried no acceptable credentials; answer 401 with this challenge.
#[derive(Clone, Debug)]
pub struct AuthChallenge {
    /// The `WWW-Authenticate` values to send.
    pub www_authenticate: Vec<HeaderValue>,
}

/// Maps a request to a user. Implement it to let a host application's own authentication
/// decide; [`CredentialsAuthenticator`] is the built-in one.
pub trait Authenticator: Send + Sync + 'static {
    /// The user the request authenticates as, or the challenge to send back.
    fn authenticate(&self, parts: &Parts) -> Result<String, AuthChallenge>;
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
pub struct CredentialsAuthenticator {
    users: HashMap<String, String>,
    tokens: HashMap<[u8; 32], String>,
    realm: String,
    /// Password checks that succeeded, by user and password digest: argon2 is slow on
    /// purpose, and a client sends credentials with every packet.
    verified: Mutex<HashMap<(String, [u8; 32]), ()>>,
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
            verified: Mutex::new(HashMap::new()),
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
        AuthChallenge { www_authenticate }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<(String, [u8; 32]), ()>> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_basic(&self, encoded: &str) -> Option<String> {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        let hash = self.users.get(user)?;
        let key = (user.to_owned(), sha256(password.as_bytes()));
        if self.cache().contains_key(&key) {
            return Some(user.to_owned());
        }
        use argon2::PasswordVerifier;
        let parsed = argon2::PasswordHash::new(hash).ok()?;
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .ok()?;
        let mut cache = self.cache();
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(key, ());
        Some(user.to_owned())
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
    fn authenticate(&self, parts: &Parts) -> Result<String, AuthChallenge> {
        let Some(value) = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return Err(self.challenge());
        };
        let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
        let user = if scheme.eq_ignore_ascii_case("basic") {
            self.check_basic(rest)
        } else if scheme.eq_ignore_ascii_case("bearer") {
            self.tokens.get(&sha256(rest.trim().as_bytes())).cloned()
        } else {
            None
        };
        user.ok_or_else(|| self.challenge())
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
