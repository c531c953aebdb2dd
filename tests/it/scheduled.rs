//! Scheduled events (`NewEvent::not_before`): published no earlier than their time and soon
//! after it, without the relay polling hot; in aggregate order they join their aggregate's
//! order when due and hold back none of its other events; many waiting events cost the claims
//! nothing.

use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use txoutbox::scheduler::{release_due, scheduled_summary};
use txoutbox::{admin, relay, NewEvent, RelayConfig, RelayOrdering};
use txoutbox_testkit::{wait_until, TestBroker, TestDb};

const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(300);

fn relay_config(ordering: RelayOrdering) -> RelayConfig {
    RelayConfig {
        workers: 2,
        ordering,
        poll_interval: POLL,
        ..RelayConfig::default()
    }
}

fn step(aggregate: &str, n: i64) -> NewEvent {
    NewEvent::new(
        "order",
        aggregate,
        "Step",
        json!({ "aggregate": aggregate, "n": n }),
    )
}

fn commit(t: &TestDb, events: &[NewEvent]) {
    let mut client = t.client();
    let mut tx = client.transaction().unwrap();
    for event in events {
        t.db.outbox().enqueue_ordered(&mut tx, event).unwrap();
    }
    tx.commit().unwrap();
}

/// The `n` of every message in the queue, in queue order.
fn queued_steps(broker: &TestBroker) -> Vec<i64> {
    broker
        .drain(&broker.topology.queue)
        .iter()
        .map(|m| {
            serde_json::from_slice::<Value>(&m.body).unwrap()["n"]
                .as_i64()
                .unwrap()
        })
        .collect()
}

/// Transactions committed on the test's database so far (Postgres' own count).
fn commits(t: &TestDb) -> i64 {
    t.count("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
}

#[test]
fn a_scheduled_event_is_published_no_earlier_than_its_time_and_soon_after() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        relay_config(RelayOrdering::None),
    )
    .unwrap();
    let due = SystemTime::now() + Duration::from_millis(1500);
    commit(&t, &[step("a", 1).not_before(due)]);
    let summary = admin::outbox_summary(&mut t.client(), t.db.schema()).unwrap();
    assert_eq!(
        (summary.scheduled, summary.backlog),
        (1, 0),
        "it waits outside the outbox"
    );
    assert!(
        summary.next_due_secs.is_some_and(|s| s > 0.5 && s <= 1.5),
        "{:?}",
        summary.next_due_secs
    );

    // Idle meanwhile: the relay sleeps until the event is due instead of polling for it.
    let before = commits(&t);
    std::thread::sleep(Duration::from_millis(900));
    let idle_commits = commits(&t) - before;
    wait_until("the scheduled event is published", WAIT, || {
        relay.stats().published() == 1
    });
    let published_at = SystemTime::now();
    relay.stop();
    assert!(published_at >= due, "published before its time");
    let late = published_at.duration_since(due).unwrap_or_default();
    assert!(
        late < POLL + Duration::from_millis(700),
        "published {late:?} after its time; the poll interval is {POLL:?}"
    );
    // Two workers and the scheduler, each looking at most once per poll interval (plus the
    // test's own statements): a hot loop would commit hundreds of times.
    assert!(
        idle_commits < 40,
        "{idle_commits} transactions in 0.9 s of waiting"
    );
    assert_eq!(queued_steps(&broker), vec![1]);
    assert_eq!(
        scheduled_summary(&mut t.client(), t.db.schema()).unwrap().waiting,
        0
    );
}

#[test]
fn in_aggregate_order_a_scheduled_event_holds_back_nothing_and_joins_its_aggregate_when_due() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    // 1 now, 2 scheduled in 1.5 s, 3 now: 3 does not wait for 2.
    let due = SystemTime::now() + Duration::from_millis(1500);
    commit(&t, &[step("a", 1), step("a", 2).not_before(due), step("a", 3)]);
    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        relay_config(RelayOrdering::Aggregate),
    )
    .unwrap();
    wait_until("the two unscheduled events are published", WAIT, || {
        relay.stats().published() == 2
    });
    assert!(SystemTime::now() < due, "they did not wait for the scheduled one");
    wait_until("the scheduled event is published", WAIT, || {
        relay.stats().published() == 3
    });
    // 4, written after 2 came due, comes after it.
    commit(&t, &[step("a", 4)]);
    wait_until("the last event is published", WAIT, || {
        relay.stats().published() == 4
    });
    relay.stop();
    assert_eq!(queued_steps(&broker), vec![1, 3, 2, 4]);
}

#[test]
fn many_events_scheduled_for_later_do_not_slow_the_claims_and_are_counted() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let tomorrow = SystemTime::now() + Duration::from_secs(24 * 3600);
    let later: Vec<NewEvent> = (0..20_000)
        .map(|n| step(&format!("later-{n}"), n).not_before(tomorrow))
        .collect();
    let now: Vec<NewEvent> = (0..2_000).map(|n| step(&format!("now-{n}"), n)).collect();
    let mut client = t.client();
    let mut tx = client.transaction().unwrap();
    assert_eq!(t.db.outbox().enqueue_many(&mut tx, &later).unwrap(), 20_000);
    assert_eq!(t.db.outbox().enqueue_many_ordered(&mut tx, &now).unwrap(), 2_000);
    tx.commit().unwrap();

    let started = Instant::now();
    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        relay_config(RelayOrdering::Aggregate),
    )
    .unwrap();
    wait_until("the 2,000 unscheduled events are published", WAIT, || {
        relay.stats().published() == 2_000
    });
    eprintln!(
        "2,000 events beside 20,000 scheduled for tomorrow drained in {:?}",
        started.elapsed()
    );
    relay.stop();
    let summary = admin::outbox_summary(&mut client, t.db.schema()).unwrap();
    assert_eq!((summary.backlog, summary.scheduled), (0, 20_000));
    assert!(summary.next_due_secs.is_some_and(|s| s > 23.0 * 3600.0));
}

#[test]
fn a_due_event_whose_message_id_is_already_in_the_outbox_is_dropped_not_stuck() {
    let t = TestDb::new();
    let event = step("dup", 1);
    let past = SystemTime::now() - Duration::from_secs(1);
    commit(
        &t,
        &[
            event.clone(),
            event.clone().not_before(past),
            step("dup", 2).not_before(past),
        ],
    );
    let mut client = t.client();
    assert_eq!(release_due(&mut client, t.db.schema()).unwrap(), 1);
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 2);
    assert_eq!(t.count("SELECT count(*) FROM outbox_scheduled"), 0);
}

#[test]
fn a_scheduled_event_is_refused_where_it_would_bypass_the_schedule() {
    let t = TestDb::new();
    let event = step("x", 1).delayed_by(Duration::from_secs(60));
    let mut client = t.client();
    let statement = t.db.outbox().insert_sql(false).to_string();
    let error = txoutbox::outbox::insert_event(&mut client, statement.as_str(), &event).unwrap_err();
    assert!(error.to_string().contains("Outbox::enqueue"), "{error}");
    let before_1970 = step("x", 1).not_before(SystemTime::UNIX_EPOCH - Duration::from_secs(1));
    let error = t.db.outbox().enqueue(&mut client, &before_1970).unwrap_err();
    assert!(error.to_string().contains("before 1970"), "{error}");
    assert_eq!(t.count("SELECT count(*) FROM outbox_scheduled"), 0);
}
