//! Session ids: random v4 GUIDs, sent as lower-case braced text (§3).

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// A session id the server issued. Displayed braced and lower case
/// (`{5e53c221-f2d6-4bf2-b994-1dc43ceaca8d}`); parsed case-insensitively, with or without braces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(Uuid);

/// The text is not a GUID, so it cannot name a session this server issued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a session id: {0:?}")]
pub struct SessionIdError(String);

impl SessionId {
    /// A fresh random (v4) id.
    pub fn random() -> Self {
        SessionId(Uuid::new_v4())
    }

    /// The id of a known GUID.
    pub fn from_uuid(uuid: Uuid) -> Self {
        SessionId(uuid)
    }

    /// The GUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// The unbraced lower-case form, used in file names and reply URLs.
    pub fn simple(&self) -> String {
        self.0.hyphenated().to_string()
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{}}}", self.0.hyphenated())
    }
}

impl FromStr for SessionId {
    type Err = SessionIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let inner = t
            .strip_prefix('{')
            .and_then(|x| x.strip_suffix('}'))
            .unwrap_or(t);
        // Only the hyphenated 36-character form; uuid would also take urn: and simple forms.
        if inner.len() != 36 {
            return Err(SessionIdError(s.to_owned()));
        }
        Uuid::parse_str(inner)
            .map(SessionId)
            .map_err(|_| SessionIdError(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_case() {
        let id: SessionId = "{0F3A6C2E-9B1D-4E57-A2C8-3D4F5E6A7B8C}".parse().unwrap();
        assert_eq!(id.to_string(), "{0f3a6c2e-9b1d-4e57-a2c8-3d4f5e6a7b8c}");
        let same: SessionId = "0f3a6c2e-9b1d-4e57-a2c8-3d4f5e6a7b8c".parse().unwrap();
        assert_eq!(id, same);
        assert_eq!(id.simple(), "0f3a6c2e-9b1d-4e57-a2c8-3d4f5e6a7b8c");
    }

    #[test]
    fn rejects_non_guids() {
        for bad in [
            "",
            "{}",
            "abc",
            "{0f3a6c2e9b1d4e57a2c83d4f5e6a7b8c}",
            "../../etc",
            "{0f3a6c2e-9b1d-4e57-a2c8-3d4f5e6a7b8c",
        ] {
            assert!(bad.parse::<SessionId>().is_err(), "{bad}");
        }
    }
}
