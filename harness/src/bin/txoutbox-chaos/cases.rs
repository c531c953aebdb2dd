//! The cases. Each: a fresh database and queue, a server and a consumer, load; then the
//! failure mid-load, the repair, more load; then the drain and the verification. The two
//! delivery cases (poison deliveries, the consumer's database cut) are in [`crate::delivery`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use txoutbox::{Error, Result};

use crate::attack::Attack;
use crate::delivery::{self, CutOutcome, CutSeen, PoisonSeen};
use crate::load::{accepted_ids, Cancels, Load, Record, Summary};
use crate::options::{Case, Plan, MAX_WARNINGS_PER_WORKER, SLOW_ANSWER};
use crate::procs::{application_name, Kind, Launcher, Proc, READY_TIMEOUT};
use crate::report::CaseResult;
use crate::services::{unacked_deliveries, Services, Which};
use crate::verify::{outbox_rows, wait_for_drain, Accepted};
use crate::world::{ChaosBroker, ChaosDb, World};
use txoutbox_harness::support::process::free_port;

/// How often the outbox is sampled while watching it.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Runs `case` and reports what it found; never panics on a failed step (it becomes the
/// result's error).
pub fn run(case: Case, plan: &Plan, world: &World, services: &Services) -> CaseResult {
    let started = Instant::now();
    let mut result = CaseResult::new(case, plan);
    if let Err(e) = run_case(case, plan, world, services, &mut result) {
        result.error = Some(e.to_string());
    }
    // An outage guard has started the service again already; this is the belt to its braces.
    services.restore_all();
    result.elapsed = started.elapsed();
    result
}

/// What happened during the failure, for the checks.
struct Injection {
    /// From the start of the failure to the end of the repair, on the load's clock.
    window: (Duration, Duration),
    /// Outbox rows just before the failure.
    outbox_before: usize,
    /// Most outbox rows seen during the failure (broker outage only).
    outbox_peak: Option<usize>,
    /// Orders accepted while the outbox was watched during the failure (broker outage only).
    accepted_while_down: usize,
    /// Outbox rows right after a kill (kill-server only).
    outbox_after_kill: Option<usize>,
    /// Ready messages in the queue when the new consumer started (kill-consumer only).
    queued_while_dead: Option<u32>,
    /// How long the repair took (service start, or the new process to be ready).
    repair_took: Duration,
    /// What the killed process was doing when it was killed, when that was seen.
    caught: Option<String>,
    /// The server's figures under attack (hostile-clients only).
    hostile: Option<Hostile>,
    /// The poison published and the queue while it passed (poison-header only).
    poison: Option<PoisonSeen>,
    /// The consumer's database cut (consumer-database-failure only).
    cut: Option<CutSeen>,
}

/// The server's threads and descriptors around the attack, and what the attackers did.
struct Hostile {
    baseline: (usize, usize),
    peak: (usize, usize),
    /// After the attack, once back under the bound (or when the wait gave up).
    after: (usize, usize),
    back_within: Option<Duration>,
    connections: u64,
    refusals: u64,
}

/// Default `HTTP_THREADS` and `HTTP_MAX_CONNECTIONS` of the server the cases run.
const SERVER_THREADS: usize = 16;
const SERVER_MAX_CONNECTIONS: usize = 256;

/// The ceiling of the server's threads whatever its clients do: a thread per connection up to
/// the cap, the handlers and their connections to tiny_http, and the rest of the process.
fn thread_ceiling(baseline: usize) -> usize {
    baseline + SERVER_MAX_CONNECTIONS + 2 * SERVER_THREADS
}

/// What the server may keep after an attack over its baseline (threads, descriptors): the
/// handlers' connections to tiny_http (a thread and two descriptors each) and a little slack.
const SERVER_SLACK: (usize, usize) = (2 * SERVER_THREADS + 2, 4 * SERVER_THREADS + 8);

/// How long a process's threads and descriptors may take to come back after a failure.
const SETTLE_WITHIN: Duration = Duration::from_secs(15);

/// True when `now` is at most `slack` over `baseline` (threads, descriptors).
fn settled(baseline: (usize, usize), now: (usize, usize), slack: (usize, usize)) -> bool {
    now.0 <= baseline.0 + slack.0 && now.1 <= baseline.1 + slack.1
}

/// Waits up to [`SETTLE_WITHIN`] until `process`'s threads and descriptors are back within
/// `slack` of `baseline`; what they are then, and how long it took (`None`: not back).
pub fn wait_settled(
    process: &Proc,
    baseline: (usize, usize),
    slack: (usize, usize),
) -> ((usize, usize), Option<Duration>) {
    let started = Instant::now();
    let mut now = process.resources().unwrap_or_default();
    while !settled(baseline, now, slack) && started.elapsed() < SETTLE_WITHIN {
        std::thread::sleep(SAMPLE_EVERY);
        now = process.resources().unwrap_or_default();
    }
    (now, settled(baseline, now, slack).then(|| started.elapsed()))
}

/// The 99th percentile latency of the records sent within `window`.
fn p99(records: &[Record], window: (Duration, Duration)) -> Duration {
    let mut latencies: Vec<Duration> = records
        .iter()
        .filter(|r| r.sent >= window.0 && r.sent <= window.1)
        .map(|r| r.latency)
        .collect();
    latencies.sort();
    let rank = (latencies.len() * 99).div_ceil(100);
    latencies.get(rank.saturating_sub(1)).copied().unwrap_or_default()
}

/// How long the consumer is frozen to build a backlog before it is killed.
const BACKLOG_PAUSE: Duration = Duration::from_millis(500);
/// For every this many orders of the load's rate, one more is created and cancelled
/// (consumer-database-failure).
const CANCEL_SHARE: u32 = 10;
/// Freeze-and-look attempts before a process is killed whatever it is doing.
const CATCH_TRIES: u64 = 100;

/// Connections of an application inside a transaction.
const IN_TRANSACTION: &str = "\
    SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND application_name = $1 AND xact_start IS NOT NULL";

/// Outbox rows some transaction holds locked (claimed by a relay round).
const LOCKED_OUTBOX_ROWS: &str = "\
    SELECT (SELECT count(*) FROM outbox)
         - (SELECT count(*) FROM (SELECT 1 FROM outbox FOR UPDATE SKIP LOCKED) AS unlocked)";

fn run_case(
    case: Case,
    plan: &Plan,
    world: &World,
    services: &Services,
    result: &mut CaseResult,
) -> Result<()> {
    let db = world.fresh_db(case.slug(), services)?;
    let broker = world.fresh_broker(case.slug(), services)?;
    let launcher = Launcher::new(
        &world.out_dir,
        case.slug(),
        &db.url,
        &world.amqp_url,
        &broker.topology,
        services,
    )?;
    let addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut server = launcher.spawn(Kind::Server, "server", Some(addr))?;
    let mut consumer = launcher.spawn(Kind::Consumer, "consumer", None)?;
    result.logs.push(server.log_path().to_path_buf());
    result.logs.push(consumer.log_path().to_path_buf());
    server.wait_listening(addr)?;
    wait_consuming(&broker, &mut [&mut server, &mut consumer])?;

    let url = format!("http://{addr}");
    let load = Load::start(&url, plan.rate, plan.connections)?;
    // Orders created and cancelled 300 ms later beside the load: each aggregate's two events
    // are in flight together, through the cut.
    let cancels = match case {
        Case::ConsumerDatabaseFailure => Some(Cancels::start(&url, plan.rate / CANCEL_SHARE)?),
        _ => None,
    };
    pause(plan.warmup, &mut [&mut server, &mut consumer])?;
    println!(
        "  load running: {} accepted in {:.0} s",
        load.accepted_so_far(),
        load.elapsed().as_secs_f64()
    );
    let outbox_before = outbox_rows(&mut db.client()?)?;
    let from = load.elapsed();
    let mut injection = Injection {
        window: (from, from),
        outbox_before,
        outbox_peak: None,
        accepted_while_down: 0,
        outbox_after_kill: None,
        queued_while_dead: None,
        repair_took: Duration::ZERO,
        caught: None,
        hostile: None,
        poison: None,
        cut: None,
    };
    match case {
        Case::BrokerOutage => {
            let outage = services.stop(Which::RabbitMq)?;
            // Down for the whole outage from the moment stop_app returned (it takes seconds).
            let accepted = load.accepted_so_far();
            let peak = watch_outbox(&db, plan.outage);
            injection.outbox_peak = Some(peak);
            injection.accepted_while_down = load.accepted_so_far() - accepted;
            injection.repair_took = outage.end()?;
        }
        Case::DbRestart => {
            let outage = services.stop(Which::Postgres)?;
            std::thread::sleep(plan.outage);
            injection.repair_took = outage.end()?;
        }
        Case::KillServer => {
            // Killed while its relay holds claimed rows: they must go out through the next one.
            let mut client = db.client()?;
            let caught = kill_mid_work(&mut server, || {
                let locked = locked_outbox_rows(&mut client)?;
                Ok((locked > 0).then(|| format!("while its relay held {locked} outbox rows locked")))
            })?;
            println!(
                "  server killed (kill -9){}",
                caught.as_deref().map_or(String::new(), |c| format!(": {c}"))
            );
            injection.caught = caught;
            injection.outbox_after_kill = outbox_rows(&mut db.client()?).ok();
            std::thread::sleep(plan.dead_for);
            let repair = Instant::now();
            server = launcher.spawn(Kind::Server, "server-2", Some(addr))?;
            result.logs.push(server.log_path().to_path_buf());
            server.wait_listening(addr)?;
            injection.repair_took = repair.elapsed();
            println!("  new server listening");
        }
        Case::KillConsumer => {
            // A backlog first, so that it is busy; then killed inside a batch's transaction.
            build_backlog(&consumer)?;
            let mut client = db.client()?;
            let caught = kill_mid_work(&mut consumer, || {
                consumer_in_transaction(&mut client, &broker.topology.queue)
            })?;
            println!(
                "  consumer killed (kill -9){}",
                caught.as_deref().map_or(String::new(), |c| format!(": {c}"))
            );
            injection.caught = caught;
            std::thread::sleep(plan.dead_for);
            injection.queued_while_dead = broker.state().ok().map(|s| s.ready);
            let repair = Instant::now();
            consumer = launcher.spawn(Kind::Consumer, "consumer-2", None)?;
            result.logs.push(consumer.log_path().to_path_buf());
            wait_consuming(&broker, &mut [&mut consumer])?;
            injection.repair_took = repair.elapsed();
            println!("  new consumer consuming");
        }
        Case::HostileClients => {
            let baseline = server.resources().unwrap_or_default();
            let attack = Attack::start(addr);
            let mut peak = baseline;
            let until = Instant::now() + plan.outage;
            while Instant::now() < until {
                if let Some(now) = server.resources() {
                    peak = (peak.0.max(now.0), peak.1.max(now.1));
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
            let connections = attack
                .tally
                .connections
                .load(std::sync::atomic::Ordering::Relaxed);
            let refusals = attack.tally.refusals.load(std::sync::atomic::Ordering::Relaxed);
            attack.stop();
            let (after, back_within) = wait_settled(&server, baseline, SERVER_SLACK);
            println!(
                "  attack over: {connections} hostile connections, {refusals} refused; threads/descriptors \
                 {baseline:?} before, {peak:?} at peak, {after:?} after"
            );
            injection.hostile = Some(Hostile {
                baseline,
                peak,
                after,
                back_within,
                connections,
                refusals,
            });
        }
        Case::PoisonHeader => {
            let watched = &mut [&mut server, &mut consumer];
            injection.poison = Some(delivery::inject_poison(
                &world.amqp_url,
                &broker,
                plan.outage,
                watched,
            )?);
        }
        Case::ConsumerDatabaseFailure => {
            injection.cut = Some(delivery::cut_consumer_database(
                &db,
                &broker,
                &mut consumer,
                plan.outage,
            )?);
        }
    }
    injection.window.1 = load.elapsed();

    pause(plan.after, &mut [&mut server, &mut consumer])?;
    let records = load.stop();
    let tally = cancels.map(Cancels::stop).unwrap_or_default();
    let ids = accepted_ids(&records);
    println!(
        "  load stopped: {} POSTs, {} accepted{}; waiting for the drain (at most {} s)",
        records.len(),
        ids.len(),
        if tally.cancelled.is_empty() {
            String::new()
        } else {
            format!(", {} more created and cancelled", tally.cancelled.len())
        },
        plan.drain_deadline.as_secs()
    );
    let accepted = Accepted {
        completed: &ids,
        cancelled: &tally.cancelled,
    };
    let drain = wait_for_drain(&db, accepted, plan.drain_deadline)?;
    result.drained = drain.drained;
    result.drain_took = drain.took;
    let counts = drain.counts;

    // The processes that were not replaced must have lived through the failure.
    for (name, process) in [("server", &mut server), ("consumer", &mut consumer)] {
        let alive = process.check_alive();
        result.check(
            format!("the {name} is alive at the end (the same process, unless this case replaced it)"),
            alive.is_ok(),
            alive.err().map_or("still running".into(), |e| e.to_string()),
        );
    }
    if let Ok(state) = broker.state() {
        let poisoned = injection.poison.as_ref().map_or(0, |p| p.poisons.len());
        result.check(
            if poisoned == 0 {
                "nothing was dead-lettered".to_string()
            } else {
                format!("nothing but the {poisoned} poison deliveries was dead-lettered")
            },
            state.dead_lettered as usize == poisoned,
            format!(
                "{} in {}",
                state.dead_lettered,
                broker.topology.dead_letter_queue()
            ),
        );
    }
    let all = Summary::of(&records, None);
    let during = Summary::of(&records, Some(injection.window));
    result.hung = all.timed_out > 0;
    result.check(
        "every POST got an answer within the client's 10 s",
        all.timed_out == 0,
        format!("{} timed out of {}", all.timed_out, all.sent),
    );
    if counts.missing > 0 {
        result.notes.push(format!(
            "{} orders answered 201 are not in the database",
            counts.missing
        ));
    }
    result.counts = Some(counts.clone());

    match case {
        Case::BrokerOutage => {
            let peak = injection.outbox_peak.unwrap_or(0);
            result.check(
                "POST /orders kept answering 201 while RabbitMQ was down",
                during.created == during.sent && all.created == all.sent,
                format!(
                    "during the outage {} of {} answered 201; in all {} of {} (other: {})",
                    during.created,
                    during.sent,
                    all.created,
                    all.sent,
                    all.failures()
                ),
            );
            let accepted = injection.accepted_while_down;
            result.check(
                "the outbox grew while RabbitMQ was down",
                peak > injection.outbox_before && peak >= injection.outbox_before + accepted / 2,
                format!(
                    "{} rows before, peak {peak}, {accepted} orders accepted while it was watched",
                    injection.outbox_before
                ),
            );
            check_warnings(result, &server, &consumer)?;
            result.notes.insert(
                0,
                format!(
                    "all {} POSTs 201; outbox peaked at {peak} (from {}); RabbitMQ back in {:.1} s; \
                     drained {:.1} s after the load; {} redeliveries absorbed",
                    all.sent,
                    injection.outbox_before,
                    injection.repair_took.as_secs_f64(),
                    drain.took.as_secs_f64(),
                    counts.redelivered
                ),
            );
        }
        Case::DbRestart => {
            let non_201: usize = during.statuses.values().sum();
            let only_503 = during.statuses.keys().all(|&s| s == 503);
            result.check(
                "while Postgres was away, POSTs were answered 201 or 503 with a JSON error",
                only_503 && during.not_json == 0 && during.no_answer == 0,
                format!(
                    "{} sent: 201 x{}, {} (not JSON: {})",
                    during.sent,
                    during.created,
                    during.failures(),
                    during.not_json
                ),
            );
            let slowest = during.slowest_failure.unwrap_or_default();
            let quick = slowest <= SLOW_ANSWER && during.timed_out == 0;
            result.hung |= !quick;
            result.check(
                format!(
                    "every error answer within {:.0} s (the pool gives up after 2 s)",
                    SLOW_ANSWER.as_secs_f64()
                ),
                quick,
                format!("slowest non-201 answer {:.2} s", slowest.as_secs_f64()),
            );
            check_warnings(result, &server, &consumer)?;
            result.notes.insert(
                0,
                format!(
                    "during the outage: {} sent, 201 x{}, {non_201} errors ({}), slowest error {:.2} s; \
                     Postgres back in {:.1} s; drained {:.1} s after the load",
                    during.sent,
                    during.created,
                    during.failures(),
                    slowest.as_secs_f64(),
                    injection.repair_took.as_secs_f64(),
                    drain.took.as_secs_f64()
                ),
            );
        }
        Case::KillServer => {
            result.notes.insert(
                0,
                format!(
                    "killed {}; {} outbox rows left, {} POSTs failed while it was down ({}); \
                     new server listening in {:.1} s; drained {:.1} s after the load; {} redeliveries absorbed",
                    injection
                        .caught
                        .as_deref()
                        .unwrap_or("while its relay held no rows (never caught mid-round)"),
                    injection
                        .outbox_after_kill
                        .map_or("?".into(), |n| n.to_string()),
                    all.sent - all.created,
                    all.failures(),
                    injection.repair_took.as_secs_f64(),
                    drain.took.as_secs_f64(),
                    counts.redelivered
                ),
            );
            // Requests still in flight when the server died may get no answer: judge those
            // whose answer (or failure) came before the kill.
            let answered_before: Vec<Record> = records
                .iter()
                .filter(|r| r.sent + r.latency < from)
                .cloned()
                .collect();
            let before = Summary::of(&answered_before, None);
            result.check(
                "POSTs were answered 201 until the kill",
                before.created == before.sent,
                format!(
                    "{} of {} (other: {})",
                    before.created,
                    before.sent,
                    before.failures()
                ),
            );
        }
        Case::HostileClients => {
            if let Some(h) = &injection.hostile {
                let p99 = p99(&records, injection.window);
                result.check(
                    "POST /orders kept answering 201 during the attacks",
                    during.created == during.sent && during.sent > 0,
                    format!(
                        "{} of {} (other: {})",
                        during.created,
                        during.sent,
                        during.failures()
                    ),
                );
                result.check(
                    "the normal client's p99 during the attacks stayed under 1 s",
                    p99 <= Duration::from_secs(1),
                    format!(
                        "p99 {:.1} ms, slowest {:.1} ms",
                        p99.as_secs_f64() * 1e3,
                        during.slowest.unwrap_or_default().as_secs_f64() * 1e3
                    ),
                );
                result.check(
                    format!(
                        "the server's threads stayed under {} (bounded by HTTP_MAX_CONNECTIONS, not by the clients)",
                        thread_ceiling(h.baseline.0)
                    ),
                    h.peak.0 <= thread_ceiling(h.baseline.0),
                    format!("peak {} threads, {} descriptors", h.peak.0, h.peak.1),
                );
                result.check(
                    "threads and descriptors came back within 15 s of the attack",
                    h.back_within.is_some(),
                    format!("{:?} before, {:?} after", h.baseline, h.after),
                );
                result.notes.insert(
                    0,
                    format!(
                        "{} hostile connections ({} refused with 4xx/5xx); normal POSTs during: {} of {} 201, \
                         p99 {:.1} ms; server threads/descriptors {:?} before, {:?} peak, {:?} after ({})",
                        h.connections,
                        h.refusals,
                        during.created,
                        during.sent,
                        p99.as_secs_f64() * 1e3,
                        h.baseline,
                        h.peak,
                        h.after,
                        h.back_within
                            .map_or("not back in 15 s".into(), |d| format!("back in {:.1} s", d.as_secs_f64()))
                    ),
                );
            }
        }
        Case::KillConsumer => {
            result.check(
                "POST /orders kept answering 201",
                all.created == all.sent,
                format!("{} of {} (other: {})", all.created, all.sent, all.failures()),
            );
            result.notes.insert(
                0,
                format!(
                    "killed {}; {} messages queued while it was dead; {} redeliveries absorbed by the \
                     dedupe; drained {:.1} s after the load",
                    injection
                        .caught
                        .as_deref()
                        .unwrap_or("between batches (never caught inside a transaction)"),
                    injection.queued_while_dead.map_or("?".into(), |n| n.to_string()),
                    counts.redelivered,
                    drain.took.as_secs_f64()
                ),
            );
        }
        Case::PoisonHeader => {
            if let Some(seen) = &injection.poison {
                delivery::check_poison(
                    result,
                    seen,
                    &world.amqp_url,
                    &db,
                    &broker,
                    &records,
                    injection.window.0,
                )?;
            }
        }
        Case::ConsumerDatabaseFailure => {
            if let Some(seen) = &injection.cut {
                let outcome = CutOutcome {
                    seen,
                    counts: &counts,
                    tally: &tally,
                    during: &during,
                };
                delivery::check_cut(result, &outcome, &db, &broker, &server, &consumer)?;
            }
        }
    }
    drop(records);
    Ok(())
}

/// Freezes the consumer for [`BACKLOG_PAUSE`] so that deliveries pile up, then lets it go: its
/// next batches are full.
pub fn build_backlog(consumer: &Proc) -> Result<()> {
    consumer.signal("STOP")?;
    std::thread::sleep(BACKLOG_PAUSE);
    consumer.signal("CONT")
}

/// What the consumer is in the middle of, for [`freeze_mid_work`]: a batch's transaction
/// (its connection inside one, seen through `client`), with the unacked deliveries of `queue`
/// when `rabbitmqctl` can count them; `None` between batches.
pub fn consumer_in_transaction(client: &mut postgres::Client, queue: &str) -> Result<Option<String>> {
    let open = client
        .query_one(IN_TRANSACTION, &[&application_name(Kind::Consumer)])
        .map_err(|e| Error::db("cannot read pg_stat_activity", e))?;
    if open.get::<_, i64>(0) == 0 {
        return Ok(None);
    }
    // Frozen, so the count holds still while rabbitmqctl takes its second.
    Ok(Some(match unacked_deliveries(queue) {
        Some(n) => format!("inside a batch's transaction, holding {n} unacked deliveries"),
        None => "inside a batch's transaction".to_string(),
    }))
}

/// Waits until the case's queue has a consumer, checking that `processes` live.
fn wait_consuming(broker: &ChaosBroker, processes: &mut [&mut Proc]) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        for process in processes.iter_mut() {
            process.check_alive()?;
        }
        if broker.state().is_ok_and(|s| s.consumers >= 1) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Other(format!(
                "queue {} has no consumer after {} s",
                broker.topology.queue,
                READY_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sleeps `duration`, checking every 250 ms that `processes` live.
fn pause(duration: Duration, processes: &mut [&mut Proc]) -> Result<()> {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        for process in processes.iter_mut() {
            process.check_alive()?;
        }
        std::thread::sleep(SAMPLE_EVERY.min(until.saturating_duration_since(Instant::now())));
    }
    Ok(())
}

/// Freezes `process` (SIGSTOP) at varying moments until `busy` says what it is in the middle
/// of, then kills it (SIGKILL); if it is never caught busy, kills it anyway. Returns what it
/// was caught doing.
fn kill_mid_work(process: &mut Proc, busy: impl FnMut() -> Result<Option<String>>) -> Result<Option<String>> {
    let caught = freeze_mid_work(process, busy)?;
    process.kill9()?;
    Ok(caught)
}

/// Freezes `process` (SIGSTOP) at varying moments until `busy` says what it is in the middle
/// of, and leaves it frozen there (the caller sends `CONT` or kills it); returns what it was
/// caught doing, or `None`, with the process running, when it never was.
pub fn freeze_mid_work(
    process: &mut Proc,
    mut busy: impl FnMut() -> Result<Option<String>>,
) -> Result<Option<String>> {
    for attempt in 0..CATCH_TRIES {
        std::thread::sleep(Duration::from_millis(1 + attempt * 7 % 23));
        process.signal("STOP")?;
        // A statement already sent finishes meanwhile; what is left open stays open.
        std::thread::sleep(Duration::from_millis(20));
        match busy() {
            Ok(Some(doing)) => return Ok(Some(doing)),
            Ok(None) => process.signal("CONT")?,
            Err(e) => {
                process.signal("CONT")?;
                return Err(e);
            }
        }
    }
    Ok(None)
}

fn locked_outbox_rows(client: &mut postgres::Client) -> Result<i64> {
    client
        .query_one(LOCKED_OUTBOX_ROWS, &[])
        .map(|row| row.get(0))
        .map_err(|e| Error::db("cannot count the locked outbox rows", e))
}

/// Samples the outbox for `duration`; returns the most rows seen.
fn watch_outbox(db: &ChaosDb, duration: Duration) -> usize {
    let until = Instant::now() + duration;
    let mut client = db.client().ok();
    let mut peak = 0;
    while Instant::now() < until {
        if let Some(rows) = client.as_mut().and_then(|c| outbox_rows(c).ok()) {
            peak = peak.max(rows);
        }
        std::thread::sleep(SAMPLE_EVERY.min(until.saturating_duration_since(Instant::now())));
    }
    peak
}

/// Checks that relay workers and the consumer logged their trouble once per state change.
pub fn check_warnings(result: &mut CaseResult, server: &Proc, consumer: &Proc) -> Result<()> {
    let mut per_worker = warnings_per_worker(server.log_path(), "server")?;
    for (worker, n) in warnings_per_worker(consumer.log_path(), "consumer")? {
        *per_worker.entry(worker).or_default() += n;
    }
    let worst = per_worker.values().copied().max().unwrap_or(0);
    let listed: Vec<String> = per_worker.iter().map(|(w, n)| format!("{w} {n}")).collect();
    result.check(
        format!("reconnect warnings once per state change (at most {MAX_WARNINGS_PER_WORKER} per worker)"),
        worst <= MAX_WARNINGS_PER_WORKER,
        if listed.is_empty() {
            "no reconnect warnings".into()
        } else {
            listed.join(", ")
        },
    );
    let other = other_log_lines(server.log_path())?;
    if !other.is_empty() {
        let listed: Vec<String> = other.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        result
            .notes
            .push(format!("other server log lines: {}", listed.join(", ")));
    }
    Ok(())
}

/// WARN/ERROR lines of relay workers, the relay's listener, the consumer and the process's
/// connection pool (`<process> pool`), by worker.
fn warnings_per_worker(log: &Path, process: &str) -> Result<BTreeMap<String, usize>> {
    let text = read_log(log)?;
    let mut counts = BTreeMap::new();
    for line in text.lines().filter(|l| is_warning(l)) {
        if let Some(worker) = worker_of(line) {
            let worker = if worker == "pool" {
                format!("{process} pool")
            } else {
                worker
            };
            *counts.entry(worker).or_default() += 1;
        }
    }
    Ok(counts)
}

/// WARN/ERROR lines that are not a worker's, by log target (e.g. `txoutbox_service::http`, `r2d2`).
fn other_log_lines(log: &Path) -> Result<BTreeMap<String, usize>> {
    let text = read_log(log)?;
    let mut counts = BTreeMap::new();
    for line in text.lines().filter(|l| is_warning(l) && worker_of(l).is_none()) {
        *counts.entry(log_target(line)).or_default() += 1;
    }
    Ok(counts)
}

fn read_log(path: &Path) -> Result<String> {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .map_err(|e| Error::Other(format!("cannot read {}: {e}", path.display())))
}

/// env_logger's `[time LEVEL target] message`.
fn is_warning(line: &str) -> bool {
    line.starts_with('[') && (line.contains(" WARN ") || line.contains(" ERROR "))
}

/// `relay[3]`, `relay-listen`, `relay-schedule`, `consumer` or `pool` (r2d2 itself, or txoutbox's `db:` lines
/// about the pool) for a line one of them logged.
fn worker_of(line: &str) -> Option<String> {
    let message = line.split_once("] ").map_or(line, |(_, m)| m);
    if message.starts_with("db:") || log_target(line).ends_with(" r2d2") {
        return Some("pool".into());
    }
    if let Some(rest) = message.strip_prefix("relay[") {
        let index = rest.split(']').next()?;
        return Some(format!("relay[{index}]"));
    }
    for name in ["relay-listen", "relay-schedule", "consumer"] {
        if message.starts_with(&format!("{name}:")) {
            return Some(name.to_string());
        }
    }
    None
}

/// The level and target of an env_logger line: `WARN txoutbox_service::http`.
fn log_target(line: &str) -> String {
    let head = line.trim_start_matches('[').split(']').next().unwrap_or_default();
    let mut fields = head.split_whitespace().skip(1);
    match (fields.next(), fields.next()) {
        (Some(level), Some(target)) => format!("{level} {target}"),
        (Some(level), None) => level.to_string(),
        _ => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_attributed_to_their_worker() {
        let relay = "[2026-11-26T16:00:00Z WARN  txoutbox::relay] relay[3]: cannot publish; reconnecting";
        let listen = "[2026-11-26T16:00:00Z WARN  txoutbox::relay] relay-listen: LISTEN connection failed";
        let consumer = "[2026-11-26T16:00:00Z WARN  txoutbox::consumer] consumer: lost; reconnecting";
        let http = "[2026-11-26T16:00:00Z WARN  txoutbox_service::http] http: cannot create the order: x";
        let pool = "[2026-11-26T16:00:00Z ERROR r2d2] connection refused";
        assert!([relay, listen, consumer, http, pool]
            .iter()
            .all(|l| is_warning(l)));
        assert!(!is_warning("txoutbox-server listening on http://127.0.0.1:1"));
        assert_eq!(worker_of(relay).as_deref(), Some("relay[3]"));
        assert_eq!(worker_of(listen).as_deref(), Some("relay-listen"));
        assert_eq!(worker_of(consumer).as_deref(), Some("consumer"));
        assert_eq!(worker_of(http), None);
        assert_eq!(worker_of(pool).as_deref(), Some("pool"));
        let db = "[2026-11-26T16:00:00Z WARN  txoutbox::db] db: a pooled database connection failed";
        assert_eq!(worker_of(db).as_deref(), Some("pool"));
        assert_eq!(log_target(http), "WARN txoutbox_service::http");
        assert_eq!(log_target(pool), "ERROR r2d2");
        assert!(!is_warning(
            "[2026-11-26T16:00:00Z INFO  txoutbox::db] db: the pool opens connections again"
        ));
    }
}
