//! The ordered relay with one hot aggregate: 5,000 events of one aggregate, written first, beside
//! 1,000 aggregates of 5 events. Only the hot aggregate's first event may be in flight, but the
//! rows behind it must not crowd the other aggregates out of the claim.
//!
//! The relay polls every 5 s here, so a relay that finds the other aggregates only in its
//! once-per-poll-interval pass over every aggregate's head (as it once did) drains them at one
//! batch per 5 s and misses the deadlines by a wide margin.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use txoutbox::{relay, NewEvent, RelayConfig, RelayOrdering};
use txoutbox_testkit::{wait_until, TestBroker, TestDb};

const WAIT: Duration = Duration::from_secs(30);
const HOT_EVENTS: i64 = 5_000;
const OTHER_AGGREGATES: i64 = 1_000;
const EVENTS_PER_OTHER: i64 = 5;
const OTHER_EVENTS: i64 = OTHER_AGGREGATES * EVENTS_PER_OTHER;

fn relay_config(ordering: RelayOrdering) -> RelayConfig {
    RelayConfig {
        workers: 2,
        batch_size: 200,
        ordering,
        poll_interval: Duration::from_secs(5),
        ..RelayConfig::default()
    }
}

fn event(aggregate: &str, seq: i64) -> NewEvent {
    NewEvent::new(
        "order",
        aggregate,
        "Step",
        json!({ "aggregate": aggregate, "seq": seq }),
    )
}

/// Commits the hot aggregate's events, then the others' round by round (so each round of the
/// others sits behind the previous one in the outbox).
fn enqueue_hot_and_others(t: &TestDb) {
    let mut client = t.client();
    let outbox = t.db.outbox();
    let hot: Vec<NewEvent> = (1..=HOT_EVENTS).map(|seq| event("hot", seq)).collect();
    let mut tx = client.transaction().unwrap();
    outbox.enqueue_many_ordered(&mut tx, &hot).unwrap();
    tx.commit().unwrap();
    for seq in 1..=EVENTS_PER_OTHER {
        let round: Vec<NewEvent> = (0..OTHER_AGGREGATES)
            .map(|n| event(&format!("other-{n}"), seq))
            .collect();
        let mut tx = client.transaction().unwrap();
        outbox.enqueue_many_ordered(&mut tx, &round).unwrap();
        tx.commit().unwrap();
    }
}

fn others_left(t: &TestDb) -> i64 {
    t.count("SELECT count(*) FROM outbox WHERE aggregate_id <> 'hot'")
}

fn hot_left(t: &TestDb) -> i64 {
    t.count("SELECT count(*) FROM outbox WHERE aggregate_id = 'hot'")
}

/// Asserts that every aggregate's events in the queue came as 1, 2, 3, ... and returns how many
/// arrived per aggregate.
fn assert_in_order(broker: &TestBroker) -> BTreeMap<String, i64> {
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for message in broker.drain(&broker.topology.queue) {
        let body: Value = serde_json::from_slice(&message.body).expect("JSON body");
        let aggregate = body["aggregate"].as_str().expect("aggregate").to_string();
        let seq = body["seq"].as_i64().expect("seq");
        let previous = last.insert(aggregate.clone(), seq).unwrap_or(0);
        assert_eq!(
            seq,
            previous + 1,
            "{aggregate}: event {seq} came after {previous}"
        );
    }
    last
}

/// Starts a relay on the enqueued events and returns how long the others took to drain and how
/// many hot events were still in the outbox then.
fn drain_others(
    t: &TestDb,
    broker: &TestBroker,
    ordering: RelayOrdering,
    deadline: Duration,
) -> (Duration, i64) {
    let started = Instant::now();
    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        relay_config(ordering),
    )
    .unwrap();
    wait_until("the other aggregates' events are published", deadline, || {
        others_left(t) == 0
    });
    let took = started.elapsed();
    let hot = hot_left(t);
    relay.stop();
    (took, hot)
}

fn per_second(events: i64, took: Duration) -> f64 {
    events as f64 / took.as_secs_f64()
}

#[test]
fn a_hot_aggregate_does_not_slow_the_other_aggregates_of_an_ordered_relay() {
    let unordered = {
        let (t, broker) = (TestDb::new(), TestBroker::new());
        enqueue_hot_and_others(&t);
        let (took, _) = drain_others(&t, &broker, RelayOrdering::None, Duration::from_secs(60));
        took
    };
    let t = TestDb::new();
    let broker = TestBroker::new();
    enqueue_hot_and_others(&t);
    let (took, hot) = drain_others(&t, &broker, RelayOrdering::Aggregate, Duration::from_secs(60));
    eprintln!(
        "other aggregates drained: ordered {:.0} events/s ({took:?}), unordered {:.0} events/s \
         ({unordered:?}, hot events included); hot events left {hot}",
        per_second(OTHER_EVENTS, took),
        per_second(OTHER_EVENTS + HOT_EVENTS, unordered),
    );
    assert!(
        hot >= HOT_EVENTS / 2,
        "the hot aggregate, one event per round, should still hold most of its events when the \
         others are done, but only {hot} were left: the others waited for it"
    );
    let arrived = assert_in_order(&broker);
    for n in 0..OTHER_AGGREGATES {
        assert_eq!(arrived.get(&format!("other-{n}")), Some(&EVENTS_PER_OTHER));
    }
}

#[test]
fn a_failed_head_of_a_long_aggregate_does_not_slow_the_other_aggregates() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    enqueue_hot_and_others(&t);
    // The hot aggregate's first event failed for good: the 4,999 behind it must wait, the others not.
    t.client()
        .execute(
            "UPDATE outbox SET failed_at = now(), attempts = 10, last_error = 'refused' \
             WHERE id = (SELECT min(id) FROM outbox WHERE aggregate_id = 'hot')",
            &[],
        )
        .unwrap();
    let (took, hot) = drain_others(&t, &broker, RelayOrdering::Aggregate, Duration::from_secs(30));
    eprintln!(
        "other aggregates drained behind a failed head: {:.0} events/s ({took:?})",
        per_second(OTHER_EVENTS, took)
    );
    assert_eq!(hot, HOT_EVENTS, "nothing of the blocked aggregate is published");
    let arrived = assert_in_order(&broker);
    assert_eq!(arrived.get("hot"), None);
    assert_eq!(arrived.len() as i64, OTHER_AGGREGATES);
}

#[test]
fn events_held_behind_a_row_deleted_by_hand_are_still_published_in_order() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let mut client = t.client();
    let events: Vec<NewEvent> = (1..=4).map(|seq| event("stuck", seq)).collect();
    let mut tx = client.transaction().unwrap();
    t.db.outbox().enqueue_many_ordered(&mut tx, &events).unwrap();
    tx.commit().unwrap();
    client
        .execute(
            "UPDATE outbox SET failed_at = now() WHERE id = (SELECT min(id) FROM outbox)",
            &[],
        )
        .unwrap();
    let config = RelayConfig {
        poll_interval: Duration::from_millis(200),
        ..relay_config(RelayOrdering::Aggregate)
    };
    let relay = relay::start(t.db.clone(), &broker.url, broker.topology.clone(), config.clone()).unwrap();
    wait_until(
        "the three events behind the failed one are held back",
        WAIT,
        || t.count("SELECT count(*) FROM outbox WHERE held") == 3,
    );
    // An operator discards the failed event with SQL, not through the relay: nobody clears the
    // mark of the next row, and the relay must find it anyway.
    client
        .execute("DELETE FROM outbox WHERE failed_at IS NOT NULL", &[])
        .unwrap();
    wait_until("the held events are published", WAIT, || {
        t.count("SELECT count(*) FROM outbox") == 0
    });
    relay.stop();
    let arrived: Vec<i64> = broker
        .drain(&broker.topology.queue)
        .iter()
        .map(|m| {
            serde_json::from_slice::<Value>(&m.body).unwrap()["seq"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(arrived, vec![2, 3, 4]);
}
