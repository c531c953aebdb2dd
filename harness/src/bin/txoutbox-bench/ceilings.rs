//! The two ceilings txoutbox is measured against, each with txoutbox's own code and nothing
//! around it: (1) the order transaction straight over C Postgres connections, and (2) confirmed
//! publishing to RabbitMQ with the relay's publisher, workers and batch size, without Postgres.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use txoutbox::broker::{OutgoingEvent, Publisher};
use txoutbox::{Error, RelayConfig, Result};
use txoutbox_service::orders::{self, Amount, NewOrder};
use uuid::Uuid;

use crate::cpu::{CpuUsage, Snapshot};
use crate::infra::Infra;
use crate::load::per_second;
use crate::options::Plan;
use crate::quantiles::Quantiles;
use crate::sampler::{Line, Sampler};
use crate::server::Stack;
use crate::verify::{self, Checks};

/// Phase names, as checks and results use them.
pub const DB_PHASE: &str = "database ceiling";
/// See [`DB_PHASE`].
pub const BROKER_PHASE: &str = "broker ceiling";

/// A throughput measured over a window.
#[derive(Clone, Debug, Default)]
pub struct Throughput {
    /// Events in the window.
    pub count: u64,
    /// The window.
    pub elapsed: Duration,
    /// Events per second.
    pub rate: f64,
    /// The rate over time.
    pub lines: Vec<Line>,
    /// CPU used during the window.
    pub cpu: CpuUsage,
}

impl Throughput {
    /// `count` events over `elapsed`, with the rate over time.
    pub fn new(count: u64, elapsed: Duration, lines: Vec<Line>) -> Self {
        Throughput {
            count,
            elapsed,
            rate: per_second(count, elapsed),
            lines,
            cpu: CpuUsage::default(),
        }
    }

    /// The same, with the CPU used during the window.
    pub fn with_cpu(self, cpu: CpuUsage) -> Self {
        Throughput { cpu, ..self }
    }
}

/// What (2) measured.
#[derive(Clone, Debug, Default)]
pub struct BrokerCeiling {
    /// Confirmed messages per second, publishing as the relay does.
    pub throughput: Throughput,
    /// Publish -> confirm of one message at a time, nothing else in flight.
    pub lone_confirm: Quantiles,
}

/// A real `OrderCreated` event as the relay reads it from the outbox: the broker ceiling
/// publishes bodies of exactly its size.
#[derive(Clone, Debug)]
pub struct SampleEvent {
    /// `aggregate_type` header.
    pub aggregate_type: String,
    /// AMQP type and routing key.
    pub event_type: String,
    /// JSON body, as `payload::text` gives it to the relay.
    pub body: Vec<u8>,
}

impl SampleEvent {
    /// `n` events like this one, each with its own message and aggregate id.
    pub fn batch(&self, n: usize) -> Vec<OutgoingEvent> {
        (0..n)
            .map(|key| OutgoingEvent {
                key: key as i64,
                message_id: Uuid::now_v7().to_string(),
                aggregate_type: self.aggregate_type.clone(),
                aggregate_id: Uuid::new_v4().to_string(),
                event_type: self.event_type.clone(),
                body: self.body.clone(),
                exchange: None,
                routing_key: None,
                aggregate_sequence: None,
                // What the server's events carry: a trace context and a creation time.
                trace_context: Some(txoutbox::TraceContext::new_root()),
                created_at: Some("2024-01-01T00:00:00.000000Z".into()),
                source: None,
            })
            .collect()
    }
}

/// A random valid order, as the stress client would send it.
pub fn random_order() -> Result<NewOrder> {
    let user_id = Uuid::new_v4();
    let cents = 1 + user_id.as_u128() % 1_000_000;
    let amount = Amount::parse(&format!("{}.{:02}", cents / 100, cents % 100)).map_err(Error::Other)?;
    Ok(NewOrder { user_id, amount })
}

/// (1) `orders::create` on `plan.concurrency` threads, each holding one pooled connection, for
/// `plan.db_ceiling`: the server's transaction (order insert, outbox insert, commit) and
/// nothing else. Returns the rate and a sample event for (2).
pub fn database(
    infra: &Infra,
    plan: &Plan,
    stop: &AtomicBool,
    checks: &mut Checks,
) -> Result<(Throughput, SampleEvent)> {
    let connections = plan.concurrency;
    let fresh = infra.fresh_db("dbceiling", connections as u32)?;
    let broker = infra.fresh_broker("dbceiling")?;
    let announce = Stack::announce_without_relay(&fresh, &broker, &infra.amqp_url)?;
    let outbox = announce.outbox(fresh.db.outbox());
    // Every connection opened and its statements prepared (one order each) before timing.
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut client = fresh.db.get()?;
        orders::create(&mut client, &outbox, &random_order()?, None, &announce)?;
        clients.push(client);
    }
    let warm_up = connections as u64;
    let commits = Arc::new(AtomicU64::new(0));
    let counted = commits.clone();
    let sampler = Sampler::start(&["commits"], plan.sample_interval, move || {
        Ok(vec![counted.load(Ordering::Relaxed)])
    })?;
    let barrier = Barrier::new(connections + 1);
    let (errors, elapsed, cpu) = thread::scope(|scope| -> Result<(Vec<String>, Duration, CpuUsage)> {
        let mut threads = Vec::with_capacity(connections);
        for (index, mut client) in clients.into_iter().enumerate() {
            let (barrier, commits, announce, outbox) = (&barrier, &commits, &announce, &outbox);
            let thread = thread::Builder::new()
                .name(format!("bench-db-{index}"))
                .spawn_scoped(scope, move || -> Option<String> {
                    barrier.wait();
                    let deadline = Instant::now() + plan.db_ceiling;
                    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                        let created = random_order().and_then(|order| {
                            // Like the server, which gives every event a trace context.
                            let trace = txoutbox::TraceContext::new_root();
                            orders::create(&mut client, outbox, &order, Some(&trace), announce)
                        });
                        match created {
                            Ok(_) => commits.fetch_add(1, Ordering::Relaxed),
                            Err(e) => return Some(e.to_string()),
                        };
                    }
                    None
                })
                .map_err(|e| Error::Other(format!("cannot start a database thread: {e}")))?;
            threads.push(thread);
        }
        barrier.wait();
        let start = Instant::now();
        let before = Snapshot::take();
        let mut errors = Vec::new();
        for thread in threads {
            match thread.join() {
                Ok(None) => {}
                Ok(Some(e)) => errors.push(e),
                Err(_) => errors.push("a database thread panicked".into()),
            }
        }
        let elapsed = start.elapsed();
        Ok((errors, elapsed, before.until(&Snapshot::take())))
    })?;
    let lines = sampler.finish();
    let committed = commits.load(Ordering::Relaxed);

    let mut client = fresh.client()?;
    checks.add(
        DB_PHASE,
        "every order transaction committed",
        errors.is_empty() && committed > 0,
        if errors.is_empty() {
            format!("{committed} commits")
        } else {
            format!("{} threads failed: {}", errors.len(), errors[0])
        },
    );
    checks.equal(
        DB_PHASE,
        "orders in Postgres",
        committed + warm_up,
        verify::order_rows(&mut client)?,
    );
    checks.equal(
        DB_PHASE,
        "outbox rows in Postgres",
        committed + warm_up,
        verify::outbox_rows(&mut client)?,
    );
    let row = client
        .query_one(
            "SELECT aggregate_type, event_type, payload::text FROM outbox ORDER BY id LIMIT 1",
            &[],
        )
        .map_err(|e| Error::db("cannot read a sample event", e))?;
    let sample = SampleEvent {
        aggregate_type: row.get(0),
        event_type: row.get(1),
        body: row.get::<_, String>(2).into_bytes(),
    };
    Ok((Throughput::new(committed, elapsed, lines).with_cpu(cpu), sample))
}

/// (2) Confirmed publishing of `sample`-sized events with txoutbox's [`Publisher`]: as many
/// threads as relay workers, each publishing batches of the relay's size and waiting for every
/// confirm, for `plan.broker_ceiling`. No database.
pub fn broker(
    infra: &Infra,
    plan: &Plan,
    sample: &SampleEvent,
    stop: &AtomicBool,
    checks: &mut Checks,
) -> Result<BrokerCeiling> {
    let config = RelayConfig::default();
    let batch_size = usize::try_from(config.batch_size)
        .map_err(|_| Error::Other(format!("relay batch size {} is not usable", config.batch_size)))?;
    let fresh = infra.fresh_broker("brokerceiling")?;
    // Connected, and one batch each through, before timing.
    let mut publishers = Vec::with_capacity(config.workers);
    let mut warm_up = 0;
    for _ in 0..config.workers {
        let mut publisher = Publisher::connect(&infra.amqp_url, &fresh.topology)?;
        let outcome = publisher.publish_batch(&sample.batch(batch_size), config.confirm_timeout)?;
        warm_up += outcome.confirmed.len() as u64;
        publishers.push(publisher);
    }
    // The floor under any commit -> confirm latency: one message, nothing else in flight.
    let mut lone = crate::quantiles::histogram();
    if let Some(publisher) = publishers.first_mut() {
        for _ in 0..plan.lone_confirms {
            let event = sample.batch(1);
            let sent = Instant::now();
            let outcome = publisher.publish_batch(&event, config.confirm_timeout)?;
            crate::quantiles::record(&mut lone, sent.elapsed());
            warm_up += outcome.confirmed.len() as u64;
        }
    }
    let confirmed = Arc::new(AtomicU64::new(0));
    let refused = AtomicU64::new(0);
    let counted = confirmed.clone();
    let sampler = Sampler::start(&["confirmed"], plan.sample_interval, move || {
        Ok(vec![counted.load(Ordering::Relaxed)])
    })?;
    let barrier = Barrier::new(config.workers + 1);
    let (errors, elapsed, cpu) = thread::scope(|scope| -> Result<(Vec<String>, Duration, CpuUsage)> {
        let mut threads = Vec::with_capacity(config.workers);
        for (index, mut publisher) in publishers.into_iter().enumerate() {
            let (barrier, confirmed, refused, config) = (&barrier, &confirmed, &refused, &config);
            let thread = thread::Builder::new()
                .name(format!("bench-publish-{index}"))
                .spawn_scoped(scope, move || -> Option<String> {
                    barrier.wait();
                    let deadline = Instant::now() + plan.broker_ceiling;
                    let mut failure = None;
                    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                        let events = sample.batch(batch_size);
                        match publisher.publish_batch(&events, config.confirm_timeout) {
                            Ok(outcome) => {
                                confirmed.fetch_add(outcome.confirmed.len() as u64, Ordering::Relaxed);
                                refused.fetch_add(outcome.refused.len() as u64, Ordering::Relaxed);
                            }
                            Err(e) => {
                                failure = Some(e.to_string());
                                break;
                            }
                        }
                    }
                    publisher.close();
                    failure
                })
                .map_err(|e| Error::Other(format!("cannot start a publisher thread: {e}")))?;
            threads.push(thread);
        }
        barrier.wait();
        let start = Instant::now();
        let before = Snapshot::take();
        let mut errors = Vec::new();
        for thread in threads {
            match thread.join() {
                Ok(None) => {}
                Ok(Some(e)) => errors.push(e),
                Err(_) => errors.push("a publisher thread panicked".into()),
            }
        }
        let elapsed = start.elapsed();
        Ok((errors, elapsed, before.until(&Snapshot::take())))
    })?;
    let lines = sampler.finish();
    let confirmed = confirmed.load(Ordering::Relaxed);
    let refused = refused.load(Ordering::Relaxed);

    checks.add(
        BROKER_PHASE,
        "every batch confirmed in time",
        errors.is_empty() && confirmed > 0,
        if errors.is_empty() {
            format!("{confirmed} confirmed")
        } else {
            format!("{} publishers failed: {}", errors.len(), errors[0])
        },
    );
    checks.equal(BROKER_PHASE, "messages refused or unroutable", 0, refused);
    checks.equal(
        BROKER_PHASE,
        "messages in the queue",
        confirmed + warm_up,
        fresh.depth()?.ready,
    );
    Ok(BrokerCeiling {
        throughput: Throughput::new(confirmed, elapsed, lines).with_cpu(cpu),
        lone_confirm: Quantiles::of_hdr(&lone),
    })
}
