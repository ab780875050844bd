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
