//! The progress bars of `bitsd upload`: the upload (`BG_JOB_PROGRESS`), then the reply
//! (`BG_JOB_REPLY_PROGRESS`), sized to the terminal, and the job's events as lines.

use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::progress::{JobEvent, Progress, ProgressObserver, BG_SIZE_UNKNOWN};

/// One bar per transfer; `{wide_bar}` takes what the terminal width leaves, so a line never
/// wraps (80 columns included).
pub(crate) const TEMPLATE: &str =
    "{prefix:>6} [{wide_bar}] {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec:>12} {msg:<15}";

pub(crate) struct Bars {
    multi: MultiProgress,
    upload: ProgressBar,
    reply: Mutex<Option<ProgressBar>>,
    style: ProgressStyle,
    quiet: bool,
    /// Called with the session id when the server creates a session (the CLI's state file).
    on_session: Box<dyn Fn(&str) + Send + Sync>,
}

impl Bars {
    /// Bars for an upload of `total` bytes: the first frame already shows the real size.
    pub(crate) fn new(
        quiet: bool,
        total: u64,
        on_session: Box<dyn Fn(&str) + Send + Sync>,
    ) -> Self {
        let target = if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        Self::with_target(target, quiet, total, on_session)
    }

    /// The same, drawing to `target`.
    pub(crate) fn with_target(
        target: ProgressDrawTarget,
        quiet: bool,
        total: u64,
        on_session: Box<dyn Fn(&str) + Send + Sync>,
    ) -> Self {
        let style = ProgressStyle::with_template(TEMPLATE)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let multi = MultiProgress::with_draw_target(target);
        let upload = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        upload.set_style(style.clone());
        upload.set_prefix("upload");
        let upload = if quiet { upload } else { multi.add(upload) };
        Bars {
            multi,
            upload,
            reply: Mutex::new(None),
            style,
            quiet,
            on_session,
        }
    }

    fn say(&self, msg: &str) {
        if self.quiet || self.multi.is_hidden() {
            eprintln!("{msg}");
        } else {
            let _ = self.multi.println(msg);
        }
    }

    /// Ends the bars: complete ones stay drawn complete; after an error, a cancel or a
    /// suspend they stay at the position reached (never redrawn as 100%).
    pub(crate) fn end(&self, state: &str, success: bool) {
        let bars = std::iter::once(self.upload.clone())
            .chain(self.reply.lock().ok().and_then(|r| r.clone()));
        for bar in bars {
            bar.set_message(state.to_owned());
            if success {
                bar.finish();
            } else {
                bar.abandon();
            }
        }
    }
}

impl ProgressObserver for Bars {
    fn progress(&self, p: &Progress) {
        self.upload.set_length(p.upload.bytes_total);
        self.upload.set_position(p.upload.bytes_transferred);
        self.upload.set_message(p.state.as_str());
        if p.reply.bytes_total != BG_SIZE_UNKNOWN {
            if let Ok(mut r) = self.reply.lock() {
                let bar = r.get_or_insert_with(|| {
                    self.upload.set_message("");
                    let b = ProgressBar::with_draw_target(
                        Some(p.reply.bytes_total),
                        ProgressDrawTarget::hidden(),
                    );
                    b.set_style(self.style.clone());
                    b.set_prefix("reply");
                    if self.quiet {
                        b
                    } else {
                        self.multi.add(b)
                    }
                });
                bar.set_length(p.reply.bytes_total);
                bar.set_position(p.reply.bytes_transferred);
                bar.set_message(p.state.as_str());
            }
        }
    }

    fn event(&self, e: &JobEvent) {
        match e {
            JobEvent::SessionCreated { session_id, .. } => (self.on_session)(session_id),
            JobEvent::Retrying {
                attempt,
                delay,
                error,
            } => self.say(&format!("retry {attempt} in {delay:?}: {error}")),
            JobEvent::SessionRestarted { old_session_id } => self.say(&format!(
                "session {old_session_id} not found on the server: starting over"
            )),
            JobEvent::FragmentSizeReduced { from, to } => self.say(&format!(
                "413: fragment of {from} bytes too large, now {to}"
            )),
            JobEvent::HostIdRedirect { url, .. } => {
                self.say(&format!("server farm: continuing at {url}"))
            }
            JobEvent::HostIdFallback { url } => {
                self.say(&format!("Host-Id unreachable: falling back to {url}"))
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::{JobProgress, JobState, ReplyProgress};
    use std::sync::Arc;

    /// An 80-column terminal that keeps every line drawn.
    #[derive(Debug, Default, Clone)]
    struct Screen(Arc<Mutex<Vec<String>>>);

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            80
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(s)
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            if !s.is_empty() {
                self.0.lock().expect("screen").push(s.to_owned());
            }
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bars_fit_80_columns_and_never_show_an_empty_first_frame() {
        let screen = Screen::default();
        let total = 3 * 1024 * 1024 * 1024 + 12345;
        let bars = Bars::with_target(
            ProgressDrawTarget::term_like(Box::new(screen.clone())),
            false,
            total,
            Box::new(|_| {}),
        );
        let mut p = Progress {
            state: JobState::Connecting,
            upload: JobProgress {
                bytes_total: total,
                bytes_transferred: 0,
            },
            reply: ReplyProgress {
                bytes_total: BG_SIZE_UNKNOWN,
                bytes_transferred: 0,
            },
        };
        bars.progress(&p);
        for state in [JobState::Transferring, JobState::TransientError] {
            p.state = state;
            p.upload.bytes_transferred += 1_000_000_007;
            bars.progress(&p);
            bars.upload.tick();
        }
        p.reply.bytes_total = 987_654_321;
        p.reply.bytes_transferred = 1234;
        bars.progress(&p);
        bars.end("SUSPENDED", false);
        let lines = screen.0.lock().expect("screen").clone();
        assert!(!lines.is_empty());
        for l in &lines {
            assert!(
                l.chars().count() <= 80,
                "{} columns: {l:?}",
                l.chars().count()
            );
            assert!(!l.contains("0 B/0 B"), "{l:?}");
        }
        // Abandoned, not finished: the upload bar is not redrawn as complete.
        assert!(!bars.upload.is_finished() || bars.upload.position() < total);
        assert!(bars.upload.position() < total);
    }
}
