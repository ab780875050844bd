//! Reply handlers as the configuration file describes them.

use std::sync::Arc;
use std::time::Duration;

use bitsd_reply_handlers::{EchoHandler, ReplyHandler};

use super::{HandlerSpec, NotificationMode};

/// Builds the reply handler a spec describes.
pub fn build_handler(spec: &HandlerSpec) -> Result<Arc<dyn ReplyHandler>, String> {
    use bitsd_reply_handlers::{
        CommandConfig, CommandHandler, DigestHandler, HttpNotifyConfig, HttpNotifyHandler,
        Notification, StaticHandler,
    };
    Ok(match spec {
        HandlerSpec::Echo => Arc::new(EchoHandler),
        HandlerSpec::Digest => Arc::new(DigestHandler::new()),
        HandlerSpec::Static {
            file: Some(file),
            url: None,
        } => Arc::new(StaticHandler::file(file.clone())),
        HandlerSpec::Static {
            file: None,
            url: Some(url),
        } => Arc::new(StaticHandler::url(url.clone()).map_err(|e| format!("static handler: {e}"))?),
        HandlerSpec::Static { .. } => {
            return Err("static handler: give exactly one of file or url".into())
        }
        HandlerSpec::Command {
            program,
            args,
            timeout_secs,
            failure_status,
            env,
            pass_env,
        } => {
            let mut config = CommandConfig::new(program.clone()).args(args.iter().cloned());
            for name in pass_env {
                config = config.pass_env(name.clone());
            }
            for (k, v) in env {
                config = config.env(k.clone(), v.clone());
            }
            if let Some(t) = timeout_secs {
                config = config.timeout(Duration::from_secs((*t).max(1)));
            }
            if let Some(s) = failure_status {
                config = config.failure_status(*s);
            }
            Arc::new(CommandHandler::new(config).map_err(|e| format!("command handler: {e}"))?)
        }
        HandlerSpec::Http {
            url,
            notification,
            timeout_secs,
            data_entity_headers,
        } => {
            let mode = match notification.unwrap_or(NotificationMode::ByValue) {
                NotificationMode::ByValue => Notification::ByValue,
                NotificationMode::ByReference => Notification::ByReference,
            };
            let mut config = HttpNotifyConfig::new(url.clone(), mode)
                .also_send_data_entity_headers(*data_entity_headers);
            if let Some(t) = timeout_secs {
                config = config.timeout(Duration::from_secs((*t).max(1)));
            }
            Arc::new(HttpNotifyHandler::new(config).map_err(|e| format!("http handler: {e}"))?)
        }
    })
}
