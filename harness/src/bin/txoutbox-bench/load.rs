//! HTTP load through the stress tool's own client ([`OrderClient`]): a closed loop (every
//! connection sends its next order as soon as the last one is answered) to measure throughput,
//! and an open loop (orders due at fixed instants) to measure latency at a given offered load.
//!
//! Why not ureq: the load generator runs on the same two cores as what it measures, so what it
//! spends per request is taken from Postgres and the server. Measured with both in `make
//! bench-quick` (2026-12-03, 32 connections): the hand-written keep-alive client used 0.06
//! cores at 1,692 orders/s in (3) (35 µs a request) and 0.09 at 1,946 in (8) (46 µs); ureq 3.5
//! (one agent per connection, no TLS) used 0.22 at 1,790 (123 µs) and 0.26 at 2,195 (118 µs),
//! three times as much, about 0.15 cores of the two more at these rates.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use txoutbox::{Error, Result};
use txoutbox_harness::stress::OrderClient;
use uuid::Uuid;

use crate::quantiles;
use crate::slow::{Episode, SenderEpisodes, SlowAnswer, SLOW_ANSWER};

/// Sending stops after this many failed POSTs while none was accepted: the server is broken.
const GIVE_UP_ERRORS: usize = 100;
/// Distinct error messages kept.
const ERROR_SAMPLES: usize = 5;
/// An open-loop request sent more than this after its due instant counts as late.
pub const LATE_AFTER: Duration = Duration::from_millis(1);

/// What a load run sent and got back.
#[derive(Debug, Default)]
pub struct LoadOutcome {
    /// Ids of the orders answered 201, in no particular order.
    pub ids: Vec<Uuid>,
    /// Orders accepted per URL, in the order the URLs were given.
    pub per_target: Vec<usize>,
    /// POSTs that failed (another status, a connection error).
    pub errors: usize,
    /// Up to five distinct error messages.
    pub error_samples: Vec<String>,
    /// Wall-clock time of the start, to compare with Postgres' timestamps.
    pub started_wall: Option<SystemTime>,
    /// From the start until the last answer.
    pub elapsed: Duration,
}

impl LoadOutcome {
    fn merge(&mut self, target: usize, part: ThreadResult) {
        if self.per_target.len() <= target {
            self.per_target.resize(target + 1, 0);
        }
        self.per_target[target] += part.ids.len();
        self.ids.extend(part.ids);
        self.errors += part.errors;
        for sample in part.error_samples {
            if self.error_samples.len() < ERROR_SAMPLES && !self.error_samples.contains(&sample) {
                self.error_samples.push(sample);
            }
        }
    }
}

/// What an open-loop run measured besides the orders.
#[derive(Debug)]
pub struct OpenLoopOutcome {
    /// The orders, as for a closed loop.
    pub load: LoadOutcome,
    /// Orders the schedule had in the measured window (after the warm-up).
    pub scheduled: usize,
    /// Orders sent before the measured window, at the same rate.
    pub warm_up_orders: usize,
    /// Orders of the measured window answered 201.
    pub measured_accepted: usize,
    /// From the first measured order's due instant to the last answer.
    pub measured_elapsed: Duration,
    /// From each measured order's due instant to its answer: waiting for a free sender counts
    /// (microseconds).
    pub latency: Histogram<u64>,
    /// The same per [`Schedule::bucket`] of the measured part, in order (none without buckets).
    pub buckets: Vec<Histogram<u64>>,
    /// Measured orders sent more than [`LATE_AFTER`] after their due instant.
    pub late: usize,
    /// The first measured order's due instant: the origin of the episodes' times.
    pub measured_from: Instant,
    /// Measured answers slower than [`SLOW_ANSWER`], grouped into episodes, in time order.
    pub slow_episodes: Vec<Episode>,
    /// Slow answers past the senders' bound on episodes: counted, not grouped.
    pub slow_not_kept: usize,
}

/// `count / elapsed` per second, 0 for an empty interval.
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        0.0
    } else {
        count as f64 / elapsed.as_secs_f64()
    }
}

/// What one sender thread collected.
#[derive(Default)]
struct ThreadResult {
    ids: Vec<Uuid>,
    errors: usize,
    error_samples: Vec<String>,
    /// Open loop: latencies of the measured part, in all and per bucket.
    latency: Option<Histogram<u64>>,
    buckets: Vec<Histogram<u64>>,
    slow: SenderEpisodes,
}

impl ThreadResult {
    /// Records one POST's outcome; false when sending should stop.
    fn record(&mut self, outcome: std::result::Result<Uuid, String>, shared: &Shared) -> bool {
        match outcome {
            Ok(id) => {
                self.ids.push(id);
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.errors += 1;
                if self.error_samples.len() < ERROR_SAMPLES && !self.error_samples.contains(&e) {
                    self.error_samples.push(e);
                }
                let errors = shared.errors.fetch_add(1, Ordering::Relaxed) + 1;
                !(errors >= GIVE_UP_ERRORS && shared.accepted.load(Ordering::Relaxed) == 0)
            }
        }
    }
}

/// Counters every sender updates.
struct Shared<'a> {
    accepted: &'a AtomicU64,
    errors: AtomicUsize,
    stop: &'a AtomicBool,
    give_up: AtomicBool,
}

impl Shared<'_> {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.give_up.load(Ordering::Relaxed)
    }
}

/// Sends orders from `connections` threads for `duration`, thread `i` to `urls[i % len]`,
/// each on its own keep-alive connection and as fast as it gets answers. `accepted` counts
/// along (for the sampler); `stop` ends the run early.
pub fn closed_loop(
    urls: &[String],
    connections: usize,
    duration: Duration,
    accepted: &AtomicU64,
    stop: &AtomicBool,
) -> Result<LoadOutcome> {
    let clients = clients(urls, connections)?;
    let shared = Shared {
        accepted,
        errors: AtomicUsize::new(0),
        stop,
        give_up: AtomicBool::new(false),
    };
    let barrier = Barrier::new(connections + 1);
    let mut outcome = LoadOutcome::default();
    thread::scope(|scope| -> Result<()> {
        let mut threads = Vec::with_capacity(connections);
        for (index, (target, mut client)) in clients.into_iter().enumerate() {
            let (shared, barrier) = (&shared, &barrier);
            let thread = thread::Builder::new()
                .name(format!("bench-load-{index}"))
                .spawn_scoped(scope, move || {
                    barrier.wait();
                    let deadline = Instant::now() + duration;
                    let mut result = ThreadResult::default();
                    while Instant::now() < deadline && !shared.stopping() {
                        if !result.record(client.post_order(), shared) {
                            shared.give_up.store(true, Ordering::Relaxed);
                        }
                    }
                    result
                })
                .map_err(|e| Error::Other(format!("cannot start a load thread: {e}")))?;
            threads.push((target, thread));
        }
        barrier.wait();
        let start = Instant::now();
        outcome.started_wall = Some(SystemTime::now());
        for (target, thread) in threads {
            let part = thread
                .join()
                .map_err(|_| Error::Other("a load thread panicked".into()))?;
            outcome.merge(target, part);
        }
        outcome.elapsed = start.elapsed();
        Ok(())
    })?;
    outcome.per_target.resize(urls.len(), 0);
    Ok(outcome)
}

/// The schedule of an open loop: order `n` is due `n / rate` seconds after the start; the
/// first `warm_up` of them are sent but not measured.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// Orders per second.
    pub rate: f64,
    /// Sent at the same rate before measuring starts (pool connections opened, caches warm).
    pub warm_up: Duration,
    /// Measured part.
    pub duration: Duration,
    /// When given, latencies are also kept per interval of this length of the measured part
    /// (by due instant), for figures over time.
    pub bucket: Option<Duration>,
}

/// Sends orders to `url` on `schedule`. `senders` threads take the orders in turn, each
/// sleeping until its order is due; when all are busy the next order goes out late, and its
/// latency still counts from the instant it was due (no coordinated omission).
/// `measuring` runs once, at the due instant of the first measured order.
pub fn open_loop(
    url: &str,
    schedule: Schedule,
    senders: usize,
    accepted: &AtomicU64,
    stop: &AtomicBool,
    measuring: &(dyn Fn() + Sync),
) -> Result<OpenLoopOutcome> {
    let rate = schedule.rate;
    if !(rate.is_finite() && rate > 0.0) {
        return Err(Error::Other(format!("cannot offer {rate} orders/s")));
    }
    let first_measured = (rate * schedule.warm_up.as_secs_f64()).round() as usize;
    let scheduled = (rate * schedule.duration.as_secs_f64()).round().max(1.0) as usize;
    let total = first_measured + scheduled;
    let clients = clients(&[url.to_string()], senders)?;
    let shared = Shared {
        accepted,
        errors: AtomicUsize::new(0),
        stop,
        give_up: AtomicBool::new(false),
    };
    let next = AtomicUsize::new(0);
    let late = AtomicUsize::new(0);
    let measured_accepted = AtomicUsize::new(0);
    let bucket_count = schedule.bucket.filter(|b| !b.is_zero()).map_or(0, |b| {
        (schedule.duration.as_secs_f64() / b.as_secs_f64()).ceil() as usize
    });
    let barrier = Barrier::new(senders + 1);
    let start = Instant::now() + Duration::from_millis(100);
    let due = |n: usize| start + Duration::from_secs_f64(n as f64 / rate);
    let mut outcome = OpenLoopOutcome {
        load: LoadOutcome::default(),
        scheduled,
        warm_up_orders: first_measured,
        measured_accepted: 0,
        measured_elapsed: Duration::ZERO,
        latency: quantiles::histogram(),
        buckets: Vec::new(),
        late: 0,
        measured_from: due(first_measured),
        slow_episodes: Vec::new(),
        slow_not_kept: 0,
    };
    let in_flight = AtomicUsize::new(0);
    let mut episodes = Vec::new();
    thread::scope(|scope| -> Result<()> {
        let mut threads = Vec::with_capacity(senders);
        for (index, (_, mut client)) in clients.into_iter().enumerate() {
            let (shared, barrier, next, late, measured_accepted, in_flight) =
                (&shared, &barrier, &next, &late, &measured_accepted, &in_flight);
            let thread = thread::Builder::new()
                .name(format!("bench-open-{index}"))
                .spawn_scoped(scope, move || {
                    barrier.wait();
                    let mut result = ThreadResult {
                        latency: Some(quantiles::histogram()),
                        buckets: (0..bucket_count).map(|_| quantiles::histogram()).collect(),
                        ..ThreadResult::default()
                    };
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= total || shared.stopping() {
                            return result;
                        }
                        let measured = n >= first_measured;
                        let due_at = due(n);
                        let now = Instant::now();
                        if due_at > now {
                            thread::sleep(due_at - now);
                        } else if measured && now - due_at > LATE_AFTER {
                            late.fetch_add(1, Ordering::Relaxed);
                        }
                        if n == first_measured {
                            measuring();
                        }
                        let connects = client.connects();
                        let others_in_flight = in_flight.fetch_add(1, Ordering::Relaxed);
                        let sent_at = Instant::now();
                        let outcome = client.post_order();
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                        if measured && outcome.is_ok() {
                            let latency = due_at.elapsed();
                            if latency >= SLOW_ANSWER {
                                result.slow.add(&SlowAnswer {
                                    due: due_at.saturating_duration_since(due(first_measured)),
                                    waited: sent_at.saturating_duration_since(due_at),
                                    answered_in: sent_at.elapsed(),
                                    new_connection: client.connects() > connects,
                                    // All the others in flight, or all but one (a sender that
                                    // has its answer and is about to take the next order).
                                    senders_busy: others_in_flight + 2 >= senders,
                                });
                            }
                            if let Some(all) = result.latency.as_mut() {
                                quantiles::record(all, latency);
                            }
                            if let Some(bucket) = schedule.bucket.filter(|b| !b.is_zero()) {
                                let since = due_at.saturating_duration_since(due(first_measured));
                                let index = (since.as_secs_f64() / bucket.as_secs_f64()) as usize;
                                if let Some(h) =
                                    result.buckets.get_mut(index.min(bucket_count.saturating_sub(1)))
                                {
                                    quantiles::record(h, latency);
                                }
                            }
                            measured_accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        if !result.record(outcome, shared) {
                            shared.give_up.store(true, Ordering::Relaxed);
                        }
                    }
                })
                .map_err(|e| Error::Other(format!("cannot start a load thread: {e}")))?;
            threads.push(thread);
        }
        barrier.wait();
        let wall_offset = start.saturating_duration_since(Instant::now());
        outcome.load.started_wall = Some(SystemTime::now() + wall_offset);
        outcome.latency = quantiles::histogram();
        outcome.buckets = (0..bucket_count).map(|_| quantiles::histogram()).collect();
        for thread in threads {
            let mut part = thread
                .join()
                .map_err(|_| Error::Other("a load thread panicked".into()))?;
            if let Some(latency) = part.latency.take() {
                let _ = outcome.latency.add(&latency);
            }
            for (all, mine) in outcome.buckets.iter_mut().zip(std::mem::take(&mut part.buckets)) {
                let _ = all.add(&mine);
            }
            episodes.append(&mut part.slow.episodes);
            outcome.slow_not_kept += part.slow.not_kept;
            outcome.load.merge(0, part);
        }
        outcome.load.elapsed = start.elapsed();
        Ok(())
    })?;
    outcome.slow_episodes = crate::slow::merge(episodes);
    outcome.late = late.into_inner();
    outcome.measured_accepted = measured_accepted.into_inner();
    outcome.measured_elapsed = outcome.load.elapsed.saturating_sub(schedule.warm_up);
    Ok(outcome)
}

/// `connections` clients, the `i`th for `urls[i % len]`, with the index of its URL.
fn clients(urls: &[String], connections: usize) -> Result<Vec<(usize, OrderClient)>> {
    if urls.is_empty() || connections == 0 {
        return Err(Error::Other(
            "a load needs at least one URL and one connection".into(),
        ));
    }
    (0..connections)
        .map(|i| {
            let target = i % urls.len();
            OrderClient::new(&urls[target]).map(|client| (target, client))
        })
        .collect()
}
