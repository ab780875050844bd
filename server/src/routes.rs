//! Routes: which URL prefixes take uploads, and what happens when an upload completes.

use std::sync::Arc;

use bitsd_reply_handlers::ReplyHandler;
pub use bitsd_storage::UploadMode;

/// One upload virtual directory: a URL prefix, its mode, and for upload-reply its handler.
#[derive(Clone)]
pub struct Route {
    prefix: String,
    mode: UploadMode,
    handler: Option<Arc<dyn ReplyHandler>>,
    allow_overwrites: bool,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("prefix", &self.prefix)
            .field("mode", &self.mode)
            .field("allow_overwrites", &self.allow_overwrites)
            .finish_non_exhaustive()
    }
}

fn normalize(prefix: &str) -> String {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        "/".to_owned()
    } else {
        format!("/{trimmed}/")
    }
}

impl Route {
    /// A plain upload route: completed uploads are committed under the files root, at the path
    /// the URL names below `prefix`.
    pub fn upload(prefix: &str) -> Self {
        Route {
            prefix: normalize(prefix),
            mode: UploadMode::Upload,
            handler: None,
            allow_overwrites: false,
        }
    }

    /// An upload-reply route: `handler` turns each completed upload into its reply.
    pub fn upload_reply(prefix: &str, handler: impl ReplyHandler) -> Self {
        Self::upload_reply_shared(prefix, Arc::new(handler))
    }

    /// An upload-reply route with a shared handler.
    pub fn upload_reply_shared(prefix: &str, handler: Arc<dyn ReplyHandler>) -> Self {
        Route {
            prefix: normalize(prefix),
            mode: UploadMode::UploadReply,
            handler: Some(handler),
            allow_overwrites: false,
        }
    }

    /// Whether an upload may replace an existing file (`BITSAllowOverwrites`; default off).
    pub fn allow_overwrites(mut self, allow: bool) -> Self {
        self.allow_overwrites = allow;
        self
    }

    /// The URL prefix, with leading and trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Plain upload or upload-reply.
    pub fn mode(&self) -> UploadMode {
        self.mode
    }

    /// The reply handler (upload-reply routes).
    pub fn handler(&self) -> Option<&Arc<dyn ReplyHandler>> {
        self.handler.as_ref()
    }

    /// Whether overwrites are allowed.
    pub fn overwrites_allowed(&self) -> bool {
        self.allow_overwrites
    }

    /// The path of a session's reply below this route.
    pub(crate) fn reply_path(&self, id_simple: &str) -> String {
        format!("{}BITS-Sessions/{id_simple}/response", self.prefix)
    }
}

/// The first pair of routes where one captures the other's reply downloads: a prefix at or
/// below another route's `<prefix>BITS-Sessions/` wins the longest-prefix match for that
/// route's reply URLs, which then answer 405 instead of the reply. `(capturing, shadowed)`.
pub(crate) fn reply_path_conflict(routes: &[Route]) -> Option<(&Route, &Route)> {
    routes.iter().find_map(|shadowed| {
        let replies = format!("{}BITS-Sessions/", shadowed.prefix);
        routes
            .iter()
            .find(|r| r.prefix.starts_with(&replies))
            .map(|capturing| (capturing, shadowed))
    })
}

/// The message for a [`reply_path_conflict`].
pub(crate) fn reply_path_conflict_message(capturing: &Route, shadowed: &Route) -> String {
    format!(
        "route {} is inside {}BITS-Sessions/, where route {} serves its reply downloads \
         (they would answer 405): choose a prefix outside it",
        capturing.prefix, shadowed.prefix, shadowed.prefix
    )
}

/// Routes, matched by longest prefix.
#[derive(Clone, Debug, Default)]
pub(crate) struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub(crate) fn new(mut routes: Vec<Route>) -> Self {
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        RouteTable { routes }
    }

    /// The route serving `path`.
    pub(crate) fn find(&self, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| path.starts_with(r.prefix.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_inside_reply_paths_conflicts() {
        let echo = || bitsd_reply_handlers::EchoHandler;
        let routes = vec![
            Route::upload_reply("/app/", echo()),
            Route::upload("/app/sub/"),
            Route::upload("/app/BITS-Sessions/x/"),
        ];
        let (capturing, shadowed) = reply_path_conflict(&routes).unwrap();
        assert_eq!(capturing.prefix(), "/app/BITS-Sessions/x/");
        assert_eq!(shadowed.prefix(), "/app/");
        // Nested prefixes elsewhere are fine.
        assert!(reply_path_conflict(&routes[..2]).is_none());
        assert!(
            reply_path_conflict(&[Route::upload("/"), Route::upload("/BITS-Sessions/")]).is_some()
        );
    }
}
