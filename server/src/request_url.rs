//! The absolute URLs a request implies: the job's remote URL and the base of reply URLs.

use http::request::Parts;

/// Scheme and authority a request was addressed to.
#[derive(Clone, Debug)]
pub(crate) struct RequestOrigin {
    pub(crate) scheme: String,
    pub(crate) authority: String,
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
    pub(crate) fn of(parts: &Parts, https: bool) -> Self {
        let default_scheme = if https { "https" } else { "http" };
        let scheme = parts.uri.scheme_str().unwrap_or(default_scheme).to_owned();
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .filter(|a| valid_authority(a))
            .unwrap_or_else(|| "localhost".to_owned());
        RequestOrigin { scheme, authority }
    }

    /// `scheme://authority`.
    pub(crate) fn base(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }

    /// The absolute URL of the request (path and query as sent).
    pub(crate) fn url_of(&self, parts: &Parts) -> String {
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        format!("{}{}", self.base(), pq)
    }
}
