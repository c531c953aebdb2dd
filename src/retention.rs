//! Retention: a background thread that purges old dedupe rows in small batches.
//!
//! `processed_messages` gains a row per message consumed; without a purge it grows forever. A
//! row may go once no copy of its message can arrive again, so the window must be longer than
//! any redelivery or replay you expect (a week by default). The outbox needs no such job: the
//! relay deletes each row once the broker confirmed it, and only failed events stay until an
//! operator re-queues them (`txoutbox failed retry`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};

use crate::{admin, Database, Error, Result};

/// How long dedupe rows are kept and how the purge runs.
#[derive(Clone, Debug)]
pub struct RetentionConfig {
    /// Rows processed longer ago than this are deleted. Default 7 days.
    pub keep: Duration,
    /// Pause between two purges; the first runs at start. Default 1 hour.
    pub interval: Duration,
    /// Rows deleted per transaction, so no lock is held long. Default 1,000.
    pub batch: i64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep: Duration::from_secs(7 * 86_400),
            interval: Duration::from_secs(3_600),
            batch: 1_000,
        }
    }
}

/// What the purge thread has done so far.
#[derive(Debug, Default)]
pub struct RetentionStats {
    runs: AtomicU64,
    purged: AtomicU64,
    failures: AtomicU64,
}

impl RetentionStats {
    /// Purges completed.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }
    /// Dedupe rows deleted.
    pub fn purged(&self) -> u64 {
        self.purged.load(Ordering::Relaxed)
    }
    /// Purges that failed (database unavailable, say); the next interval tries again.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// The running purge thread; [`stop`](Self::stop) ends it.
pub struct RetentionHandle {
    stop: Sender<()>,
    thread: JoinHandle<()>,
    stats: Arc<RetentionStats>,
}

impl RetentionHandle {
    /// Counters of the purge thread.
    pub fn stats(&self) -> &RetentionStats {
        &self.stats
    }

    /// Stops the thread once its current batch is done, and waits for it.
    pub fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

/// Starts purging `processed_messages` rows older than `config.keep`, every `config.interval`.
pub fn start(db: Database, config: RetentionConfig) -> Result<RetentionHandle> {
    if config.batch < 1 {
        return Err(Error::Config("the retention batch must be at least 1".into()));
    }
    let (stop, stopped) = bounded::<()>(0);
    let stats = Arc::new(RetentionStats::default());
    let thread_stats = stats.clone();
    let thread = std::thread::Builder::new()
        .name("retention".into())
        .spawn(move || loop {
            purge_once(&db, &config, &thread_stats);
            match stopped.recv_timeout(config.interval) {
                Err(RecvTimeoutError::Timeout) => continue,
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
        })
        .map_err(|e| Error::Other(format!("cannot start the retention thread: {e}")))?;
    Ok(RetentionHandle { stop, thread, stats })
}

fn purge_once(db: &Database, config: &RetentionConfig, stats: &RetentionStats) {
    let result = db
        .get()
        .and_then(|mut client| admin::purge_processed(&mut *client, db.schema(), config.keep, config.batch));
    match result {
        Ok(purged) => {
            stats.runs.fetch_add(1, Ordering::Relaxed);
            stats.purged.fetch_add(purged, Ordering::Relaxed);
            if purged > 0 {
                log::info!(
                    "retention: purged {purged} processed_messages rows older than {} s",
                    config.keep.as_secs()
                );
            }
        }
        Err(e) => {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "retention: purge failed, trying again in {:?}: {e}",
                config.interval
            );
        }
    }
}
