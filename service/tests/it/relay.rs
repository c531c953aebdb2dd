//! The write side and the relay against the real Postgres and RabbitMQ.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use txoutbox::{enqueue, relay, NewEvent, RelayConfig};
use txoutbox_service::orders::{self, Amount, NewOrder};
use txoutbox_testkit::{wait_until, Policy, TestBroker, TestDb};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

fn event(n: usize) -> NewEvent {
    NewEvent::new("test", n.to_string(), "TestHappened", json!({ "n": n }))
}

fn fast_relay(workers: usize, batch: i64) -> RelayConfig {
    RelayConfig {
        workers,
        batch_size: batch,
        poll_interval: Duration::from_millis(500),
        retry_delay: Duration::from_millis(100),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        ..RelayConfig::default()
    }
}

/// `t`'s outbox refusing every insert with "outbox refused by test".
fn refuse_outbox_inserts(t: &TestDb) {
    t.client()
        .batch_execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'outbox refused by test'; END $$;
             CREATE TRIGGER refuse BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION refuse();",
        )
        .unwrap();
}

fn new_order() -> NewOrder {
    NewOrder {
        user_id: Uuid::new_v4(),
        amount: Amount::parse("10.00").unwrap(),
    }
}

#[test]
fn an_order_is_not_written_when_its_outbox_insert_fails() {
    let t = TestDb::new();
    refuse_outbox_inserts(&t);
    let mut conn = t.db.get().unwrap();
    let result = orders::create(
        &mut conn,
        t.db.outbox(),
        &new_order(),
        None,
        &orders::Announce::Notify,
    );
    let error = result.expect_err("the order must fail when its event cannot be written");
    assert!(error.to_string().contains("outbox refused by test"), "{error}");
    assert_eq!(t.count("SELECT count(*) FROM orders"), 0);
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 0);
}

#[test]
fn an_order_with_a_key_writes_neither_order_nor_key_when_its_outbox_insert_fails() {
    let t = TestDb::new();
    refuse_outbox_inserts(&t);
    let mut conn = t.db.get().unwrap();
    let (new, announce) = (new_order(), orders::Announce::Notify);
    let result = orders::create_idempotent(&mut conn, t.db.outbox(), &new, "key-1", None, &announce);
    let error = result.expect_err("the order must fail when its event cannot be written");
    assert!(error.to_string().contains("outbox refused by test"), "{error}");
    assert_eq!(t.count("SELECT count(*) FROM orders"), 0);
    assert_eq!(t.count("SELECT count(*) FROM idempotency_keys"), 0);
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 0);
    // The key is free: the retry creates the order.
    t.client().batch_execute("DROP TRIGGER refuse ON outbox").unwrap();
    let created = orders::create_idempotent(&mut conn, t.db.outbox(), &new, "key-1", None, &announce);
    assert!(matches!(created, Ok(orders::Creation::Created(_))), "{created:?}");
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 1);
}

#[test]
fn a_new_order_wakes_an_idle_relay_through_its_notification() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let relay = idle_slow_polling_relay(&t, &broker);
    let mut conn = t.db.get().unwrap();
    let announce = orders::Announce::Notify;
    orders::create(&mut conn, t.db.outbox(), &new_order(), None, &announce).unwrap();
    // The poll is an hour away: only the order's NOTIFY can bring its event out.
    wait_until("the new order's event is published", WAIT, || {
        relay.stats().published() == 1
    });
    let keyed = orders::create_idempotent(&mut conn, t.db.outbox(), &new_order(), "k", None, &announce);
    assert!(matches!(keyed, Ok(orders::Creation::Created(_))), "{keyed:?}");
    wait_until("the keyed order's event is published", WAIT, || {
        relay.stats().published() == 2
    });
    relay.stop();
}

#[test]
fn an_event_of_a_rolled_back_transaction_is_never_published() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let mut client = t.client();
    let ghost = event(1);
    {
        let mut tx = client.transaction().unwrap();
        enqueue(&mut tx, &ghost).unwrap();
        tx.rollback().unwrap();
    }
    let marker = event(2);
    let mut tx = client.transaction().unwrap();
    enqueue(&mut tx, &marker).unwrap();
    tx.commit().unwrap();

    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        fast_relay(2, 10),
    )
    .unwrap();
    wait_until("the committed event is published", WAIT, || {
        relay.stats().published() == 1
    });
    relay.stop();
    let got = broker.drain(&broker.topology.queue);
    let ids: Vec<_> = got.iter().filter_map(|m| m.message_id.clone()).collect();
    assert_eq!(ids, vec![marker.message_id.to_string()]);
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 0);
}

#[test]
fn five_workers_publish_each_of_5000_events_exactly_once() {
    const EVENTS: usize = 5000;
    let t = TestDb::new();
    let broker = TestBroker::new();
    let mut client = t.client();
    let mut tx = client.transaction().unwrap();
    let mut expected = Vec::with_capacity(EVENTS);
    for n in 0..EVENTS {
        let e = event(n);
        enqueue(&mut tx, &e).unwrap();
        expected.push(e.message_id.to_string());
    }
    tx.commit().unwrap();

    // Small batches so that the five workers contend for rows over many rounds.
    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        fast_relay(5, 25),
    )
    .unwrap();
    wait_until("the outbox is empty", WAIT, || {
        t.count("SELECT count(*) FROM outbox") == 0
    });
    wait_until("every event is in the queue", WAIT, || {
        broker.ready_main() as usize >= EVENTS
    });
    relay.stop();

    let got = broker.drain(&broker.topology.queue);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in &got {
        *seen
            .entry(m.message_id.clone().expect("message_id set"))
            .or_default() += 1;
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "published more than once: {doubled:?}");
    assert_eq!(got.len(), EVENTS);
    for id in &expected {
        assert!(seen.contains_key(id), "event {id} was never published");
    }
    let first = &got[0];
    assert_eq!(first.event_type.as_deref(), Some("TestHappened"));
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(first.delivery_mode, Some(2), "messages must be persistent");
}

#[test]
fn events_committed_out_of_id_order_are_all_published() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        fast_relay(5, 10),
    )
    .unwrap();
    let mut early_client = t.client();
    let mut late_client = t.client();
    let mut published = Vec::new();
    for round in 0..5 {
        // The early transaction takes the lower outbox id but commits last.
        let mut early = early_client.transaction().unwrap();
        let first = event(round * 2);
        enqueue(&mut early, &first).unwrap();
        let mut late = late_client.transaction().unwrap();
        let second = event(round * 2 + 1);
        enqueue(&mut late, &second).unwrap();
        late.commit().unwrap();
        let expected = published.len() as u64 + 1;
        wait_until("the later id is published", WAIT, || {
            relay.stats().published() >= expected
        });
        early.commit().unwrap();
        let expected = expected + 1;
        wait_until("the earlier id is published after it commits", WAIT, || {
            relay.stats().published() >= expected
        });
        published.push(first.message_id.to_string());
        published.push(second.message_id.to_string());
    }
    relay.stop();
    let got: Vec<String> = broker
        .drain(&broker.topology.queue)
        .into_iter()
        .filter_map(|m| m.message_id)
        .collect();
    assert_eq!(got.len(), published.len());
    for id in &published {
        assert!(got.contains(id), "event {id} was skipped");
    }
}

#[test]
fn refused_events_stay_in_the_outbox_until_the_broker_confirms_them() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    // A real refusal: the broker nacks every publish to a queue at its length limit.
    let policy = Policy::on_queue(
        &broker.topology.queue,
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
    );
    let mut client = t.client();
    let mut tx = client.transaction().unwrap();
    for n in 0..20 {
        enqueue(&mut tx, &event(n)).unwrap();
    }
    tx.commit().unwrap();

    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        fast_relay(2, 10),
    )
    .unwrap();
    wait_until("publishes are refused", WAIT, || relay.stats().refused() >= 20);
    assert_eq!(relay.stats().published(), 0);
    assert_eq!(
        t.count("SELECT count(*) FROM outbox"),
        20,
        "refused rows must stay"
    );
    assert!(t.count("SELECT count(*) FROM outbox WHERE attempts > 0 AND last_error IS NOT NULL") > 0);
    assert_eq!(broker.ready_main(), 0);

    drop(policy);
    wait_until("a later round publishes them", WAIT, || {
        t.count("SELECT count(*) FROM outbox") == 0
    });
    relay.stop();
    assert_eq!(broker.drain(&broker.topology.queue).len(), 20);
}

#[test]
fn unroutable_events_are_kept_not_lost() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        fast_relay(1, 10),
    )
    .unwrap();
    wait_until("the relay is connected", WAIT, || {
        relay.stats().connected_workers() == 1
    });
    // Once the relay is connected, remove the queue's binding: publishes then reach no queue
    // and the broker returns them (they are still "confirmed").
    let (connection, channel) = txoutbox::broker::connect(&broker.url).unwrap();
    channel
        .queue_unbind(
            broker.topology.queue.as_str(),
            broker.topology.exchange.as_str(),
            "#",
            Default::default(),
        )
        .unwrap();
    let mut client = t.client();
    let mut tx = client.transaction().unwrap();
    enqueue(&mut tx, &event(1)).unwrap();
    tx.commit().unwrap();
    wait_until("the publish is refused as unroutable", WAIT, || {
        relay.stats().refused() >= 1
    });
    relay.stop();
    assert_eq!(relay_published_nothing(&t), 1);
    assert_eq!(
        t.count("SELECT count(*) FROM outbox WHERE last_error LIKE 'unroutable%'"),
        1
    );
    let _ = channel.close();
    let _ = connection.close();
}

fn relay_published_nothing(t: &TestDb) -> i64 {
    t.count("SELECT count(*) FROM outbox")
}

fn slow_polling_relay() -> RelayConfig {
    RelayConfig {
        poll_interval: Duration::from_secs(3600),
        ..fast_relay(2, 10)
    }
}

fn wait_idle(relay: &relay::RelayHandle) {
    wait_until("the relay is connected", WAIT, || {
        relay.stats().connected_workers() == 2
    });
}

/// A relay on `t` and `broker` whose poll is an hour away, connected and idle: only a
/// notification or a waker brings events out.
fn idle_slow_polling_relay(t: &TestDb, broker: &TestBroker) -> relay::RelayHandle {
    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        slow_polling_relay(),
    )
    .unwrap();
    wait_idle(&relay);
    relay
}

#[test]
fn a_notification_wakes_an_idle_relay_long_before_its_poll() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let relay = idle_slow_polling_relay(&t, &broker);
    for n in 1..=3u64 {
        let mut client = t.client();
        let mut tx = client.transaction().unwrap();
        enqueue(&mut tx, &event(n as usize)).unwrap();
        tx.commit().unwrap();
        // The poll is an hour away: only the NOTIFY can bring this event out.
        wait_until("the notified event is published", WAIT, || {
            relay.stats().published() == n
        });
    }
    relay.stop();
}

#[test]
fn a_waker_wakes_an_idle_relay_for_silently_enqueued_events() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let relay = idle_slow_polling_relay(&t, &broker);
    let waker = relay.waker();
    for n in 1..=3u64 {
        let mut client = t.client();
        let mut tx = client.transaction().unwrap();
        t.db.outbox()
            .clone()
            .without_notify()
            .enqueue(&mut tx, &event(n as usize))
            .unwrap();
        tx.commit().unwrap();
        waker.wake();
        wait_until("the woken relay publishes the event", WAIT, || {
            relay.stats().published() == n
        });
    }
    relay.stop();
}

#[test]
fn a_silent_event_nobody_announces_is_found_by_the_poll() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let config = RelayConfig {
        poll_interval: Duration::from_millis(200),
        ..fast_relay(2, 10)
    };
    let relay = relay::start(t.db.clone(), &broker.url, broker.topology.clone(), config).unwrap();
    wait_idle(&relay);
    let mut client = t.client();
    let mut tx = client.transaction().unwrap();
    t.db.outbox()
        .clone()
        .without_notify()
        .enqueue(&mut tx, &event(1))
        .unwrap();
    tx.commit().unwrap();
    wait_until("the poll finds the event", WAIT, || {
        relay.stats().published() == 1
    });
    relay.stop();
}

#[test]
fn an_event_refused_too_often_is_marked_failed_without_blocking_the_rest_and_can_be_requeued() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let config = RelayConfig {
        max_attempts: 2,
        retry_delay: Duration::from_millis(50),
        ..fast_relay(1, 10)
    };
    let relay = relay::start(t.db.clone(), &broker.url, broker.topology.clone(), config).unwrap();
    wait_until("the relay is connected", WAIT, || {
        relay.stats().connected_workers() == 1
    });
    // Only "Good" events reach the queue now: "Bad" ones come back unroutable.
    let (connection, channel) = txoutbox::broker::connect(&broker.url).unwrap();
    let (queue, exchange) = (broker.topology.queue.as_str(), broker.topology.exchange.as_str());
    channel
        .queue_unbind(queue, exchange, "#", Default::default())
        .unwrap();
    channel
        .queue_bind(queue, exchange, "Good", Default::default())
        .unwrap();

    let mut client = t.client();
    let mut tx = client.transaction().unwrap();
    enqueue(&mut tx, &NewEvent::new("test", "bad", "Bad", json!({}))).unwrap();
    for n in 0..5 {
        enqueue(
            &mut tx,
            &NewEvent::new("test", n.to_string(), "Good", json!({ "n": n })),
        )
        .unwrap();
    }
    tx.commit().unwrap();

    wait_until("the bad event is marked failed", WAIT, || {
        relay.stats().failed() == 1
    });
    wait_until("the good events behind it are published", WAIT, || {
        relay.stats().published() == 5
    });
    let failed = t.db.outbox().failed_events(&mut client, 10).unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!((failed[0].event_type.as_str(), failed[0].attempts), ("Bad", 2));
    assert!(failed[0]
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("unroutable")));
    // Failed means left alone: no more attempts while it stays failed.
    let refused_so_far = relay.stats().refused();
    let mut sleeper = t.client();
    sleeper.batch_execute("SELECT pg_sleep(0.3)").unwrap();
    assert_eq!(relay.stats().refused(), refused_so_far);

    channel
        .queue_bind(queue, exchange, "#", Default::default())
        .unwrap();
    assert_eq!(
        t.db.outbox()
            .requeue_failed(&mut client, Some(failed[0].id))
            .unwrap(),
        1
    );
    wait_until("the re-queued event is published", WAIT, || {
        relay.stats().published() == 6
    });
    relay.stop();
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 0);
    let _ = channel.close();
    let _ = connection.close();
}

#[test]
fn an_order_created_in_one_statement_carries_the_same_event_as_one_inserted_in_a_transaction() {
    let t = TestDb::new();
    let mut conn = t.db.get().unwrap();
    let announce = orders::Announce::Notify;
    let created = orders::create(&mut conn, t.db.outbox(), &new_order(), None, &announce).unwrap();
    let mut client = t.client();
    let mut tx = client.transaction().unwrap();
    let inserted = orders::insert(&mut tx, t.db.outbox(), &new_order()).unwrap();
    tx.commit().unwrap();
    for order in [created, inserted] {
        let row = client
            .query_one(
                "SELECT aggregate_type, event_type, payload FROM outbox WHERE aggregate_id = $1",
                &[&order.id.to_string()],
            )
            .unwrap();
        assert_eq!(row.get::<_, String>(0), orders::AGGREGATE_TYPE);
        assert_eq!(row.get::<_, String>(1), orders::ORDER_CREATED);
        let expected = json!({
            "order_id": order.id.to_string(),
            "user_id": order.user_id.to_string(),
            "amount": order.amount,
            "created_at": order.created_at,
        });
        assert_eq!(row.get::<_, serde_json::Value>(2), expected);
    }
}
