//! Where requests go: an `http://` or `https://` URL split into what the connection and the
//! request head need.

use std::fmt;

use http::uri::{Authority, Uri};

use crate::error::ClientError;

/// A parsed absolute `http://` or `https://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    /// `https`: the connection speaks TLS.
    tls: bool,
    /// Host as written in a URL (IPv6 literals keep their brackets).
    host: String,
    /// TCP port (80 or 443 when the URL names none).
    port: u16,
    /// Whether the URL named the port (decides the `Host` header form).
    explicit_port: bool,
    /// Path and query, origin form (`/upload/a.bin?x=1`).
    path: String,
}

impl Target {
    /// Parses an absolute `http://` or `https://` URL.
    pub(crate) fn parse(url: &str) -> Result<Target, ClientError> {
        let invalid = |reason: &str| ClientError::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url
            .trim()
            .parse()
            .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
        let tls = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("http") => false,
            Some(s) if s.eq_ignore_ascii_case("https") => true,
            Some(_) => return Err(invalid("only http:// and https:// URLs are supported")),
            None => return Err(invalid("not an absolute URL (http://host/path)")),
        };
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid(
                "credentials in the URL are not supported; pass them separately",
            ));
        }
        if authority.host().is_empty() {
            return Err(invalid("no host"));
        }
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".to_owned());
        Ok(Target {
            tls,
            host: authority.host().to_owned(),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            explicit_port: authority.port_u16().is_some(),
            path,
        })
    }

    /// Resolves a URL the server sent (a reply URL) as the Windows client does: an absolute
    /// `http(s)://` URL as it is; a path (`/x/y`) on this target's origin; anything else
    /// relative to the directory of this target's path. IIS sends the relative form with
    /// backslashes, `BITS-Sessions\Replies\{GUID}\responsefile.bin`: backslashes count as
    /// separators, characters a URL path cannot hold are percent-encoded (`{` → `%7B`), and
    /// `.` / `..` segments are refused rather than resolved.
    pub(crate) fn resolve(&self, url: &str) -> Result<Target, ClientError> {
        let url = url.trim();
        let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            return Target::parse(url);
        }
        let invalid = |reason: &str| ClientError::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let rel = url.replace('\\', "/");
        if rel.starts_with("//") {
            return Err(invalid("a reply URL without a scheme must not name a host"));
        }
        if rel.contains(':') && !rel.starts_with('/') {
            let scheme_end = rel.find(':').unwrap_or(0);
            if !rel[..scheme_end].contains('/') {
                return Err(invalid(
                    "only http:// and https:// reply URLs are supported",
                ));
            }
        }
        let (path, query) = match rel.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rel.as_str(), None),
        };
        let mut out = if path.starts_with('/') {
            String::new()
        } else {
            let base = self.path.split('?').next().unwrap_or("/");
            base[..base.rfind('/').map_or(0, |i| i + 1)]
                .trim_end_matches('/')
                .to_owned()
        };
        for seg in path.trim_start_matches('/').split('/') {
            let decoded = seg.replace("%2e", ".").replace("%2E", ".");
            if decoded == "." || decoded == ".." {
                return Err(invalid(
                    "dot segments (. and ..) are not allowed in a reply URL",
                ));
            }
            out.push('/');
            out.push_str(&encode(seg, false));
        }
        if let Some(q) = query {
            out.push('?');
            out.push_str(&encode(q, true));
        }
        let mut t = self.clone();
        t.path = out;
        // What is left must be a valid request target.
        t.path
            .parse::<http::uri::PathAndQuery>()
            .map_err(|e| invalid(&e.to_string()))?;
        Ok(t)
    }

    /// This URL with its host replaced by a `BITS-Host-Id` value (§8). The Host-Id is a server
    /// name or IP address; if it also names a port (`node7:8080`), the port is replaced too.
    pub(crate) fn with_host_id(&self, host_id: &str) -> Result<Target, ClientError> {
        let host_id = host_id.trim();
        let invalid = |reason: &str| ClientError::InvalidUrl {
            url: host_id.to_owned(),
            reason: format!("unusable BITS-Host-Id: {reason}"),
        };
        if host_id.is_empty() {
            return Err(invalid("empty"));
        }
        // A bare IPv6 address: bracket it.
        let candidate = if host_id.matches(':').count() > 1 && !host_id.starts_with('[') {
            format!("[{host_id}]")
        } else {
            host_id.to_owned()
        };
        let authority: Authority = candidate
            .parse()
            .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
        if authority.as_str().contains('@') || authority.host().is_empty() {
            return Err(invalid("not a host name"));
        }
        let mut t = self.clone();
        t.host = authority.host().to_owned();
        if let Some(port) = authority.port_u16() {
            t.port = port;
            t.explicit_port = true;
        }
        Ok(t)
    }

    /// Host and port to connect to (IPv6 without brackets).
    pub(crate) fn connect_addr(&self) -> (&str, u16) {
        let h = self.host.trim_start_matches('[').trim_end_matches(']');
        (h, self.port)
    }

    /// Scheme, host and port: the key for connection reuse.
    pub(crate) fn authority_key(&self) -> String {
        format!("{}:{}:{}", self.tls, self.host, self.port)
    }

    /// Whether the connection speaks TLS.
    pub(crate) fn is_tls(&self) -> bool {
        self.tls
    }

    /// The host name for TLS (SNI and certificate check), without IPv6 brackets.
    pub(crate) fn tls_name(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }

    /// The `Host` header value.
    pub(crate) fn host_header(&self) -> String {
        let default_port = if self.tls { 443 } else { 80 };
        if self.explicit_port && self.port != default_port {
            format!("{}:{}", self.host, self.port)
        } else {
            self.host.clone()
        }
    }

    /// The request target (origin form).
    pub(crate) fn path(&self) -> &str {
        &self.path
    }
}

/// Percent-encodes what a URL path segment (or query) cannot hold; keeps valid `%XX` escapes.
fn encode(s: &str, query: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let keep = b.is_ascii_alphanumeric()
            || b"-._~!$&'()*+,;=:@".contains(&b)
            || (query && (b == b'/' || b == b'?'));
        let escape = b == b'%'
            && bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
            && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
        if keep || escape {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
        i += 1;
    }
    out
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.host_header(), self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_rewrite() {
        let t = Target::parse("http://bits.example.test:8080/upload/a.bin?x=1").expect("url");
        assert_eq!(t.connect_addr(), ("bits.example.test", 8080));
        assert_eq!(t.path(), "/upload/a.bin?x=1");
        assert_eq!(t.host_header(), "bits.example.test:8080");
        let n = t.with_host_id("node7.bits.example.test").expect("host id");
        assert_eq!(
            n.to_string(),
            "http://node7.bits.example.test:8080/upload/a.bin?x=1"
        );
        let n = t.with_host_id("10.0.0.7:9000").expect("host id");
        assert_eq!(n.connect_addr(), ("10.0.0.7", 9000));
        let n = t.with_host_id("::1").expect("host id");
        assert_eq!(n.connect_addr(), ("::1", 8080));
        assert_eq!(n.host_header(), "[::1]:8080");
        let d = Target::parse("http://h/x").expect("url");
        assert_eq!((d.port, d.host_header().as_str()), (80, "h"));
        let s = Target::parse("https://h/x").expect("https url");
        assert!(s.is_tls());
        assert_eq!((s.port, s.host_header().as_str()), (443, "h"));
        assert_eq!(s.to_string(), "https://h/x");
        assert_eq!(
            s.with_host_id("n:8443").expect("host id").to_string(),
            "https://n:8443/x"
        );
        assert!(Target::parse("/relative").is_err());
        assert!(Target::parse("ftp://h/x").is_err());
        let r = t
            .resolve("/echo/BITS-Sessions/1/response")
            .expect("resolve");
        assert_eq!(
            r.to_string(),
            "http://bits.example.test:8080/echo/BITS-Sessions/1/response"
        );
    }

    #[test]
    fn resolves_relative_reply_urls_as_windows_does() {
        let t = Target::parse("http://iis.example.test/dir/upload.bin").expect("url");
        let r = t
            .resolve(
                r"BITS-Sessions\Replies\{D7A4B1C2-1111-2222-3333-444455556666}\responsefile.bin",
            )
            .expect("IIS form");
        assert_eq!(
            r.to_string(),
            "http://iis.example.test/dir/BITS-Sessions/Replies/%7BD7A4B1C2-1111-2222-3333-444455556666%7D/responsefile.bin"
        );
        let root = Target::parse("http://h/upload.bin").expect("url");
        assert_eq!(
            root.resolve("a b/ü.bin").expect("relative").path(),
            "/a%20b/%C3%BC.bin"
        );
        assert_eq!(root.resolve(r"\x\y").expect("rooted").path(), "/x/y");
        assert_eq!(
            t.resolve("r%20x?q=1 2").expect("query").path(),
            "/dir/r%20x?q=1%202"
        );
        for bad in [
            r"..\secret",
            "a/../b",
            "./x",
            "%2e%2e/x",
            "//other.host/x",
            "ftp:x",
        ] {
            assert!(t.resolve(bad).is_err(), "{bad}");
        }
        assert_eq!(
            t.resolve("https://cdn.example.test/r")
                .expect("absolute")
                .to_string(),
            "https://cdn.example.test/r"
        );
    }
}
