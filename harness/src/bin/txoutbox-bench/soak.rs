//! `make soak` (`txoutbox-bench --soak`): the release server and consumer under a steady load for
//! 30 minutes (3 with `--quick`), at half the end-to-end capacity measured at the start on the
//! same processes, open loop. Per interval (a minute; 10 s quick) it records throughput
//! (accepted and completed orders/s, from Postgres' timestamps), the p99 of commit ->
//! `COMPLETED` (Postgres) and of the HTTP answer (client, from each order's due instant), the
//! sizes of `outbox`, `processed_messages` and `orders` (`pg_total_relation_size`, so indexes
//! and TOAST count) and the resident memory of both processes; it plots each against time in
//! `soak.svg` and judges that they stay where they started.
//!
//! The consumer runs with a short `PROCESSED_RETENTION` (a sixth of the soak) and
//! `RETENTION_INTERVAL`, so that retention runs several times within the soak and
//! `processed_messages` must reach a plateau: a bounded table is one that retention and
//! autovacuum keep level, which a soak shorter than the production retention could not show.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{bounded, RecvTimeoutError};
use postgres::Client;
use serde_json::{json, Value};
use txoutbox::{Error, Result};

use crate::infra::{FreshDb, Infra};
use crate::load::{open_loop, Schedule};
use crate::pipeline::{interrupted, measure};
use crate::plot::{self, Panel, Series};
use crate::process::{wait_consuming, Kind, Launcher, Process};
use crate::quantiles::Quantiles;
use crate::report::{count, fmt_ms, mib, Status};
use crate::slow::{self, Episode};
use crate::verify::{self, Checks};
use crate::Progress;

/// Phase name of the soak's checks.
pub const SOAK_PHASE: &str = "soak";

/// Share of the capacity offered.
pub const SHARE: f64 = 0.5;

/// Throughput of the last third may differ from the first third's by this share at most. At a
/// fixed offered rate, completed orders/s equals the offered rate while the pipeline keeps up;
/// a pipeline falling behind (a growing table, a slower claim) completes fewer, and one
/// catching up after a stall more. Per-interval counts at this load vary by a few percent
/// (orders sent late by the open loop are counted in the next interval); 10% is beyond that.
pub const THROUGHPUT_BOUND: f64 = 0.10;

/// The median p99 of the last third may be at most this times the first third's, plus
/// [`P99_SLACK`]. Degradation over time (bloat, an index growing past the cache) raises p99
/// steadily; noise from the other work on a shared 2-core machine moves a minute's p99 by tens
/// of percent either way, and a median over a third of the run damps it: 1.5x is outside that.
pub const P99_FACTOR: f64 = 1.5;
/// See [`P99_FACTOR`]: a few milliseconds of scheduling noise at low latencies.
pub const P99_SLACK: Duration = Duration::from_millis(5);

/// No interval's commit -> `COMPLETED` p99 (nor its HTTP p99) may exceed this many times the
/// first third's median p99, or [`STALL_FLOOR`] if that is more. The other verdicts compare
/// thirds by their median or mean, so a stall of a few minutes in the middle passes them all (a full soak on 2026-12-06
/// stalled for 3 minutes, p99 57 s, and passed all six); the worst interval shows it. At half
/// capacity an interval's p99 moves by a few times with the other work on the machine (the
/// worst minute of a clean 30-minute soak: 183 ms against a median of 75 ms), not by ten.
pub const STALL_FACTOR: f64 = 10.0;
/// See [`STALL_FACTOR`]: at half load a p99 of a second means delivery stopped for a while.
pub const STALL_FLOOR: Duration = Duration::from_secs(1);

/// A table is bounded when it grew in the last third by at most this share of its final size
/// (or [`SIZE_SLACK`]). A table that grows without bound grows about linearly from the start,
/// by a third (33%) of its final size in the last third; one kept level by retention and
/// autovacuum hardly grows once at its plateau, but autovacuum visits a table once a
/// naptime (1 minute by default), and the quick soak's thirds are a minute long, so one visit
/// more or less moves its size by up to ~15% there (a full soak's thirds are ten minutes).
pub const SIZE_GROWTH_BOUND: f64 = 0.20;
/// See [`SIZE_GROWTH_BOUND`]: a few pages of an almost empty table are not growth.
pub const SIZE_SLACK: u64 = 1024 * 1024;

/// Server RSS is flat when its mean over the last third is at most this times the first
/// third's, plus [`RSS_SLACK`]. The process is warm before the soak starts (the capacity
/// measurement ran it at full load); a leak of 100 bytes an order at this rate would add tens
/// of MiB over the soak, far past 10%.
pub const RSS_FACTOR: f64 = 1.10;
/// See [`RSS_FACTOR`]: allocator arenas settle in steps of a few hundred KiB.
pub const RSS_SLACK: u64 = 2 * 1024 * 1024;

/// Sender threads of the open loop.
const SENDERS: usize = 64;

/// Episodes of slow answers shown in the reports (soak.json keeps them all).
const WORST_EPISODES: usize = 10;

/// Step of the CPU timeline that says who had the processors during an episode.
const CPU_STEP: Duration = Duration::from_secs(1);

/// Steps the CPU timeline keeps: the whole soak, with room to spare.
fn timeline_steps(plan: &SoakPlan) -> usize {
    (plan.duration.as_secs() as usize + 120) / CPU_STEP.as_secs().max(1) as usize
}

/// Per-interval orders and latencies, from Postgres, of the orders created from `$1` on.
const CREATED_BY_INTERVAL: &str = "\
    SELECT floor(extract(epoch FROM created_at - $1::timestamptz) / $2::float8)::int8 AS i,
           count(*),
           percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM updated_at - created_at)::float8),
           max(extract(epoch FROM updated_at - created_at))::float8
    FROM orders WHERE created_at >= $1::timestamptz AND status = 'COMPLETED'
    GROUP BY i ORDER BY i";

const COMPLETED_BY_INTERVAL: &str = "\
    SELECT floor(extract(epoch FROM updated_at - $1::timestamptz) / $2::float8)::int8 AS i, count(*)
    FROM orders WHERE created_at >= $1::timestamptz AND status = 'COMPLETED'
    GROUP BY i ORDER BY i";

const SIZES: &str = "\
    SELECT pg_total_relation_size('outbox'), pg_total_relation_size('processed_messages'),
           pg_total_relation_size('orders'), (SELECT count(*) FROM processed_messages)";

/// How long, how often, with what.
#[derive(Clone, Debug)]
pub struct SoakPlan {
    /// A `--quick` run.
    pub quick: bool,
    /// Connections of the capacity measurement.
    pub concurrency: usize,
    /// The closed loop that measures the capacity.
    pub capacity: Duration,
    /// The soak itself.
    pub duration: Duration,
    /// One point per interval.
    pub interval: Duration,
    /// The consumer's `PROCESSED_RETENTION`.
    pub retention: Duration,
    /// The consumer's `RETENTION_INTERVAL`.
    pub retention_interval: Duration,
    /// How long the orders may take to complete after sending stopped.
    pub completion_timeout: Duration,
    /// The bench's plan of the same mode, for its sampling interval and completion timeout.
    pub sampling: crate::options::Plan,
}

impl SoakPlan {
    /// 30 minutes in one-minute intervals, or 3 minutes in 10-second ones.
    pub fn new(bench: &crate::options::Plan) -> SoakPlan {
        let (quick, concurrency) = (bench.quick, bench.concurrency);
        let secs = Duration::from_secs;
        let duration = if quick { secs(180) } else { secs(1800) };
        SoakPlan {
            quick,
            concurrency,
            capacity: if quick { secs(5) } else { secs(20) },
            duration,
            interval: if quick { secs(10) } else { secs(60) },
            retention: duration / 6,
            retention_interval: duration / 18,
            completion_timeout: secs(120),
            sampling: bench.clone(),
        }
    }
}

/// One interval of the soak.
#[derive(Clone, Debug, Default)]
pub struct Interval {
    /// Seconds from the soak's start to the interval's end.
    pub end: f64,
    /// Orders created per second (by `created_at`).
    pub accepted_rate: f64,
    /// Orders completed per second (by `updated_at`).
    pub completed_rate: f64,
    /// p99 of commit -> `COMPLETED` of the orders created in the interval.
    pub completed_p99: Duration,
    /// The slowest of them: a commit that stalls holds only the few orders in flight, below
    /// the p99, while the requests queued behind it raise the HTTP p99.
    pub completed_max: Duration,
    /// p99 of the HTTP answer, from the due instant, of the orders due in the interval.
    pub http_p99: Duration,
    /// The slowest of them.
    pub http_max: Duration,
    /// Sizes at the interval's end, bytes.
    pub outbox_bytes: u64,
    /// See [`Interval::outbox_bytes`].
    pub processed_bytes: u64,
    /// See [`Interval::outbox_bytes`].
    pub orders_bytes: u64,
    /// Rows in `processed_messages` at the interval's end.
    pub processed_rows: u64,
    /// VmRSS at the interval's end, bytes.
    pub server_rss: u64,
    /// See [`Interval::server_rss`].
    pub consumer_rss: u64,
}

/// A judged property of the soak.
#[derive(Clone, Debug)]
pub struct Verdict {
    /// What is judged.
    pub name: String,
    /// First third, as shown.
    pub first: String,
    /// Last third, as shown.
    pub last: String,
    /// The bound, as shown.
    pub bound: String,
    /// Met or not.
    pub status: Status,
}

/// What the soak measured.
#[derive(Clone, Debug)]
pub struct Soak {
    /// The plan it ran.
    pub plan: SoakPlan,
    /// `SHOW autovacuum` of the server: with `off` no table can stay bounded.
    pub autovacuum: String,
    /// End-to-end orders/s of the closed loop at the start.
    pub capacity: f64,
    /// Orders/s offered.
    pub offered: f64,
    /// Orders accepted over the soak.
    pub accepted: usize,
    /// Over the whole soak.
    pub completed: Quantiles,
    /// Over the whole soak.
    pub http: Quantiles,
    /// One per interval.
    pub intervals: Vec<Interval>,
    /// The judgements.
    pub verdicts: Vec<Verdict>,
    /// HTTP answers slower than [`slow::SLOW_ANSWER`], grouped in time, in time order.
    pub episodes: Vec<Episode>,
    /// The CPU used during each episode (and a second either side), by process: who had the
    /// processors while answers were late. `None` where no CPU step ended in it.
    pub episode_cpu: Vec<Option<crate::cpu::CpuUsage>>,
    /// Slow answers beyond what each sender keeps (not in `episodes`).
    pub slow_not_kept: usize,
    /// CPU used during the soak.
    pub cpu: crate::cpu::CpuUsage,
}

/// Gauges read at an instant.
#[derive(Clone, Copy, Debug, Default)]
struct Gauges {
    at: f64,
    outbox: u64,
    processed: u64,
    orders: u64,
    processed_rows: u64,
    server_rss: u64,
    consumer_rss: u64,
}

/// Runs the soak.
pub fn run(
    infra: &Infra,
    launcher: &Launcher,
    plan: &SoakPlan,
    stop: &AtomicBool,
    checks: &mut Checks,
    progress: &Progress,
) -> Result<Soak> {
    let fresh = infra.fresh_db("soak", 4)?;
    let broker = infra.fresh_broker("soak")?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], txoutbox_harness::support::process::free_port()?));
    let mut server = launcher.spawn(Kind::Server, "soak-server", &fresh, &broker, Some(addr))?;
    let consumer_settings = [
        ("PROCESSED_RETENTION", format!("{}s", plan.retention.as_secs())),
        (
            "RETENTION_INTERVAL",
            format!("{}s", plan.retention_interval.as_secs()),
        ),
    ];
    let mut consumer = launcher.spawn_with(
        Kind::Consumer,
        "soak-consumer",
        &fresh,
        &broker,
        None,
        &consumer_settings,
    )?;
    server.wait_listening(addr)?;
    wait_consuming(&broker, 1, &mut [&mut server, &mut consumer])?;
    let url = format!("http://{addr}");

    progress.step(&format!(
        "{SOAK_PHASE}: capacity: {} connections for {} s ...",
        plan.concurrency,
        plan.capacity.as_secs()
    ));
    let capacity = measure(
        &fresh,
        std::slice::from_ref(&url),
        plan.concurrency,
        plan.capacity,
        &plan.sampling,
        stop,
    )?;
    interrupted(stop)?;
    let offered = capacity.e2e.rate * SHARE;
    progress.step(&format!(
        "{SOAK_PHASE}: capacity {} orders/s end to end; offering {} orders/s for {} s, a point every {} s ...",
        count(capacity.e2e.rate),
        count(offered),
        plan.duration.as_secs(),
        plan.interval.as_secs()
    ));
    if !(offered.is_finite() && offered > 0.0) {
        return Err(Error::Other(format!(
            "the capacity measured, {offered} orders/s, is not usable"
        )));
    }

    let started: Mutex<Option<(Instant, SystemTime)>> = Mutex::new(None);
    let gauges = GaugeSampler::start(&fresh, &server, &consumer, plan.interval)?;
    let accepted = AtomicU64::new(0);
    let timeline = crate::cpu::Timeline::start(CPU_STEP, timeline_steps(plan))
        .map_err(|e| Error::Other(format!("cannot start the CPU timeline: {e}")))?;
    let before = crate::cpu::Snapshot::take();
    let outcome = open_loop(
        &url,
        Schedule {
            rate: offered,
            warm_up: Duration::ZERO,
            duration: plan.duration,
            bucket: Some(plan.interval),
        },
        SENDERS,
        &accepted,
        stop,
        &|| {
            *started.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), SystemTime::now()));
            gauges.mark();
        },
    )?;
    let cpu = before.until(&crate::cpu::Snapshot::take());
    let cpu_steps = timeline.finish();
    let samples = gauges.finish();
    let mut client = fresh.client()?;
    verify::wait_until_completed(
        &mut client,
        outcome.load.ids.len() as u64,
        plan.completion_timeout,
        stop,
    )?;
    for service in [&mut server, &mut consumer] {
        service.check_alive()?;
    }
    interrupted(stop)?;
    let (_, wall_start) = started
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .ok_or_else(|| Error::Other("the soak's load never started".into()))?;

    let intervals = intervals(&mut client, plan, wall_start, &outcome.buckets, &samples)?;
    // A failure to check (the broker restarted under the soak, say) fails the run but keeps
    // the figures, which took the whole soak to make.
    if let Err(e) = verify_soak(&mut client, &broker, &outcome.load, checks) {
        checks.add(SOAK_PHASE, "verification completed", false, e.to_string());
    }
    let all_completed = completion_quantiles(&mut client, wall_start)?;
    let episodes = outcome.slow_episodes.clone();
    let mut verdicts = judge(&intervals);
    let autovacuum = infra.servers.autovacuum.clone();
    if autovacuum != "on" {
        for v in verdicts.iter_mut().filter(|v| v.name.contains("size bounded")) {
            v.name += " [autovacuum is off]";
        }
    }
    Ok(Soak {
        plan: plan.clone(),
        autovacuum,
        capacity: capacity.e2e.rate,
        offered,
        accepted: outcome.load.ids.len(),
        completed: all_completed,
        http: Quantiles::of_hdr(&outcome.latency),
        intervals,
        verdicts,
        episode_cpu: episodes
            .iter()
            .map(|e| {
                let origin = outcome.measured_from;
                let from = (origin + e.start).checked_sub(CPU_STEP).unwrap_or(origin);
                crate::cpu::usage_between(&cpu_steps, from, origin + e.answered_until + CPU_STEP)
            })
            .collect(),
        episodes,
        slow_not_kept: outcome.slow_not_kept,
        cpu,
    })
}

/// Reads the gauges at the soak's start ([`GaugeSampler::mark`]) and at the end of every
/// interval after it, on a thread of its own.
struct GaugeSampler {
    marks: crossbeam_channel::Sender<Instant>,
    stop: crossbeam_channel::Sender<()>,
    thread: Option<std::thread::JoinHandle<Vec<Gauges>>>,
}

impl GaugeSampler {
    fn start(
        fresh: &FreshDb,
        server: &Process,
        consumer: &Process,
        interval: Duration,
    ) -> Result<GaugeSampler> {
        let mut client = fresh.client()?;
        let pids = (server.id(), consumer.id());
        let (marks, marked) = bounded::<Instant>(1);
        let (stop, stopped) = bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("bench-soak-gauges".into())
            .spawn(move || {
                let mut samples = Vec::new();
                let Ok(start) = marked.recv() else {
                    return samples;
                };
                let mut next = start;
                loop {
                    samples.push(read_gauges(&mut client, pids, start.elapsed().as_secs_f64()));
                    next += interval;
                    match stopped.recv_timeout(next.saturating_duration_since(Instant::now())) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                samples.push(read_gauges(&mut client, pids, start.elapsed().as_secs_f64()));
                samples
            })
            .map_err(|e| Error::Other(format!("cannot start the gauge sampler: {e}")))?;
        Ok(GaugeSampler {
            marks,
            stop,
            thread: Some(thread),
        })
    }

    /// The soak starts now.
    fn mark(&self) {
        let _ = self.marks.try_send(Instant::now());
    }

    fn finish(mut self) -> Vec<Gauges> {
        let _ = self.stop.try_send(());
        // A sampler never marked (the load ended before its start) reads once and ends.
        let _ = self.marks.try_send(Instant::now());
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

impl Drop for GaugeSampler {
    fn drop(&mut self) {
        let _ = self.stop.try_send(());
        if let Some(thread) = self.thread.take() {
            // Unblocks a sampler still waiting for its start.
            let _ = self.marks.try_send(Instant::now());
            let _ = thread.join();
        }
    }
}

fn read_gauges(client: &mut Client, pids: (Option<u32>, Option<u32>), at: f64) -> Gauges {
    let mut gauges = Gauges {
        at,
        server_rss: pids.0.and_then(rss_bytes).unwrap_or(0),
        consumer_rss: pids.1.and_then(rss_bytes).unwrap_or(0),
        ..Gauges::default()
    };
    match client.query_one(SIZES, &[]) {
        Ok(row) => {
            let get = |i: usize| row.get::<_, i64>(i).max(0) as u64;
            gauges.outbox = get(0);
            gauges.processed = get(1);
            gauges.orders = get(2);
            gauges.processed_rows = get(3);
        }
        Err(e) => log::warn!("bench: cannot read the table sizes: {e:?}"),
    }
    gauges
}

/// `VmRSS` of a process, bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line["VmRSS:".len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// Puts the interval figures together: rates and p99s from Postgres, HTTP p99 from the load,
/// sizes and memory from the gauge reading at each interval's end.
fn intervals(
    client: &mut Client,
    plan: &SoakPlan,
    start: SystemTime,
    http: &[hdrhistogram::Histogram<u64>],
    gauges: &[Gauges],
) -> Result<Vec<Interval>> {
    let seconds = plan.interval.as_secs_f64();
    let n = (plan.duration.as_secs_f64() / seconds).ceil() as usize;
    let mut out: Vec<Interval> = (0..n)
        .map(|i| Interval {
            end: (i + 1) as f64 * seconds,
            ..Interval::default()
        })
        .collect();
    let rows = client
        .query(CREATED_BY_INTERVAL, &[&start, &seconds])
        .map_err(|e| Error::db("cannot read the soak's orders by interval", e))?;
    for row in rows {
        let i: i64 = row.get(0);
        if let Some(slot) = usize::try_from(i).ok().and_then(|i| out.get_mut(i)) {
            slot.accepted_rate = row.get::<_, i64>(1) as f64 / seconds;
            let p99: Option<f64> = row.get(2);
            let seconds = |v: Option<f64>| {
                Duration::from_secs_f64(v.filter(|v| v.is_finite() && *v >= 0.0).unwrap_or(0.0))
            };
            slot.completed_p99 = seconds(p99);
            slot.completed_max = seconds(row.get(3));
        }
    }
    let rows = client
        .query(COMPLETED_BY_INTERVAL, &[&start, &seconds])
        .map_err(|e| Error::db("cannot read the soak's completions by interval", e))?;
    for row in rows {
        let i: i64 = row.get(0);
        if let Some(slot) = usize::try_from(i).ok().and_then(|i| out.get_mut(i)) {
            slot.completed_rate = row.get::<_, i64>(1) as f64 / seconds;
        }
    }
    for (slot, histogram) in out.iter_mut().zip(http) {
        slot.http_p99 = Duration::from_micros(histogram.value_at_quantile(0.99));
        slot.http_max = Duration::from_micros(histogram.max());
    }
    for slot in &mut out {
        // The reading nearest the interval's end.
        if let Some(g) = gauges
            .iter()
            .min_by(|a, b| (a.at - slot.end).abs().total_cmp(&(b.at - slot.end).abs()))
        {
            slot.outbox_bytes = g.outbox;
            slot.processed_bytes = g.processed;
            slot.orders_bytes = g.orders;
            slot.processed_rows = g.processed_rows;
            slot.server_rss = g.server_rss;
            slot.consumer_rss = g.consumer_rss;
        }
    }
    Ok(out)
}

fn completion_quantiles(client: &mut Client, since: SystemTime) -> Result<Quantiles> {
    let row = client
        .query_one(
            "SELECT percentile_cont(ARRAY[0.5, 0.9, 0.99, 0.999]) WITHIN GROUP \
             (ORDER BY extract(epoch FROM updated_at - created_at)::float8), \
             extract(epoch FROM max(updated_at - created_at))::float8 \
             FROM orders WHERE status = 'COMPLETED' AND created_at >= $1",
            &[&since],
        )
        .map_err(|e| Error::db("cannot compute the soak's completion latencies", e))?;
    let p: Option<Vec<Option<f64>>> = row.get(0);
    let max: Option<f64> = row.get(1);
    let d = |v: Option<f64>| Duration::from_secs_f64(v.filter(|v| v.is_finite() && *v >= 0.0).unwrap_or(0.0));
    let at = |i: usize| d(p.as_ref().and_then(|p| p.get(i).copied().flatten()));
    Ok(Quantiles {
        p50: at(0),
        p90: at(1),
        p99: at(2),
        p999: at(3),
        max: d(max),
    })
}

/// Every POST answered, every order `COMPLETED`, nothing left behind, and retention ran
/// (`processed_messages` holds fewer rows than orders were processed). With rows purged,
/// "processed exactly once" cannot be counted here: `make bench` checks it.
fn verify_soak(
    client: &mut Client,
    broker: &crate::infra::FreshBroker,
    load: &crate::load::LoadOutcome,
    checks: &mut Checks,
) -> Result<()> {
    let accepted = load.ids.len() as u64;
    checks.add(
        SOAK_PHASE,
        "every POST answered 201",
        load.errors == 0 && accepted > 0,
        if load.errors == 0 {
            format!("{accepted} accepted")
        } else {
            format!("{} failed: {}", load.errors, load.error_samples.join("; "))
        },
    );
    let orders = verify::counts(
        client,
        "SELECT count(*), count(*) FILTER (WHERE status = 'COMPLETED') FROM orders",
        &[],
    )?;
    checks.equal(SOAK_PHASE, "orders COMPLETED", orders[0], orders[1]);
    checks.equal(SOAK_PHASE, "outbox rows left", 0, verify::outbox_rows(client)?);
    let processed = verify::counts(client, "SELECT count(*) FROM processed_messages", &[])?[0];
    checks.add(
        SOAK_PHASE,
        "retention purged processed_messages",
        processed < orders[0],
        format!("{processed} rows kept of {} orders processed", orders[0]),
    );
    let depth = broker.depth()?;
    checks.equal(SOAK_PHASE, "messages left in the queue", 0, depth.ready);
    checks.equal(SOAK_PHASE, "messages dead-lettered", 0, depth.dead_lettered);
    Ok(())
}

/// First and last thirds of `values` (at least one interval each).
fn thirds<T>(values: &[T]) -> (&[T], &[T]) {
    let third = (values.len() / 3).max(1).min(values.len());
    (&values[..third], &values[values.len() - third..])
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The judgements: throughput, the two p99s, the two tables and RSS, last third against first;
/// and no stall, the worst interval against the first third.
pub fn judge(intervals: &[Interval]) -> Vec<Verdict> {
    let mut verdicts = Vec::new();
    if intervals.len() < 3 {
        return verdicts;
    }
    let status = |ok: bool| if ok { Status::Pass } else { Status::Miss };
    let (first, last) = thirds(intervals);
    let values = |part: &[Interval], f: fn(&Interval) -> f64| part.iter().map(f).collect::<Vec<f64>>();

    let (a, b) = (
        mean(&values(first, |i| i.completed_rate)),
        mean(&values(last, |i| i.completed_rate)),
    );
    let change = if a > 0.0 { b / a - 1.0 } else { f64::INFINITY };
    verdicts.push(Verdict {
        name: "throughput stable (completed orders/s, mean)".into(),
        first: format!("{} /s", count(a)),
        last: format!("{} /s", count(b)),
        bound: format!("within ±{:.0}%", THROUGHPUT_BOUND * 100.0),
        status: status(change.abs() <= THROUGHPUT_BOUND),
    });

    for (name, f) in [
        (
            "commit -> COMPLETED p99 stable (median of the intervals)",
            (|i: &Interval| i.completed_p99.as_secs_f64()) as fn(&Interval) -> f64,
        ),
        ("HTTP p99 stable (median of the intervals)", |i: &Interval| {
            i.http_p99.as_secs_f64()
        }),
    ] {
        let (a, b) = (median(&values(first, f)), median(&values(last, f)));
        let bound = a * P99_FACTOR + P99_SLACK.as_secs_f64();
        verdicts.push(Verdict {
            name: name.into(),
            first: fmt_ms(Duration::from_secs_f64(a)),
            last: fmt_ms(Duration::from_secs_f64(b)),
            bound: format!("<= {P99_FACTOR} x first + {} ms", P99_SLACK.as_millis()),
            status: status(b <= bound),
        });
    }

    for (name, f) in [
        (
            "outbox size bounded",
            (|i: &Interval| i.outbox_bytes) as fn(&Interval) -> u64,
        ),
        ("processed_messages size bounded", |i: &Interval| {
            i.processed_bytes
        }),
    ] {
        let at_start_of_last = f(&intervals[intervals.len() - last.len() - 1]);
        let at_end = f(&intervals[intervals.len() - 1]);
        let grown = at_end.saturating_sub(at_start_of_last);
        let allowed = ((at_end as f64 * SIZE_GROWTH_BOUND) as u64).max(SIZE_SLACK);
        verdicts.push(Verdict {
            name: format!("{name} (growth over the last third)"),
            first: format!("{:.2} MiB at 2/3", mib(at_start_of_last)),
            last: format!("{:.2} MiB at the end", mib(at_end)),
            bound: format!(
                "growth <= {:.0}% of the final size or {} MiB",
                SIZE_GROWTH_BOUND * 100.0,
                SIZE_SLACK / (1024 * 1024)
            ),
            status: status(grown <= allowed),
        });
    }

    for (what, p99) in [
        (
            "commit -> COMPLETED",
            (|i: &Interval| i.completed_p99) as fn(&Interval) -> Duration,
        ),
        ("HTTP", |i: &Interval| i.http_p99),
    ] {
        let first_p99 = median(&first.iter().map(|i| p99(i).as_secs_f64()).collect::<Vec<f64>>());
        let bound = (first_p99 * STALL_FACTOR).max(STALL_FLOOR.as_secs_f64());
        if let Some(worst) = intervals.iter().max_by_key(|i| p99(i)) {
            verdicts.push(Verdict {
                name: format!("no stall ({what} p99 of the worst interval)"),
                first: format!("{} median", fmt_ms(Duration::from_secs_f64(first_p99))),
                last: format!("{} at {:.0} s", fmt_ms(p99(worst)), worst.end),
                bound: format!("<= {STALL_FACTOR} x first or {} s", STALL_FLOOR.as_secs_f64()),
                status: status(p99(worst).as_secs_f64() <= bound),
            });
        }
    }

    let (a, b) = (
        mean(&values(first, |i| i.server_rss as f64)),
        mean(&values(last, |i| i.server_rss as f64)),
    );
    verdicts.push(Verdict {
        name: "server RSS flat (mean)".into(),
        first: format!("{:.1} MiB", a / (1024.0 * 1024.0)),
        last: format!("{:.1} MiB", b / (1024.0 * 1024.0)),
        bound: format!("<= {RSS_FACTOR} x first + {} MiB", RSS_SLACK / (1024 * 1024)),
        status: status(b <= a * RSS_FACTOR + RSS_SLACK as f64),
    });
    verdicts
}

impl Soak {
    /// The console report.
    pub fn console(&self) -> String {
        let mut out = format!(
            "\ntxoutbox-bench soak: {} s at {} orders/s ({:.0}% of the {} orders/s measured at the start), \
             {} orders; PROCESSED_RETENTION {} s, RETENTION_INTERVAL {} s\n\n",
            self.plan.duration.as_secs(),
            count(self.offered),
            SHARE * 100.0,
            count(self.capacity),
            count(self.accepted as f64),
            self.plan.retention.as_secs(),
            self.plan.retention_interval.as_secs()
        );
        out += "      t  accepted/s completed/s  COMPLETED p99 / max   HTTP p99 / max  outbox MiB  processed MiB  orders MiB  server RSS  consumer RSS\n";
        for i in &self.intervals {
            out += &format!(
                "  {:>5.0}s  {:>10} {:>11}  {:>19}  {:>15}  {:>10.2}  {:>13.2}  {:>10.1}  {:>8.1} MiB  {:>8.1} MiB\n",
                i.end,
                count(i.accepted_rate),
                count(i.completed_rate),
                format!("{} / {}", fmt_ms(i.completed_p99), fmt_ms(i.completed_max)),
                format!("{} / {}", fmt_ms(i.http_p99), fmt_ms(i.http_max)),
                mib(i.outbox_bytes),
                mib(i.processed_bytes),
                mib(i.orders_bytes),
                mib(i.server_rss),
                mib(i.consumer_rss)
            );
        }
        out += &format!(
            "\n  whole soak: commit -> COMPLETED p50 {} p99 {} max {}; HTTP p50 {} p99 {} max {}\n",
            fmt_ms(self.completed.p50),
            fmt_ms(self.completed.p99),
            fmt_ms(self.completed.max),
            fmt_ms(self.http.p50),
            fmt_ms(self.http.p99),
            fmt_ms(self.http.max)
        );
        out += &format!("  CPU, cores of the machine: {}\n", self.cpu.brief());
        if let Some(warning) = self.contention_warning() {
            out += &format!("  warning: {warning}\n");
        }
        if let Some(note) = self.autovacuum_note() {
            out += &format!("\n  note: {note}\n");
        }
        out += &self.episodes_console();
        out += "\nStable over time (last third against first third; a stall: worst interval against first third)\n";
        for v in &self.verdicts {
            out += &format!(
                "  {:<62} {:>16} -> {:<18} {:<44} {}\n",
                v.name,
                v.first,
                v.last,
                v.bound,
                v.status.label()
            );
        }
        out
    }

    /// The worst episodes of slow HTTP answers, with where their time went.
    fn episodes_console(&self) -> String {
        let answers: usize = self.episodes.iter().map(|e| e.answers).sum::<usize>() + self.slow_not_kept;
        let mut out = format!(
            "\n  HTTP answers slower than {}: {} in {} episode(s){}\n",
            fmt_ms(slow::SLOW_ANSWER),
            count(answers as f64),
            self.episodes.len(),
            if self.slow_not_kept > 0 {
                format!(" ({} more not kept)", count(self.slow_not_kept as f64))
            } else {
                String::new()
            }
        );
        let worst = slow::worst(&self.episodes, WORST_EPISODES);
        if !worst.is_empty() {
            out += "      from      to  answers    worst  longest answer  longest wait  new conns  sent late (senders busy)  reading\n";
        }
        for &index in &worst {
            let [from, to, answers, worst, answer, wait, new, late, reading, cpu] = self.episode_cells(index);
            out += &format!(
                "  {from:>7}s {to:>6}s  {answers:>7}  {worst:>7}  {answer:>14}  {wait:>12}  {new:>9}  {late:>24}  {reading}\n\
                 {:>19}CPU meanwhile: {cpu}\n",
                ""
            );
        }
        out
    }

    /// Episode `index` as the reports show it: from, to, answers, worst, longest answer,
    /// longest wait, new connections, sent late (with the senders busy), reading, CPU meanwhile.
    fn episode_cells(&self, index: usize) -> [String; 10] {
        let e = &self.episodes[index];
        let cpu = match self.episode_cpu.get(index) {
            Some(Some(usage)) => usage.brief(),
            _ => "not sampled".into(),
        };
        [
            format!("{:.1}", e.start.as_secs_f64()),
            format!("{:.1}", e.end.as_secs_f64()),
            e.answers.to_string(),
            fmt_ms(e.worst),
            fmt_ms(e.longest_answer),
            fmt_ms(e.longest_wait),
            e.new_connections.to_string(),
            format!("{} ({})", e.sent_late, e.sent_late_senders_busy),
            e.reading().to_string(),
            cpu,
        ]
    }

    /// soak.md.
    pub fn markdown(&self, heading: &str) -> String {
        let mut out = format!("# txoutbox soak, {heading}\n\n");
        out += &format!(
            "{} s at {} orders/s, {:.0}% of the {} orders/s end to end measured at the start; {} orders. \
             PROCESSED_RETENTION {} s, RETENTION_INTERVAL {} s.\n\n",
            self.plan.duration.as_secs(),
            count(self.offered),
            SHARE * 100.0,
            count(self.capacity),
            count(self.accepted as f64),
            self.plan.retention.as_secs(),
            self.plan.retention_interval.as_secs()
        );
        out += &format!("CPU during the soak, in cores: {}.\n\n", self.cpu.brief());
        if let Some(warning) = self.contention_warning() {
            out += &format!("**Warning:** {warning}.\n\n");
        }
        if let Some(note) = self.autovacuum_note() {
            out += &format!("**Note:** {note}\n\n");
        }
        out += "| Judged | First third | Last third | Bound | |\n|---|---:|---:|---|---|\n";
        for v in &self.verdicts {
            out += &format!(
                "| {} | {} | {} | {} | **{}** |\n",
                v.name,
                v.first,
                v.last,
                v.bound,
                v.status.label()
            );
        }
        let worst = slow::worst(&self.episodes, WORST_EPISODES);
        if !worst.is_empty() {
            out += &format!(
                "\nThe worst episodes of HTTP answers slower than {} (of {}; due instants from the soak's start; \
                 longest answer: from sending to the answer, longest wait: from the due instant to sending; \
                 sent late: more than {} after the due instant, in brackets those sent while the {SENDERS} \
                 senders were all in flight but one at most):\n\n\
                 | from (s) | to (s) | answers | worst | longest answer | longest wait | new connections | sent late (senders busy) | reading | CPU meanwhile (cores) |\n\
                 |---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
                fmt_ms(slow::SLOW_ANSWER),
                self.episodes.len(),
                fmt_ms(slow::SENT_LATE)
            );
            for &index in &worst {
                out += &format!("| {} |\n", self.episode_cells(index).join(" | "));
            }
        }
        out += "\n![the soak over time](soak.svg)\n\n| t (s) | accepted/s | completed/s | COMPLETED p99 | COMPLETED max | HTTP p99 | HTTP max | outbox MiB | processed_messages MiB | orders MiB | server RSS MiB | consumer RSS MiB |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
        for i in &self.intervals {
            out += &format!(
                "| {:.0} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} |\n",
                i.end,
                count(i.accepted_rate),
                count(i.completed_rate),
                fmt_ms(i.completed_p99),
                fmt_ms(i.completed_max),
                fmt_ms(i.http_p99),
                fmt_ms(i.http_max),
                mib(i.outbox_bytes),
                mib(i.processed_bytes),
                mib(i.orders_bytes),
                mib(i.server_rss),
                mib(i.consumer_rss)
            );
        }
        out
    }

    /// A warning when other processes took a noticeable share of the processors.
    pub fn contention_warning(&self) -> Option<String> {
        let other = crate::cpu::GROUPS.iter().position(|g| *g == "other")?;
        let cores = *self.cpu.groups.get(other)?;
        (cores >= crate::report::OTHER_CPU_WARNING).then(|| {
            format!(
                "other processes used {cores:.2} cores during the soak: it shared the machine, and its \
                 latencies say as much about them as about txoutbox"
            )
        })
    }

    /// Why the table sizes cannot stay bounded on this server, when autovacuum is off.
    pub fn autovacuum_note(&self) -> Option<String> {
        (self.autovacuum != "on").then(|| {
            format!(
                "autovacuum is {} on this Postgres (SELECT sourcefile FROM pg_settings WHERE name = 'autovacuum' \
                 says where): rows the relay deletes from the outbox and retention deletes from \
                 processed_messages are never reclaimed, so both tables grow with every order however \
                 few rows they hold; turn it on (ALTER SYSTEM SET autovacuum = on; SELECT pg_reload_conf(), \
                 no restart) to judge them",
                self.autovacuum
            )
        })
    }

    /// soak.json's body.
    pub fn json(&self) -> Value {
        json!({
            "quick": self.plan.quick,
            "autovacuum": self.autovacuum,
            "autovacuum_note": self.autovacuum_note(),
            "contention_warning": self.contention_warning(),
            "cpu_cores": {
                "busy": self.cpu.busy,
                "iowait": self.cpu.iowait,
                "by_process": crate::cpu::GROUPS.iter().zip(&self.cpu.groups)
                    .map(|(g, c)| (g.to_string(), json!(c))).collect::<serde_json::Map<String, Value>>(),
            },
            "seconds": self.plan.duration.as_secs_f64(),
            "interval_seconds": self.plan.interval.as_secs_f64(),
            "capacity_per_second": self.capacity,
            "offered_per_second": self.offered,
            "accepted": self.accepted,
            "processed_retention_seconds": self.plan.retention.as_secs_f64(),
            "retention_interval_seconds": self.plan.retention_interval.as_secs_f64(),
            "intervals": self.intervals.iter().map(|i| json!({
                "end_seconds": i.end,
                "accepted_per_second": i.accepted_rate,
                "completed_per_second": i.completed_rate,
                "completed_p99_ms": i.completed_p99.as_secs_f64() * 1000.0,
                "completed_max_ms": i.completed_max.as_secs_f64() * 1000.0,
                "http_p99_ms": i.http_p99.as_secs_f64() * 1000.0,
                "http_max_ms": i.http_max.as_secs_f64() * 1000.0,
                "outbox_bytes": i.outbox_bytes,
                "processed_messages_bytes": i.processed_bytes,
                "processed_messages_rows": i.processed_rows,
                "orders_bytes": i.orders_bytes,
                "server_rss_bytes": i.server_rss,
                "consumer_rss_bytes": i.consumer_rss,
            })).collect::<Vec<_>>(),
            "slow_answer_ms": slow::SLOW_ANSWER.as_secs_f64() * 1000.0,
            "slow_answers_not_kept": self.slow_not_kept,
            "slow_episodes": self.episodes.iter().zip(&self.episode_cpu).map(|(e, cpu)| {
                let mut episode = e.to_json();
                episode["cpu_cores"] = cpu.as_ref().map_or(Value::Null, |u| json!({
                    "busy": u.busy,
                    "iowait": u.iowait,
                    "by_process": crate::cpu::GROUPS.iter().zip(&u.groups)
                        .map(|(g, c)| (g.to_string(), json!(c))).collect::<serde_json::Map<String, Value>>(),
                }));
                episode
            }).collect::<Vec<_>>(),
            "verdicts": self.verdicts.iter().map(|v| json!({
                "name": v.name, "first_third": v.first, "last_third": v.last,
                "bound": v.bound, "status": v.status.label(),
            })).collect::<Vec<_>>(),
        })
    }

    /// soak.svg: throughput, p99, table sizes and memory against time.
    pub fn svg(&self, heading: &str) -> std::result::Result<String, String> {
        let minutes = |i: &Interval| i.end / 60.0;
        let line = |name: &str, f: &dyn Fn(&Interval) -> f64| {
            Series::line(name, self.intervals.iter().map(|i| (minutes(i), f(i))).collect())
        };
        let end = self.intervals.last().map_or(1.0, minutes);
        let x = "minutes into the soak".to_string();
        plot::stacked(
            &format!("txoutbox soak, {heading}"),
            &[
                Panel {
                    title: "Throughput, orders/s".into(),
                    x_label: x.clone(),
                    y_label: "orders/s".into(),
                    series: vec![
                        line("accepted", &|i| i.accepted_rate),
                        line("completed", &|i| i.completed_rate),
                        Series::level("offered", self.offered, 0.0, end),
                    ],
                },
                Panel {
                    title: "p99 per interval, ms".into(),
                    x_label: x.clone(),
                    y_label: "ms".into(),
                    series: vec![
                        line("commit -> COMPLETED", &|i| i.completed_p99.as_secs_f64() * 1000.0),
                        line("HTTP, from due instant", &|i| i.http_p99.as_secs_f64() * 1000.0),
                    ],
                },
                Panel {
                    title: "Table sizes (pg_total_relation_size), MiB".into(),
                    x_label: x.clone(),
                    y_label: "MiB".into(),
                    series: vec![
                        line("outbox", &|i| mib(i.outbox_bytes)),
                        line("processed_messages", &|i| mib(i.processed_bytes)),
                        line("orders (never purged)", &|i| mib(i.orders_bytes)),
                    ],
                },
                Panel {
                    title: "Resident memory (VmRSS), MiB".into(),
                    x_label: x,
                    y_label: "MiB".into(),
                    series: vec![
                        line("server", &|i| mib(i.server_rss)),
                        line("consumer", &|i| mib(i.consumer_rss)),
                    ],
                },
            ],
        )
    }
}

/// Runs the soak and writes its files into `out_dir`; true when it completed and verified.
pub fn main(
    infra: &Infra,
    launcher: &Launcher,
    plan: &SoakPlan,
    stop: &AtomicBool,
    progress: &Progress,
    out_dir: &Path,
    heading: &str,
) -> Result<bool> {
    let mut checks = Checks::default();
    let soak = match run(infra, launcher, plan, stop, &mut checks, progress) {
        Ok(soak) => Some(soak),
        Err(e) => {
            checks.add(SOAK_PHASE, "soak completed", false, e.to_string());
            None
        }
    };
    let failed = checks.failed();
    let verification = if failed.is_empty() {
        format!("verification: all {} checks held", checks.0.len())
    } else {
        let list: Vec<String> = failed
            .iter()
            .map(|c| format!("{}: {}", c.what, c.detail))
            .collect();
        format!("verification: FAILED: {}", list.join("; "))
    };
    if let Some(soak) = &soak {
        print!("{}", soak.console());
        let write = |name: &str, text: &str| {
            let path = out_dir.join(name);
            std::fs::write(&path, text)
                .map_err(|e| Error::Other(format!("cannot write {}: {e}", path.display())))
        };
        let mut json = soak.json();
        json["checks"] = Value::Array(
            checks
                .0
                .iter()
                .map(|c| json!({ "what": c.what, "detail": c.detail, "ok": c.ok }))
                .collect(),
        );
        write(
            "soak.json",
            &serde_json::to_string_pretty(&json).map_err(|e| Error::Other(e.to_string()))?,
        )?;
        write(
            "soak.md",
            &format!("{}\n{verification}\n", soak.markdown(heading)),
        )?;
        write("soak.svg", &soak.svg(heading).map_err(Error::Other)?)?;
        println!("\n{verification}");
        println!(
            "wrote {0}/soak.json, {0}/soak.md, {0}/soak.svg",
            out_dir.display()
        );
    } else {
        println!("\n{verification}");
    }
    Ok(failed.is_empty() && soak.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quick soak at 1,476 orders/s with one slow episode, sampled CPU and all.
    fn soak_with_an_episode() -> Soak {
        let options = crate::options::Options::parse(["--quick".to_string()]).expect("valid");
        let plan = SoakPlan::new(&crate::options::Plan::new(&options));
        let episode = Episode {
            start: Duration::from_millis(870_700),
            end: Duration::from_millis(874_000),
            answered_until: Duration::from_millis(874_300),
            answers: 4_171,
            worst: Duration::from_millis(634),
            longest_answer: Duration::from_millis(274),
            longest_wait: Duration::from_millis(513),
            new_connections: 0,
            sent_late: 3_000,
            sent_late_senders_busy: 2_990,
        };
        let cpu = crate::cpu::CpuUsage {
            seconds: 5.0,
            busy: 2.0,
            iowait: 0.0,
            groups: vec![1.2, 0.3, 0.4, 0.1, 0.0, 0.0],
        };
        Soak {
            plan,
            autovacuum: "on".into(),
            capacity: 2_953.0,
            offered: 1_476.0,
            accepted: 100,
            completed: Quantiles::default(),
            http: Quantiles::default(),
            intervals: Vec::new(),
            verdicts: Vec::new(),
            episodes: vec![episode],
            episode_cpu: vec![Some(cpu)],
            slow_not_kept: 0,
            cpu: crate::cpu::CpuUsage::default(),
        }
    }

    #[test]
    fn the_reports_show_each_episode_with_its_reading_and_the_cpu_meanwhile() {
        let soak = soak_with_an_episode();
        let console = soak.console();
        assert!(console.contains("4,171 in 1 episode(s)"), "{console}");
        let row = console
            .lines()
            .find(|l| l.trim_start().starts_with("870.7s"))
            .unwrap_or_else(|| panic!("no row for the episode: {console}"));
        assert!(
            row.contains("634 ms") && row.contains("3000 (2990)") && row.contains("server:"),
            "{row}"
        );
        assert!(
            console.contains("CPU meanwhile: busy 2.00, iowait 0.00; postgres 1.20, rabbitmq 0.30, server 0.40, consumer 0.10"),
            "{console}"
        );
        let markdown = soak.markdown("test");
        assert!(
            markdown
                .contains("| 870.7 | 874.0 | 4171 | 634 ms | 274 ms | 513 ms | 0 | 3000 (2990) | server:"),
            "{markdown}"
        );
        let json = soak.json();
        assert_eq!(json["slow_episodes"][0]["answers"], 4_171);
        assert_eq!(
            json["slow_episodes"][0]["cpu_cores"]["by_process"]["postgres"],
            1.2
        );
    }

    fn interval(i: usize, rate: f64, p99_ms: u64, outbox: u64, rss: u64) -> Interval {
        Interval {
            end: (i + 1) as f64 * 10.0,
            accepted_rate: rate,
            completed_rate: rate,
            completed_p99: Duration::from_millis(p99_ms),
            http_p99: Duration::from_millis(p99_ms),
            outbox_bytes: outbox,
            processed_bytes: outbox,
            server_rss: rss,
            ..Interval::default()
        }
    }

    #[test]
    fn a_steady_soak_passes_and_a_degrading_one_misses() {
        let mib = 1024 * 1024;
        let steady: Vec<Interval> = (0..9)
            .map(|i| interval(i, 800.0, 20, 10 * mib, 20 * mib))
            .collect();
        assert!(
            judge(&steady).iter().all(|v| v.status == Status::Pass),
            "{:?}",
            judge(&steady)
        );
        let degrading: Vec<Interval> = (0..9)
            .map(|i| {
                interval(
                    i,
                    800.0 - 40.0 * i as f64,
                    20 + 10 * i as u64,
                    (i as u64 + 1) * 10 * mib,
                    (20 + 5 * i as u64) * mib,
                )
            })
            .collect();
        let verdicts = judge(&degrading);
        assert_eq!(verdicts.len(), 8);
        let drifts: Vec<&Verdict> = verdicts
            .iter()
            .filter(|v| !v.name.starts_with("no stall"))
            .collect();
        assert_eq!(drifts.len(), 6);
        assert!(drifts.iter().all(|v| v.status == Status::Miss), "{verdicts:?}");
    }

    /// A stall in the middle leaves the thirds alike (the medians and means of the first and
    /// last thirds do not see it): only the worst interval does.
    #[test]
    fn a_stall_in_the_middle_misses_though_the_thirds_agree() {
        let mib = 1024 * 1024;
        let mut soak: Vec<Interval> = (0..30)
            .map(|i| interval(i, 1_300.0, 70, 30 * mib, 18 * mib))
            .collect();
        for (i, stalled) in soak.iter_mut().enumerate().skip(12).take(3) {
            stalled.completed_rate = 225.0;
            stalled.completed_p99 = Duration::from_secs(63 - i as u64);
        }
        let verdicts = judge(&soak);
        let (stall, others): (Vec<&Verdict>, Vec<&Verdict>) =
            verdicts.iter().partition(|v| v.name.starts_with("no stall"));
        assert!(others.iter().all(|v| v.status == Status::Pass), "{verdicts:?}");
        assert_eq!(stall.len(), 2, "{verdicts:?}");
        assert_eq!(stall[0].status, Status::Miss, "{verdicts:?}");
        assert!(stall[0].last.contains("130 s"), "names when: {:?}", stall[0]);
        assert_eq!(
            stall[1].status,
            Status::Pass,
            "HTTP answered on time: {verdicts:?}"
        );

        // Stalled HTTP answers alone.
        let mut deaf = soak.clone();
        for (i, interval) in deaf.iter_mut().enumerate() {
            interval.completed_p99 = Duration::from_millis(70);
            if (12..15).contains(&i) {
                interval.http_p99 = Duration::from_secs(20);
            }
        }
        let verdicts = judge(&deaf);
        let missed: Vec<&str> = verdicts
            .iter()
            .filter(|v| v.status == Status::Miss)
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(
            missed,
            ["no stall (HTTP p99 of the worst interval)"],
            "{verdicts:?}"
        );

        // The soak #3 of 2026-12-07: worst minute's p99 183 ms against 75 ms: no stall.
        soak[12].completed_p99 = Duration::from_millis(183);
        soak[13].completed_p99 = Duration::from_millis(70);
        soak[14].completed_p99 = Duration::from_millis(70);
        let verdicts = judge(&soak);
        assert!(verdicts.iter().all(|v| v.status == Status::Pass), "{verdicts:?}");
    }
}
