//! The absolute URLs a request implies: the job's remote URL and the base of reply URLs.

use http::request::Parts;

/// How the server names itself in the URLs it hands out.
#[derive(Clone, Debug, Default)]
pub(crate) struct UrlPolicy {
    /// The listener terminates TLS: the default scheme is `https`.
    pub(crate) https: bool,
    /// Path under which the service is mounted by a host app (`/bits`), or empty.
    pub(crate) mount_path: String,
    /// Believe `X-Forwarded-Proto` / `X-Forwarded-Host` (only behind a proxy that sets them).
    pub(crate) trust_forwarded: bool,
    /// Replaces scheme, host and mount path in reply URLs (`https://bits.example.com/base`).
    pub(crate) public_base_url: Option<String>,
    /// The listener's own address as a URL base (`http://127.0.0.1:8080`): what relative
    /// notification URLs resolve against when there is no public base URL.
    pub(crate) server_base_url: Option<String>,
}

impl UrlPolicy {
    /// `remote_url` (a job's remote URL, built from what the client sent) re-based on a name
    /// the server chose itself: the public base URL if one is set, else the listener's own
    /// address. Only the path and query of `remote_url` are kept, so nothing the client sent
    /// in `Host`, `X-Forwarded-*` or an absolute-form request target picks the host or port.
    /// `None` when the server has no name of its own (a service with neither set).
    pub(crate) fn server_side_url(&self, remote_url: &str) -> Option<String> {
        let after_scheme = remote_url.split_once("://").map_or(remote_url, |(_, r)| r);
        let path_and_query = after_scheme.find('/').map_or("/", |i| &after_scheme[i..]);
        if let Some(public) = &self.public_base_url {
            let below_mount = path_and_query
                .strip_prefix(self.mount_path.as_str())
                .filter(|rest| rest.starts_with('/'))
                .unwrap_or(path_and_query);
            return Some(format!("{public}{below_mount}"));
        }
        let own = self.server_base_url.as_ref()?;
        Some(format!("{own}{path_and_query}"))
    }
}

/// Scheme and authority a request was addressed to.
#[derive(Clone, Debug)]
pub(crate) struct RequestOrigin {
    pub(crate) scheme: String,
    pub(crate) authority: String,
    mount_path: String,
}

fn valid_authority(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= 300
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
}

impl RequestOrigin {
    /// From the absolute-form URI if there is one, else the `Host` header; `localhost` when
    /// neither is usable. The scheme is the URI's, else `https` on a TLS listener, else `http`.
    /// With `trust_forwarded`, `X-Forwarded-Proto` and `X-Forwarded-Host` win.
    pub(crate) fn of(parts: &Parts, policy: &UrlPolicy) -> Self {
        let forwarded = |name: &str| {
            policy
                .trust_forwarded
                .then(|| parts.headers.get(name).and_then(|v| v.to_str().ok()))
                .flatten()
                .map(|v| v.split(',').next().unwrap_or("").trim().to_owned())
        };
        let default_scheme = if policy.https { "https" } else { "http" };
        let scheme = forwarded("x-forwarded-proto")
            .filter(|p| p == "http" || p == "https")
            .unwrap_or_else(|| parts.uri.scheme_str().unwrap_or(default_scheme).to_owned());
        let authority = forwarded("x-forwarded-host")
            .filter(|a| valid_authority(a))
            .or_else(|| parts.uri.authority().map(|a| a.as_str().to_owned()))
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .filter(|a| valid_authority(a))
            .unwrap_or_else(|| "localhost".to_owned());
        RequestOrigin {
            scheme,
            authority,
            mount_path: policy.mount_path.clone(),
        }
    }

    /// `scheme://authority` and the mount path.
    pub(crate) fn base(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.mount_path)
    }

    /// The base of reply URLs: the public base URL if one is set, else [`RequestOrigin::base`].
    pub(crate) fn reply_base(&self, policy: &UrlPolicy) -> String {
        policy
            .public_base_url
            .clone()
            .unwrap_or_else(|| self.base())
    }

    /// The absolute URL of the request (path and query as sent, under the mount path).
    pub(crate) fn url_of(&self, parts: &Parts) -> String {
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        format!("{}{}", self.base(), pq)
    }
}

/// Why a request path is refused before it is routed, as IIS request filtering refuses it
/// (`allowDoubleEscaping="false"`): an IIS `%uXXXX` escape, or a percent escape that still
/// leaves an escape after one decoding (`%252e` → `%2e`). `None` for an acceptable path.
pub(crate) fn hostile_path(path: &str) -> Option<&'static str> {
    if has_u_escape(path.as_bytes()) {
        return Some("the request target uses a %u escape");
    }
    let once: Vec<u8> = percent_encoding::percent_decode_str(path).collect();
    if has_percent_escape(&once) || has_u_escape(&once) {
        return Some("the request target is double-encoded");
    }
    None
}

fn has_percent_escape(bytes: &[u8]) -> bool {
    bytes
        .windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
}

fn has_u_escape(bytes: &[u8]) -> bool {
    bytes.windows(6).any(|w| {
        w[0] == b'%' && (w[1] == b'u' || w[1] == b'U') && w[2..].iter().all(u8::is_ascii_hexdigit)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_and_u_escapes_are_hostile() {
        for bad in [
            "/upload/%252e%252e%252fetc",
            "/upload/a%2525b",
            "/upload/%u002e%u002e/x",
            "/upload/%U002E",
            "/upload/%25u002e",
        ] {
            assert!(hostile_path(bad).is_some(), "{bad}");
        }
        for good in [
            "/upload/a%20b.bin",
            "/upload/100%25",
            "/upload/%25zz",
            "/upload/plain/x.bin",
            "/upload/%u00",
        ] {
            assert_eq!(hostile_path(good), None, "{good}");
        }
    }
}
