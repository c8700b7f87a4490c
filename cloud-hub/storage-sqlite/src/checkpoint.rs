//! WAL checkpoints off the write path. SQLite's automatic checkpoint runs
//! inside the commit that crosses its threshold, so one ingest batch (or
//! one audited API request) in every few pays for copying the WAL into the
//! database file and two fsyncs. Here a thread of the store, on its own
//! connection, runs `PRAGMA wal_checkpoint(PASSIVE)` shortly after writes:
//! a passive checkpoint never blocks the writer or the readers, and the
//! writer restarts the WAL from its start once a checkpoint has caught up.
//!
//! The writer keeps an automatic checkpoint at a high threshold
//! ([`WRITER_AUTOCHECKPOINT_PAGES`]) as a safety valve: should this thread
//! fall behind, the WAL stops growing there.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

use crate::DbError;

/// How long the thread lets writes accumulate after the first one it is
/// told of before it checkpoints: one checkpoint (two fsyncs) covers every
/// commit of the interval.
const INTERVAL: Duration = Duration::from_millis(100);

/// The writer's own automatic checkpoint threshold, in WAL pages (SQLite's
/// default is 1 000): reached only when the thread falls behind.
const WRITER_AUTOCHECKPOINT_PAGES: u32 = 16_384;

#[derive(Debug, Default)]
struct State {
    /// The writer was used since the last checkpoint began.
    dirty: bool,
    stop: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Checkpoints run.
    runs: std::sync::atomic::AtomicU64,
}

/// The store's checkpoint thread; stopped (and joined) on drop.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread on a connection of its own to `path`, and moves
    /// `writer` (the database's writing connection) to the safety-valve
    /// threshold.
    pub(crate) fn start(path: &Path, writer: &Connection) -> Result<Self, DbError> {
        writer.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)?;
        let conn = Connection::open(path)?;
        // Its checkpoints fsync the WAL before copying and the database
        // file after, as the writer's own would.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("sqlite-checkpoint".into())
                .spawn(move || run(&conn, &shared))
                .map_err(|e| DbError::File(path.to_owned(), e))?
        };
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Tells the thread the writer is about to write (call when taking the
    /// writer): a checkpoint follows within [`INTERVAL`] or so.
    pub(crate) fn written(&self) {
        if let Ok(mut s) = self.shared.state.lock()
            && !s.dirty
        {
            s.dirty = true;
            self.shared.wake.notify_one();
        }
    }

    /// Checkpoints run so far.
    #[cfg(test)]
    pub(crate) fn runs(&self) -> u64 {
        self.shared.runs.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        if let Ok(mut s) = self.shared.state.lock() {
            s.stop = true;
        }
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(conn: &Connection, shared: &Shared) {
    let Ok(mut s) = shared.state.lock() else {
        return;
    };
    loop {
        while !s.dirty && !s.stop {
            s = match shared.wake.wait(s) {
                Ok(s) => s,
                Err(_) => return,
            };
        }
        if s.stop {
            return;
        }
        // Let the commits of the interval accumulate (a stop ends the wait).
        s = match shared.wake.wait_timeout_while(s, INTERVAL, |s| !s.stop) {
            Ok((s, _)) => s,
            Err(_) => return,
        };
        if s.stop {
            return;
        }
        // Writes from here on ask for the next checkpoint.
        s.dirty = false;
        drop(s);
        // (busy, frames in the WAL, frames checkpointed); a passive
        // checkpoint that meets a reader stops short and the next one
        // carries on.
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0)) {
            Ok(_) => {
                shared
                    .runs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "sqlite background checkpoint failed"),
        }
        s = match shared.state.lock() {
            Ok(s) => s,
            Err(_) => return,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_checkpointed_by_the_thread_not_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sqlite");
        let w = Connection::open(&p).unwrap();
        w.pragma_update(None, "journal_mode", "WAL").unwrap();
        w.execute_batch("CREATE TABLE t (x BLOB)").unwrap();
        let ck = Checkpointer::start(&p, &w).unwrap();
        // The writer's own automatic checkpoint off altogether, so that only
        // the thread can have copied the pages.
        w.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        ck.written();
        for _ in 0..50 {
            w.execute("INSERT INTO t VALUES (zeroblob(8000))", [])
                .unwrap();
        }
        // The thread copies the pages into the database file (which the
        // writer, with its automatic checkpoint off, never does).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while ck.runs() == 0 || std::fs::metadata(&p).unwrap().len() < 50 * 8_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "no background checkpoint ({} runs)",
                ck.runs()
            );
            ck.written();
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(ck);
        // The rows are in the database file.
        let n: i64 = w
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 50);
    }
}
