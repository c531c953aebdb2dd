//! Adversarial cases found in review of the ordered relay's held marks and of scheduled events.

use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use txoutbox::scheduler::release_due;
use txoutbox::{relay, NewEvent, RelayConfig, RelayOrdering};
use txoutbox_testkit::{wait_until, TestBroker, TestDb};

fn event(aggregate: &str, n: i64) -> NewEvent {
    NewEvent::new(
        "order",
        aggregate,
        "Step",
        json!({ "aggregate": aggregate, "n": n }),
    )
}

/// Failed rows are the first rows of their aggregates and are never held, so they stay in the
/// ordered claim's window of the oldest unheld rows. When they fill it (window = batch_size *
/// (workers + 3)), every other event waits for the once-per-poll-interval heads pass: one batch
/// per poll interval.
#[test]
fn failed_heads_filling_the_ordered_window_do_not_throttle_the_relay() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let config = RelayConfig {
        workers: 1,
        batch_size: 10,
        ordering: RelayOrdering::Aggregate,
        poll_interval: Duration::from_secs(5),
        ..RelayConfig::default()
    };
    let window = config.batch_size * (config.workers as i64 + 3);
    let mut client = t.client();
    let failed: Vec<NewEvent> = (0..window + 10)
        .map(|n| event(&format!("failed-{n}"), 1))
        .collect();
    let mut tx = client.transaction().unwrap();
    t.db.outbox().enqueue_many_ordered(&mut tx, &failed).unwrap();
    tx.commit().unwrap();
    // What the relay leaves after max_attempts refusals (e.g. an exchange that does not exist).
    client
        .execute(
            "UPDATE outbox SET failed_at = now(), attempts = 10, last_error = 'refused'",
            &[],
        )
        .unwrap();
    let others: Vec<NewEvent> = (0..200).map(|n| event(&format!("other-{n}"), 1)).collect();
    let mut tx = client.transaction().unwrap();
    t.db.outbox().enqueue_many_ordered(&mut tx, &others).unwrap();
    tx.commit().unwrap();
    let started = Instant::now();
    let relay = relay::start(t.db.clone(), &broker.url, broker.topology.clone(), config).unwrap();
    let left = || t.count("SELECT count(*) FROM outbox WHERE failed_at IS NULL");
    let deadline = Instant::now() + Duration::from_secs(15);
    while left() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let remaining = left();
    relay.stop();
    assert_eq!(
        remaining,
        0,
        "{remaining} of 200 healthy events still unpublished after {:?}: the failed heads fill \
         the claim window and only the heads pass (one batch per poll interval) finds the rest",
        started.elapsed()
    );
}

/// Two relays move due scheduled events at once: the one blocked on an aggregate's lock has
/// the earlier event of aggregate `x`, the other moves a later event of `x` meanwhile. The
/// outbox ids of `x` must still follow not_before order.
#[test]
fn scheduled_events_of_one_aggregate_keep_not_before_order_across_two_movers() {
    let t = TestDb::new();
    let outbox = t.db.outbox();
    // An application transaction holds aggregate `a`'s lock (it sorts before `x`).
    let mut holder = t.client();
    let mut app = holder.transaction().unwrap();
    outbox.enqueue_ordered(&mut app, &event("a", 0)).unwrap();
    let now = SystemTime::now();
    let mut client = t.client();
    let first = event("x", 1).not_before(now - Duration::from_secs(20));
    outbox
        .enqueue(
            &mut client,
            &event("a", 1).not_before(now - Duration::from_secs(20)),
        )
        .unwrap();
    outbox.enqueue(&mut client, &first).unwrap();
    let db = t.db.clone();
    let mover_a = std::thread::spawn(move || {
        let mut client = db.dedicated().unwrap();
        release_due(&mut client, db.schema()).unwrap()
    });
    wait_until(
        "the first mover waits for aggregate a's lock",
        Duration::from_secs(10),
        || t.count("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted") == 1,
    );
    let second = event("x", 2).not_before(now - Duration::from_secs(10));
    outbox.enqueue(&mut client, &second).unwrap();
    let moved_b = release_due(&mut client, t.db.schema()).unwrap();
    app.rollback().unwrap();
    let moved_a = mover_a.join().unwrap();
    let moved_after = release_due(&mut client, t.db.schema()).unwrap();
    assert_eq!(moved_a + moved_b + moved_after, 3, "every due event is moved");
    let order: Vec<i64> = client
        .query(
            "SELECT (payload->>'n')::bigint FROM outbox WHERE aggregate_id = 'x' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        order,
        vec![1, 2],
        "x's event due first must get the lower outbox id"
    );
}

/// enqueue_many promises all of the events or none; on a client outside a transaction the
/// split into outbox and outbox_scheduled statements must not commit the first alone.
#[test]
fn enqueue_many_with_scheduled_events_is_all_or_nothing_outside_a_transaction() {
    let t = TestDb::new();
    let outbox = t.db.outbox();
    let mut client = t.client();
    let later = event("s", 1).delayed_by(Duration::from_secs(3600));
    outbox.enqueue(&mut client, &later).unwrap();
    // The same message id again: the scheduled part fails on outbox_scheduled's unique key.
    let batch = vec![event("n", 1), later.clone()];
    assert!(outbox.enqueue_many(&mut client, &batch).is_err());
    assert_eq!(
        t.count("SELECT count(*) FROM outbox"),
        0,
        "enqueue_many failed but its unscheduled event was committed"
    );
}
