//! Destinations per event: each outbox row carries its exchange and routing key; a missing
//! exchange or an unroutable event ends failed with the reason; a publish-only relay declares
//! its exchange and no queue.

use std::time::Duration;

use amiquip::{ExchangeDeclareOptions, ExchangeType, FieldTable, QueueDeclareOptions};
use serde_json::json;
use txoutbox::relay::RelayHandle;
use txoutbox::{consumer, enqueue, relay, ConsumerConfig, Database, NewEvent, RelayConfig, Topology};
use txoutbox_testkit::{amqp_url, quick_relay, wait_until, TestBroker, TestDb};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

fn start_relay(db: &Database, topology: Topology) -> RelayHandle {
    relay::start(
        db.clone(),
        &amqp_url(),
        topology,
        RelayConfig {
            max_attempts: 1,
            retry_delay: Duration::from_millis(10),
            ..quick_relay(1)
        },
    )
    .unwrap()
}

fn event(n: i32) -> NewEvent {
    NewEvent::new("ticket", format!("t-{n}"), "TicketOpened", json!({ "n": n }))
}

fn enqueue_all(t: &TestDb, events: &[NewEvent]) {
    let mut client = t.client();
    let mut tx = client.transaction().unwrap();
    for e in events {
        enqueue(&mut tx, e).unwrap();
    }
    tx.commit().unwrap();
}

fn last_errors(t: &TestDb) -> Vec<String> {
    t.client()
        .query(
            "SELECT last_error FROM outbox WHERE failed_at IS NOT NULL ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
        .collect()
}

#[test]
fn each_event_goes_to_its_own_exchange_and_routing_key() {
    let t = TestDb::new();
    let ours = TestBroker::new();
    let theirs = TestBroker::new();
    // A queue on their exchange that takes only routing key `billing.ticket`.
    let (connection, channel) = txoutbox::broker::connect(&amqp_url()).unwrap();
    let keyed = format!("txo_test.{}.keyed", Uuid::new_v4().simple());
    let queue = channel
        .queue_declare(
            keyed.as_str(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
        )
        .unwrap();
    let exchange = channel
        .exchange_declare(
            ExchangeType::Topic,
            theirs.topology.exchange.as_str(),
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
        )
        .unwrap();
    queue
        .bind(&exchange, "billing.ticket", FieldTable::default())
        .unwrap();

    enqueue_all(
        &t,
        &[
            event(1),
            event(2).to_exchange(theirs.topology.exchange.clone()),
            event(3)
                .to_exchange(theirs.topology.exchange.clone())
                .with_routing_key("billing.ticket"),
        ],
    );
    let relay = start_relay(&t.db, ours.topology.clone());
    wait_until("all three are published", WAIT, || relay.stats().published() == 3);
    relay.stop();
    assert_eq!(
        ours.ready_main(),
        1,
        "the event without a destination takes the relay's exchange"
    );
    assert_eq!(
        theirs.ready_main(),
        2,
        "their queue is bound with #: both of theirs"
    );
    assert_eq!(
        theirs.ready(&keyed),
        1,
        "only the event routed billing.ticket reaches the keyed queue"
    );
    let _ = channel.queue_delete(keyed.as_str(), Default::default());
    let _ = connection.close();
}

#[test]
fn an_event_for_a_missing_exchange_fails_with_the_reason_and_the_batch_goes_on() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let missing = format!("txo_test.{}.nowhere", Uuid::new_v4().simple());
    enqueue_all(&t, &[event(1), event(2).to_exchange(missing.clone()), event(3)]);
    let relay = start_relay(&t.db, broker.topology.clone());
    wait_until("the two others are published and the third failed", WAIT, || {
        relay.stats().published() == 2 && relay.stats().failed() == 1
    });
    // The relay's own channel survived the missing exchange: later events still go through.
    enqueue_all(&t, &[event(4)]);
    wait_until("a later event is published", WAIT, || {
        relay.stats().published() == 3
    });
    assert!(relay.health().check().is_ok());
    relay.stop();
    assert_eq!(last_errors(&t), vec![format!("no such exchange: {missing}")]);
    assert_eq!(broker.ready_main(), 3);
}

#[test]
fn a_publish_only_relay_declares_no_queue_and_an_unroutable_event_ends_failed() {
    let t = TestDb::new();
    let exchange = format!("txo_test.{}.publish_only", Uuid::new_v4().simple());
    let topology = Topology::publish_only(exchange.clone());
    enqueue_all(&t, &[event(1)]);
    let relay = start_relay(&t.db, topology.clone());
    wait_until("the unroutable event is marked failed", WAIT, || {
        relay.stats().failed() == 1
    });
    relay.stop();
    assert!(
        last_errors(&t)[0].starts_with("unroutable"),
        "{:?}",
        last_errors(&t)
    );

    // The exchange exists; nothing else was declared for it (no queue, no binding).
    let (connection, channel) = txoutbox::broker::connect(&amqp_url()).unwrap();
    channel
        .exchange_declare_passive(exchange.as_str())
        .expect("the exchange is declared");
    let bindings = std::process::Command::new("rabbitmqctl")
        .args(["list_bindings", "-q", "source_name", "destination_name"])
        .output()
        .unwrap();
    let bindings = String::from_utf8_lossy(&bindings.stdout);
    assert!(
        !bindings.contains(&exchange),
        "no queue is bound to it: {bindings}"
    );
    let _ = channel.exchange_delete(exchange.as_str(), false);
    let _ = connection.close();

    // And a consumer refuses a topology that has no queue.
    let error = consumer::start(
        t.db.clone(),
        &amqp_url(),
        topology,
        ConsumerConfig::default(),
        |_: &mut postgres::Transaction<'_>, _: &txoutbox::Message| Ok(()),
    )
    .err()
    .expect("consumer::start refuses a publish-only topology");
    assert!(error.to_string().contains("publish-only"), "{error}");
}

/// The default exchange (`""`) routes by queue name; a row whose routing key AMQP cannot carry
/// (written behind the library's back) ends failed with the reason, and the rest go through.
#[test]
fn the_default_exchange_works_and_an_impossible_routing_key_fails_alone() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let direct = event(1)
        .to_exchange("")
        .with_routing_key(broker.topology.queue.clone());
    enqueue_all(&t, &[event(0), direct]);
    let too_long = "k".repeat(300);
    let error = enqueue(&mut t.client(), &event(2).with_routing_key(too_long.clone())).unwrap_err();
    assert!(
        error.to_string().contains("NewEvent::routing_key is 300 bytes"),
        "{error}"
    );
    t.client()
        .execute(
            "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, payload, routing_key)
             VALUES (gen_random_uuid(), 'ticket', 't-3', 'TicketOpened', '{}', $1)",
            &[&too_long],
        )
        .unwrap();
    enqueue_all(&t, &[event(4)]);
    let relay = start_relay(&t.db, broker.topology.clone());
    wait_until("three published and one failed", WAIT, || {
        relay.stats().published() == 3 && relay.stats().failed() == 1
    });
    assert!(relay.health().check().is_ok());
    relay.stop();
    assert_eq!(
        broker.ready_main(),
        3,
        "the direct one reached the queue through the default exchange"
    );
    assert_eq!(
        last_errors(&t),
        vec!["routing key of 300 bytes, longer than AMQP's 255".to_string()]
    );
}

/// The backoff of a row refused many times is bounded before it is computed (issue 10): at
/// attempt 60, `retry_delay * 2^attempts` used to overflow an interval, fail the round, roll
/// back the deletes of rows already confirmed and republish them on every backoff.
#[test]
fn a_row_refused_sixty_times_waits_an_hour_and_the_batch_beside_it_is_deleted() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let missing = format!("txo_test.{}.nowhere", Uuid::new_v4().simple());
    enqueue_all(&t, &[event(1).to_exchange(missing), event(2), event(3)]);
    t.client()
        .batch_execute("UPDATE outbox SET attempts = 60 WHERE exchange IS NOT NULL")
        .unwrap();
    let relay = relay::start(
        t.db.clone(),
        &amqp_url(),
        broker.topology.clone(),
        RelayConfig {
            max_attempts: 1000,
            retry_delay: Duration::from_millis(10),
            ..quick_relay(1)
        },
    )
    .unwrap();
    wait_until(
        "the two good ones are published and the refused row postponed",
        WAIT,
        || relay.stats().published() == 2 && t.count("SELECT count(*) FROM outbox WHERE attempts = 61") == 1,
    );
    relay.stop();
    assert_eq!(
        t.count("SELECT count(*) FROM outbox"),
        1,
        "the confirmed rows are deleted"
    );
    assert_eq!(
        t.count("SELECT count(*) FROM outbox WHERE available_at BETWEEN now() + interval '59 minutes' AND now() + interval '61 minutes'"),
        1,
        "the wait is capped at an hour"
    );
    assert_eq!(
        broker.ready_main(),
        2,
        "published once each, not again on every backoff"
    );
    let error = RelayConfig {
        max_attempts: 1_000_000,
        ..RelayConfig::default()
    }
    .validate()
    .unwrap_err();
    assert!(
        error.to_string().contains("RELAY_MAX_ATTEMPTS) must be 1..=1000"),
        "{error}"
    );
}
