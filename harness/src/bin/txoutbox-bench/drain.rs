//! (4) Relay drain: a backlog of `OrderCreated` events in a fresh outbox, no consumer, and the
//! real relay (in this process, with the server's settings) publishing it until the outbox is
//! empty.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use txoutbox::{relay, Error, RelayConfig, Result};
use txoutbox_service::orders::{AGGREGATE_TYPE, ORDER_CREATED};

use crate::ceilings::Throughput;
use crate::cpu::Snapshot;
use crate::infra::Infra;
use crate::options::Plan;
use crate::sampler::Recorder;
use crate::server::server_pool_size;
use crate::verify::{self, Checks};

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

/// What (4) measured.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    /// Events published per second, from the relay's start until the outbox was empty.
    pub throughput: Throughput,
    /// How long writing the backlog took (not part of the rate).
    pub fill: Duration,
}

/// Fills the outbox with `plan.backlog` events, starts the relay and times it until every event
/// is published, confirmed and deleted.
pub fn run(infra: &Infra, plan: &Plan, stop: &AtomicBool, checks: &mut Checks) -> Result<Drain> {
    let fresh = infra.fresh_db("drain", server_pool_size())?;
    let broker = infra.fresh_broker("drain")?;
    let mut client = fresh.client()?;
    let backlog = i64::try_from(plan.backlog)
        .map_err(|_| Error::Config(format!("backlog {} is too large", plan.backlog)))?;
    let filling = Instant::now();
    client
        .execute(FILL, &[&backlog, &AGGREGATE_TYPE, &ORDER_CREATED])
        .map_err(|e| Error::db("cannot fill the outbox", e))?;
    // A real backlog has statistics (autovacuum); give the planner the same.
    client
        .batch_execute("ANALYZE outbox")
        .map_err(|e| Error::db("cannot analyze the outbox", e))?;
    let fill = filling.elapsed();
    checks.equal(
        DRAIN_PHASE,
        "events in the backlog",
        plan.backlog,
        verify::outbox_rows(&mut client)?,
    );

    let mut recorder = Recorder::new(&["published"], plan.sample_interval);
    let started = Instant::now();
    let before = Snapshot::take();
    let relay = relay::start(
        fresh.db.clone(),
        &infra.amqp_url,
        broker.topology.clone(),
        RelayConfig::default(),
    )?;
    let deadline = started + plan.completion_timeout;
    loop {
        let published = relay.stats().published();
        recorder.observe(vec![published]);
        if published >= plan.backlog || Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(POLL);
    }
    let elapsed = started.elapsed();
    let cpu = before.until(&Snapshot::take());
    let published = relay.stats().published();
    let refused = relay.stats().refused();
    relay.stop();
    crate::pipeline::interrupted(stop)?;

    checks.equal(
        DRAIN_PHASE,
        "events published and confirmed",
        plan.backlog,
        published,
    );
    checks.equal(DRAIN_PHASE, "events refused or unroutable", 0, refused);
    checks.equal(
        DRAIN_PHASE,
        "outbox rows left",
        0,
        verify::outbox_rows(&mut client)?,
    );
    checks.equal(
        DRAIN_PHASE,
        "messages in the queue",
        plan.backlog,
        broker.depth()?.ready,
    );
    Ok(Drain {
        throughput: Throughput::new(published, elapsed, recorder.finish()).with_cpu(cpu),
        fill,
    })
}
