//! Load generator and verifier behind `txoutbox-stress`: sends `POST /orders` from many threads,
//! each on its own keep-alive HTTP/1.1 connection, then watches Postgres until every accepted
//! order is `COMPLETED` and checks that the outbox delivered each `OrderCreated` exactly once.
//!
//! ```no_run
//! use std::time::Duration;
//! use txoutbox_harness::stress::{self, StressOptions};
//!
//! fn main() -> txoutbox::Result<()> {
//!     let report = stress::run(&StressOptions {
//!         url: "http://127.0.0.1:18080".into(),
//!         orders: 500,
//!         timeout: Duration::from_secs(30),
//!         ..StressOptions::default()
//!     })?;
//!     println!("{report}");
//!     assert!(report.verified(), "{}", report.problems().join("; "));
//!     Ok(())
//! }
//! ```
//!
//! Every order carries an `Idempotency-Key` of its own (a fresh UUID). An answer 5xx, a lost
//! connection or a timeout leaves the client not knowing whether the order was created, so the
//! same request is sent again with the same key (at most [`StressOptions::retries`] times, after
//! 100 ms, 200 ms, 400 ms ... at most 1 s): the server answers a retry of an order it did create
//! with that order (`Idempotent-Replayed: true`), so a retry never creates a second one. The
//! report counts the retries, the orders accepted only on a retry, and the replayed answers.
//!
//! How the numbers are measured:
//! - *HTTP latency* is client side: from writing the first request of an order to reading the
//!   response that accepted it, retries and their pauses included.
//! - *POST->COMPLETED* latency is measured by Postgres, `orders.updated_at - created_at`: from the
//!   transaction that inserted the order (and its outbox row) to the consumer's transaction that
//!   completed it. One clock, so it holds even when Postgres runs on another machine.
//! - *End to end* time runs from the first POST sent to the last `COMPLETED`. The last
//!   `COMPLETED` is `max(updated_at)` of the orders, compared with the wall-clock time of the
//!   first POST; this is exact to the millisecond rather than to the polling interval. When the
//!   two clocks visibly disagree (the result is negative or later than the instant polling saw
//!   the last completion), the instant polling saw the last completion is used instead.
//! - Completion is polled once a second while orders are sent (enough for the progress line)
//!   and every 100 ms afterwards, spaced out while one poll of many pending ids is expensive,
//!   so that the measuring takes little of Postgres from the consumer being measured.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use postgres::{Client, NoTls};
use serde_json::Value;
use uuid::Uuid;

use txoutbox::config::redact_url;
use txoutbox::{Error, Result};
use txoutbox_service::config::DEFAULT_DATABASE_URL;
use txoutbox_service::orders::ORDER_CREATED;

/// Default `--url`.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";
/// Default `--orders`.
pub const DEFAULT_ORDERS: usize = 10_000;
/// Default `--concurrency`.
pub const DEFAULT_CONCURRENCY: usize = 32;
/// Default `--timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Default `--retries`.
pub const DEFAULT_RETRIES: usize = 3;

/// Most connections (threads) a run may open.
const MAX_CONCURRENCY: usize = 1024;
/// Most retries of one order `--retries` may ask for.
const MAX_RETRIES: usize = 100;
/// Pause before the first retry of an order; it doubles with each retry, up to [`RETRY_PAUSE_MAX`].
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause between two attempts of one order.
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(1);
/// Connect, read and write timeout of every HTTP connection.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often Postgres is asked which orders have completed once sending is over, at most.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often it is asked while orders are being sent (for the progress line), and at least.
const SLOW_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Polls are spaced so that they keep Postgres busy at most 1/this of the time: with many
/// orders pending a poll costs tens of milliseconds, taken from the consumer being measured.
const POLL_DUTY_DIVISOR: u32 = 10;
/// How often the progress line is refreshed.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Most ids passed to one `= ANY($1)` query.
const CHUNK: usize = 5_000;
/// Sending stops when this many POSTs failed and none was accepted: the server is not working.
const GIVE_UP_ERRORS: usize = 100;
/// Distinct error messages kept for the report.
const ERROR_SAMPLES: usize = 5;
/// Longest status or header line accepted from the server.
const MAX_LINE: u64 = 8 * 1024;
/// Most header lines accepted in one response.
const MAX_HEADERS: usize = 100;
/// Largest response body accepted.
const MAX_BODY: usize = 1024 * 1024;

const POLL_ORDERS: &str = "\
    SELECT id, status,
           extract(epoch FROM (updated_at - created_at))::float8,
           extract(epoch FROM updated_at)::float8
    FROM orders WHERE id = ANY($1)";

const COUNT_ORDERS: &str = "\
    SELECT count(*) FILTER (WHERE status = 'COMPLETED'), count(*)
    FROM orders WHERE id = ANY($1)";

const COUNT_PROCESSED: &str = "\
    SELECT count(*) FROM processed_messages
    WHERE event_type = $2 AND aggregate_id = ANY($1::text[])";

const COUNT_OUTBOX: &str = "SELECT count(*) FROM outbox WHERE aggregate_id = ANY($1::text[])";

const CHECK_TABLES: &str = "SELECT 1 FROM orders, outbox, processed_messages LIMIT 0";

/// What [`run`] does.
#[derive(Clone, Debug)]
pub struct StressOptions {
    /// Base URL of `txoutbox-server`; orders go to `{url}/orders` (default [`DEFAULT_URL`]).
    /// Plain `http://` only.
    pub url: String,
    /// Orders to create (default [`DEFAULT_ORDERS`]).
    pub orders: usize,
    /// Threads sending at once, each with its own keep-alive connection (default
    /// [`DEFAULT_CONCURRENCY`]; at most 1024, and never more than `orders`).
    pub concurrency: usize,
    /// Deadline, from the start, for every accepted order to be `COMPLETED` (default
    /// [`DEFAULT_TIMEOUT`]). Sending stops too when it passes.
    pub timeout: Duration,
    /// Postgres URL of the server's database, read to verify the orders (default
    /// [`DEFAULT_DATABASE_URL`]). It must exist and hold the txoutbox schema.
    pub database_url: String,
    /// Print a progress line to stderr about once a second (default `false`).
    pub progress: bool,
    /// How many times an order is sent again, with the same `Idempotency-Key`, after a 5xx, a
    /// lost connection or a timeout (default [`DEFAULT_RETRIES`]; 0 sends each order once).
    pub retries: usize,
}

impl Default for StressOptions {
    fn default() -> Self {
        StressOptions {
            url: DEFAULT_URL.into(),
            orders: DEFAULT_ORDERS,
            concurrency: DEFAULT_CONCURRENCY,
            timeout: DEFAULT_TIMEOUT,
            database_url: DEFAULT_DATABASE_URL.into(),
            progress: false,
            retries: DEFAULT_RETRIES,
        }
    }
}

impl StressOptions {
    /// Checks that the values can work together.
    pub fn validate(&self) -> Result<()> {
        if self.orders == 0 {
            return Err(Error::Config("--orders must be at least 1".into()));
        }
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            return Err(Error::Config(format!(
                "--concurrency must be 1..={MAX_CONCURRENCY}, got {}",
                self.concurrency
            )));
        }
        if self.timeout.is_zero() {
            return Err(Error::Config("--timeout must be more than 0 seconds".into()));
        }
        if self.retries > MAX_RETRIES {
            return Err(Error::Config(format!(
                "--retries must be 0..={MAX_RETRIES}, got {}",
                self.retries
            )));
        }
        Ok(())
    }
}

/// Percentiles of a set of durations (nearest rank).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Percentiles {
    /// Median.
    pub p50: Duration,
    /// 95th percentile.
    pub p95: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest value.
    pub max: Duration,
}

impl Percentiles {
    /// Sorts `samples` and takes its percentiles; `None` when there are none.
    pub fn of(samples: &mut [Duration]) -> Option<Percentiles> {
        samples.sort_unstable();
        Some(Percentiles {
            p50: percentile(samples, 50.0)?,
            p95: percentile(samples, 95.0)?,
            p99: percentile(samples, 99.0)?,
            max: *samples.last()?,
        })
    }
}

impl fmt::Display for Percentiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {}  p95 {}  p99 {}  max {}",
            Millis(self.p50),
            Millis(self.p95),
            Millis(self.p99),
            Millis(self.max)
        )
    }
}

/// The `p`th percentile (0 < p <= 100) of `sorted` by nearest rank: the smallest value with at
/// least `p` percent of the samples at or below it. `None` when `sorted` is empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// A duration as milliseconds with one decimal.
struct Millis(Duration);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1} ms", self.0.as_secs_f64() * 1000.0)
    }
}

/// What a run measured and found. [`Display`](fmt::Display) prints the summary;
/// [`verified`](Self::verified) says whether everything checked out.
#[derive(Clone, Debug)]
pub struct StressReport {
    /// The server's URL (password redacted).
    pub url: String,
    /// Orders asked for.
    pub orders: usize,
    /// Connections used.
    pub concurrency: usize,
    /// The deadline the run had.
    pub timeout: Duration,
    /// Orders sent (fewer than `orders` when sending stopped early); retries not counted.
    pub sent: usize,
    /// Orders answered 201 with an order id (on the first attempt or a retry).
    pub accepted: usize,
    /// Orders that failed for good: another status, a malformed answer, or a 5xx or connection
    /// error on every attempt.
    pub errors: usize,
    /// POSTs sent again with the same `Idempotency-Key` after a 5xx or no answer.
    pub retries: usize,
    /// Orders accepted only on a retry.
    pub recovered: usize,
    /// Of those, the ones answered `Idempotent-Replayed: true`: the first attempt had created
    /// the order, and the retry got it back instead of a second one.
    pub replayed: usize,
    /// Up to five distinct error messages, first seen first.
    pub error_samples: Vec<String>,
    /// From the start until the last POST was answered.
    pub http_elapsed: Duration,
    /// `accepted / http_elapsed`, orders per second.
    pub http_rate: f64,
    /// Accepted orders whose status is `COMPLETED` at the end.
    pub completed: usize,
    /// `processed_messages` rows of `OrderCreated` events of the accepted orders.
    pub processed: usize,
    /// Outbox rows of the accepted orders still undelivered at the end.
    pub outbox_left: usize,
    /// Accepted orders not found in the database (DATABASE_URL names another database).
    pub missing: usize,
    /// First POST sent to last `COMPLETED` seen (see the module docs); `None` if none completed.
    pub e2e_elapsed: Option<Duration>,
    /// Completed orders per second over `e2e_elapsed` (0 when none completed).
    pub e2e_rate: f64,
    /// HTTP latency of the accepted POSTs.
    pub http_latency: Option<Percentiles>,
    /// POST->COMPLETED latency (`updated_at - created_at`) of the completed orders.
    pub e2e_latency: Option<Percentiles>,
    /// True when the deadline passed before every accepted order was `COMPLETED` and out of the
    /// outbox.
    pub deadline_passed: bool,
}

impl StressReport {
    /// True when every order was sent and accepted, and `accepted == COMPLETED == processed`
    /// with no outbox row left, before the deadline. A failed POST makes it false too: a
    /// healthy server answers every one with 201.
    pub fn verified(&self) -> bool {
        self.problems().is_empty()
    }

    /// What went wrong, one sentence each with what to check; empty when [`verified`](Self::verified).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let secs = self.timeout.as_secs_f64();
        if self.sent < self.orders {
            let why = if self.missing > 0 {
                "stopped because accepted orders are missing from the database".to_string()
            } else if self.deadline_passed {
                format!("the {secs} s deadline passed")
            } else {
                format!("stopped after {} errors without one accepted order", self.errors)
            };
            problems.push(format!(
                "only {} of {} orders were sent: {why}",
                self.sent, self.orders
            ));
        }
        if self.errors > 0 {
            let example = match self.error_samples.first() {
                Some(e) => format!(" (first: {e})"),
                None => String::new(),
            };
            problems.push(format!(
                "{} of {} POSTs failed{example}: a healthy server answers every POST with 201",
                self.errors, self.sent
            ));
        }
        if self.missing > 0 {
            problems.push(format!(
                "{} accepted orders are not in the database: set DATABASE_URL to the database \
                 txoutbox-server uses",
                self.missing
            ));
        }
        let pending = self.accepted.saturating_sub(self.completed + self.missing);
        if pending > 0 {
            let hint = if self.outbox_left > 0 {
                format!(
                    "{} of their events are still in the outbox: is txoutbox-server's relay \
                     connected to RabbitMQ?",
                    self.outbox_left
                )
            } else {
                "their events left the outbox: is txoutbox-consumer running, on the same queue?".into()
            };
            problems.push(format!("{pending} orders still PENDING after {secs} s ({hint})"));
        } else if self.outbox_left > 0 {
            problems.push(format!(
                "{} events of COMPLETED orders still in the outbox after {secs} s: the relay did not \
                 delete them after the broker confirmed",
                self.outbox_left
            ));
        }
        if self.processed != self.completed {
            problems.push(format!(
                "{} orders COMPLETED but {} OrderCreated rows in processed_messages for them: the \
                 consumer must record each message in the transaction of its effect",
                self.completed, self.processed
            ));
        }
        if self.deadline_passed && problems.is_empty() {
            problems.push(format!("the {secs} s deadline passed"));
        }
        problems
    }
}

impl fmt::Display for StressReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "txoutbox-stress: {} orders, concurrency {}, url {}",
            self.orders, self.concurrency, self.url
        )?;
        let sent = if self.sent < self.orders {
            format!("{} of {} sent: ", self.sent, self.orders)
        } else {
            String::new()
        };
        writeln!(
            f,
            "  HTTP:        {sent}{} accepted, {} errors in {:.2} s = {:.0} orders/s",
            self.accepted,
            self.errors,
            self.http_elapsed.as_secs_f64(),
            self.http_rate
        )?;
        if self.retries > 0 {
            writeln!(
                f,
                "  retries:     {} (same Idempotency-Key, after a 5xx or no answer): {} orders accepted \
                 on a retry, {} of them replayed (created by the first attempt)",
                self.retries, self.recovered, self.replayed
            )?;
        }
        for sample in &self.error_samples {
            writeln!(f, "    error: {sample}")?;
        }
        match self.e2e_elapsed {
            Some(elapsed) if self.completed >= self.accepted => writeln!(
                f,
                "  end to end:  {} COMPLETED in {:.2} s (first POST to last COMPLETED) = {:.0} orders/s",
                self.completed,
                elapsed.as_secs_f64(),
                self.e2e_rate
            )?,
            Some(elapsed) => writeln!(
                f,
                "  end to end:  only {} of {} COMPLETED, the last {:.2} s after the first POST = {:.0} orders/s",
                self.completed,
                self.accepted,
                elapsed.as_secs_f64(),
                self.e2e_rate
            )?,
            None if self.deadline_passed => writeln!(
                f,
                "  end to end:  none of {} COMPLETED within {} s",
                self.accepted,
                self.timeout.as_secs_f64()
            )?,
            None => writeln!(f, "  end to end:  none of {} COMPLETED", self.accepted)?,
        }
        let show = |p: &Option<Percentiles>| p.map_or_else(|| "no samples".to_string(), |p| p.to_string());
        writeln!(f, "  HTTP latency           {}", show(&self.http_latency))?;
        writeln!(f, "  POST->COMPLETED        {}", show(&self.e2e_latency))?;
        let equal = self.accepted == self.completed && self.completed == self.processed;
        let counts = if equal {
            format!(
                "accepted {} = COMPLETED {} = processed {}",
                self.accepted, self.completed, self.processed
            )
        } else {
            format!(
                "accepted {}, COMPLETED {}, processed {}",
                self.accepted, self.completed, self.processed
            )
        };
        let problems = self.problems();
        let verdict = if problems.is_empty() { "OK" } else { "FAILED" };
        write!(
            f,
            "  verification: {counts}, outbox {} left: {verdict}",
            self.outbox_left
        )?;
        for problem in problems {
            write!(f, "\n    - {problem}")?;
        }
        Ok(())
    }
}

/// Sends `options.orders` orders, waits until each accepted one is `COMPLETED` or the deadline
/// passes, and verifies the counts in Postgres.
///
/// An `Err` means the run could not be carried out (bad options, Postgres or the server
/// unreachable at the start, a database error); a run that went wrong is an `Ok` report whose
/// [`verified`](StressReport::verified) is false. Sending stops early when the deadline passes,
/// when accepted orders turn out to be missing from the database, or after 100 failed POSTs
/// without one accepted.
pub fn run(options: &StressOptions) -> Result<StressReport> {
    options.validate()?;
    let target = Target::parse(&options.url)?;
    let mut verifier = Verifier::connect(&options.database_url)?;
    // Fail before the load when nobody listens, rather than with N connection errors.
    target
        .connect()
        .map_err(|e| Error::Other(format!("{e}: is txoutbox-server running there?")))?;

    let concurrency = options.concurrency.min(options.orders);
    log::info!(
        "stress: sending orders={} concurrency={concurrency} url={}",
        options.orders,
        target.url
    );
    let start = Instant::now();
    let start_wall = SystemTime::now();
    let shared = Shared {
        orders: options.orders,
        deadline: start + options.timeout,
        next: AtomicUsize::new(0),
        sent: AtomicUsize::new(0),
        accepted: AtomicUsize::new(0),
        errors: AtomicUsize::new(0),
        retries: AtomicUsize::new(0),
        recovered: AtomicUsize::new(0),
        replayed: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        error_samples: Mutex::new(Vec::new()),
    };
    let mut monitor = Monitor {
        shared: &shared,
        verifier: &mut verifier,
        start,
        progress: Progress::new(options.progress, start),
        all: Vec::with_capacity(options.orders),
        pending: Vec::new(),
        http_latencies: Vec::with_capacity(options.orders),
        e2e_latencies: Vec::with_capacity(options.orders),
        first_sent: None,
        http_done: None,
        last_updated_epoch: None,
        last_completion_seen: None,
        missing: 0,
        deadline_passed: false,
        poll_cost: Duration::ZERO,
    };

    thread::scope(|scope| -> Result<()> {
        let (sender, receiver) = crossbeam_channel::unbounded();
        for index in 0..concurrency {
            let sender = sender.clone();
            let (shared, target) = (&shared, &target);
            let retries = options.retries;
            let spawned = thread::Builder::new()
                .name(format!("stress-{index}"))
                .spawn_scoped(scope, move || send_orders(target, shared, retries, &sender));
            if let Err(e) = spawned {
                shared.stop.store(true, Ordering::Relaxed);
                return Err(Error::Other(format!("cannot start a sender thread: {e}")));
            }
        }
        drop(sender);
        let watched = monitor.watch(&receiver);
        // Stop the senders (they finish the request in hand) and keep what they still accept.
        shared.stop.store(true, Ordering::Relaxed);
        for accepted in receiver.iter() {
            monitor.record(accepted);
        }
        watched
    })?;
    monitor.progress.finish();
    let http_done = monitor.http_done.unwrap_or_else(Instant::now);
    monitor.finish(options, &target, start_wall, http_done)
}

/// State shared by the sender threads and the monitor.
struct Shared {
    orders: usize,
    deadline: Instant,
    next: AtomicUsize,
    sent: AtomicUsize,
    accepted: AtomicUsize,
    errors: AtomicUsize,
    /// POSTs sent again after a 5xx or no answer.
    retries: AtomicUsize,
    /// Orders accepted on a retry.
    recovered: AtomicUsize,
    /// Of those, answered as a replay of the first attempt's order.
    replayed: AtomicUsize,
    stop: AtomicBool,
    error_samples: Mutex<Vec<String>>,
}

impl Shared {
    fn fail(&self, message: String) {
        let errors = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
        log::debug!("stress: POST failed: {message}");
        let mut samples = self.error_samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() < ERROR_SAMPLES && !samples.contains(&message) {
            samples.push(message);
        }
        drop(samples);
        if errors >= GIVE_UP_ERRORS && self.accepted.load(Ordering::Relaxed) == 0 {
            self.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// One accepted order, as a sender saw it.
struct Accepted {
    id: Uuid,
    sent: Instant,
    latency: Duration,
}

/// A sender thread: takes order numbers until all are taken, the deadline passes or the run
/// stops, and sends each on its own connection, retrying it up to `retries` times.
fn send_orders(target: &Target, shared: &Shared, retries: usize, accepted: &Sender<Accepted>) {
    let mut connection = Connection::new(target);
    loop {
        if shared.stop.load(Ordering::Relaxed) || Instant::now() >= shared.deadline {
            return;
        }
        if shared.next.fetch_add(1, Ordering::Relaxed) >= shared.orders {
            return;
        }
        let body = random_order_body();
        let sent = Instant::now();
        shared.sent.fetch_add(1, Ordering::Relaxed);
        let order = send_order(&mut connection, &body, retries, shared.deadline);
        let latency = sent.elapsed();
        shared.retries.fetch_add(order.retries, Ordering::Relaxed);
        match order.outcome {
            Ok(id) => {
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                if order.retries > 0 {
                    shared.recovered.fetch_add(1, Ordering::Relaxed);
                    shared
                        .replayed
                        .fetch_add(usize::from(order.replayed), Ordering::Relaxed);
                }
                // The monitor outlives the senders; a send error cannot happen.
                let _ = accepted.send(Accepted { id, sent, latency });
            }
            Err(e) => shared.fail(e),
        }
    }
}

/// How one order went over all its attempts.
#[derive(Debug)]
struct SentOrder {
    /// The created order's id, or why the last attempt did not get one.
    outcome: Result<Uuid, String>,
    /// Attempts after the first.
    retries: usize,
    /// The answer that accepted it said `Idempotent-Replayed: true`.
    replayed: bool,
}

/// POSTs `body` under a fresh `Idempotency-Key`, and again under the same key after a 5xx or
/// no answer (whether the order was created is then unknown), at most `retries` times, pausing
/// [`retry_pause`] between attempts, never past `deadline`.
fn send_order(connection: &mut Connection, body: &str, retries: usize, deadline: Instant) -> SentOrder {
    let key = Uuid::new_v4().to_string();
    let headers = [("Idempotency-Key", key.as_str())];
    let target = connection.target;
    let path = target.path.as_str();
    let mut attempt = 0;
    loop {
        let outcome = connection.post_json(path, body.as_bytes(), &headers);
        let pause = retry_pause(attempt);
        let retry = attempt < retries && worth_retrying(&outcome) && Instant::now() + pause < deadline;
        if !retry {
            return SentOrder {
                replayed: outcome.as_ref().is_ok_and(|r| r.replayed),
                outcome: created_order(outcome),
                retries: attempt,
            };
        }
        log::debug!(
            "stress: retrying order {key} in {} ms after {}",
            pause.as_millis(),
            match &outcome {
                Ok(response) => format!("HTTP {}", response.status),
                Err(e) => e.clone(),
            }
        );
        thread::sleep(pause);
        attempt += 1;
    }
}

/// A 5xx, a lost connection or a timeout: the order may or may not exist, and only a retry
/// under the same key tells. A 4xx (or a 201 without an id) would come back the same.
fn worth_retrying(outcome: &Result<Response, String>) -> bool {
    match outcome {
        Ok(response) => response.status >= 500,
        Err(_) => true,
    }
}

/// The pause before retry number `attempt + 1`: 100 ms, doubling, at most 1 s.
fn retry_pause(attempt: usize) -> Duration {
    RETRY_PAUSE
        .saturating_mul(1u32 << attempt.min(10))
        .min(RETRY_PAUSE_MAX)
}

/// A `POST /orders` body with a random user and an amount from 0.01 to 10000.00.
fn random_order_body() -> String {
    let user_id = Uuid::new_v4();
    // Varying with the random user id.
    let cents = 1 + user_id.as_u128() % 1_000_000;
    format!(
        r#"{{"user_id":"{user_id}","amount":"{}.{:02}"}}"#,
        cents / 100,
        cents % 100
    )
}

/// The id of the created order when the answer is a 201 that carries one, else why not.
fn created_order(outcome: Result<Response, String>) -> Result<Uuid, String> {
    match outcome {
        Ok(response) if response.status == 201 => order_id(&response.body)
            .ok_or_else(|| format!("HTTP 201 without an order id: {}", snippet(&response.body))),
        Ok(response) => Err(format!("HTTP {}: {}", response.status, snippet(&response.body))),
        Err(e) => Err(e),
    }
}

/// One keep-alive HTTP/1.1 connection that POSTs random orders exactly as the senders of
/// [`run`] do. Public so that other load generators (`txoutbox-bench`) send the same requests
/// through the same client; it connects on first use and reconnects after the server closes.
pub struct OrderClient {
    target: Target,
    stream: Option<BufReader<TcpStream>>,
    /// Connections opened so far.
    connects: u64,
}

impl OrderClient {
    /// A client for the server at `url` (`http://HOST:PORT`, as `--url`). Does not connect yet.
    pub fn new(url: &str) -> Result<OrderClient> {
        Ok(OrderClient {
            target: Target::parse(url)?,
            stream: None,
            connects: 0,
        })
    }

    /// Connections this client has opened so far, a replaced keep-alive connection included:
    /// compared before and after a request, whether it went out on a new connection.
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// POSTs one order with a random user and amount; the created order's id, or why the
    /// request failed (connection error, another status than 201, or a 201 without an id).
    pub fn post_order(&mut self) -> Result<Uuid, String> {
        let mut connection = Connection {
            target: &self.target,
            stream: self.stream.take(),
            opened: 0,
        };
        let outcome = connection.post_json(&self.target.path, random_order_body().as_bytes(), &[]);
        self.stream = connection.stream;
        self.connects += connection.opened;
        created_order(outcome)
    }

    /// POSTs one order like [`post_order`](Self::post_order) but returns the answer as it came:
    /// its status and body, or why there was none (connection refused, reset, or no progress
    /// within 10 s). For load generators that tell failures apart (`txoutbox-chaos` counts the
    /// 503s of a database outage); [`order_id`] reads the id out of a 201 body.
    pub fn post_order_raw(&mut self) -> Result<(u16, Vec<u8>), String> {
        let mut connection = Connection {
            target: &self.target,
            stream: self.stream.take(),
            opened: 0,
        };
        let outcome = connection.post_json(&self.target.path, random_order_body().as_bytes(), &[]);
        self.stream = connection.stream;
        self.connects += connection.opened;
        outcome.map(|response| (response.status, response.body))
    }

    /// `POST /orders/{id}/cancel` (no body); the answer as it came, like
    /// [`post_order_raw`](Self::post_order_raw): 200 cancelled now, 409 cancelled before.
    pub fn cancel_order_raw(&mut self, id: Uuid) -> Result<(u16, Vec<u8>), String> {
        let mut connection = Connection {
            target: &self.target,
            stream: self.stream.take(),
            opened: 0,
        };
        let path = format!("{}/{id}/cancel", self.target.path);
        let outcome = connection.post_json(&path, b"", &[]);
        self.stream = connection.stream;
        self.connects += connection.opened;
        outcome.map(|response| (response.status, response.body))
    }
}

/// The `id` of the order in a 201 body of `POST /orders`, if it holds one.
pub fn order_id(body: &[u8]) -> Option<Uuid> {
    let value: Value = serde_json::from_slice(body).ok()?;
    Uuid::parse_str(value.get("id")?.as_str()?).ok()
}

/// The start of a body, for error messages.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
}

/// Collects accepted orders, polls Postgres for their completion and prints progress.
struct Monitor<'a> {
    shared: &'a Shared,
    verifier: &'a mut Verifier,
    start: Instant,
    progress: Progress,
    /// Every accepted order id.
    all: Vec<Uuid>,
    /// Accepted ids not yet seen `COMPLETED`.
    pending: Vec<Uuid>,
    http_latencies: Vec<Duration>,
    e2e_latencies: Vec<Duration>,
    first_sent: Option<Instant>,
    /// When the last sender finished.
    http_done: Option<Instant>,
    /// Largest `updated_at` of the completed orders, in seconds since the Unix epoch.
    last_updated_epoch: Option<f64>,
    /// When polling last saw an order complete.
    last_completion_seen: Option<Instant>,
    missing: usize,
    deadline_passed: bool,
    /// How long the last poll took.
    poll_cost: Duration,
}

impl Monitor<'_> {
    fn record(&mut self, accepted: Accepted) {
        self.first_sent = Some(self.first_sent.map_or(accepted.sent, |t| t.min(accepted.sent)));
        self.all.push(accepted.id);
        self.pending.push(accepted.id);
        self.http_latencies.push(accepted.latency);
    }

    /// Runs until the senders are done and every accepted order completed, or the deadline
    /// passes, or accepted orders turn out to be missing from the database.
    fn watch(&mut self, receiver: &Receiver<Accepted>) -> Result<()> {
        loop {
            let started = Instant::now();
            let tick = started + self.poll_interval();
            // recv_deadline returns a waiting message even after the deadline: check it here.
            while self.http_done.is_none() && Instant::now() < tick {
                match receiver.recv_deadline(tick) {
                    Ok(accepted) => self.record(accepted),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => self.http_done = Some(Instant::now()),
                }
            }
            // The interval shortens when sending is over.
            let tick = tick.min(started + self.poll_interval());
            thread::sleep(tick.saturating_duration_since(Instant::now()));
            let polled = Instant::now();
            let outcome = self.poll();
            self.poll_cost = polled.elapsed();
            match outcome {
                Ok(()) => {}
                Err(e) if e.is_unavailable() => log::warn!("stress: cannot poll the orders, retrying: {e}"),
                Err(e) => return Err(e),
            }
            self.show_progress();
            if self.missing > 0 {
                return Ok(());
            }
            if self.http_done.is_some() && self.pending.is_empty() {
                return self.wait_for_outbox();
            }
            if Instant::now() >= self.shared.deadline {
                self.deadline_passed = true;
                return Ok(());
            }
        }
    }

    /// Once a second while sending; afterwards every 100 ms, or less often while a poll is
    /// expensive (see [`POLL_DUTY_DIVISOR`]).
    fn poll_interval(&self) -> Duration {
        if self.http_done.is_none() {
            return SLOW_POLL_INTERVAL;
        }
        (self.poll_cost * POLL_DUTY_DIVISOR).clamp(POLL_INTERVAL, SLOW_POLL_INTERVAL)
    }

    /// Moves the pending orders that completed out of `pending`.
    fn poll(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut done = HashSet::new();
        let mut found = 0;
        for chunk in self.pending.chunks(CHUNK) {
            let rows = self
                .verifier
                .query(POLL_ORDERS, &[&chunk], "cannot poll the orders")?;
            found += rows.len();
            for row in rows {
                let status: &str = row.get(1);
                if status != "COMPLETED" {
                    continue;
                }
                let latency: Option<f64> = row.get(2);
                let updated: Option<f64> = row.get(3);
                if let Some(latency) = latency.filter(|l| l.is_finite() && *l >= 0.0) {
                    self.e2e_latencies.push(Duration::from_secs_f64(latency));
                }
                if let Some(updated) = updated {
                    self.last_updated_epoch =
                        Some(self.last_updated_epoch.map_or(updated, |u| u.max(updated)));
                }
                done.insert(row.get::<_, Uuid>(0));
            }
        }
        // The server commits before it answers 201, so every accepted order must be visible.
        self.missing = self.pending.len().saturating_sub(found);
        if self.missing > 0 {
            log::error!(
                "stress: {} accepted orders are not in database {}",
                self.missing,
                self.verifier.url
            );
        }
        if !done.is_empty() {
            self.pending.retain(|id| !done.contains(id));
            self.last_completion_seen = Some(Instant::now());
        }
        Ok(())
    }

    /// After the last completion, the relay may still be deleting the last confirmed rows.
    fn wait_for_outbox(&mut self) -> Result<()> {
        loop {
            if self.verifier.count_outbox(&self.all)? == 0 {
                return Ok(());
            }
            if Instant::now() >= self.shared.deadline {
                self.deadline_passed = true;
                return Ok(());
            }
            thread::sleep(POLL_INTERVAL / 2);
        }
    }

    fn show_progress(&mut self) {
        let counts = ProgressCounts {
            sent: self.shared.sent.load(Ordering::Relaxed),
            orders: self.shared.orders,
            accepted: self.shared.accepted.load(Ordering::Relaxed),
            errors: self.shared.errors.load(Ordering::Relaxed),
            completed: self.all.len() - self.pending.len(),
        };
        self.progress.tick(&counts);
    }

    /// Counts everything in the database and builds the report.
    fn finish(
        mut self,
        options: &StressOptions,
        target: &Target,
        start_wall: SystemTime,
        http_done: Instant,
    ) -> Result<StressReport> {
        let (completed, found) = self.verifier.count_orders(&self.all)?;
        let processed = self.verifier.count_processed(&self.all)?;
        let outbox_left = self.verifier.count_outbox(&self.all)?;
        let missing = self.all.len().saturating_sub(found);
        let accepted = self.all.len();
        let http_elapsed = http_done.saturating_duration_since(self.start);
        let e2e_elapsed = self.e2e_elapsed(start_wall);
        let seen_completed = self.e2e_latencies.len();
        let error_samples = self
            .shared
            .error_samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(StressReport {
            url: target.url.clone(),
            orders: options.orders,
            concurrency: options.concurrency.min(options.orders),
            timeout: options.timeout,
            sent: self.shared.sent.load(Ordering::Relaxed),
            accepted,
            errors: self.shared.errors.load(Ordering::Relaxed),
            retries: self.shared.retries.load(Ordering::Relaxed),
            recovered: self.shared.recovered.load(Ordering::Relaxed),
            replayed: self.shared.replayed.load(Ordering::Relaxed),
            error_samples,
            http_elapsed,
            http_rate: rate(accepted, Some(http_elapsed)),
            completed,
            processed,
            outbox_left,
            missing,
            e2e_elapsed,
            e2e_rate: rate(seen_completed, e2e_elapsed),
            http_latency: Percentiles::of(&mut self.http_latencies),
            e2e_latency: Percentiles::of(&mut self.e2e_latencies),
            deadline_passed: self.deadline_passed,
        })
    }

    /// First POST sent to last `COMPLETED`: by Postgres' `max(updated_at)` against the wall
    /// clock of the first POST, or by when polling saw it if the clocks disagree.
    fn e2e_elapsed(&self, start_wall: SystemTime) -> Option<Duration> {
        let first_sent = self.first_sent?;
        let observed = self.last_completion_seen?.saturating_duration_since(first_sent);
        let first_wall = start_wall + first_sent.saturating_duration_since(self.start);
        let by_clock = match (self.last_updated_epoch, first_wall.duration_since(UNIX_EPOCH)) {
            (Some(last), Ok(first)) => last - first.as_secs_f64(),
            _ => f64::NAN,
        };
        if by_clock.is_finite() && by_clock > 0.0 && by_clock <= observed.as_secs_f64() {
            Some(Duration::from_secs_f64(by_clock))
        } else {
            Some(observed)
        }
    }
}

/// `count` per second over `elapsed`; 0 when nothing was measured.
fn rate(count: usize, elapsed: Option<Duration>) -> f64 {
    match elapsed {
        Some(elapsed) if !elapsed.is_zero() => count as f64 / elapsed.as_secs_f64(),
        _ => 0.0,
    }
}

/// The counts the progress line shows.
struct ProgressCounts {
    sent: usize,
    orders: usize,
    accepted: usize,
    errors: usize,
    completed: usize,
}

/// The progress line on stderr: rewritten in place on a terminal, one line a second otherwise.
struct Progress {
    enabled: bool,
    terminal: bool,
    start: Instant,
    last: Instant,
    last_accepted: usize,
    last_completed: usize,
    printed: bool,
}

impl Progress {
    fn new(enabled: bool, start: Instant) -> Self {
        Progress {
            enabled,
            terminal: io::stderr().is_terminal(),
            start,
            last: start,
            last_accepted: 0,
            last_completed: 0,
            printed: false,
        }
    }

    fn tick(&mut self, counts: &ProgressCounts) {
        let now = Instant::now();
        let interval = now.duration_since(self.last);
        if !self.enabled || interval < PROGRESS_INTERVAL {
            return;
        }
        let per_second = |now: usize, before: usize| (now - before.min(now)) as f64 / interval.as_secs_f64();
        let line = format!(
            "stress {:>5.1} s: sent {}/{}, accepted {}, errors {}, completed {} | {:.0} accepted/s, {:.0} completed/s",
            now.duration_since(self.start).as_secs_f64(),
            counts.sent,
            counts.orders,
            counts.accepted,
            counts.errors,
            counts.completed,
            per_second(counts.accepted, self.last_accepted),
            per_second(counts.completed, self.last_completed),
        );
        let mut stderr = io::stderr().lock();
        let _ = if self.terminal {
            write!(stderr, "\r{line}\x1b[K")
        } else {
            writeln!(stderr, "{line}")
        };
        let _ = stderr.flush();
        self.printed = true;
        self.last = now;
        self.last_accepted = counts.accepted;
        self.last_completed = counts.completed;
    }

    /// Ends the rewritten line so the summary starts on its own.
    fn finish(&mut self) {
        if self.printed && self.terminal {
            eprintln!();
        }
        self.printed = false;
    }
}

/// The Postgres side: one connection, reopened after it is lost.
struct Verifier {
    config: postgres::Config,
    client: Option<Client>,
    /// The URL with its password redacted.
    url: String,
}

impl Verifier {
    /// Connects and checks that the txoutbox tables are there.
    fn connect(url: &str) -> Result<Verifier> {
        let config = txoutbox::db::parse_url(url, Duration::from_secs(30))?;
        let mut verifier = Verifier {
            config,
            client: None,
            url: redact_url(url),
        };
        let client = verifier.client()?;
        client.simple_query(CHECK_TABLES).map_err(|e| {
            Error::db(
                format!(
                    "database {} has no txoutbox tables; set DATABASE_URL to the database \
                     txoutbox-server uses",
                    redact_url(url)
                ),
                e,
            )
        })?;
        Ok(verifier)
    }

    fn client(&mut self) -> Result<&mut Client> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        let client = match self.client.take() {
            Some(client) => client,
            None => self.config.connect(NoTls).map_err(|e| {
                Error::db(
                    format!(
                        "cannot connect to {} to verify the orders (is Postgres running? \
                         DATABASE_URL must name the server's database)",
                        self.url
                    ),
                    e,
                )
            })?,
        };
        Ok(self.client.insert(client))
    }

    fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
        context: &str,
    ) -> Result<Vec<postgres::Row>> {
        let client = self.client()?;
        client.query(sql, params).map_err(|e| Error::db(context, e))
    }

    /// (COMPLETED, found) among `ids`.
    fn count_orders(&mut self, ids: &[Uuid]) -> Result<(usize, usize)> {
        let (mut completed, mut found) = (0, 0);
        for chunk in ids.chunks(CHUNK) {
            let rows = self.query(COUNT_ORDERS, &[&chunk], "cannot count the orders")?;
            if let Some(row) = rows.first() {
                completed += count(row.get(0));
                found += count(row.get(1));
            }
        }
        Ok((completed, found))
    }

    /// `processed_messages` rows of the `OrderCreated` events of `ids`.
    fn count_processed(&mut self, ids: &[Uuid]) -> Result<usize> {
        let mut total = 0;
        for chunk in ids.chunks(CHUNK) {
            let texts: Vec<String> = chunk.iter().map(Uuid::to_string).collect();
            let rows = self.query(
                COUNT_PROCESSED,
                &[&texts, &ORDER_CREATED],
                "cannot count processed_messages",
            )?;
            total += rows.first().map_or(0, |row| count(row.get(0)));
        }
        Ok(total)
    }

    /// Outbox rows of `ids` not yet delivered.
    fn count_outbox(&mut self, ids: &[Uuid]) -> Result<usize> {
        let mut total = 0;
        for chunk in ids.chunks(CHUNK) {
            let texts: Vec<String> = chunk.iter().map(Uuid::to_string).collect();
            let rows = self.query(COUNT_OUTBOX, &[&texts], "cannot count the outbox rows")?;
            total += rows.first().map_or(0, |row| count(row.get(0)));
        }
        Ok(total)
    }
}

/// A `count(*)` as usize.
fn count(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// Where the orders go, parsed from `--url`.
struct Target {
    /// The URL as given, password redacted, for messages.
    url: String,
    /// `Host` header value.
    authority: String,
    addrs: Vec<SocketAddr>,
    /// Request path of the orders endpoint.
    path: String,
}

impl Target {
    /// Parses `http://HOST[:PORT][/BASE]` and resolves the host.
    fn parse(url: &str) -> Result<Target> {
        let shown = redact_url(url);
        let bad = |why: &str| Error::Config(format!("--url {shown}: {why}; expected http://HOST:PORT"));
        let Some(rest) = strip_prefix_ignore_case(url.trim(), "http://") else {
            if strip_prefix_ignore_case(url.trim(), "https://").is_some() {
                return Err(bad("https is not supported, use plain http"));
            }
            return Err(bad("not an http:// URL"));
        };
        let (authority, base) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        if authority.contains('@') {
            return Err(bad("credentials in the URL are not supported"));
        }
        if base.contains(['?', '#']) {
            return Err(bad("a query or fragment is not supported"));
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(bracketed) => {
                let (host, tail) = bracketed.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
                (host, tail.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        let port = match port {
            Some(port) => port
                .parse::<u16>()
                .map_err(|_| bad(&format!("port {port:?} is not a number")))?,
            None => 80,
        };
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| Error::Config(format!("--url {shown}: cannot resolve {host}: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(Error::Config(format!("--url {shown}: {host} has no address")));
        }
        Ok(Target {
            url: shown,
            authority: authority.to_string(),
            addrs,
            path: format!("{}/orders", base.trim_end_matches('/')),
        })
    }

    /// Opens a connection with the I/O timeouts set, trying each address in turn.
    fn connect(&self) -> Result<TcpStream, String> {
        let mut last_error = None;
        for addr in &self.addrs {
            match TcpStream::connect_timeout(addr, IO_TIMEOUT) {
                Ok(stream) => {
                    let configured = stream
                        .set_read_timeout(Some(IO_TIMEOUT))
                        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
                        .and_then(|()| stream.set_nodelay(true));
                    return match configured {
                        Ok(()) => Ok(stream),
                        Err(e) => Err(format!("cannot configure the connection to {addr}: {e}")),
                    };
                }
                Err(e) => last_error = Some(format!("cannot connect to {} ({addr}): {e}", self.url)),
            }
        }
        Err(last_error.unwrap_or_else(|| format!("cannot connect to {}", self.url)))
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

/// An HTTP response: the status, the body, and whether it replays an earlier answer.
#[derive(Debug)]
struct Response {
    status: u16,
    body: Vec<u8>,
    /// `Idempotent-Replayed: true`: the answer of the first request under the same key.
    replayed: bool,
}

/// Why one exchange failed; `stale` when a reused keep-alive connection turned out closed
/// before any of the response arrived, which is worth one retry on a new connection.
#[derive(Debug)]
struct Failure {
    message: String,
    stale: bool,
}

impl Failure {
    fn new(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            stale: false,
        }
    }

    fn io(what: &str, e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                Failure::new(format!("{what}: no progress within {} s", IO_TIMEOUT.as_secs()))
            }
            _ => Failure::new(format!("{what}: {e}")),
        }
    }
}

/// True for the errors a keep-alive connection the server already closed produces.
fn is_closed_by_peer(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
    )
}

/// A minimal HTTP/1.1 client on one keep-alive connection, opened on first use and reopened
/// after the server closes it.
struct Connection<'t> {
    target: &'t Target,
    stream: Option<BufReader<TcpStream>>,
    /// Connections opened so far (a reused one found closed is replaced: one more).
    opened: u64,
}

impl<'t> Connection<'t> {
    fn new(target: &'t Target) -> Self {
        Connection {
            target,
            stream: None,
            opened: 0,
        }
    }

    /// POSTs a JSON body with `headers` besides the usual ones. A reused connection found
    /// closed is replaced once before the failure counts.
    fn post_json(&mut self, path: &str, body: &[u8], headers: &[(&str, &str)]) -> Result<Response, String> {
        let reused = self.stream.is_some();
        match self.exchange(path, body, headers) {
            Ok(response) => Ok(response),
            Err(failure) if reused && failure.stale => {
                log::debug!(
                    "stress: keep-alive connection closed ({}), reconnecting",
                    failure.message
                );
                self.exchange(path, body, headers).map_err(|f| f.message)
            }
            Err(failure) => Err(failure.message),
        }
    }

    /// One request and its response; the connection is dropped after any failure, and after a
    /// response that ends it.
    fn exchange(&mut self, path: &str, body: &[u8], headers: &[(&str, &str)]) -> Result<Response, Failure> {
        let result = self.try_exchange(path, body, headers);
        match &result {
            Ok((_, true)) => {}
            _ => self.stream = None,
        }
        result.map(|(response, _)| response)
    }

    fn try_exchange(
        &mut self,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(Response, bool), Failure> {
        let stream = match self.stream.take() {
            Some(stream) => stream,
            None => {
                let stream = BufReader::new(self.target.connect().map_err(Failure::new)?);
                self.opened += 1;
                stream
            }
        };
        let stream = self.stream.insert(stream);
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Accept: application/json\r\nContent-Length: {}\r\n",
            self.target.authority,
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        let mut request = request.into_bytes();
        request.extend_from_slice(body);
        stream.get_mut().write_all(&request).map_err(|e| Failure {
            stale: is_closed_by_peer(&e),
            ..Failure::io("cannot send the request", &e)
        })?;
        read_response(stream)
    }
}

/// Reads one response; returns it and whether the connection stays open.
fn read_response(reader: &mut impl BufRead) -> Result<(Response, bool), Failure> {
    let mut line = Vec::new();
    loop {
        // Status line. Nothing at all before EOF or a reset: the server had closed the connection.
        line.clear();
        match read_line(reader, &mut line) {
            Ok(0) => {
                return Err(Failure {
                    stale: true,
                    ..Failure::new("the server closed the connection without answering")
                })
            }
            Ok(_) => {}
            Err(e) => {
                return Err(Failure {
                    stale: is_closed_by_peer(&e),
                    ..Failure::io("cannot read the response", &e)
                })
            }
        }
        let status_line = String::from_utf8_lossy(&line).trim_end().to_string();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        let status = parts.next().and_then(|s| s.parse::<u16>().ok());
        let Some(status) = status.filter(|_| version.starts_with("HTTP/1.")) else {
            return Err(Failure::new(format!("malformed status line {status_line:?}")));
        };
        let mut keep_alive = version == "HTTP/1.1";
        let mut content_length = None;
        let mut chunked = false;
        let mut replayed = false;
        for index in 0.. {
            line.clear();
            match read_line(reader, &mut line) {
                Ok(0) => return Err(Failure::new("the connection closed inside the headers")),
                Ok(_) => {}
                Err(e) => return Err(Failure::io("cannot read the headers", &e)),
            }
            let header = String::from_utf8_lossy(&line);
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if index >= MAX_HEADERS {
                return Err(Failure::new(format!("more than {MAX_HEADERS} headers")));
            }
            let Some((name, value)) = header.split_once(':') else {
                return Err(Failure::new(format!("malformed header {header:?}")));
            };
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("content-length") {
                let length = value
                    .parse::<usize>()
                    .map_err(|_| Failure::new(format!("malformed Content-Length {value:?}")))?;
                content_length = Some(length);
            } else if name.eq_ignore_ascii_case("idempotent-replayed") {
                replayed = value.eq_ignore_ascii_case("true");
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                for token in value.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        keep_alive = true;
                    }
                }
            }
        }
        if (100..200).contains(&status) {
            continue; // an interim response; the real one follows
        }
        let body = if status == 204 || status == 304 {
            Vec::new()
        } else if chunked {
            read_chunked(reader)?
        } else if let Some(length) = content_length {
            if length > MAX_BODY {
                return Err(Failure::new(format!(
                    "response body of {length} bytes is too large"
                )));
            }
            let mut body = vec![0; length];
            reader
                .read_exact(&mut body)
                .map_err(|e| Failure::io("cannot read the body", &e))?;
            body
        } else {
            // No length: the body runs to the end of the connection.
            keep_alive = false;
            let mut body = Vec::new();
            reader
                .take(MAX_BODY as u64)
                .read_to_end(&mut body)
                .map_err(|e| Failure::io("cannot read the body", &e))?;
            body
        };
        return Ok((
            Response {
                status,
                body,
                replayed,
            },
            keep_alive,
        ));
    }
}

/// Reads a `Transfer-Encoding: chunked` body and its trailer.
fn read_chunked(reader: &mut impl BufRead) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if read_line(reader, &mut line).map_err(|e| Failure::io("cannot read a chunk", &e))? == 0 {
            return Err(Failure::new("the connection closed inside a chunked body"));
        }
        let text = String::from_utf8_lossy(&line);
        let size_text = text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| Failure::new(format!("malformed chunk size {size_text:?}")))?;
        if size == 0 {
            // Trailer lines until the empty one.
            loop {
                line.clear();
                let n =
                    read_line(reader, &mut line).map_err(|e| Failure::io("cannot read the trailer", &e))?;
                if n == 0 || line.trim_ascii().is_empty() {
                    return Ok(body);
                }
            }
        }
        if body.len() + size > MAX_BODY {
            return Err(Failure::new("chunked response body is too large"));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader
            .read_exact(&mut body[start..])
            .map_err(|e| Failure::io("cannot read a chunk", &e))?;
        line.clear();
        read_line(reader, &mut line).map_err(|e| Failure::io("cannot read a chunk", &e))?;
    }
}

/// Reads up to and including `\n`, at most [`MAX_LINE`] bytes; 0 at end of stream.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<usize> {
    let n = reader.take(MAX_LINE).read_until(b'\n', line)?;
    if n as u64 == MAX_LINE && line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("line longer than {MAX_LINE} bytes"),
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|&v| Duration::from_millis(v)).collect()
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let mut samples = ms(&[5, 1, 4, 2, 3, 10, 9, 8, 7, 6]);
        let p = Percentiles::of(&mut samples).expect("samples");
        assert_eq!(p.p50, Duration::from_millis(5));
        assert_eq!(p.p95, Duration::from_millis(10));
        assert_eq!(p.max, Duration::from_millis(10));
        let sorted = ms(&(1..=100).collect::<Vec<_>>());
        assert_eq!(percentile(&sorted, 99.0), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&sorted, 0.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&ms(&[7]), 50.0), Some(Duration::from_millis(7)));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(Percentiles::of(&mut []), None);
    }

    #[test]
    fn urls_parse_into_host_and_path() {
        let t = Target::parse("http://127.0.0.1:18080").expect("url");
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("127.0.0.1:18080", "/orders")
        );
        assert_eq!(t.addrs[0].port(), 18080);
        let t = Target::parse("HTTP://[::1]:9000/api/").expect("url");
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("[::1]:9000", "/api/orders")
        );
        assert_eq!(
            Target::parse("http://127.0.0.1").expect("url").addrs[0].port(),
            80
        );
        for bad in [
            "https://127.0.0.1",
            "127.0.0.1:80",
            "http://",
            "http://h:x",
            "http://a@h:1",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn responses_parse_with_length_chunks_or_close() {
        let mut input: &[u8] = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}rest";
        let (r, keep) = read_response(&mut input).expect("response");
        assert_eq!((r.status, r.body.as_slice(), keep), (201, &b"{}"[..], true));
        let mut input: &[u8] =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nConnection: close\r\n\r\n3;x\r\nabc\r\n1\r\nd\r\n0\r\n\r\n";
        let (r, keep) = read_response(&mut input).expect("response");
        assert_eq!((r.status, r.body.as_slice(), keep), (200, &b"abcd"[..], false));
        let mut input: &[u8] = b"HTTP/1.0 503 Unavailable\r\n\r\nbusy";
        let (r, keep) = read_response(&mut input).expect("response");
        assert_eq!((r.status, r.body.as_slice(), keep), (503, &b"busy"[..], false));
        let mut input: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(read_response(&mut input).expect("response").0.status, 204);
        let mut input: &[u8] = b"";
        assert!(read_response(&mut input).expect_err("eof").stale);
        let mut input: &[u8] = b"SMTP ready\r\n\r\n";
        assert!(!read_response(&mut input).expect_err("garbage").stale);
    }

    /// Reads one request (headers and Content-Length body) from a test server's connection.
    fn read_request(reader: &mut BufReader<TcpStream>) -> Vec<u8> {
        read_keyed_request(reader).1
    }

    /// Reads one request; its `Idempotency-Key` (empty without one) and body.
    fn read_keyed_request(reader: &mut BufReader<TcpStream>) -> (String, Vec<u8>) {
        let mut length = 0;
        let mut key = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line).expect("request line");
            if line.trim().is_empty() {
                break;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().expect("length");
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("idempotency-key") {
                    key = value.trim().to_string();
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).expect("body");
        (key, body)
    }

    /// The `Idempotency-Key` and body of each request a test server received.
    type Received = Vec<(String, Vec<u8>)>;

    /// A server that takes one request per connection and gives it the next of `answers`
    /// (`None`: it closes without answering); returns the keys and bodies it received.
    fn serve_once_each(answers: Vec<Option<String>>) -> (Target, thread::JoinHandle<Received>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = thread::spawn(move || {
            let mut received = Vec::new();
            for answer in answers {
                let (stream, _) = listener.accept().expect("accept");
                let mut reader = BufReader::new(stream);
                received.push(read_keyed_request(&mut reader));
                if let Some(answer) = answer {
                    reader.get_mut().write_all(answer.as_bytes()).expect("write");
                }
            }
            received
        });
        let target = Target::parse(&format!("http://127.0.0.1:{port}")).expect("url");
        (target, server)
    }

    fn answer(status: &str, extra: &str, body: &str) -> Option<String> {
        Some(format!(
            "HTTP/1.1 {status}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        ))
    }

    #[test]
    fn an_order_is_retried_under_its_key_after_a_5xx_or_no_answer() {
        let id = Uuid::new_v4();
        let (target, server) = serve_once_each(vec![
            answer("503 Service Unavailable", "", r#"{"error":"retry later"}"#),
            None,
            answer(
                "201 Created",
                "Idempotent-Replayed: true\r\n",
                &format!(r#"{{"id":"{id}"}}"#),
            ),
        ]);
        let mut connection = Connection::new(&target);
        let deadline = Instant::now() + Duration::from_secs(10);
        let order = send_order(&mut connection, "{}", 3, deadline);
        assert_eq!(order.outcome, Ok(id));
        assert_eq!((order.retries, order.replayed), (2, true));
        let received = server.join().expect("server");
        assert_eq!(received.len(), 3);
        assert!(!received[0].0.is_empty(), "no Idempotency-Key sent");
        assert!(
            received.iter().all(|r| r == &received[0]),
            "every attempt carries the same key and body: {received:?}"
        );
    }

    #[test]
    fn retries_stop_at_the_bound_and_skip_4xx() {
        let unavailable = || answer("503 Service Unavailable", "", "{}");
        let (target, server) = serve_once_each(vec![unavailable(), unavailable()]);
        let order = send_order(
            &mut Connection::new(&target),
            "{}",
            1,
            Instant::now() + Duration::from_secs(10),
        );
        assert_eq!(order.retries, 1);
        assert!(order.outcome.expect_err("503 twice").contains("HTTP 503"));
        server.join().expect("server");

        let (target, server) = serve_once_each(vec![answer("422 Unprocessable Entity", "", "{}")]);
        let order = send_order(
            &mut Connection::new(&target),
            "{}",
            3,
            Instant::now() + Duration::from_secs(10),
        );
        assert_eq!(order.retries, 0, "a 4xx is not retried");
        assert!(order.outcome.is_err());
        assert_eq!(server.join().expect("server").len(), 1);
        assert_eq!(
            (retry_pause(0), retry_pause(1), retry_pause(9)),
            (RETRY_PAUSE, 2 * RETRY_PAUSE, RETRY_PAUSE_MAX)
        );
    }

    #[test]
    fn a_closed_keep_alive_connection_is_replaced_once() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = thread::spawn(move || {
            // Each connection answers one request and then closes without saying so.
            for n in 0..2 {
                let (stream, _) = listener.accept().expect("accept");
                let mut reader = BufReader::new(stream);
                let body = read_request(&mut reader);
                let reply = format!("{{\"n\":{n},\"echo\":{}}}", String::from_utf8_lossy(&body));
                let response = format!(
                    "HTTP/1.1 201 Created\r\nContent-Length: {}\r\n\r\n{reply}",
                    reply.len()
                );
                reader.get_mut().write_all(response.as_bytes()).expect("write");
            }
        });
        let target = Target::parse(&format!("http://127.0.0.1:{port}")).expect("url");
        let mut connection = Connection::new(&target);
        let first = connection.post_json("/orders", b"1", &[]).expect("first");
        assert_eq!(first.body, b"{\"n\":0,\"echo\":1}");
        thread::sleep(Duration::from_millis(50));
        let second = connection
            .post_json("/orders", b"2", &[])
            .expect("second, on a new connection");
        assert_eq!(second.body, b"{\"n\":1,\"echo\":2}");
        server.join().expect("server");
    }

    #[test]
    fn reports_name_what_is_missing() {
        let report = StressReport {
            url: DEFAULT_URL.into(),
            orders: 10,
            concurrency: 2,
            timeout: Duration::from_secs(5),
            sent: 10,
            accepted: 10,
            errors: 0,
            retries: 0,
            recovered: 0,
            replayed: 0,
            error_samples: Vec::new(),
            http_elapsed: Duration::from_secs(1),
            http_rate: 10.0,
            completed: 7,
            processed: 7,
            outbox_left: 0,
            missing: 0,
            e2e_elapsed: Some(Duration::from_secs(2)),
            e2e_rate: 3.5,
            http_latency: None,
            e2e_latency: None,
            deadline_passed: true,
        };
        assert!(!report.verified());
        assert_eq!(
            report.problems(),
            [
                "3 orders still PENDING after 5 s (their events left the outbox: is txoutbox-consumer \
              running, on the same queue?)"
            ]
        );
        assert!(report.to_string().contains("FAILED"));
        let ok = StressReport {
            completed: 10,
            processed: 10,
            deadline_passed: false,
            ..report
        };
        assert!(ok.verified(), "{:?}", ok.problems());
        assert!(ok
            .to_string()
            .ends_with("accepted 10 = COMPLETED 10 = processed 10, outbox 0 left: OK"));
    }
}
