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
