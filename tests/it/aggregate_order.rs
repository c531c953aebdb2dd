//! Per-aggregate order on the consumer side: retries, a second consumer and a dead-letter replay
//! never let an older event of an aggregate be applied after a newer one.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postgres::Transaction;
use serde_json::json;
use txoutbox::{
    admin, consumer, relay, ConsumerConfig, HandlerError, Message, NewEvent, RelayConfig, RelayOrdering,
};
use txoutbox_testkit::{quick_relay, wait_until, TestBroker, TestDb};

const WAIT: Duration = Duration::from_secs(60);

fn consumer_config(batch_size: usize) -> ConsumerConfig {
    ConsumerConfig {
        prefetch: 50,
        batch_size,
        max_retries: 5,
        retry_delay: Duration::from_millis(20),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        ..ConsumerConfig::default()
    }
}

fn ordered_relay() -> RelayConfig {
    RelayConfig {
        ordering: RelayOrdering::Aggregate,
        ..quick_relay(2)
    }
}

/// An effects table that keeps the order effects were applied in.
fn with_effects_table(t: &TestDb) {
    t.client()
        .batch_execute(
            "CREATE TABLE effects (seq bigserial PRIMARY KEY, aggregate text NOT NULL, n int NOT NULL)",
        )
        .unwrap();
}

fn record(tx: &mut Transaction<'_>, message: &Message) -> Result<(), HandlerError> {
    let n = message.payload["n"].as_i64().unwrap_or(-1) as i32;
    let aggregate = message.aggregate_id.clone().unwrap_or_default();
    tx.execute(
        "INSERT INTO effects (aggregate, n) VALUES ($1, $2)",
        &[&aggregate, &n],
    )?;
    Ok(())
}

/// The `n` of each applied effect of `aggregate`, in the order they were applied.
fn applied_order(t: &TestDb, aggregate: &str) -> Vec<i32> {
    t.client()
        .query(
            "SELECT n FROM effects WHERE aggregate = $1 ORDER BY seq",
            &[&aggregate],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Commits `events_per_aggregate` events (n = 1, 2, ...) for each aggregate, in aggregate order.
fn enqueue_ordered(t: &TestDb, aggregates: &[&str], events_per_aggregate: i32) {
    let mut client = t.client();
    for n in 1..=events_per_aggregate {
        for aggregate in aggregates {
            let mut tx = client.transaction().unwrap();
            let event = NewEvent::new("order", *aggregate, "Step", json!({ "n": n }));
            t.db.outbox().enqueue_ordered(&mut tx, &event).unwrap();
            tx.commit().unwrap();
        }
    }
}

/// Publishes the enqueued events in aggregate order and waits until all `count` are queued.
fn publish_all(t: &TestDb, broker: &TestBroker, count: u32) {
    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        ordered_relay(),
    )
    .unwrap();
    wait_until("every event is queued", WAIT, || broker.ready_main() == count);
    relay.stop();
}

/// Fails the first delivery of each aggregate's first event once, transiently; applies the rest.
fn failing_once_on_the_first_event() -> impl FnMut(&mut Transaction<'_>, &Message) -> Result<(), HandlerError>
{
    let mut failed: HashSet<String> = HashSet::new();
    move |tx, message| {
        let aggregate = message.aggregate_id.clone().unwrap_or_default();
        if message.payload["n"] == 1 && failed.insert(aggregate) {
            return Err(HandlerError::transient("the first try fails"));
        }
        record(tx, message)
    }
}

fn a_transient_failure_keeps_aggregate_order(batch_size: usize) {
    let t = TestDb::new();
    with_effects_table(&t);
    let broker = TestBroker::new();
    let aggregates = ["a", "b", "c"];
    enqueue_ordered(&t, &aggregates, 3);
    publish_all(&t, &broker, 9);

    let handle = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        consumer_config(batch_size),
        failing_once_on_the_first_event(),
    )
    .unwrap();
    wait_until("all nine events are applied", WAIT, || {
        handle.stats().applied() == 9
    });
    let failed = handle.stats().failed();
    handle.stop();
    assert!(failed >= 1, "a first event failed and was retried");
    for aggregate in aggregates {
        assert_eq!(
            applied_order(&t, aggregate),
            vec![1, 2, 3],
            "aggregate {aggregate}: the retried first event is applied before the later ones"
        );
    }
    assert_eq!(broker.ready(&broker.topology.dead_letter_queue()), 0);
}

#[test]
fn a_transient_failure_in_a_batch_does_not_let_later_events_of_its_aggregate_go_first() {
    a_transient_failure_keeps_aggregate_order(10);
}

#[test]
fn a_transient_failure_does_not_let_prefetched_events_of_its_aggregate_go_first() {
    a_transient_failure_keeps_aggregate_order(1);
}

#[test]
fn a_second_consumer_of_the_queue_stands_by_until_the_first_stops() {
    let t = TestDb::new();
    with_effects_table(&t);
    let broker = TestBroker::new();
    let first = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        consumer_config(10),
        record,
    )
    .unwrap();
    enqueue_ordered(&t, &["warm-up"], 1);
    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        ordered_relay(),
    )
    .unwrap();
    wait_until("the first consumer is active", WAIT, || {
        first.stats().applied() == 1
    });
    let second = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        consumer_config(10),
        record,
    )
    .unwrap();
    // Give the second consumer time to register (it would take deliveries from here on).
    wait_until("the second consumer is registered", WAIT, || {
        broker.consumers_of_main() == 2
    });
    enqueue_ordered(&t, &["a", "b", "c", "d"], 5);
    wait_until("the first consumer applied all 21", WAIT, || {
        first.stats().applied() == 21
    });
    assert_eq!(second.stats().applied(), 0, "the standby consumer took nothing");

    first.stop();
    enqueue_ordered(&t, &["e", "f"], 5);
    wait_until("the standby applies the new events", WAIT, || {
        second.stats().applied() == 10
    });
    relay.stop();
    second.stop();
    assert_eq!(t.count("SELECT count(*) FROM effects"), 31);
}

#[test]
fn a_replayed_dead_letter_is_not_applied_over_a_later_event_of_its_aggregate() {
    let t = TestDb::new();
    with_effects_table(&t);
    let broker = TestBroker::new();
    enqueue_ordered(&t, &["a"], 2);
    // A lone event of another aggregate type with the same id, published earlier: it is not
    // superseded by aggregate a's events.
    {
        let mut client = t.client();
        let mut tx = client.transaction().unwrap();
        let event = NewEvent::new("customer", "a", "Step", json!({ "n": 10 }));
        t.db.outbox().enqueue_ordered(&mut tx, &event).unwrap();
        tx.commit().unwrap();
    }
    publish_all(&t, &broker, 3);

    // The first event fails for good and is dead-lettered; the second is applied.
    let rejecting = Arc::new(Mutex::new(true));
    let handler = {
        let rejecting = rejecting.clone();
        move |tx: &mut Transaction<'_>, message: &Message| {
            if message.payload["n"] == 1 && *rejecting.lock().unwrap() {
                return Err(HandlerError::permanent("not yet"));
            }
            record(tx, message)
        }
    };
    let handle = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        consumer_config(10),
        handler,
    )
    .unwrap();
    let dlq = broker.topology.dead_letter_queue();
    wait_until("n=1 is dead-lettered and the others applied", WAIT, || {
        broker.ready(&dlq) == 1 && handle.stats().applied() == 2
    });

    // The operator fixes the handler and replays: the old event must not land after n=2.
    *rejecting.lock().unwrap() = false;
    assert_eq!(
        admin::replay_dead_letters(&broker.url, &broker.topology).unwrap(),
        1
    );
    wait_until("the replayed event is dead-lettered again", WAIT, || {
        handle.stats().rejected() == 2 && broker.ready(&dlq) == 1
    });
    let applied = handle.stats().applied();
    handle.stop();
    assert_eq!(applied, 2, "the replayed event had no effect");
    assert_eq!(applied_order(&t, "a"), vec![10, 2]);
    let reasons = broker.dead_letter_reasons();
    assert_eq!(reasons.len(), 1);
    assert!(
        reasons[0].contains("superseded") && reasons[0].contains("order/a"),
        "{reasons:?}"
    );
    assert_eq!(
        t.count("SELECT count(*) FROM processed_messages"),
        2,
        "the superseded event is not recorded as processed"
    );
}
