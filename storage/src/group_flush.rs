//! The meta store's group commit: many sessions' durable changes share one sled flush.
//!
//! Every durable change takes a ticket; one flush covers every ticket taken before it
//! started. Who runs a flush depends on who waits:
//!
//! - a caller on a blocking thread ([`GroupFlush::wait`], e.g. a durable file fragment whose
//!   bytes that thread just synced) **leads** when no flush is running: it flushes on its own
//!   thread, with no hand-off to the flusher thread and back. When a flush is running it
//!   **follows**: it sleeps until the flush that covers its ticket ends (the running one if
//!   its ticket was taken before that flush started, else the next one), woken once.
//! - a task on the runtime ([`GroupFlush::flush_async`]) must not block: it takes a ticket,
//!   wakes the `bitsd-meta-flush` thread and awaits the news on a watch channel.
//!
//! Only one flush runs at a time. Whoever ends a flush wakes the flusher thread when tickets
//! are still waiting, so a follower's ticket is always flushed by someone.
//!
//! **A failed flush poisons the store until the process restarts.** After a failed
//! `fdatasync` the kernel may have dropped the dirty pages it could not write, and a later
//! `fdatasync` succeeds without them ("fsyncgate"); sled's memory, meanwhile, already holds
//! the changes the failed flush was to make durable. So once a flush fails, no ticket not
//! flushed before it is ever reported durable, no further flush runs, and the store refuses
//! work ([`GroupFlush::poisoned`]) until a restart recovers what the disk really holds.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::{FlushTicket, StorageError};

/// Group commit state: a ticket per flush request; one flush covers every ticket taken
/// before it started.
#[derive(Debug)]
pub(crate) struct GroupFlush {
    state: Mutex<FlushState>,
    db: sled::Db,
    /// The log files to `fdatasync` after sled's flush (held by the running flush).
    files: Mutex<Option<LogFiles>>,
    /// Signalled when tickets are requested for the flusher thread, when a flush ends with
    /// tickets still waiting, or when the store closes.
    work: Condvar,
    /// Signalled when a flush ends: flush number `n` signals `done[n % 2]`, so followers
    /// waiting for the next flush are not woken by the end of the running one.
    done: [Condvar; 2],
    /// The same news for async waiters: `(flushed, poisoned)` after every flush.
    progress: tokio::sync::watch::Sender<Progress>,
}

/// What async waiters watch: every ticket up to `.0` is durable; `.1` the failure that
/// poisoned the store (every later ticket fails with it).
type Progress = (u64, Option<String>);

#[derive(Debug, Default)]
struct FlushState {
    /// Tickets handed out.
    requested: u64,
    /// Every ticket up to this one is durable.
    flushed: u64,
    /// The first failed flush's error: from then on no ticket past `flushed` is durable.
    poisoned: Option<String>,
    /// The flush in progress, if any: the last ticket it covers.
    running: Option<u64>,
    /// Flushes started so far (the running one's number while one runs).
    rounds: u64,
    /// The store is closing: the flusher finishes what was requested and ends.
    closing: bool,
}

impl FlushState {
    /// Every ticket up to this one has an outcome (all of them once poisoned).
    fn settled(&self) -> u64 {
        if self.poisoned.is_some() {
            u64::MAX
        } else {
            self.flushed
        }
    }

    /// The outcome of `ticket`, once it has one.
    fn outcome(&self, ticket: u64) -> Option<Result<(), StorageError>> {
        if self.flushed >= ticket {
            return Some(Ok(()));
        }
        self.poisoned.as_deref().map(|why| Err(poison_error(why)))
    }
}

impl GroupFlush {
    fn new(db: sled::Db, files: Option<LogFiles>) -> Self {
        GroupFlush {
            state: Mutex::default(),
            db,
            files: Mutex::new(files),
            work: Condvar::new(),
            done: [Condvar::new(), Condvar::new()],
            progress: tokio::sync::watch::channel((0, None)).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, FlushState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ticket, and the flusher thread woken to flush it.
    pub(crate) fn request(&self) -> FlushTicket {
        let mut st = self.lock();
        st.requested += 1;
        self.work.notify_one();
        FlushTicket::new(st.requested)
    }

    /// A ticket for a caller that waits for it itself with [`GroupFlush::wait`] (leading
    /// the flush when none runs): the flusher thread is not woken.
    pub(crate) fn request_quiet(&self) -> FlushTicket {
        let mut st = self.lock();
        st.requested += 1;
        FlushTicket::new(st.requested)
    }

    /// The error of the failed flush that poisoned the store, if one failed: from then on
    /// the store acknowledges nothing until the process restarts.
    pub(crate) fn poisoned(&self) -> Option<String> {
        self.lock().poisoned.clone()
    }

    /// Takes a ticket and waits for it on the calling task: no thread sits in a wait, and the
    /// flusher's news wakes the task directly.
    pub(crate) fn flush_async(self: &Arc<Self>) -> crate::meta::FlushFuture {
        let mut rx = self.progress.subscribe();
        let ticket = self.request().get();
        Box::pin(async move {
            loop {
                {
                    let (flushed, poisoned) = &*rx.borrow_and_update();
                    if *flushed >= ticket {
                        return Ok(());
                    }
                    if let Some(why) = poisoned {
                        return Err(poison_error(why));
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(StorageError::Meta(
                        "the meta store closed before the flush ended".into(),
                    ));
                }
            }
        })
    }

    /// Waits (blocking) until `ticket` is durable: leads a flush when none runs, else
    /// follows the flush that covers the ticket.
    pub(crate) fn wait(&self, ticket: FlushTicket) -> Result<(), StorageError> {
        let ticket = ticket.get();
        let mut st = self.lock();
        loop {
            if let Some(outcome) = st.outcome(ticket) {
                return outcome;
            }
            st = match st.running {
                None => self.lead(st),
                Some(target) => {
                    // Taken before the running flush started: it covers the ticket. Else the
                    // next one does (it starts after this ticket was taken).
                    let round = if ticket <= target {
                        st.rounds
                    } else {
                        st.rounds + 1
                    };
                    let cv = &self.done[(round % 2) as usize];
                    cv.wait(st).unwrap_or_else(|p| p.into_inner())
                }
            };
        }
    }

    /// Runs one flush covering every ticket requested so far on the calling thread (none may
    /// be running), then publishes its outcome.
    fn lead<'a>(&'a self, st: MutexGuard<'a, FlushState>) -> MutexGuard<'a, FlushState> {
        if st.poisoned.is_some() {
            // Nothing a flush does now can vouch for what the failed one lost.
            return st;
        }
        let (target, round) = Self::begin(st);
        // sled writes its log with `sync_file_range`, which neither flushes the drive's write
        // cache nor the log's new size: after sled's flush, an `fdatasync` of the log (and of
        // any new blob file) makes the group durable.
        let result = self.db.flush().map_err(|e| e.to_string()).and_then(|_| {
            match &mut *self.files.lock().unwrap_or_else(|p| p.into_inner()) {
                Some(files) => files.sync(),
                None => Ok(()),
            }
        });
        self.finish(target, round, result)
    }

    /// Marks a flush of every ticket requested so far as running: its last ticket and its
    /// number.
    fn begin(mut st: MutexGuard<'_, FlushState>) -> (u64, u64) {
        let target = st.requested;
        st.running = Some(target);
        st.rounds += 1;
        (target, st.rounds)
    }

    /// Publishes the outcome of flush `round` (covering tickets up to `target`) and makes
    /// sure the tickets still waiting get a flush.
    fn finish(
        &self,
        target: u64,
        round: u64,
        result: Result<(), String>,
    ) -> MutexGuard<'_, FlushState> {
        let mut st = self.lock();
        match result {
            // A flush that succeeds after one failed proves nothing about the failed one's
            // changes: `flushed` stays where the failure found it.
            Ok(()) if st.poisoned.is_none() => st.flushed = st.flushed.max(target),
            Ok(()) => {}
            Err(e) => {
                if st.poisoned.is_none() {
                    tracing::error!(
                        error = %e,
                        "the meta store could not make its log durable: nothing more is \
                         acknowledged; check the disk, then restart bitsd (recovery keeps \
                         everything acknowledged before the failure)"
                    );
                    st.poisoned = Some(e);
                }
            }
        }
        st.running = None;
        self.done[(round % 2) as usize].notify_all();
        if st.poisoned.is_some() {
            // Followers of the next flush too: there will be none, their tickets failed.
            self.done[((round + 1) % 2) as usize].notify_all();
        }
        self.progress
            .send_replace((st.flushed, st.poisoned.clone()));
        if st.requested > st.settled() || st.closing {
            // Followers of the next flush (and async waiters) need someone to run it.
            self.work.notify_one();
        }
        st
    }

    /// The flusher thread: flushes whenever tickets are waiting and no flush runs, until the
    /// store closes.
    fn run(&self) {
        let mut st = self.lock();
        loop {
            if st.running.is_none() && st.requested > st.settled() {
                st = self.lead(st);
            } else if st.closing && st.running.is_none() {
                return;
            } else {
                st = self.work.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

/// The error every ticket gets once a flush failed: what failed and what to do.
pub(crate) fn poison_error(why: &str) -> StorageError {
    StorageError::Meta(format!(
        "a flush of the meta store failed ({why}); nothing is acknowledged until bitsd \
         restarts: check the disk, then restart"
    ))
}

/// Owns the flusher thread; dropped with the last clone of the store, it lets the thread
/// finish the requested flushes and waits for it (so sled's lock is released afterwards).
#[derive(Debug)]
pub(crate) struct Flusher {
    pub(crate) group: Arc<GroupFlush>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    pub(crate) fn start(db: sled::Db, files: Option<LogFiles>) -> Result<Self, StorageError> {
        let group = Arc::new(GroupFlush::new(db, files));
        let g = group.clone();
        let thread = std::thread::Builder::new()
            .name("bitsd-meta-flush".into())
            .spawn(move || g.run())
            .map_err(|e| StorageError::Meta(format!("starting the flusher thread: {e}")))?;
        Ok(Flusher {
            group,
            thread: Some(thread),
        })
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.group.lock().closing = true;
        self.group.work.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The files of a sled database that sled itself does not `fsync` at a flush: its log
/// (`db`) and the blob files (`blobs/`) that large log entries are written to.
#[derive(Debug)]
pub(crate) struct LogFiles {
    log: std::fs::File,
    blobs: std::path::PathBuf,
    /// Blob files already synced (sled never rewrites one in place).
    synced: std::collections::HashSet<std::ffi::OsString>,
}

impl LogFiles {
    pub(crate) fn open(dir: &Path) -> Result<Self, StorageError> {
        let log = std::fs::File::open(dir.join("db")).map_err(|e| {
            StorageError::Meta(format!("opening {}: {e}", dir.join("db").display()))
        })?;
        Ok(LogFiles {
            log,
            blobs: dir.join("blobs"),
            synced: Default::default(),
        })
    }

    /// `fdatasync` of the log, then of every blob file not synced yet and of their directory.
    fn sync(&mut self) -> Result<(), String> {
        let context = |what: &Path, e: std::io::Error| format!("syncing {}: {e}", what.display());
        let mut present = std::collections::HashSet::new();
        let mut new_blob = false;
        if let Ok(entries) = std::fs::read_dir(&self.blobs) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                if !self.synced.contains(&name) {
                    let path = entry.path();
                    match std::fs::File::open(&path) {
                        Ok(f) => f.sync_data().map_err(|e| context(&path, e))?,
                        // Removed by sled since the listing: nothing to make durable.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(context(&path, e)),
                    }
                    new_blob = true;
                }
                present.insert(name);
            }
        }
        if new_blob {
            crate::fs_util::sync_dir(&self.blobs).map_err(|e| e.to_string())?;
        }
        self.synced = present;
        let log = Path::new("db");
        self.log.sync_data().map_err(|e| context(log, e))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Blocking leaders/followers and async waiters, all at once on one store: each blocking
    /// waiter checks that `flushed` covers its ticket when its wait returns; no waiter may
    /// hang (a lost wake-up stalls the test until the timeout); after a reopen every insert
    /// made before a ticket is there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leaders_followers_and_async_waiters_all_finish_covered() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let files = LogFiles::open(dir.path()).unwrap();
        let flusher = Arc::new(Flusher::start(db.clone(), Some(files)).unwrap());
        let mut threads = Vec::new();
        for t in 0..12u64 {
            let (g, db) = (flusher.group.clone(), db.clone());
            threads.push(std::thread::spawn(move || {
                for i in 0..40u64 {
                    db.insert((t * 1000 + i).to_be_bytes(), b"x").unwrap();
                    let ticket = g.request_quiet();
                    g.wait(ticket).unwrap();
                    assert!(g.lock().flushed >= ticket.get());
                }
            }));
        }
        let mut tasks = Vec::new();
        for t in 0..12u64 {
            let (g, db) = (flusher.group.clone(), db.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..40u64 {
                    db.insert((100_000 + t * 1000 + i).to_be_bytes(), b"y")
                        .unwrap();
                    g.flush_async().await.unwrap();
                }
            }));
        }
        let all = async {
            for task in tasks {
                task.await.unwrap();
            }
            tokio::task::spawn_blocking(move || {
                for t in threads {
                    t.join().unwrap();
                }
            })
            .await
            .unwrap();
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), all)
            .await
            .expect("a waiter hung: a flush was never run for its ticket");
        let st = flusher.group.lock();
        assert_eq!(st.requested, 12 * 40 * 2);
        assert_eq!(st.flushed, st.requested);
        assert!(st.running.is_none() && st.poisoned.is_none());
        // Shared flushes: never more rounds than tickets.
        assert!(st.rounds <= st.requested, "{} rounds", st.rounds);
        drop(st);
        drop(flusher);
        drop(db);
        // The flusher thread lets go of its handle (and sled's file lock) as it exits, which
        // may be a moment after the drop: reopen until the lock is free.
        let mut reopened = sled::Config::new().path(dir.path()).open();
        for _ in 0..200 {
            if reopened.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
            reopened = sled::Config::new().path(dir.path()).open();
        }
        assert_eq!(reopened.unwrap().len(), 12 * 40 * 2);
    }

    /// A blocking follower whose ticket came after the running flush started waits for the
    /// next flush, which someone must run even when no one else asks: here the running
    /// flush is the test's own, ended by hand, and only the flusher thread is left to run
    /// the next one.
    #[test]
    fn a_follower_of_the_next_flush_is_never_stranded() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let flusher = Flusher::start(db, None).unwrap();
        let g = flusher.group.clone();
        // The ticket and the flush's start under one lock: the flusher thread must not flush
        // the early ticket itself in between.
        let (early, (target, round)) = {
            let mut st = g.lock();
            st.requested += 1;
            (FlushTicket::new(st.requested), GroupFlush::begin(st))
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let (g2, g3) = (g.clone(), g.clone());
        let early_waiter = std::thread::spawn(move || g3.wait(early));
        std::thread::spawn(move || {
            let late = g2.request_quiet();
            tx.send(g2.wait(late).map(|()| late)).unwrap();
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            rx.try_recv().is_err(),
            "a follower returned during the flush"
        );
        drop(g.finish(target, round, Ok(())));
        early_waiter.join().unwrap().unwrap();
        let late = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the follower of the next flush was stranded")
            .unwrap();
        assert!(g.lock().flushed >= late.get());
    }

    /// fsyncgate: a failed flush fails the tickets it covered, the follower waiting for the
    /// next flush (woken at once: no next flush runs), and every ticket after it, blocking or
    /// async, even when a flush is later reported to have succeeded; tickets flushed before
    /// the failure stay durable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_flush_poisons_every_later_ticket() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let flusher = Flusher::start(db, None).unwrap();
        let g = flusher.group.clone();
        let before = g.request_quiet();
        g.wait(before).unwrap();
        let (early, (target, round)) = {
            let mut st = g.lock();
            st.requested += 1;
            (FlushTicket::new(st.requested), GroupFlush::begin(st))
        };
        let (g2, g3) = (g.clone(), g.clone());
        let early_waiter = std::thread::spawn(move || g3.wait(early));
        let late_waiter = std::thread::spawn(move || g2.wait(g2.request_quiet()));
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(g.finish(target, round, Err("injected EIO".into())));
        let is_poison = |r: Result<(), StorageError>| match r {
            Err(StorageError::Meta(m)) => m.contains("injected EIO") && m.contains("restart"),
            _ => false,
        };
        assert!(is_poison(early_waiter.join().unwrap()));
        assert!(is_poison(late_waiter.join().unwrap()));
        // A flush that "succeeds" afterwards (as a later fdatasync would) changes nothing.
        let (t, r) = GroupFlush::begin(g.lock());
        drop(g.finish(t, r, Ok(())));
        assert!(is_poison(g.wait(g.request_quiet())));
        assert!(is_poison(
            tokio::time::timeout(std::time::Duration::from_secs(10), g.flush_async())
                .await
                .expect("an async waiter hung on a poisoned store")
        ));
        assert!(g.poisoned().is_some());
        assert!(matches!(g.lock().outcome(before.get()), Some(Ok(()))));
    }

    /// A blocking waiter with no flush running leads: its flush runs on its own thread, and
    /// the flusher thread is never needed for it.
    #[test]
    fn an_idle_store_is_flushed_by_its_blocking_caller() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let g = Arc::new(GroupFlush::new(db.clone(), None));
        // No flusher thread at all: a wait that relied on it would hang.
        for i in 0..5u64 {
            db.insert(i.to_be_bytes(), b"z").unwrap();
            g.wait(g.request_quiet()).unwrap();
        }
        let st = g.lock();
        assert_eq!((st.flushed, st.rounds), (5, 5));
    }
}
