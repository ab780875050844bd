//! The `http` handler: the IIS-compatible notification of a backend (§9), whose answer is the
//! reply.

mod notify;
mod upload_body;

use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use url::Url;

use crate::{HandlerConfigError, HandlerError, ReplyFuture, ReplyHandler, Upload};
use upload_body::UploadBody;

/// The file in [`Upload::session_dir`] named in `BITS-Response-DataFile-Name` (by reference):
/// where the backend may write the reply.
pub const RESPONSE_FILE: &str = "response";

/// The name the backend's response body is streamed to in [`Upload::session_dir`], made
/// unique per notification by [`Upload::unique_session_file`]
/// (`notification-reply.<unique>.tmp`).
pub const NOTIFICATION_REPLY_FILE: &str = "notification-reply.tmp";

/// The longest notification URL IIS accepts (BITSServerNotificationURL, §7).
const MAX_URL_LEN: usize = 2200;

/// Size of the chunks the upload is sent in (by value).
const CHUNK: usize = 64 * 1024;

/// Request header: the job's remote URL (§9.1).
const ORIGINAL_REQUEST_URL: &str = "bits-original-request-url";
/// Request header, by reference: the upload file (§9.1).
const REQUEST_DATAFILE: &str = "bits-request-datafile-name";
/// Request header, by reference: where the backend may write the reply (§9.1).
const RESPONSE_DATAFILE: &str = "bits-response-datafile-name";
/// MC-BUP 2.2.12.2's name for [`REQUEST_DATAFILE`].
const REQUEST_DATAENTITY: &str = "bits-request-dataentity-name";
/// MC-BUP 2.2.12.2's name for [`RESPONSE_DATAFILE`].
const RESPONSE_DATAENTITY: &str = "bits-response-dataentity-name";
/// Response header: the reply is this existing absolute URL (§9.2).
const STATIC_RESPONSE_URL: &str = "bits-static-response-url";
/// Response header: also commit the upload to its destination (§6.1, §9.2).
const COPY_FILE_TO_DESTINATION: &str = "bits-copy-file-to-destination";

/// How the backend gets the upload (`BITSServerNotificationType`, §9.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Notification {
    /// Type 2: the POST body is the upload, and the response body is the reply.
    #[default]
    ByValue,
    /// Type 1: the POST has no body; `BITS-Request-DataFile-Name` names the upload file and
    /// `BITS-Response-DataFile-Name` the file the backend may write the reply to.
    ByReference,
}

impl Notification {
    /// The mode of an IIS `BITSServerNotificationType` value: 1 by reference, 2 by value
    /// (0, no notification, and anything else give `None`).
    pub fn from_iis_type(value: u32) -> Option<Self> {
        match value {
            1 => Some(Notification::ByReference),
            2 => Some(Notification::ByValue),
            _ => None,
        }
    }

    /// The IIS `BITSServerNotificationType` value of this mode.
    pub fn iis_type(self) -> u32 {
        match self {
            Notification::ByReference => 1,
            Notification::ByValue => 2,
        }
    }
}

/// How a [`HttpNotifyHandler`] notifies its backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpNotifyConfig {
    /// The notification URL (BITSServerNotificationURL): an absolute `http` URL, or a
    /// relative one, resolved against the directory of each job's remote URL (§9.1) as the
    /// server names it ([`Upload::server_url`]: its public URL or its listener's address,
    /// never the client's `Host`).
    /// HTTP only; at most 2200 characters.
    pub url: String,
    /// By value or by reference. Default: by value.
    pub notification: Notification,
    /// How long the backend may be silent: for connecting, for taking the upload, for
    /// answering after it, and between chunks of its response body. Past it the handler fails
    /// as unreachable (504, transient, §9.4). Default: 300 s.
    pub timeout: Duration,
    /// By reference, also send MC-BUP's `BITS-Request-DataEntity-Name` /
    /// `BITS-Response-DataEntity-Name` next to the `…-DataFile-Name` headers. Default: false.
    pub also_send_data_entity_headers: bool,
}

impl HttpNotifyConfig {
    /// The default [`HttpNotifyConfig::timeout`]: 300 s, the IIS backend timeout (§9.4).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

    /// Notifies `url` in `notification` mode, with the defaults for everything else.
    pub fn new(url: impl Into<String>, notification: Notification) -> Self {
        HttpNotifyConfig {
            url: url.into(),
            notification,
            ..Self::default()
        }
    }

    /// Sets [`HttpNotifyConfig::timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`HttpNotifyConfig::also_send_data_entity_headers`].
    pub fn also_send_data_entity_headers(mut self, yes: bool) -> Self {
        self.also_send_data_entity_headers = yes;
        self
    }
}

impl Default for HttpNotifyConfig {
    /// No URL (it must be set), by value, a 300 s timeout, no `DataEntity` headers.
    fn default() -> Self {
        HttpNotifyConfig {
            url: String::new(),
            notification: Notification::ByValue,
            timeout: Self::DEFAULT_TIMEOUT,
            also_send_data_entity_headers: false,
        }
    }
}

/// The configured notification URL, checked.
#[derive(Clone, Debug)]
enum Target {
    Absolute(Url),
    Relative(String),
}

/// The HTTP client, with the request body type the handler sends.
type HttpClient = Client<HttpConnector, UploadBody>;

/// Notifies an HTTP backend of each finished upload exactly as the IIS BITS extension does
/// (§9), and turns its answer into the reply.
///
/// The request is `POST` to the notification URL (a relative one resolved against the
/// directory of the job's remote URL as the server names it, [`Upload::server_url`], never
/// against the client's `Host`; the remote URL's query string appended), with `Host`
/// and `BITS-Original-Request-URL: <remote URL>`, and no `BITS-Packet-Type`:
/// * by value, the body is the upload, streamed from its file with its exact
///   `Content-Length`;
/// * by reference, `Content-Length: 0`, `BITS-Request-DataFile-Name: <absolute upload path>`
///   and `BITS-Response-DataFile-Name: <absolute path of` [`RESPONSE_FILE`] `in the session
///   directory>` (plus the `…-DataEntity-Name` twins if configured).
///
/// The answer:
/// * any status but 200 → [`HandlerError::Status`] with that status (the server relays it,
///   §9.5);
/// * no connection, a reset or dropped connection, or silence past the timeout →
///   [`HandlerError::Unreachable`] (504, transient);
/// * 200 with `BITS-Static-Response-URL` → [`Reply::static_url`](crate::Reply::static_url) (it must be an absolute
///   `http`/`https` URL, else the handler fails with 500);
/// * 200 otherwise: by value the response body is the reply; by reference a non-empty
///   response body is the reply, else the file the backend wrote at
///   `BITS-Response-DataFile-Name` if it exists, else the reply is empty (the REC of §9.2).
///   The body is streamed to a file of this notification's own in the session directory
///   (`notification-reply.<unique>.tmp`, see [`NOTIFICATION_REPLY_FILE`]), never held in
///   memory;
/// * `BITS-Copy-File-To-Destination` (any value) on a 200 → [`Reply::with_commit_upload`](crate::Reply::with_commit_upload).
#[derive(Clone, Debug)]
pub struct HttpNotifyHandler {
    config: Arc<HttpNotifyConfig>,
    target: Target,
    client: HttpClient,
}

impl HttpNotifyHandler {
    /// A handler notifying `config.url`. Fails if the URL is empty, longer than 2200
    /// characters, not a valid URL, `https` ([`HandlerConfigError::HttpsNotification`]), of
    /// another scheme, or without a host; or if the timeout is zero.
    pub fn new(config: HttpNotifyConfig) -> Result<Self, HandlerConfigError> {
        let raw = config.url.trim();
        let invalid = |reason: &str| HandlerConfigError::InvalidUrl {
            url: config.url.clone(),
            reason: reason.to_owned(),
        };
        if raw.is_empty() {
            return Err(invalid("empty"));
        }
        if raw.len() > MAX_URL_LEN {
            return Err(invalid("longer than 2200 characters"));
        }
        if config.timeout.is_zero() {
            return Err(HandlerConfigError::Invalid(
                "the notification timeout is zero".into(),
            ));
        }
        let target = match Url::parse(raw) {
            Ok(url) => {
                check_http(&url).map_err(|e| match e {
                    NotHttp::Https => HandlerConfigError::HttpsNotification(config.url.clone()),
                    NotHttp::Other(reason) => invalid(&reason),
                })?;
                Target::Absolute(url)
            }
            Err(url::ParseError::RelativeUrlWithoutBase) => {
                // Check it resolves to an http URL against a sample remote URL.
                let sample = Url::parse("http://host.invalid/vdir/file.bin")
                    .map_err(|e| invalid(&e.to_string()))?;
                let resolved = sample.join(raw).map_err(|e| invalid(&e.to_string()))?;
                check_http(&resolved).map_err(|e| match e {
                    NotHttp::Https => HandlerConfigError::HttpsNotification(config.url.clone()),
                    NotHttp::Other(reason) => invalid(&reason),
                })?;
                Target::Relative(raw.to_owned())
            }
            Err(e) => return Err(invalid(&e.to_string())),
        };

        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.timeout));
        connector.set_nodelay(true);
        // One connection per notification: nothing is kept idle that the backend could close
        // under us.
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        Ok(HttpNotifyHandler {
            config: Arc::new(config),
            target,
            client,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &HttpNotifyConfig {
        &self.config
    }

    /// The URL notified for a job whose remote URL is `original_url` (§9.1): the notification
    /// URL, resolved against `original_url` if relative, with `original_url`'s query string
    /// appended. Fails with 500 if `original_url` is not an absolute URL or the result is not
    /// an `http` URL.
    pub fn notification_url(&self, original_url: &str) -> Result<Url, HandlerError> {
        let remote = Url::parse(original_url).map_err(|e| {
            HandlerError::internal(format!("remote URL {original_url:?} is not valid: {e}"))
        })?;
        let mut url = match &self.target {
            Target::Absolute(url) => url.clone(),
            Target::Relative(rel) => remote.join(rel).map_err(|e| {
                HandlerError::internal(format!(
                    "notification URL {rel:?} does not resolve against {original_url:?}: {e}"
                ))
            })?,
        };
        if let Err(e) = check_http(&url) {
            let why = match e {
                NotHttp::Https => "https is not supported for notifications".to_owned(),
                NotHttp::Other(reason) => reason,
            };
            return Err(HandlerError::internal(format!(
                "notification URL {url} (for {original_url:?}): {why}"
            )));
        }
        if let Some(query) = remote.query().filter(|q| !q.is_empty()) {
            let joined = match url.query().filter(|q| !q.is_empty()) {
                Some(own) => format!("{own}&{query}"),
                None => query.to_owned(),
            };
            url.set_query(Some(&joined));
        }
        url.set_fragment(None);
        Ok(url)
    }

    /// The URL notified for `upload`. A relative notification URL resolves against
    /// [`Upload::server_url`] (the server's own name), never against
    /// [`Upload::original_url`], whose host the client chose: otherwise a client could make
    /// the server post the upload to any host and port it likes and hand back the answer.
    fn target_for(&self, upload: &Upload) -> Result<Url, HandlerError> {
        match &self.target {
            Target::Absolute(_) => self.notification_url(&upload.original_url),
            Target::Relative(rel) => {
                let base = upload.server_url.as_deref().ok_or_else(|| {
                    HandlerError::internal(format!(
                        "relative notification URL {rel:?} needs the server's own URL \
                         (set public_url); the client's Host is never used"
                    ))
                })?;
                self.notification_url(base)
            }
        }
    }
}

impl ReplyHandler for HttpNotifyHandler {
    fn reply(&self, upload: Upload) -> ReplyFuture {
        let this = self.clone();
        Box::pin(async move { this.notify(upload).await })
    }
}

/// Why a URL is not an `http` URL with a host.
enum NotHttp {
    Https,
    Other(String),
}

fn check_http(url: &Url) -> Result<(), NotHttp> {
    match url.scheme() {
        "http" => {}
        "https" => return Err(NotHttp::Https),
        other => return Err(NotHttp::Other(format!("scheme {other:?} is not http"))),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(NotHttp::Other("no host".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler(url: &str) -> HttpNotifyHandler {
        HttpNotifyHandler::new(HttpNotifyConfig::new(url, Notification::ByValue)).unwrap()
    }

    #[test]
    fn urls_are_checked_at_construction() {
        let new = |u: &str| HttpNotifyHandler::new(HttpNotifyConfig::new(u, Notification::ByValue));
        assert!(new("http://backend:8080/app/notify").is_ok());
        assert!(new("myasp.asp").is_ok());
        assert!(new("/app/notify?x=1").is_ok());
        assert!(new("../other/notify").is_ok());
        assert!(matches!(
            new("https://backend/app").unwrap_err(),
            HandlerConfigError::HttpsNotification(_)
        ));
        assert!(matches!(
            new("//backend/app").map(|h| h.notification_url("https://h/v/f")),
            Ok(Err(HandlerError::Status { status: 500, .. }))
        ));
        for bad in [
            "",
            "   ",
            "ftp://h/x",
            "mailto:a@b",
            "http://",
            "http://[::1/x",
        ] {
            assert!(
                matches!(new(bad).unwrap_err(), HandlerConfigError::InvalidUrl { .. }),
                "{bad:?}"
            );
        }
        let long = format!("http://h/{}", "a".repeat(2200));
        assert!(new(&long).is_err());
        assert!(HttpNotifyHandler::new(
            HttpNotifyConfig::new("http://h/", Notification::ByValue).timeout(Duration::ZERO)
        )
        .is_err());
    }

    #[test]
    fn config_defaults() {
        let c = HttpNotifyConfig::new("http://h/n", Notification::ByReference);
        assert_eq!(c.timeout, Duration::from_secs(300));
        assert!(!c.also_send_data_entity_headers);
        assert_eq!(Notification::default(), Notification::ByValue);
        assert_eq!(
            Notification::from_iis_type(1),
            Some(Notification::ByReference)
        );
        assert_eq!(Notification::from_iis_type(2), Some(Notification::ByValue));
        assert_eq!(Notification::from_iis_type(0), None);
        assert_eq!(Notification::ByReference.iis_type(), 1);
    }

    #[test]
    fn query_string_is_appended() {
        // §9.1's example.
        let h = handler("http://otherserver/myvdir2/bag.asp");
        let url = h
            .notification_url("http://myserver/myvdir/subdir/file.asp?ACCOUNT=86433")
            .unwrap();
        assert_eq!(
            url.as_str(),
            "http://otherserver/myvdir2/bag.asp?ACCOUNT=86433"
        );
        // The notification URL's own query comes first.
        let h = handler("http://otherserver/bag.asp?from=bits");
        let url = h.notification_url("http://myserver/f?a=1&b=2").unwrap();
        assert_eq!(url.as_str(), "http://otherserver/bag.asp?from=bits&a=1&b=2");
        // No query, no '?'.
        let url = h.notification_url("http://myserver/f").unwrap();
        assert_eq!(url.as_str(), "http://otherserver/bag.asp?from=bits");
    }

    #[test]
    fn relative_urls_resolve_against_the_remote_directory() {
        // §9.1's example.
        let h = handler("myasp.asp");
        let url = h
            .notification_url("http://myserver/myvdir/file.txt")
            .unwrap();
        assert_eq!(url.as_str(), "http://myserver/myvdir/myasp.asp");
        let url = h
            .notification_url("http://myserver:8080/myvdir/sub/file.txt?x=%20y#frag")
            .unwrap();
        assert_eq!(
            url.as_str(),
            "http://myserver:8080/myvdir/sub/myasp.asp?x=%20y"
        );
        let h = handler("/root/notify");
        let url = h
            .notification_url("http://myserver/myvdir/file.txt")
            .unwrap();
        assert_eq!(url.as_str(), "http://myserver/root/notify");
        // An https remote URL cannot be notified relative to (HTTP only).
        let err = handler("myasp.asp")
            .notification_url("https://myserver/myvdir/file.txt")
            .unwrap_err();
        assert!(matches!(err, HandlerError::Status { status: 500, .. }));
        // A remote URL that is not absolute.
        let err = handler("myasp.asp")
            .notification_url("/myvdir/file.txt")
            .unwrap_err();
        assert!(matches!(err, HandlerError::Status { status: 500, .. }));
    }
}
