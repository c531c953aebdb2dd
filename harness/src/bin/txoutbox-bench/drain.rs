//! (4) Relay drain, and its cost as the backlog grows: backlogs of `OrderCreated` events (10k,
//! 100k and 1M in a full run) each in a fresh outbox, no consumer, and the real relay (in this
//! process, with the server's settings: `RELAY_ORDERING=aggregate`) publishing it until the
//! outbox is empty; then the smaller ones again with `RELAY_ORDERING=none`. The time per event
//! must not grow with the backlog: a claim that scans what it skips, or an index that stops
//! being used, would show here first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use txoutbox::{relay, Error, RelayConfig, RelayOrdering, Result};
use txoutbox_service::orders::{AGGREGATE_TYPE, ORDER_CREATED};

use crate::ceilings::Throughput;
use crate::cpu::Snapshot;
use crate::infra::Infra;
use crate::options::Plan;
use crate::sampler::Recorder;
use crate::server::{server_pool_size, server_relay_config};
use crate::verify::{self, Checks};
use crate::Progress;

/// Phase name of (4).
pub const DRAIN_PHASE: &str = "relay drain";

/// How often the relay's counter is read.
const POLL: Duration = Duration::from_millis(5);

/// A backlog in one statement: events shaped like those `orders::create` writes (a JSON body
/// with order id, user id, amount and creation time), each with its own ids.
const FILL: &str = "\
    INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, payload)
    SELECT gen_random_uuid(), $2::text, o.id::text, $3::text,
           jsonb_build_object(
               'order_id', o.id::text,
               'user_id', gen_random_uuid()::text,
               'amount', to_char(o.cents / 100.0, 'FM9999999990.00'),
               'created_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))
    FROM (SELECT gen_random_uuid() AS id, 1 + floor(random() * 1000000)::bigint AS cents
          FROM generate_series(1, $1::bigint)) AS o";

/// The largest backlog / smallest backlog time per event may be at most this.
pub const GROWTH_GOAL: f64 = 1.5;

/// One drain: one backlog, one ordering.
#[derive(Clone, Debug)]
pub struct Drain {
    /// `aggregate` (the server's default) or `none`.
    pub ordering: RelayOrdering,
    /// Events in the backlog.
    pub backlog: u64,
    /// Events published per second, from the first confirmed event until the outbox was
    /// empty (the relay's start-up, the same at every size, left out); its lines are the whole run.
    pub throughput: Throughput,
    /// How long writing the backlog took (not part of the rate).
    pub fill: Duration,
}

impl Drain {
    /// Microseconds per event.
    pub fn us_per_event(&self) -> f64 {
        if self.throughput.rate > 0.0 {
            1e6 / self.throughput.rate
        } else {
            f64::INFINITY
        }
    }
}

/// Every drain of (4), in the order run.
#[derive(Clone, Debug, Default)]
pub struct Drains {
    /// Aggregate ordering at each size, then none at the sizes planned for it.
    pub runs: Vec<Drain>,
}

/// Time per event at the largest backlog against the smallest, for one ordering.
#[derive(Clone, Copy, Debug)]
pub struct Growth {
    /// The smallest backlog's drain.
    pub smallest: u64,
    /// The largest backlog's drain.
    pub largest: u64,
    /// µs/event at the largest / µs/event at the smallest.
    pub ratio: f64,
}

impl Drains {
    /// The drains with `ordering`, smallest backlog first.
    pub fn with(&self, ordering: RelayOrdering) -> Vec<&Drain> {
        let mut runs: Vec<&Drain> = self.runs.iter().filter(|d| d.ordering == ordering).collect();
        runs.sort_by_key(|d| d.backlog);
        runs
    }

    /// The drain compared with the broker ceiling: aggregate ordering, the middle backlog
    /// (100,000 in a full run, the size this target was set at).
    pub fn reference(&self) -> Option<&Drain> {
        let runs = self.with(RelayOrdering::Aggregate);
        runs.get(runs.len().saturating_sub(1) / 2).copied()
    }

    /// How time per event grew from the smallest to the largest backlog with `ordering`.
    pub fn growth(&self, ordering: RelayOrdering) -> Option<Growth> {
        let runs = self.with(ordering);
        let (first, last) = (runs.first()?, runs.last()?);
        (runs.len() >= 2).then(|| Growth {
            smallest: first.backlog,
            largest: last.backlog,
            ratio: last.us_per_event() / first.us_per_event(),
        })
    }
}

/// `aggregate` or `none`, as `RELAY_ORDERING` spells it.
pub fn ordering_name(ordering: RelayOrdering) -> &'static str {
    match ordering {
        RelayOrdering::Aggregate => "aggregate",
        _ => "none",
    }
}

/// Every drain of the plan: each backlog with aggregate ordering, then the ones planned with none.
pub fn run(
    infra: &Infra,
    plan: &Plan,
    stop: &AtomicBool,
    checks: &mut Checks,
    progress: &Progress,
) -> Result<Drains> {
    let mut drains = Drains::default();
    let planned = plan
        .backlogs
        .iter()
        .map(|b| (RelayOrdering::Aggregate, *b))
        .chain(plan.unordered_backlogs.iter().map(|b| (RelayOrdering::None, *b)));
    for (ordering, backlog) in planned {
        crate::pipeline::interrupted(stop)?;
        let drain = run_one(infra, plan, ordering, backlog, stop, checks)?;
        progress.step(&format!(
            "{DRAIN_PHASE}: {} events, RELAY_ORDERING={}: {} events/s, {:.1} µs/event (filled in {:.1} s)",
            crate::report::count(backlog as f64),
            ordering_name(ordering),
            crate::report::count(drain.throughput.rate),
            drain.us_per_event(),
            drain.fill.as_secs_f64()
        ));
        drains.runs.push(drain);
    }
    Ok(drains)
}

/// Fills a fresh outbox with `backlog` events, starts the relay with `ordering` and times it
/// until every event is published, confirmed and deleted.
fn run_one(
    infra: &Infra,
    plan: &Plan,
    ordering: RelayOrdering,
    backlog: u64,
    stop: &AtomicBool,
    checks: &mut Checks,
) -> Result<Drain> {
    let fresh = infra.fresh_db("drain", server_pool_size())?;
    let broker = infra.fresh_broker("drain")?;
    let mut client = fresh.client()?;
    let what = |check: &str| {
        format!(
            "{} events, {}: {check}",
            crate::report::count(backlog as f64),
            ordering_name(ordering)
        )
    };
    let rows =
        i64::try_from(backlog).map_err(|_| Error::Config(format!("backlog {backlog} is too large")))?;
    let filling = Instant::now();
    client
        .execute(FILL, &[&rows, &AGGREGATE_TYPE, &ORDER_CREATED])
        .map_err(|e| Error::db("cannot fill the outbox", e))?;
    // A real backlog has statistics (autovacuum); give the planner the same.
    client
        .batch_execute("ANALYZE outbox")
        .map_err(|e| Error::db("cannot analyze the outbox", e))?;
    let fill = filling.elapsed();
    checks.equal(
        DRAIN_PHASE,
        &what("events in the backlog"),
        backlog,
        verify::outbox_rows(&mut client)?,
    );

    let mut recorder = Recorder::new(&["published"], plan.sample_interval);
    let started = Instant::now();
    let before = Snapshot::take();
    let config = RelayConfig {
        ordering,
        ..server_relay_config()
    };
    let relay = relay::start(fresh.db.clone(), &infra.amqp_url, broker.topology.clone(), config)?;
    let deadline = started
        + plan
            .completion_timeout
            .max(Duration::from_secs_f64(backlog as f64 / 1000.0));
    let mut first: Option<(Instant, u64)> = None;
    loop {
        let published = relay.stats().published();
        if first.is_none() && published > 0 {
            first = Some((Instant::now(), published));
        }
        recorder.observe(vec![published]);
        if published >= backlog || Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(POLL);
    }
    let finished = Instant::now();
    let cpu = before.until(&Snapshot::take());
    let published = relay.stats().published();
    let refused = relay.stats().refused();
    relay.stop();
    crate::pipeline::interrupted(stop)?;

    checks.equal(
        DRAIN_PHASE,
        &what("events published and confirmed"),
        backlog,
        published,
    );
    checks.equal(DRAIN_PHASE, &what("events refused or unroutable"), 0, refused);
    checks.equal(
        DRAIN_PHASE,
        &what("outbox rows left"),
        0,
        verify::outbox_rows(&mut client)?,
    );
    checks.equal(
        DRAIN_PHASE,
        &what("messages in the queue"),
        backlog,
        broker.depth()?.ready,
    );
    // From the first confirmed batch on: what the relay does per event, without its start-up.
    let (count, elapsed) = match first {
        Some((at, already)) if published > already && finished > at => (published - already, finished - at),
        _ => (published, finished - started),
    };
    let throughput = Throughput::new(count, elapsed, recorder.finish()).with_cpu(cpu);
    Ok(Drain {
        ordering,
        backlog,
        throughput,
        fill,
    })
}
