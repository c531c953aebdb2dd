//! The relay: worker threads that claim outbox rows with `FOR UPDATE SKIP LOCKED`, publish
//! them with confirms, and delete them in the same transaction once the broker confirmed.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;

use crate::broker::{self, OutgoingEvent, Publisher, Topology};
use crate::config::{RelayConfig, RelayOrdering};
use crate::db::Database;
use crate::metrics::{self, LatencyHistogram, Reason, Registry};
use crate::outbox::NOTIFY_CHANNEL;
use crate::trace::TraceContext;
use crate::wakeup::{Backoff, FailureLog, Wakeup};
use crate::{Error, Result};
use postgres::Statement;

/// Available rows in outbox order; rows other workers hold are skipped, not waited for.
const CLAIM: &str = "\
    SELECT id, message_id::text, aggregate_type, aggregate_id, event_type, payload::text,
           extract(epoch FROM clock_timestamp() - created_at)::float8, exchange, routing_key,
           traceparent, tracestate,
           to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
    FROM {schema}.outbox
    WHERE available_at <= now() AND failed_at IS NULL
    ORDER BY id
    LIMIT $1
    FOR UPDATE SKIP LOCKED";

/// Like [`CLAIM`], for [`RelayOrdering::Aggregate`]: a row is not claimed while an earlier row
/// (lower id) of its aggregate is still in the outbox, whatever its state (claimed by another
/// worker, waiting for a retry, failed). So at most one event per aggregate is in flight, and
/// the next one is claimed only after the broker confirmed the previous one and its row was
/// deleted. Ids follow commit order within an aggregate when its writers take turns:
/// [`Outbox::enqueue_ordered`](crate::outbox::Outbox::enqueue_ordered) or a lock on the aggregate's row.
///
/// Only the oldest `$2` rows not [held back](HOLD_BACK), not failed and not waiting for a retry
/// are looked at (enough for every worker's batch and a few more, see [`ordered_window`]), one
/// index probe (`outbox_aggregate_idx`) each: the cost of a claim does not grow with the
/// backlog, nor with one aggregate's queue, whose rows behind its first are marked held once and
/// then skipped, nor with the failed rows (left out by `outbox_unheld_idx`). Rows waiting for a
/// retry are stepped over, not counted. The "first row of its
/// aggregate" test is a correlated subquery on purpose: written as `NOT EXISTS`, Postgres may
/// plan a hash anti-join that costs seconds on a backlog of one aggregate.
///
/// It bounds `e.aggregate_id` from both sides (`>=` and `<=` the row's), not with `=`, on
/// purpose too (so do [`HOLD_BACK`], [`DELETE_CONFIRMED_IN_ORDER`] and
/// [`CLAIM_AGGREGATE_HEADS`]). With `=` on both aggregate columns the planner reduces
/// `ORDER BY aggregate_type, aggregate_id, id` to `ORDER BY id`, which the primary key provides
/// as well, and against statistics taken while the outbox was empty (the usual state of a queue
/// table when autovacuum analyzes it) the generic plan walked `outbox_pkey` from its oldest
/// entry, dead ones included, filtering on the aggregate: a walk of the backlog per probe,
/// rounds of seconds, a relay falling further behind with each (a 29 s stall in a 3-minute
/// soak). With only `>=`, statistics of a two-row outbox led to a bitmap scan of every entry
/// from the row's aggregate on, sorted, per probe (claims of 30 s, a 3-minute stall in a
/// 30-minute soak). Two bounds keep an ordering only `outbox_aggregate_idx` provides and keep
/// any plan of the probe within the row's aggregate. The relay's plan tests check this.
///
/// The last column ([`WINDOW_ROWS_COLUMN`]) is how many rows that window held: fewer than `$2`,
/// and the claim saw every claimable row, so there is nothing for [`HOLD_BACK`] to uncover.
const CLAIM_IN_AGGREGATE_ORDER: &str = "\
    WITH oldest AS (
        SELECT id FROM {schema}.outbox
        WHERE NOT held AND failed_at IS NULL AND available_at <= now()
        ORDER BY id LIMIT $2
    )
    SELECT o.id, o.message_id::text, o.aggregate_type, o.aggregate_id, o.event_type, o.payload::text,
           extract(epoch FROM clock_timestamp() - o.created_at)::float8, o.exchange, o.routing_key,
           o.traceparent, o.tracestate,
           to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
           (SELECT count(*) FROM oldest)
    FROM {schema}.outbox o
    WHERE o.id <= (SELECT max(id) FROM oldest)
      AND NOT o.held AND o.available_at <= now() AND o.failed_at IS NULL
      AND o.id = (
          SELECT e.id FROM {schema}.outbox e
          WHERE e.aggregate_type = o.aggregate_type
                AND e.aggregate_id >= o.aggregate_id AND e.aggregate_id <= o.aggregate_id
          ORDER BY e.aggregate_type, e.aggregate_id, e.id
          LIMIT 1
      )
    ORDER BY o.id
    LIMIT $1
    FOR UPDATE OF o SKIP LOCKED";

/// The column of [`CLAIM_IN_AGGREGATE_ORDER`] holding its window's row count.
const WINDOW_ROWS_COLUMN: usize = 12;

/// Marks `held` the rows among the oldest `$1` not held that have an earlier row of their
/// aggregate, so that later claims skip them; run when a claim came up short with its window
/// full (or found nothing). Returns how many it marked.
///
/// A row is marked only while this transaction holds a lock on the first row of its aggregate
/// (`FOR KEY SHARE`, which a worker holding that row for publishing prevents; then the row is
/// skipped and marked by a later round). So the worker that deletes an aggregate's first row,
/// which holds it `FOR UPDATE` from its claim to its commit, always sees the marks of the rows
/// behind it and clears the next one ([`DELETE_CONFIRMED_IN_ORDER`]). Locked rows are skipped,
/// never waited for. (The bounds on `aggregate_id`: see [`CLAIM_IN_AGGREGATE_ORDER`].)
const HOLD_BACK: &str = "\
    WITH oldest AS (
        SELECT o.id,
               (SELECT e.id FROM {schema}.outbox e
                WHERE e.aggregate_type = o.aggregate_type
                AND e.aggregate_id >= o.aggregate_id AND e.aggregate_id <= o.aggregate_id
                ORDER BY e.aggregate_type, e.aggregate_id, e.id
                LIMIT 1) AS first_id
        FROM {schema}.outbox o
        WHERE NOT o.held AND o.failed_at IS NULL
        ORDER BY o.id
        LIMIT $1
    ),
    firsts AS (
        SELECT f.id FROM {schema}.outbox f
        WHERE f.id IN (SELECT first_id FROM oldest WHERE first_id < id)
        FOR KEY SHARE SKIP LOCKED
    ),
    behind AS (
        SELECT b.id FROM {schema}.outbox b
        WHERE b.id IN (SELECT id FROM oldest
                       WHERE first_id < id AND first_id IN (SELECT id FROM firsts))
        FOR UPDATE SKIP LOCKED
    )
    UPDATE {schema}.outbox SET held = true
    WHERE id IN (SELECT id FROM behind) AND NOT held";

/// The rest of an ordered claim: the oldest `$1` rows that are the first of their aggregate,
/// minus the rows `$2` this round claimed already, found by walking the outbox in id order
/// and probing `outbox_aggregate_idx` per row (as [`CLAIM_IN_AGGREGATE_ORDER`] does): it stops
/// once it has its rows instead of grouping the whole outbox (1.5 s per pass at a million rows),
/// though behind one long aggregate, or heads other workers hold, it may still walk the backlog;
/// hence [`HeadsPass`]. Held rows are included: a row whose predecessor was deleted by hand (not by
/// a relay, which clears the mark) is found here and published, at most a poll interval late
/// (or [`HEADS_PASS_SPACING`] times a pass's duration).
const CLAIM_AGGREGATE_HEADS: &str = "\
    SELECT o.id, o.message_id::text, o.aggregate_type, o.aggregate_id, o.event_type, o.payload::text,
           extract(epoch FROM clock_timestamp() - o.created_at)::float8, o.exchange, o.routing_key,
           o.traceparent, o.tracestate,
           to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
    FROM {schema}.outbox o
    WHERE o.id <> ALL($2) AND o.available_at <= now() AND o.failed_at IS NULL
      AND o.id = (
          SELECT e.id FROM {schema}.outbox e
          WHERE e.aggregate_type = o.aggregate_type
                AND e.aggregate_id >= o.aggregate_id AND e.aggregate_id <= o.aggregate_id
          ORDER BY e.aggregate_type, e.aggregate_id, e.id
          LIMIT 1
      )
    ORDER BY o.id
    LIMIT $1
    FOR UPDATE OF o SKIP LOCKED";

/// How many of the oldest rows [`CLAIM_IN_AGGREGATE_ORDER`] looks at: the batches the other
/// workers may hold (skipped as locked) and three batches more.
fn ordered_window(config: &RelayConfig) -> i64 {
    config.batch_size * (config.workers as i64 + 3)
}

const DELETE_CONFIRMED: &str = "DELETE FROM {schema}.outbox WHERE id = ANY($1)";

/// [`DELETE_CONFIRMED`] for [`RelayOrdering::Aggregate`]: also clears the [held](HOLD_BACK)
/// mark of the row after each deleted one in its aggregate, which is now its aggregate's first,
/// and returns how many deleted rows had such a next row (whose event can go now). (The
/// statement sees the outbox as it was before the delete, hence "after `g`". The next row is
/// the first index entry after `g`'s, `(aggregate_id, id) > (g's)`, and `<=` its aggregate,
/// bounds rather than `=`: see [`CLAIM_IN_AGGREGATE_ORDER`]; with `=` the generic plan walked
/// the primary key from `g` to the end of the outbox for every deleted row without a next one,
/// and so would a separate `e.id > g.id`.)
const DELETE_CONFIRMED_IN_ORDER: &str = "\
    WITH gone AS (
        DELETE FROM {schema}.outbox WHERE id = ANY($1)
        RETURNING id, aggregate_type, aggregate_id
    ),
    next AS (
        SELECT (SELECT e.id FROM {schema}.outbox e
                WHERE e.aggregate_type = g.aggregate_type
                  AND (e.aggregate_id, e.id) > (g.aggregate_id, g.id) AND e.aggregate_id <= g.aggregate_id
                ORDER BY e.aggregate_type, e.aggregate_id, e.id
                LIMIT 1) AS id
        FROM gone g
    ),
    cleared AS (
        UPDATE {schema}.outbox o SET held = false
        FROM next n
        WHERE o.id = n.id AND o.held
    )
    SELECT count(id) FROM next";

/// A refused row (the first of its aggregate, in aggregate order: its `held` mark, if the heads
/// pass claimed it with one, is cleared) waits `retry_delay * 2^attempts` (capped at an hour, and the exponent at 32 so
/// that the product never overflows an interval) before its next try;
/// at `max_attempts` it is marked failed and no longer claimed. Returns whether it failed.
const POSTPONE_REFUSED: &str = "\
    UPDATE {schema}.outbox
    SET attempts = attempts + 1,
        held = false,
        last_error = $2,
        available_at = now() + make_interval(secs => least($3::float8 * 2 ^ least(attempts, 32), 3600)),
        failed_at = CASE WHEN attempts + 1 >= $4 THEN now() END
    WHERE id = $1
    RETURNING failed_at IS NOT NULL";

/// Counters a running relay keeps; read them through [`RelayHandle::stats`], or expose them
/// to Prometheus with [`register`](Self::register).
#[derive(Debug)]
pub struct RelayStats {
    published: Counter,
    publish_failures: Family<Reason, Counter>,
    nacked: Counter,
    unroutable: Counter,
    broker_errors: Counter,
    failed: Counter,
    batches: AtomicU64,
    connected: Gauge,
    dead_workers: Gauge,
    batch_size: Histogram,
    batch_duration: Histogram,
    confirm_latency: LatencyHistogram,
}

/// Upper bounds of the batch size histogram (events per round).
const BATCH_SIZE_BUCKETS: [f64; 11] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
];

impl Default for RelayStats {
    fn default() -> Self {
        let (publish_failures, [nacked, unroutable, broker_errors]) =
            metrics::counters_by_reason(["nack", "unroutable", "broker_error"]);
        RelayStats {
            published: Counter::default(),
            publish_failures,
            nacked,
            unroutable,
            broker_errors,
            failed: Counter::default(),
            batches: AtomicU64::new(0),
            connected: Gauge::default(),
            dead_workers: Gauge::default(),
            batch_size: Histogram::new(BATCH_SIZE_BUCKETS),
            batch_duration: metrics::seconds_histogram(),
            confirm_latency: LatencyHistogram::default(),
        }
    }
}

impl RelayStats {
    /// Adds this relay's metrics to `registry` (once per registry): `txoutbox_events_published_total`,
    /// `txoutbox_publish_failures_total{reason}`, `txoutbox_events_failed_total`,
    /// `txoutbox_relay_connected_workers`, `txoutbox_relay_dead_workers`, `txoutbox_relay_batch_size` and
    /// `txoutbox_relay_batch_duration_seconds`. They keep counting after the call.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "txoutbox_events_published",
            "Events confirmed by RabbitMQ and deleted from the outbox",
            self.published.clone(),
        );
        registry.register(
            "txoutbox_publish_failures",
            "Events not published by an attempt: reason nack or unroutable (the row waits for \
             a retry), broker_error (connection lost or no confirm in time; the batch is retried)",
            self.publish_failures.clone(),
        );
        registry.register(
            "txoutbox_events_failed",
            "Events marked failed after RELAY_MAX_ATTEMPTS refusals",
            self.failed.clone(),
        );
        registry.register(
            "txoutbox_relay_connected_workers",
            "Relay workers currently connected to RabbitMQ",
            self.connected.clone(),
        );
        registry.register(
            "txoutbox_relay_dead_workers",
            "Relay worker threads that ended with a panic (see the log); restart the process",
            self.dead_workers.clone(),
        );
        registry.register(
            "txoutbox_relay_batch_size",
            "Events claimed per relay round that found any",
            self.batch_size.clone(),
        );
        registry.register_with_unit(
            "txoutbox_relay_batch_duration",
            "Time of a committed relay round: claim, publish, wait for confirms, delete, commit",
            Unit::Seconds,
            self.batch_duration.clone(),
        );
    }

    /// Events confirmed by the broker and deleted from the outbox.
    pub fn published(&self) -> u64 {
        self.published.get()
    }
    /// Publish attempts the broker refused or could not route (rows kept for a retry).
    pub fn refused(&self) -> u64 {
        self.nacked.get() + self.unroutable.get()
    }
    /// Time from an event's transaction (its `created_at`) to the broker's confirm, for every
    /// published event.
    pub fn confirm_latency(&self) -> &LatencyHistogram {
        &self.confirm_latency
    }
    /// Events that reached the attempt limit and were marked failed.
    pub fn failed(&self) -> u64 {
        self.failed.get()
    }
    /// Workers currently connected to the broker.
    pub fn connected_workers(&self) -> u64 {
        self.connected.get().max(0) as u64
    }
    /// Worker threads that ended with a panic.
    pub fn dead_workers(&self) -> u64 {
        self.dead_workers.get().max(0) as u64
    }
    /// Rounds that published at least one event.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
}

/// A running relay. Dropping it stops the relay the same way as [`stop`](Self::stop).
pub struct RelayHandle {
    workers: usize,
    wakeup: Arc<Wakeup>,
    stats: Arc<RelayStats>,
    threads: Vec<JoinHandle<()>>,
}

/// Wakes an idle relay at once; cheap to clone and to call.
///
/// For producers in the relay's own process that enqueue with
/// [`Outbox::without_notify`](crate::outbox::Outbox::without_notify): call [`wake`](Self::wake) after the
/// commit instead of paying for a Postgres NOTIFY.
#[derive(Clone, Debug)]
pub struct Waker(Arc<Wakeup>);

impl Waker {
    /// Tells the relay that new events have committed.
    pub fn wake(&self) {
        self.0.notify();
    }
}

/// A cheap view of a running relay for health checks and metrics.
#[derive(Clone, Debug)]
pub struct RelayHealth {
    stats: Arc<RelayStats>,
    workers: usize,
}

impl RelayHealth {
    /// `Ok` when at least one worker is connected to the broker and none has died, else why not.
    pub fn check(&self) -> Result<(), String> {
        let dead = self.stats.dead_workers();
        if dead > 0 {
            return Err(format!(
                "relay: {dead} of its {} workers ended with a panic (see the log); restart the process",
                self.workers
            ));
        }
        match self.stats.connected_workers() {
            0 => Err(format!(
                "relay: none of its {} workers is connected to RabbitMQ",
                self.workers
            )),
            _ => Ok(()),
        }
    }

    /// Events the relay has published since it started.
    pub fn published(&self) -> u64 {
        self.stats.published()
    }

    /// Worker threads the relay runs.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Workers currently connected to the broker.
    pub fn connected_workers(&self) -> u64 {
        self.stats.connected_workers()
    }

    /// Counters of the relay.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }
}

impl RelayHandle {
    /// A health view of this relay, for readiness checks.
    pub fn health(&self) -> RelayHealth {
        RelayHealth {
            stats: self.stats.clone(),
            workers: self.workers,
        }
    }

    /// A [`Waker`] for producers in this process.
    pub fn waker(&self) -> Waker {
        Waker(self.wakeup.clone())
    }

    /// Counters of this relay.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Stops claiming, lets every worker finish its batch, and waits for all threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.wakeup.stop();
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                log::error!("relay: a worker thread panicked");
            }
        }
        let stats = &self.stats;
        log::info!(
            "relay: stopped published={} batches={} refused={} failed={} confirm_p99_ms={:.1}",
            stats.published(),
            stats.batches(),
            stats.refused(),
            stats.failed(),
            stats.confirm_latency().percentile(99.0).as_secs_f64() * 1000.0
        );
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The relay's dependencies, shared by its threads.
struct Shared {
    db: Database,
    amqp_url: String,
    topology: Topology,
    config: RelayConfig,
    wakeup: Arc<Wakeup>,
    stats: Arc<RelayStats>,
    /// When the workers may run [`CLAIM_AGGREGATE_HEADS`].
    heads_pass: Mutex<HeadsPass>,
}

impl Shared {
    fn heads_pass(&self) -> std::sync::MutexGuard<'_, HeadsPass> {
        self.heads_pass.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// While claims come back full, the heads pass runs once per this many poll intervals (10 s
/// by default): a row only it finds waits that long at most.
const FULL_BATCH_HEADS_EVERY: u32 = 10;

/// The heads pass starts no sooner than this many times its last duration after its last
/// start, so that it takes at most a twentieth of one worker's time whatever the backlog.
const HEADS_PASS_SPACING: u32 = 20;

/// When the heads pass ([`CLAIM_AGGREGATE_HEADS`]) may run, shared by all workers: at most
/// once per poll interval after a claim that came up short (a large backlog, whose first look
/// comes up short because other workers hold its rows, does not turn every round into one), once
/// per [`FULL_BATCH_HEADS_EVERY`] poll intervals while claims come back full, and never sooner
/// than [`HEADS_PASS_SPACING`] times its last duration after its last start.
#[derive(Debug, Default)]
struct HeadsPass {
    last_start: Option<Instant>,
    last_duration: Duration,
    /// A worker runs the pass now: no other starts one (the first pass on a large backlog has
    /// no duration yet to space the next by).
    running: bool,
}

impl HeadsPass {
    /// Whether a worker may run the pass at `now`, after a claim that came up `short` or not;
    /// if so, records that it starts.
    fn take(&mut self, now: Instant, short: bool, poll_interval: Duration) -> bool {
        let every = match short {
            true => poll_interval,
            false => poll_interval * FULL_BATCH_HEADS_EVERY,
        };
        let every = every.max(self.last_duration * HEADS_PASS_SPACING);
        let due = !self.running
            && self
                .last_start
                .map_or(true, |at| now.saturating_duration_since(at) >= every);
        if due {
            self.last_start = Some(now);
            self.running = true;
        }
        due
    }

    /// Records that the pass taken last ended (done or failed) after `took`.
    fn finished(&mut self, took: Duration) {
        self.last_duration = took;
        self.running = false;
    }
}

/// Starts `config.workers` worker threads, one LISTEN thread and one thread that moves scheduled
/// events into the outbox when they come due ([`crate::scheduler`]); returns at once.
///
/// Each worker owns a broker connection; each round is one transaction: claim up to
/// `batch_size` rows, publish them, wait for every confirm, delete the confirmed rows, commit.
/// A failure before the commit leaves every row of the round for a later round.
pub fn start(db: Database, amqp_url: &str, topology: Topology, config: RelayConfig) -> Result<RelayHandle> {
    config.validate()?;
    let wakeup = Arc::new(Wakeup::default());
    let stats = Arc::new(RelayStats::default());
    let shared = Arc::new(Shared {
        db,
        amqp_url: amqp_url.to_string(),
        topology,
        config,
        wakeup: wakeup.clone(),
        stats: stats.clone(),
        heads_pass: Mutex::new(HeadsPass::default()),
    });
    let mut threads = Vec::with_capacity(shared.config.workers + 2);
    let spawn_error = |e: std::io::Error| Error::Other(format!("cannot start a relay thread: {e}"));
    let listener = shared.clone();
    threads.push(
        std::thread::Builder::new()
            .name("relay-listen".into())
            .spawn(move || listen_loop(&listener))
            .map_err(spawn_error)?,
    );
    let scheduler = shared.clone();
    threads.push(
        std::thread::Builder::new()
            .name("relay-schedule".into())
            .spawn(move || {
                let config = &scheduler.config;
                crate::scheduler::release_loop(
                    &scheduler.db,
                    &scheduler.wakeup,
                    config.poll_interval,
                    Backoff::new(config.min_backoff, config.max_backoff),
                )
            })
            .map_err(spawn_error)?,
    );
    for worker in 0..shared.config.workers {
        let shared = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("relay-{worker}"))
                .spawn(move || {
                    let run = std::panic::catch_unwind(AssertUnwindSafe(|| worker_loop(worker, &shared)));
                    if run.is_err() {
                        shared.stats.dead_workers.inc();
                        log::error!(
                            "relay[{worker}]: the worker ended with a panic (above); its rows are \
                             left to the other workers, and health reports it until a restart"
                        );
                    }
                })
                .map_err(spawn_error)?,
        );
    }
    log::info!(
        "relay: started workers={} batch={} ordering={} exchange={}",
        shared.config.workers,
        shared.config.batch_size,
        shared.config.ordering,
        shared.topology.exchange
    );
    Ok(RelayHandle {
        workers: shared.config.workers,
        wakeup,
        stats,
        threads,
    })
}

/// Holds a dedicated connection in LISTEN and turns each notification into a wake-up.
fn listen_loop(shared: &Shared) {
    let mut backoff = Backoff::new(shared.config.min_backoff, shared.config.max_backoff);
    let mut failures = FailureLog::new("relay-listen");
    while !shared.wakeup.is_stopping() {
        let result = shared.db.dedicated().and_then(|mut client| {
            client
                .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
                .map_err(|e| Error::db("cannot LISTEN for outbox notifications", e))?;
            failures.recovered();
            backoff.reset();
            // Rows committed while we were not listening: look now.
            shared.wakeup.notify();
            while !shared.wakeup.is_stopping() {
                // A fresh iterator for every wait: an exhausted one returns None forever.
                let received = client
                    .notifications()
                    .timeout_iter(Duration::from_millis(250))
                    .next();
                match received {
                    Ok(Some(_)) => {
                        // Drain whatever else is queued: one wake-up covers them all.
                        while let Ok(Some(_)) = client.notifications().iter().next() {}
                        shared.wakeup.notify();
                    }
                    Ok(None) if client.is_closed() => {
                        return Err(Error::Other("LISTEN connection closed".into()));
                    }
                    Ok(None) => {}
                    Err(e) => return Err(Error::db("LISTEN connection failed", e)),
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            failures.failed(format!("{e}; workers poll meanwhile"));
            shared.wakeup.sleep(backoff.next_delay());
        }
    }
}

/// One worker: connect, run rounds, wait for a wake-up when idle, reconnect on failure.
fn worker_loop(worker: usize, shared: &Shared) {
    let config = &shared.config;
    let mut backoff = Backoff::new(config.min_backoff, config.max_backoff);
    let mut failures = FailureLog::new(format!("relay[{worker}]"));
    let mut publisher: Option<Connected<'_>> = None;
    let mut db: Option<RelayDb> = None;
    while !shared.wakeup.is_stopping() {
        if db.is_none() {
            match RelayDb::connect(&shared.db, config) {
                Ok(connected) => db = Some(connected),
                Err(e) => {
                    failures.failed(e);
                    shared.wakeup.sleep(backoff.next_delay());
                    continue;
                }
            }
        }
        if publisher.is_none() {
            match Publisher::connect(&shared.amqp_url, &shared.topology) {
                Ok(p) => publisher = Some(Connected::new(p, &shared.stats.connected)),
                Err(e) => {
                    failures.failed(e);
                    shared.wakeup.sleep(backoff.next_delay());
                    continue;
                }
            }
        }
        let (Some(active), Some(connection)) = (publisher.as_mut(), db.as_mut()) else {
            continue;
        };
        let seen = shared.wakeup.start_looking();
        match run_round(shared, connection, &mut active.publisher) {
            Ok(Round {
                claimed,
                held_back,
                unblocked,
            }) => {
                failures.recovered();
                backoff.reset();
                if unblocked > 0 || held_back > 0 {
                    // The rows just deleted were holding back the next events of their
                    // aggregates, which nobody announces, or rows just held back no longer
                    // hide the rows after them: look again at once. (Not after every round
                    // that claimed something: at low load that kept every worker busy.)
                    continue;
                }
                if claimed < config.batch_size as usize {
                    let woken = shared.wakeup.wait(seen, config.poll_interval);
                    if woken && !config.linger.is_zero() {
                        // Until this worker starts looking, new events wake nobody else:
                        // those of the next moments join its round.
                        shared.wakeup.sleep(config.linger);
                    }
                } else {
                    // A full batch: there may be more, so recruit an idle worker.
                    shared.wakeup.notify();
                }
            }
            Err(RoundError::Broker(e)) => {
                failures.failed(format!("{e}; rows stay in the outbox"));
                // Closed and uncounted when dropped.
                publisher = None;
                shared.wakeup.sleep(backoff.next_delay());
            }
            Err(RoundError::Db(e)) => {
                failures.failed(e);
                if connection.client.is_closed() {
                    db = None;
                }
                shared.wakeup.sleep(backoff.next_delay());
            }
        }
    }
    drop(publisher);
}

/// A worker's publisher, counted in the connected-workers gauge while it lives; uncounted and
/// closed (amiquip closes channels and connections it drops) when dropped, also by a panic.
struct Connected<'a> {
    publisher: Publisher,
    gauge: &'a Gauge,
}

impl<'a> Connected<'a> {
    fn new(publisher: Publisher, gauge: &'a Gauge) -> Self {
        gauge.inc();
        Connected { publisher, gauge }
    }
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

enum RoundError {
    Broker(Error),
    Db(Error),
}

/// A worker's own database connection with its statements prepared.
///
/// Its commits are asynchronous (`synchronous_commit = off`): losing one in a crash can only
/// bring deleted rows back, which are then published again and deduplicated by consumers,
/// while not waiting for a WAL flush per round leaves the disk to the producers' commits.
struct RelayDb {
    client: postgres::Client,
    claim: Statement,
    /// With [`RelayOrdering::Aggregate`], the statements that claim run beside [`CLAIM_IN_AGGREGATE_ORDER`].
    ordered: Option<OrderedStatements>,
    delete: Statement,
    postpone: Statement,
}

/// [`HOLD_BACK`] and [`CLAIM_AGGREGATE_HEADS`], prepared.
struct OrderedStatements {
    hold_back: Statement,
    claim_heads: Statement,
}

impl RelayDb {
    fn connect(db: &Database, config: &RelayConfig) -> Result<RelayDb> {
        let ordering = config.ordering;
        let mut client = db.dedicated()?;
        let schema = db.schema();
        let context = "cannot prepare the relay's statements";
        // A round waits for the broker inside its transaction, at most `confirm_timeout`. If the
        // process freezes or loses the broker for longer than twice that, Postgres ends the
        // session, and the rows it claimed go to the other workers and relays within seconds.
        let idle_limit = idle_in_transaction_limit(config);
        // No sequential scans of the outbox: every statement of the relay finds its rows through
        // an index, but a queue table's statistics are taken while it is nearly empty, and
        // against them (and a bloated index) the planner once chose a scan of the whole outbox
        // per claimed row: claims of seconds, a relay falling further behind with each (a 55 s
        // stall in a 3-minute soak). `enable_seqscan = off` prices such plans out. No JIT
        // either: the generic plan of a claim on a large outbox is priced far above
        // `jit_above_cost`, and compiling it took 10 ms of a 13 ms claim, every round.
        client
            .batch_execute(&format!(
                "SET synchronous_commit = off; SET idle_in_transaction_session_timeout = {}; \
                 SET enable_seqscan = off; SET jit = off",
                idle_limit.as_millis()
            ))
            .map_err(|e| Error::db(context, e))?;
        let mut prepare = |sql: &str| {
            client
                .prepare(&schema.qualify(sql))
                .map_err(|e| Error::db(context, e))
        };
        let (claim, delete, ordered) = match ordering {
            RelayOrdering::None => (prepare(CLAIM)?, prepare(DELETE_CONFIRMED)?, None),
            RelayOrdering::Aggregate => (
                prepare(CLAIM_IN_AGGREGATE_ORDER)?,
                prepare(DELETE_CONFIRMED_IN_ORDER)?,
                Some(OrderedStatements {
                    hold_back: prepare(HOLD_BACK)?,
                    claim_heads: prepare(CLAIM_AGGREGATE_HEADS)?,
                }),
            ),
        };
        let postpone = prepare(POSTPONE_REFUSED)?;
        Ok(RelayDb {
            client,
            claim,
            ordered,
            delete,
            postpone,
        })
    }
}

/// How long a relay session may sit inside a claim transaction without a statement before
/// Postgres ends it: twice the longest wait for the broker in a round, and 5 s more.
pub fn idle_in_transaction_limit(config: &RelayConfig) -> Duration {
    config.confirm_timeout * 2 + Duration::from_secs(5)
}

/// What a round did.
#[derive(Clone, Copy, Debug, Default)]
struct Round {
    /// Rows claimed (published or refused).
    claimed: usize,
    /// Rows newly [held back](HOLD_BACK); only in aggregate order.
    held_back: u64,
    /// Deleted rows whose aggregate has a next event, now claimable; only in aggregate order.
    unblocked: i64,
}

/// One claim-publish-delete transaction.
fn run_round(shared: &Shared, db: &mut RelayDb, publisher: &mut Publisher) -> Result<Round, RoundError> {
    let started = Instant::now();
    let (claim, delete, postpone) = (&db.claim, &db.delete, &db.postpone);
    let db_error = |context: &'static str| move |e| RoundError::Db(Error::db(context, e));
    let mut tx = db
        .client
        .transaction()
        .map_err(db_error("cannot begin a relay transaction"))?;
    let batch_size = shared.config.batch_size;
    let window = ordered_window(&shared.config);
    let mut rows = match &db.ordered {
        None => tx.query(claim, &[&batch_size]),
        Some(_) => tx.query(claim, &[&batch_size, &window]),
    }
    .map_err(db_error("cannot claim outbox rows"))?;
    let mut held_back = 0;
    // Fewer rows in the claim's window than it may hold: the claim saw every claimable row.
    let window_full = rows.first().map_or(true, |row| {
        row.try_get::<_, i64>(WINDOW_ROWS_COLUMN)
            .map_or(true, |n| n >= window)
    });
    let short = rows.len() < batch_size as usize;
    if let Some(ordered) = db.ordered.as_ref().filter(|_| short && window_full) {
        // Short with a full window: rows behind their aggregate's first may fill it. Mark
        // them, so that the next claims look past them, and (at most once per poll interval)
        // look at the first row of every aggregate.
        held_back = tx
            .execute(&ordered.hold_back, &[&window])
            .map_err(db_error("cannot mark held-back outbox rows"))?;
    }
    let poll_interval = shared.config.poll_interval;
    let heads_due = db.ordered.is_some() && shared.heads_pass().take(Instant::now(), short, poll_interval);
    if let Some(ordered) = db.ordered.as_ref().filter(|_| heads_due) {
        // Also when the batch is full, less often (then for a tenth of a batch more): a row
        // found only by this pass (its predecessor deleted by hand) is not starved by a busy
        // relay.
        let claimed: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
        let room = (batch_size - rows.len() as i64).max((batch_size / 10).max(1));
        let pass_started = Instant::now();
        let heads = tx.query(&ordered.claim_heads, &[&room, &claimed]);
        shared.heads_pass().finished(pass_started.elapsed());
        rows.extend(heads.map_err(db_error("cannot claim outbox rows"))?);
    }
    if rows.is_empty() {
        if held_back > 0 {
            tx.commit().map_err(db_error("cannot commit a relay round"))?;
        }
        return Ok(Round {
            claimed: 0,
            held_back,
            unblocked: 0,
        });
    }
    let claimed_at = Instant::now();
    let mut ages = std::collections::HashMap::with_capacity(rows.len());
    // In aggregate order each event carries its outbox id as the aggregate's sequence.
    let ordered = db.ordered.is_some();
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        ages.insert(row.get::<_, i64>(0), row.get::<_, f64>(6));
        events.push(OutgoingEvent {
            key: row.get(0),
            message_id: row.get(1),
            aggregate_type: row.get(2),
            aggregate_id: row.get(3),
            event_type: row.get(4),
            body: row.get::<_, String>(5).into_bytes(),
            exchange: row.get(7),
            routing_key: row.get(8),
            aggregate_sequence: ordered.then(|| row.get(0)),
            trace_context: TraceContext::from_headers(row.get(9), row.get(10)),
            created_at: row.get(11),
            source: Some(shared.config.cloudevents_source_for(row.get(2))),
        });
    }
    let stats = &shared.stats;
    // On error the transaction rolls back when dropped: every claimed row stays.
    let outcome = publisher
        .publish_batch(&events, shared.config.confirm_timeout)
        .map_err(|e| {
            stats.broker_errors.inc_by(events.len() as u64);
            RoundError::Broker(e)
        })?;
    let confirmed_after = claimed_at.elapsed();
    for id in &outcome.confirmed {
        let age = ages.get(id).copied().unwrap_or(0.0).max(0.0);
        stats
            .confirm_latency
            .record(Duration::from_secs_f64(age) + confirmed_after);
    }
    let mut unblocked = 0;
    if !outcome.confirmed.is_empty() {
        let deleted = tx
            .query(delete, &[&outcome.confirmed])
            .map_err(db_error("cannot delete published outbox rows"))?;
        // In aggregate order: how many deleted rows had a next event in their aggregate.
        unblocked = deleted
            .first()
            .and_then(|row| row.try_get::<_, i64>(0).ok())
            .unwrap_or(0);
    }
    let retry_secs = shared.config.retry_delay.as_secs_f64();
    let max_attempts = shared.config.max_attempts;
    let mut failed = Vec::new();
    for (id, reason) in &outcome.refused {
        let now_failed: bool = tx
            .query_one(postpone, &[id, reason, &retry_secs, &max_attempts])
            .map_err(db_error("cannot record a refused publish"))?
            .get(0);
        if now_failed {
            failed.push((id, reason));
        }
    }
    tx.commit().map_err(db_error("cannot commit a relay round"))?;

    // Counted once committed, so that the counter never runs ahead of the outbox.
    for (id, reason) in failed {
        stats.failed.inc();
        log::error!(
            "relay: outbox id={id} failed after {max_attempts} attempts, kept as failed until re-queued: {reason}"
        );
    }

    stats.published.inc_by(outcome.confirmed.len() as u64);
    for (_, reason) in &outcome.refused {
        match reason.as_str() {
            broker::UNROUTABLE => stats.unroutable.inc(),
            r if r.starts_with(broker::NO_EXCHANGE) => stats.unroutable.inc(),
            _ => stats.nacked.inc(),
        };
    }
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.batch_size.observe(rows.len() as f64);
    metrics::observe_since(&stats.batch_duration, started);
    if !outcome.refused.is_empty() {
        log::warn!(
            "relay: broker refused n={} of batch; first: {}",
            outcome.refused.len(),
            outcome.refused[0].1
        );
    }
    log::debug!(
        "relay: published batch n={} refused={} ms={}",
        outcome.confirmed.len(),
        outcome.refused.len(),
        started.elapsed().as_millis()
    );
    Ok(Round {
        claimed: rows.len(),
        held_back,
        unblocked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use txoutbox_testkit::EmptyDb;

    /// Statistics taken while the outbox held `kept` rows after a busy spell (none, or a few:
    /// the usual states of a queue table that keeps up when autovacuum analyzes it), then a
    /// backlog of `backlog` rows; autovacuum kept off the table, so that the statistics stay.
    fn outbox_analyzed_with(kept: i64, backlog: i64) -> EmptyDb {
        let database = EmptyDb::new();
        let mut client = database.client();
        crate::migrate::run(&mut client, "public").unwrap();
        let fill = |n: i64| {
            format!(
                "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, payload)
                 SELECT gen_random_uuid(), 'order', gen_random_uuid()::text, 'OrderCreated', '{{}}'
                 FROM generate_series(1, {n})"
            )
        };
        client
            .batch_execute(&format!(
                "ALTER TABLE outbox SET (autovacuum_enabled = false); {};
                 DELETE FROM outbox WHERE id <= {backlog}; ANALYZE outbox; {}",
                fill(backlog + kept),
                fill(backlog)
            ))
            .unwrap();
        database
    }

    /// [`outbox_analyzed_with`] nothing kept.
    fn outbox_analyzed_empty(backlog: i64) -> EmptyDb {
        outbox_analyzed_with(0, backlog)
    }

    /// The plan of `sql` (a relay statement with parameters of `types`) run with `args` on
    /// `session`, as `EXPLAIN (options) EXECUTE` prints it, line by line.
    fn plan(session: &mut RelayDb, options: &str, sql: &str, types: &str, args: &str) -> Vec<String> {
        let client = &mut session.client;
        client
            .batch_execute(&format!(
                "PREPARE probe({types}) AS {}",
                sql.replace("{schema}", "public")
            ))
            .unwrap();
        let plan = client
            .query(&format!("EXPLAIN ({options}) EXECUTE probe({args})"), &[])
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        client.batch_execute("DEALLOCATE probe").unwrap();
        plan
    }

    /// For each scan of the outbox under the alias `e` (which the ordered statements give the
    /// search for an aggregate's first or next row) in the generic plan of `sql` on `session`:
    /// its line with the few under it, and its condition.
    fn aggregate_probes(session: &mut RelayDb, sql: &str, types: &str, args: &str) -> Vec<(String, String)> {
        let plan = plan(session, "COSTS OFF", sql, types, args);
        let probes: Vec<(String, String)> = plan
            .iter()
            .enumerate()
            .filter(|(_, line)| line.contains(" on outbox e"))
            .map(|(at, line)| {
                // A bitmap heap scan names its index two lines further down.
                let below = &plan[at + 1..(at + 4).min(plan.len())];
                let condition = below
                    .iter()
                    .find(|l| l.contains("Cond:"))
                    .cloned()
                    .unwrap_or_default();
                (format!("{line} {}", below.join(" ")), condition)
            })
            .collect();
        assert!(!probes.is_empty(), "no probe of outbox e in the plan of {sql}");
        probes
    }

    #[test]
    fn the_ordered_statements_probe_only_the_rows_aggregate_whatever_the_statistics() {
        // Statistics of an empty outbox once gave a walk of the primary key per probe, and of
        // a two-row outbox a bitmap scan of every aggregate from the row's on, sorted.
        for kept in [0, 2] {
            let database = outbox_analyzed_with(kept, 30_000);
            let mut session = relay_session(&database);
            for page_cost in [4, 1000] {
                let set = format!("SET random_page_cost = {page_cost}");
                session.client.batch_execute(&set).unwrap();
                for (sql, types, args) in [
                    (CLAIM_IN_AGGREGATE_ORDER, "bigint, bigint", "100, 800"),
                    (HOLD_BACK, "bigint", "800"),
                    (DELETE_CONFIRMED_IN_ORDER, "bigint[]", "ARRAY[1, 2, 3]"),
                    (
                        CLAIM_AGGREGATE_HEADS,
                        "bigint, bigint[]",
                        "100, ARRAY[]::bigint[]",
                    ),
                ] {
                    for (probe, condition) in aggregate_probes(&mut session, sql, types, args) {
                        let seen = format!("kept {kept}, {set}: {probe} / {condition} in {sql}");
                        let index_only =
                            probe.contains("outbox_aggregate_idx") && !probe.contains("outbox_pkey");
                        assert!(index_only, "{seen}");
                        let bounded_above = condition.contains("(aggregate_id <= ");
                        let bounded_below = condition.contains("(aggregate_id >= ")
                            || condition.contains("(ROW(aggregate_id, id) > ");
                        assert!(bounded_above && bounded_below, "{seen}");
                    }
                }
            }
            // And they run: the relay's own claim and heads pass take their full batches
            // within the session's statement timeout (a walk per probe took seconds each).
            let config = RelayConfig::default();
            let heads = session
                .ordered
                .as_ref()
                .expect("ordered relay")
                .claim_heads
                .clone();
            let mut tx = session.client.transaction().unwrap();
            let claimed = tx
                .query(&session.claim, &[&config.batch_size, &ordered_window(&config)])
                .expect("the claim finished within the statement timeout");
            assert_eq!(claimed.len() as i64, config.batch_size, "kept {kept}");
            let none: Vec<i64> = Vec::new();
            let heads = tx
                .query(&heads, &[&200_i64, &none])
                .expect("the heads pass finished within the statement timeout");
            assert_eq!(heads.len(), 200, "kept {kept}");
        }
    }

    #[test]
    fn the_heads_pass_runs_once_per_poll_interval_after_short_claims_and_ten_while_full() {
        let poll = Duration::from_secs(1);
        let start = Instant::now();
        let mut pass = HeadsPass::default();
        assert!(pass.take(start, true, poll), "the first pass is due at once");
        pass.finished(Duration::from_millis(1));
        assert!(!pass.take(start + Duration::from_millis(999), true, poll));
        assert!(pass.take(start + poll, true, poll));
        pass.finished(Duration::from_millis(1));
        assert!(
            !pass.take(start + poll * 10, false, poll),
            "full claims: ten intervals"
        );
        assert!(pass.take(start + poll * 11, false, poll));
    }

    #[test]
    fn no_second_heads_pass_starts_while_one_runs() {
        let poll = Duration::from_secs(1);
        let start = Instant::now();
        let mut pass = HeadsPass::default();
        assert!(pass.take(start, true, poll));
        assert!(
            !pass.take(start + poll * 5, true, poll),
            "the first is still running"
        );
        pass.finished(Duration::from_millis(100));
        assert!(pass.take(start + poll * 5, true, poll));
    }

    #[test]
    fn a_slow_heads_pass_waits_twenty_times_its_duration() {
        let poll = Duration::from_secs(1);
        let start = Instant::now();
        let mut pass = HeadsPass::default();
        assert!(pass.take(start, true, poll));
        pass.finished(Duration::from_millis(1500));
        assert!(!pass.take(start + Duration::from_secs(29), true, poll));
        assert!(pass.take(start + Duration::from_secs(30), true, poll));
    }

    #[test]
    fn the_claim_is_never_jit_compiled() {
        let database = outbox_analyzed_empty(1_000);
        let mut session = relay_session(&database);
        // As for the generic plan of the claim on an outbox of a million rows, priced far
        // above the threshold: compiling it took 10 ms of a 13 ms claim, every round.
        session.client.batch_execute("SET jit_above_cost = 0").unwrap();
        let mut plain = database.client();
        let available: bool = plain.query_one("SELECT pg_jit_available()", &[]).unwrap().get(0);
        if !available {
            eprintln!("skipped: this Postgres has no JIT (pg_jit_available() is false)");
            return;
        }
        plain
            .batch_execute("SET jit = on; SET jit_above_cost = 0")
            .unwrap();
        let compiled = plain
            .query("EXPLAIN ANALYZE SELECT count(*) FROM outbox WHERE id > 0", &[])
            .unwrap();
        assert!(
            compiled
                .iter()
                .any(|row| row.get::<_, String>(0).starts_with("JIT:")),
            "without the relay's setting this session compiles"
        );
        for (sql, types, args) in [
            (CLAIM, "bigint", "100"),
            (CLAIM_IN_AGGREGATE_ORDER, "bigint, bigint", "100, 800"),
        ] {
            let plan = plan(&mut session, "ANALYZE", sql, types, args);
            assert!(
                !plan.iter().any(|line| line.starts_with("JIT:")),
                "the claim was compiled: {plan:#?}"
            );
        }
    }

    /// The relay's own session (its settings and prepared statements) on `database`, with
    /// generic plans forced, as Postgres picks them after a few runs of a prepared statement,
    /// and an index probe priced like a thousand page reads: the planner's view of a bloated
    /// outbox index against statistics of a nearly empty table, under which a soak's claims
    /// took a sequential scan of the outbox per claimed row (seconds each, the relay stalled).
    fn relay_session(database: &EmptyDb) -> RelayDb {
        let db = Database::connect(&database.url, &crate::PoolOptions::default()).unwrap();
        let config = RelayConfig {
            ordering: RelayOrdering::Aggregate,
            ..RelayConfig::default()
        };
        let mut session = RelayDb::connect(&db, &config).unwrap();
        session
            .client
            .batch_execute(
                "SET plan_cache_mode = force_generic_plan; SET statement_timeout = '2s'; \
                 SET random_page_cost = 1000",
            )
            .unwrap();
        session
    }
}
