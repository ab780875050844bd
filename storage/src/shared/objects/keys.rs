//! Object keys: where each kind of object lives under the configured prefix.

use bitsd_protocol::SessionId;
use object_store::path::Path;

use super::Objects;

/// The longest object key, in bytes, that S3 (and the stores that follow it) accepts.
pub const MAX_KEY_LEN: usize = 1024;

/// The key of one object in the bucket (the configured prefix included), as stored in
/// PostgreSQL. Segments are separated by `/`; each is percent-encoded where S3 keys need it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey(Path);

impl ObjectKey {
    /// The key of the `/`-separated segments of `key` (empty segments are dropped; each
    /// segment is encoded where it needs to be).
    pub fn new(key: &str) -> Self {
        ObjectKey(Path::from_iter(key.split('/').filter(|s| !s.is_empty())))
    }

    /// A key as returned by [`ObjectKey::as_str`] (for example read back from PostgreSQL);
    /// `None` if it is not one.
    pub fn parse(stored: &str) -> Option<Self> {
        Path::parse(stored).ok().map(ObjectKey)
    }

    pub(crate) fn from_path(path: Path) -> Self {
        ObjectKey(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// The key as text (the form to store).
    pub fn as_str(&self) -> &str {
        self.0.as_ref()
    }

    /// This key with `/`-separated `more` appended.
    pub fn join(&self, more: &str) -> Self {
        let mut path = self.0.clone();
        for part in more.split('/').filter(|s| !s.is_empty()) {
            path = path.join(part);
        }
        ObjectKey(path)
    }

    /// Whether `self` is `prefix` or lies under it.
    pub fn starts_with(&self, prefix: &ObjectKey) -> bool {
        self.0.prefix_matches(&prefix.0)
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A short random token, so that two writes of "the same" fragment never share a key.
fn nonce() -> String {
    let mut s = uuid::Uuid::new_v4().simple().to_string();
    s.truncate(16);
    s
}

impl Objects {
    /// `<prefix>/sessions/`: every session's objects lie under it.
    pub fn sessions_prefix(&self) -> ObjectKey {
        self.prefix.join("sessions")
    }

    /// `<prefix>/sessions/<id>/`: all objects of one session.
    pub fn session_prefix(&self, session: &SessionId) -> ObjectKey {
        self.sessions_prefix().join(&session.simple())
    }

    /// A fresh key for the fragment of `session` starting at `offset`:
    /// `…/frag/<offset, 20 digits>-<nonce>` (listing order is offset order).
    pub fn fragment_key(&self, session: &SessionId, offset: u64) -> ObjectKey {
        self.session_prefix(session)
            .join(&format!("frag/{offset:020}-{}", nonce()))
    }

    /// A fresh key for a reply of `session` (`…/reply-<nonce>`) and its name under the
    /// session's prefix (`reply-<nonce>`), which the session's record keeps.
    pub fn reply_key(&self, session: &SessionId) -> (ObjectKey, String) {
        let name = format!("reply-{}", nonce());
        (self.session_prefix(session).join(&name), name)
    }

    /// `<prefix>/bitsd-access-check`: the object a node writes and deletes at start
    /// ([`Objects::access`]); outside `sessions/` and `files/`, so no sweep and no
    /// upload ever meets it.
    pub fn access_check_key(&self) -> ObjectKey {
        self.prefix.join("bitsd-access-check")
    }

    /// The key of a committed plain upload: `<prefix>/files/<path>` (`path` is the route's
    /// relative file path, already checked by the caller; empty segments are dropped).
    pub fn file_key(&self, path: &str) -> ObjectKey {
        self.prefix.join("files").join(path)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn store(prefix: &str) -> Objects {
        crate::shared::objects::unconnected(prefix)
    }

    #[test]
    fn keys_sit_under_the_prefix_and_round_trip() {
        let objects = store("/farm//a/");
        let id = SessionId::random();
        let frag = objects.fragment_key(&id, 42);
        assert!(frag
            .as_str()
            .starts_with(&format!("farm/a/sessions/{}/frag/", id.simple())));
        assert!(frag.as_str().contains("/00000000000000000042-"));
        assert!(frag.starts_with(&objects.session_prefix(&id)));
        assert!(frag.starts_with(&objects.sessions_prefix()));
        assert_ne!(
            frag,
            objects.fragment_key(&id, 42),
            "every write gets its own key"
        );
        assert_eq!(ObjectKey::parse(frag.as_str()), Some(frag.clone()));
        // Offsets sort as numbers.
        let low = objects.fragment_key(&id, 9).to_string();
        let high = objects.fragment_key(&id, 10).to_string();
        assert!(low < high);
        let (reply, _) = objects.reply_key(&id);
        assert!(reply.starts_with(&objects.session_prefix(&id)));
        assert_eq!(store("").file_key("x.bin").as_str(), "files/x.bin");
    }

    #[test]
    fn file_keys_cannot_escape_their_prefix() {
        let objects = store("farm");
        for path in [
            "../../etc/passwd",
            "a/../../b",
            "./x",
            "a b/ü%25/x.bin",
            "a\\b",
        ] {
            let key = objects.file_key(path);
            assert!(
                key.starts_with(&objects.prefix().join("files")),
                "{path} -> {key}"
            );
            assert!(
                !key.as_str().split('/').any(|s| s == ".." || s == "."),
                "{path} -> {key}"
            );
            assert_eq!(ObjectKey::parse(key.as_str()), Some(key.clone()), "{path}");
        }
    }
}
