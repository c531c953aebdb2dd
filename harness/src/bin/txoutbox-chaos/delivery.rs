//! The two delivery cases, injection and checks: `poison-header` (deliveries the consumer can
//! never record, beside the normal orders) and `consumer-database-failure` (the consumer's
//! database refusing connections mid-batch, with orders created and cancelled in flight).
//! The rest of a case (world, load, drain, common checks) is [`crate::cases`]'s.

use std::time::{Duration, Instant};

use txoutbox::{Error, Result};

use crate::cases::{build_backlog, check_warnings, consumer_in_transaction, freeze_mid_work, wait_settled};
use crate::load::{accepted_ids, CancelTally, Record, Summary};
use crate::options::SLOW_ANSWER;
use crate::poison::{self, Poison};
use crate::procs::{application_name, Kind, Proc};
use crate::report::CaseResult;
use crate::verify::Counts;
use crate::world::{ChaosBroker, ChaosDb};

/// How often the queue or the sessions are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// The longest POST -> COMPLETED an order posted after the poison may take: the consumer
/// applies them within about 100 ms, and a poison retried before it is dead-lettered holds
/// them for seconds.
const STALL_LIMIT: Duration = Duration::from_secs(1);
/// How long the consumer may take to be back (a session in its database and on the queue)
/// once connections are allowed again: its reconnect backoff grows to 10 s.
const RECONNECT_WITHIN: Duration = Duration::from_secs(30);
/// Threads and descriptors the consumer may hold over its baseline after the cut.
const CONSUMER_SLACK: (usize, usize) = (2, 4);

/// The queue of the case's consumer, sampled.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueWatch {
    /// Samples taken.
    pub samples: usize,
    /// Samples in which the queue had no consumer.
    pub without_consumer: usize,
    /// Most ready messages seen.
    pub max_ready: u32,
}

/// What `poison-header` published and saw while the poison passed.
pub struct PoisonSeen {
    /// The poison deliveries.
    pub poisons: Vec<Poison>,
    /// The queue while they passed.
    pub queue: QueueWatch,
}

/// Publishes the poison straight to the case's exchange, then watches the queue for `watch`
/// while the load goes on, checking that `processes` live.
pub fn inject_poison(
    amqp_url: &str,
    broker: &ChaosBroker,
    watch: Duration,
    processes: &mut [&mut Proc],
) -> Result<PoisonSeen> {
    let poisons = poison::publish(amqp_url, &broker.topology)?;
    let kinds: Vec<&str> = poisons.iter().map(|p| p.kind).collect();
    println!(
        "  published {} poison deliveries: {}",
        poisons.len(),
        kinds.join(", ")
    );
    let mut queue = QueueWatch::default();
    let until = Instant::now() + watch;
    while Instant::now() < until {
        for process in processes.iter_mut() {
            process.check_alive()?;
        }
        if let Ok(state) = broker.state() {
            queue.samples += 1;
            queue.without_consumer += usize::from(state.consumers == 0);
            queue.max_ready = queue.max_ready.max(state.ready);
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
    Ok(PoisonSeen { poisons, queue })
}

/// Orders among `ids` `COMPLETED`, and the longest POST -> COMPLETED of those (Postgres clock).
const COMPLETION: &str = "\
    SELECT count(*), coalesce(max(extract(epoch FROM updated_at - created_at)), 0)::float8
    FROM orders WHERE id = ANY($1) AND status = 'COMPLETED'";

/// The checks of `poison-header`, after the drain: each poison in the dead-letter queue with
/// its reason, the queue never without its consumer, the orders posted after the poison
/// completed without a stall.
pub fn check_poison(
    result: &mut CaseResult,
    seen: &PoisonSeen,
    amqp_url: &str,
    db: &ChaosDb,
    broker: &ChaosBroker,
    records: &[Record],
    poisoned_at: Duration,
) -> Result<()> {
    let letters = poison::take_dead_letters(amqp_url, &broker.topology)?;
    let problems = poison::unexpected(&seen.poisons, &letters, &broker.topology.queue);
    let reasons: Vec<String> = seen
        .poisons
        .iter()
        .map(|p| {
            let reason = letters
                .get(&p.message_id)
                .map_or("missing", |l| l.reason.as_str());
            format!("{}: {reason:?}", p.kind)
        })
        .collect();
    result.check(
        "every poison delivery is in the dead-letter queue with its reason, and nothing else is",
        problems.is_empty(),
        if problems.is_empty() {
            reasons.join("; ")
        } else {
            problems.join("; ")
        },
    );
    let q = seen.queue;
    result.check(
        "the queue kept its consumer while the poison passed",
        q.samples > 0 && q.without_consumer == 0,
        format!(
            "{} samples, {} without a consumer, at most {} ready",
            q.samples, q.without_consumer, q.max_ready
        ),
    );
    let after = &records[records.partition_point(|r| r.sent < poisoned_at)..];
    let ids = accepted_ids(after);
    let row = db
        .client()?
        .query_one(COMPLETION, &[&ids])
        .map_err(|e| Error::db("cannot read the completions", e))?;
    let (completed, slowest) = (
        row.get::<_, i64>(0),
        Duration::from_secs_f64(row.get::<_, f64>(1).max(0.0)),
    );
    result.check(
        format!(
            "the orders posted after the poison were COMPLETED within {} s (no stall)",
            STALL_LIMIT.as_secs()
        ),
        !ids.is_empty() && completed as usize == ids.len() && slowest <= STALL_LIMIT,
        format!(
            "{completed} of {} COMPLETED, slowest POST -> COMPLETED {:.0} ms",
            ids.len(),
            slowest.as_secs_f64() * 1e3
        ),
    );
    let right = seen
        .poisons
        .iter()
        .filter(|p| {
            letters
                .get(&p.message_id)
                .is_some_and(|l| l.reason.contains(p.expected_reason))
        })
        .count();
    result.notes.insert(
        0,
        format!(
            "{right} of {} poison deliveries dead-lettered at once with their reason ({} dead letters in \
             all); the queue had its consumer in {} of {} samples (at most {} ready); {completed} of \
             the {} orders posted after the poison COMPLETED, the slowest in {:.0} ms",
            seen.poisons.len(),
            letters.len(),
            q.samples - q.without_consumer,
            q.samples,
            q.max_ready,
            ids.len(),
            slowest.as_secs_f64() * 1e3
        ),
    );
    Ok(())
}

/// What `consumer-database-failure` did and saw.
pub struct CutSeen {
    /// What the consumer was doing when its sessions were terminated, when that was seen.
    pub caught: Option<String>,
    /// Its sessions terminated.
    pub terminated: usize,
    /// When the cut began, Unix seconds on the Postgres clock.
    pub began_at: f64,
    /// Most sessions of the consumer seen in its database during the cut.
    pub consumer_sessions: usize,
    /// The server's sessions in the database before the cut, and the fewest during it.
    pub server_sessions: (usize, usize),
    /// How long the consumer took to be back once connections were allowed.
    pub reconnected_in: Option<Duration>,
    /// The consumer's threads and descriptors before the cut.
    pub baseline: (usize, usize),
}

/// Cuts the case's database from under the consumer for `hold`: a backlog first, then, with
/// the consumer caught inside a batch's transaction (frozen while its sessions go), new
/// connections refused and its sessions terminated; Postgres and the server's sessions stay.
/// Then connections are allowed again and the consumer is waited for.
pub fn cut_consumer_database(
    db: &ChaosDb,
    broker: &ChaosBroker,
    consumer: &mut Proc,
    hold: Duration,
) -> Result<CutSeen> {
    let consumer_app = application_name(Kind::Consumer);
    let server_app = application_name(Kind::Server);
    let baseline = consumer.resources().unwrap_or_default();
    let mut admin = db.admin()?;
    let server_before = db.sessions(&mut admin, server_app)?;
    build_backlog(consumer)?;
    let mut client = db.client()?;
    let caught = freeze_mid_work(consumer, || {
        consumer_in_transaction(&mut client, &broker.topology.queue)
    })?;
    drop(client);
    let began_at: f64 = admin
        .query_one("SELECT extract(epoch FROM now())::float8", &[])
        .map_err(|e| Error::db("cannot read the Postgres clock", e))?
        .get(0);
    let cut = db.cut(consumer_app);
    if caught.is_some() {
        consumer.signal("CONT")?;
    }
    let cut = cut?;
    println!(
        "  consumer's database cut: connections refused, {} consumer sessions terminated{}",
        cut.terminated,
        caught.as_deref().map_or(String::new(), |c| format!(" {c}"))
    );
    let (mut consumer_sessions, mut server_fewest) = (0, server_before);
    let until = Instant::now() + hold;
    while Instant::now() < until {
        consumer.check_alive()?;
        consumer_sessions = consumer_sessions.max(cut.sessions(&mut admin)?);
        server_fewest = server_fewest.min(db.sessions(&mut admin, server_app)?);
        std::thread::sleep(SAMPLE_EVERY);
    }
    let terminated = cut.terminated;
    cut.end()?;
    let allowed = Instant::now();
    let reconnected_in = loop {
        consumer.check_alive()?;
        let back =
            db.sessions(&mut admin, consumer_app)? > 0 && broker.state().is_ok_and(|s| s.consumers >= 1);
        if back {
            break Some(allowed.elapsed());
        }
        if allowed.elapsed() >= RECONNECT_WITHIN {
            break None;
        }
        std::thread::sleep(SAMPLE_EVERY);
    };
    println!(
        "  connections allowed again after {:.1} s; consumer {}",
        hold.as_secs_f64(),
        reconnected_in.map_or("NOT back".into(), |d| format!("back in {:.1} s", d.as_secs_f64()))
    );
    Ok(CutSeen {
        caught,
        terminated,
        began_at,
        consumer_sessions,
        server_sessions: (server_before, server_fewest),
        reconnected_in,
        baseline,
    })
}

/// Cancelled orders `$1` created before the cut began (`$2`, Unix seconds) whose two events
/// were both applied after it: the aggregates whose events were in flight through the cut.
const IN_FLIGHT: &str = "\
    SELECT count(*) FROM orders o
    WHERE o.id = ANY($1) AND o.created_at < to_timestamp($2)
      AND (SELECT count(*) FROM processed_messages p
           WHERE p.aggregate_id = o.id::text AND p.processed_at >= to_timestamp($2)) = 2";

/// What `consumer-database-failure` checks after the drain, besides the counts.
pub struct CutOutcome<'a> {
    /// What the cut saw.
    pub seen: &'a CutSeen,
    /// The final counts.
    pub counts: &'a Counts,
    /// The orders created and cancelled.
    pub tally: &'a CancelTally,
    /// The POSTs sent during the cut.
    pub during: &'a Summary,
}

/// The checks of `consumer-database-failure`: the cut reached the consumer and only it, the
/// consumer came back by itself, the aggregates in flight ended right (cancelled orders
/// `CANCELLED`, never `COMPLETED` after the cancel, every event applied once), the queue is
/// empty, and the consumer's threads and descriptors are back.
pub fn check_cut(
    result: &mut CaseResult,
    outcome: &CutOutcome,
    db: &ChaosDb,
    broker: &ChaosBroker,
    server: &Proc,
    consumer: &Proc,
) -> Result<()> {
    let CutOutcome {
        seen,
        counts,
        tally,
        during,
    } = *outcome;
    result.check(
        "the cut reached the consumer: its sessions were terminated and none came back while \
         connections were refused",
        seen.terminated > 0 && seen.consumer_sessions == 0,
        format!(
            "{} terminated, at most {} during the cut",
            seen.terminated, seen.consumer_sessions
        ),
    );
    result.check(
        format!(
            "the consumer was back by itself (same process) within {} s of the database",
            RECONNECT_WITHIN.as_secs()
        ),
        seen.reconnected_in.is_some(),
        seen.reconnected_in
            .map_or("not back".into(), |d| format!("back in {:.1} s", d.as_secs_f64())),
    );
    let in_flight: i64 = db
        .client()?
        .query_one(IN_FLIGHT, &[&tally.cancelled, &seen.began_at])
        .map_err(|e| Error::db("cannot count the aggregates in flight", e))?
        .get(0);
    result.check(
        "aggregates had both their events in flight through the cut",
        in_flight > 0,
        format!("{in_flight} cancelled orders created before the cut had OrderCreated and OrderCancelled applied after it"),
    );
    result.check(
        "every cancelled order ended CANCELLED, and none was COMPLETED after its cancel",
        counts.cancelled == tally.cancelled.len() && counts.undone_cancels == 0,
        format!(
            "{} of {} CANCELLED; {} changes out of CANCELLED",
            counts.cancelled,
            tally.cancelled.len(),
            counts.undone_cancels
        ),
    );
    result.check(
        "every event was applied once (an OrderCreated per order, an OrderCancelled per cancel)",
        counts.processed == counts.accepted
            && counts.cancels_processed == tally.cancelled.len()
            && counts.duplicates() == 0,
        format!(
            "OrderCreated {} of {}, OrderCancelled {} of {}, {} second effects",
            counts.processed,
            counts.accepted,
            counts.cancels_processed,
            tally.cancelled.len(),
            counts.duplicates()
        ),
    );
    result.check(
        "every cancel was answered 200 (or 409 on a retry after a lost answer)",
        tally.unresolved.is_empty() && !tally.cancelled.is_empty(),
        format!(
            "{} cancelled, {} unresolved, {} retries",
            tally.cancelled.len(),
            tally.unresolved.len(),
            tally.retries
        ),
    );
    let state = broker.state()?;
    result.check(
        "nothing was left in the queue, and it has its consumer",
        state.ready == 0 && state.consumers >= 1,
        format!("{} ready, {} consumers", state.ready, state.consumers),
    );
    let slowest = during.slowest_failure.unwrap_or_default();
    let only_503 = during.statuses.keys().all(|&s| s == 503);
    result.check(
        format!(
            "POSTs from the backlog to the consumer's return were answered 201, or 503 with a JSON \
             error within {:.0} s (the server shares the database)",
            SLOW_ANSWER.as_secs_f64()
        ),
        only_503 && during.not_json == 0 && during.no_answer == 0 && slowest <= SLOW_ANSWER,
        format!(
            "{} sent: 201 x{}, {}",
            during.sent,
            during.created,
            during.failures()
        ),
    );
    let (after, back_within) = wait_settled(consumer, seen.baseline, CONSUMER_SLACK);
    result.check(
        "the consumer's threads and descriptors came back to their level before the cut",
        back_within.is_some(),
        format!("{:?} before, {after:?} after", seen.baseline),
    );
    check_warnings(result, server, consumer)?;
    result.notes.insert(
        0,
        format!(
            "consumer cut {}: {} sessions terminated; {in_flight} cancelled orders had both \
             events applied after the cut; consumer back {:.1} s after connections were allowed; \
             {} of {} orders CANCELLED, {} changes out of CANCELLED; POSTs from the backlog to the \
             consumer's return 201 x{} of {} (server sessions {} before, at least {} during the \
             cut); consumer threads/descriptors {:?} before, {after:?} after; {} redeliveries absorbed",
            seen.caught
                .as_deref()
                .unwrap_or("between batches (never caught inside a transaction)"),
            seen.terminated,
            seen.reconnected_in.unwrap_or_default().as_secs_f64(),
            counts.cancelled,
            tally.cancelled.len(),
            counts.undone_cancels,
            during.created,
            during.sent,
            seen.server_sessions.0,
            seen.server_sessions.1,
            seen.baseline,
            counts.redelivered
        ),
    );
    Ok(())
}
