//! The idempotent consumer against the real Postgres and RabbitMQ.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use postgres::Transaction;
use serde_json::json;
use txoutbox::{
    consumer, enqueue_many, relay, ConsumerConfig, Database, HandlerError, Message, NewEvent, PoolOptions,
    Topology,
};
use txoutbox_testkit::{quick_relay, wait_until, RoundTripProxy, TestBroker, TestDb};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

fn config() -> ConsumerConfig {
    ConsumerConfig {
        prefetch: 20,
        batch_size: 10,
        retry_delay: Duration::from_millis(20),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        ..ConsumerConfig::default()
    }
}

/// A deliberately non-idempotent effect: one row per application.
fn with_effects_table(t: &TestDb) {
    t.client()
        .batch_execute("CREATE TABLE effects (message_id uuid NOT NULL, n int NOT NULL)")
        .unwrap();
}

fn record_effect(tx: &mut Transaction<'_>, message: &Message) -> Result<(), HandlerError> {
    let n = message.payload["n"].as_i64().unwrap_or(-1) as i32;
    tx.execute(
        "INSERT INTO effects (message_id, n) VALUES ($1, $2)",
        &[&message.message_id, &n],
    )?;
    Ok(())
}

fn body(n: i32) -> Vec<u8> {
    serde_json::to_vec(&json!({ "n": n })).unwrap()
}

#[test]
fn a_message_delivered_twice_has_one_effect_and_both_are_acked() {
    let t = TestDb::new();
    with_effects_table(&t);
    let broker = TestBroker::new();
    let id = Uuid::new_v4().to_string();
    broker.publish_raw(Some(&id), "TestHappened", &body(1));
    broker.publish_raw(Some(&id), "TestHappened", &body(1));
    let other = Uuid::new_v4().to_string();
    broker.publish_raw(Some(&other), "TestHappened", &body(2));

    let handle = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        config(),
        record_effect,
    )
    .unwrap();
    wait_until("all three deliveries are settled", WAIT, || {
        handle.stats().applied() + handle.stats().duplicates() == 3
    });
    handle.stop();
    assert_eq!(t.count("SELECT count(*) FROM effects"), 2);
    assert_eq!(
        t.count(&format!("SELECT count(*) FROM effects WHERE message_id = '{id}'")),
        1
    );
    assert_eq!(t.count("SELECT count(*) FROM processed_messages"), 2);
    // Acked, not merely held: nothing comes back once the consumer is gone.
    assert_eq!(broker.ready_main(), 0);
    assert_eq!(broker.ready(&broker.topology.dead_letter_queue()), 0);
}

#[test]
fn a_redelivery_after_a_lost_ack_has_no_second_effect() {
    let t = TestDb::new();
    with_effects_table(&t);
    let broker = TestBroker::new();
    let id = Uuid::new_v4();
    // The effect committed earlier, but the ack never reached the broker.
    {
        let mut client = t.client();
        let mut tx = client.transaction().unwrap();
        tx.execute("INSERT INTO processed_messages (message_id) VALUES ($1)", &[&id])
            .unwrap();
        tx.execute("INSERT INTO effects (message_id, n) VALUES ($1, 1)", &[&id])
            .unwrap();
        tx.commit().unwrap();
    }
    broker.publish_raw(Some(&id.to_string()), "TestHappened", &body(1));
    let handle = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        config(),
        record_effect,
    )
    .unwrap();
    wait_until("the redelivery is settled", WAIT, || {
        handle.stats().duplicates() == 1
    });
    handle.stop();
    assert_eq!(t.count("SELECT count(*) FROM effects"), 1);
    assert_eq!(broker.ready_main(), 0);
}

#[test]
fn a_failing_handler_leaves_no_processed_row_and_the_message_is_retried() {
    let t = TestDb::new();
    with_effects_table(&t);
    let broker = TestBroker::new();
    let id = Uuid::new_v4();
    broker.publish_raw(Some(&id.to_string()), "TestHappened", &body(7));
    for n in 0..5 {
        broker.publish_raw(Some(&Uuid::new_v4().to_string()), "TestHappened", &body(n));
    }

    let calls = Arc::new(AtomicUsize::new(0));
    let processed_seen_on_retry = Arc::new(AtomicUsize::new(usize::MAX));
    let url = t.url.clone();
    let (calls_in, seen_in) = (calls.clone(), processed_seen_on_retry.clone());
    let handler = move |tx: &mut Transaction<'_>, message: &Message| -> Result<(), HandlerError> {
        if message.message_id != id {
            return record_effect(tx, message);
        }
        let call = calls_in.fetch_add(1, Ordering::SeqCst);
        if call >= 1 {
            // What did the failed attempts leave behind? Look from outside this transaction.
            let mut outside = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            let left: i64 = outside
                .query_one(
                    "SELECT count(*) FROM processed_messages WHERE message_id = $1",
                    &[&id],
                )
                .unwrap()
                .get(0);
            seen_in.store(left as usize, Ordering::SeqCst);
        }
        if call < 2 {
            return Err(HandlerError::transient("downstream unavailable (test)"));
        }
        record_effect(tx, message)
    };
    let handle = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        config(),
        handler,
    )
    .unwrap();
    wait_until("every message is applied", WAIT, || handle.stats().applied() == 6);
    handle.stop();
    assert_eq!(
        processed_seen_on_retry.load(Ordering::SeqCst),
        0,
        "a failed attempt left a processed row"
    );
    assert!(calls.load(Ordering::SeqCst) >= 3);
    assert_eq!(
        t.count("SELECT count(*) FROM effects"),
        6,
        "every message has exactly one effect"
    );
    assert_eq!(t.count("SELECT count(DISTINCT message_id) FROM effects"), 6);
    assert_eq!(t.count("SELECT count(*) FROM processed_messages"), 6);
    assert_eq!(broker.ready_main(), 0);
}

#[test]
fn malformed_deliveries_are_dead_lettered_once_not_redelivered() {
    let t = TestDb::new();
    with_effects_table(&t);
    let broker = TestBroker::new();
    broker.publish_raw(None, "TestHappened", &body(1));
    broker.publish_raw(Some("not-a-uuid"), "TestHappened", &body(2));
    broker.publish_raw(Some(&Uuid::new_v4().to_string()), "TestHappened", b"{not json");
    let good = Uuid::new_v4().to_string();
    broker.publish_raw(Some(&good), "TestHappened", &body(3));

    let handle = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        config(),
        record_effect,
    )
    .unwrap();
    let dlq = broker.topology.dead_letter_queue();
    wait_until(
        "the three malformed messages reach the dead-letter queue",
        WAIT,
        || broker.ready(&dlq) == 3,
    );
    wait_until("the good one is applied", WAIT, || handle.stats().applied() == 1);
    handle.stop();
    assert_eq!(handle_rejected_total(&broker), 3);
    assert_eq!(t.count("SELECT count(*) FROM effects"), 1);
    assert_eq!(t.count("SELECT count(*) FROM processed_messages"), 1);
    assert_eq!(broker.ready_main(), 0);
}

fn handle_rejected_total(broker: &TestBroker) -> usize {
    broker.drain(&broker.topology.dead_letter_queue()).len()
}

#[test]
fn a_permanent_handler_failure_is_dead_lettered() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    broker.publish_raw(Some(&Uuid::new_v4().to_string()), "TestHappened", &body(1));
    let handler = |_: &mut Transaction<'_>, _: &Message| -> Result<(), HandlerError> {
        Err(HandlerError::permanent("cannot ever apply this (test)"))
    };
    let handle = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        config(),
        handler,
    )
    .unwrap();
    let dlq = broker.topology.dead_letter_queue();
    wait_until("the message is dead-lettered", WAIT, || broker.ready(&dlq) == 1);
    handle.stop();
    assert_eq!(t.count("SELECT count(*) FROM processed_messages"), 0);
    assert_eq!(broker.ready_main(), 0);
}

#[test]
fn dead_letters_carry_their_reason() {
    let t = TestDb::new();
    with_effects_table(&t);
    let broker = TestBroker::new();
    broker.publish_raw(None, "TestHappened", &body(1));
    broker.publish_raw(Some(&Uuid::new_v4().to_string()), "TestHappened", b"{not json");
    let handle = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        config(),
        record_effect,
    )
    .unwrap();
    let dlq = broker.topology.dead_letter_queue();
    wait_until("both reach the dead-letter queue", WAIT, || {
        broker.ready(&dlq) == 2
    });
    handle.stop();
    let mut reasons = broker.dead_letter_reasons();
    reasons.sort();
    assert!(reasons[0].contains("body is not JSON"), "{reasons:?}");
    assert!(reasons[1].contains("no message_id"), "{reasons:?}");
}

#[test]
fn a_message_that_keeps_failing_is_dead_lettered_after_its_retries() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    broker.publish_raw(Some(&Uuid::new_v4().to_string()), "TestHappened", &body(1));
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let handler = move |_: &mut Transaction<'_>, _: &Message| -> Result<(), HandlerError> {
        counted.fetch_add(1, Ordering::SeqCst);
        Err(HandlerError::transient("downstream keeps failing (test)"))
    };
    let config = ConsumerConfig {
        max_retries: 3,
        ..config()
    };
    let handle = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        config,
        handler,
    )
    .unwrap();
    let dlq = broker.topology.dead_letter_queue();
    wait_until("the message is dead-lettered", WAIT, || broker.ready(&dlq) == 1);
    handle.stop();
    assert_eq!(calls.load(Ordering::SeqCst), 4, "one delivery and three retries");
    assert_eq!(broker.ready_main(), 0);
    assert_eq!(t.count("SELECT count(*) FROM processed_messages"), 0);
    let reasons = broker.dead_letter_reasons();
    assert!(
        reasons[0].contains("failed 4 times") && reasons[0].contains("keeps failing"),
        "{reasons:?}"
    );
}

#[test]
fn a_panicking_handler_is_contained_its_message_dead_lettered_and_the_consumer_lives_on() {
    let t = TestDb::new();
    with_effects_table(&t);
    let broker = TestBroker::new();
    for n in 1..=3 {
        broker.publish_raw(Some(&Uuid::new_v4().to_string()), "TestHappened", &body(n));
    }
    let handler = |tx: &mut Transaction<'_>, message: &Message| -> Result<(), HandlerError> {
        if message.payload["n"] == 2 {
            panic!("the handler cannot cope with n = 2 (test)");
        }
        record_effect(tx, message)
    };
    let config = ConsumerConfig {
        max_retries: 2,
        ..config()
    };
    let handle = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        config,
        handler,
    )
    .unwrap();
    let dlq = broker.topology.dead_letter_queue();
    wait_until(
        "the others are applied and the panicking one dead-lettered",
        WAIT,
        || handle.stats().applied() == 2 && broker.ready(&dlq) == 1,
    );
    // The consumer thread survived: a later message is applied.
    broker.publish_raw(Some(&Uuid::new_v4().to_string()), "TestHappened", &body(4));
    wait_until("a later message is applied", WAIT, || {
        handle.stats().applied() == 3
    });
    handle.stop();
    assert_eq!(t.count("SELECT count(*) FROM effects"), 3);
    assert_eq!(
        t.count("SELECT count(*) FROM effects WHERE n = 2"),
        0,
        "the panic rolled back"
    );
    let reasons = broker.dead_letter_reasons();
    assert!(
        reasons[0].contains("failed 3 times")
            && reasons[0].contains("the handler panicked: the handler cannot cope"),
        "{reasons:?}"
    );
}

/// Two consumers of two queues bound to one exchange, on one database (say invoices and
/// audit): each applies every event once; neither takes the other's record as its own.
#[test]
fn two_consumers_of_two_queues_on_one_database_each_apply_every_event_once() {
    let t = TestDb::new();
    t.client()
        .batch_execute("CREATE TABLE effects (consumer text NOT NULL, message_id uuid NOT NULL)")
        .unwrap();
    let invoices = TestBroker::new();
    let audit = Topology::new(
        invoices.topology.exchange.clone(),
        format!("{}.audit", invoices.topology.queue),
    );
    let effect = |name: &'static str| {
        move |tx: &mut Transaction<'_>, message: &Message| -> Result<(), HandlerError> {
            tx.execute(
                "INSERT INTO effects (consumer, message_id) VALUES ($1, $2)",
                &[&name, &message.message_id],
            )?;
            Ok(())
        }
    };
    let first = consumer::start(
        t.db.clone(),
        &invoices.url,
        invoices.topology.clone(),
        config(),
        effect("invoices"),
    )
    .unwrap();
    let second = consumer::start(
        t.db.clone(),
        &invoices.url,
        audit.clone(),
        config(),
        effect("audit"),
    )
    .unwrap();
    // A failed passive declare closes its channel: ask on a fresh one each time.
    wait_until("the audit consumer declared its queue", WAIT, || {
        let (connection, channel) = txoutbox::broker::connect(&invoices.url).unwrap();
        let declared = channel.queue_declare_passive(audit.queue.as_str()).is_ok();
        let _ = connection.close();
        declared
    });

    let mut client = t.client();
    let mut tx = client.transaction().unwrap();
    let events: Vec<NewEvent> = (0..20)
        .map(|n| NewEvent::new("invoice", n.to_string(), "InvoiceSent", json!({ "n": n })))
        .collect();
    enqueue_many(&mut tx, &events).unwrap();
    tx.commit().unwrap();
    let relay = relay::start(
        t.db.clone(),
        &invoices.url,
        invoices.topology.clone(),
        quick_relay(1),
    )
    .unwrap();
    wait_until("both consumers applied all 20", WAIT, || {
        first.stats().applied() == 20 && second.stats().applied() == 20
    });
    let duplicates = first.stats().duplicates() + second.stats().duplicates();
    relay.stop();
    first.stop();
    second.stop();
    assert_eq!(duplicates, 0);
    assert_eq!(
        t.count("SELECT count(*) FROM effects WHERE consumer = 'invoices'"),
        20
    );
    assert_eq!(
        t.count("SELECT count(*) FROM effects WHERE consumer = 'audit'"),
        20
    );
    assert_eq!(
        t.count("SELECT count(DISTINCT (consumer, message_id)) FROM effects"),
        40,
        "no event applied twice by one consumer"
    );
    assert_eq!(
        t.count(&format!(
            "SELECT count(*) FROM processed_messages WHERE consumer IN ('{}', '{}')",
            invoices.topology.queue, audit.queue
        )),
        40,
        "each consumer records under its queue's name"
    );
    // The audit topology's queues are this test's to remove (the exchange goes with `invoices`).
    let (connection, channel) = txoutbox::broker::connect(&invoices.url).unwrap();
    for queue in [audit.queue.clone(), audit.dead_letter_queue()] {
        let _ = channel.queue_delete(queue.as_str(), Default::default());
    }
    let _ = channel.exchange_delete(audit.dead_letter_exchange().as_str(), false);
    let _ = connection.close();
}

/// Rows recorded before schema version 2 have no consumer name: they count as processed for
/// every consumer, so an upgrade does not apply an old message again.
#[test]
fn a_message_recorded_before_the_upgrade_is_not_applied_again() {
    let t = TestDb::new();
    with_effects_table(&t);
    let broker = TestBroker::new();
    let id = Uuid::new_v4();
    t.client()
        .execute(
            "INSERT INTO processed_messages (consumer, message_id) VALUES ('', $1)",
            &[&id],
        )
        .unwrap();
    broker.publish_raw(Some(&id.to_string()), "TestHappened", &body(1));
    let handle = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        config(),
        record_effect,
    )
    .unwrap();
    wait_until("the redelivery is settled as a duplicate", WAIT, || {
        handle.stats().duplicates() == 1
    });
    handle.stop();
    assert_eq!(t.count("SELECT count(*) FROM effects"), 0);
    assert_eq!(broker.ready_main(), 0);
}

/// Publishes straight to the test queue with an `aggregate_id` header and a `type`.
fn publish_with_headers(broker: &TestBroker, event_type: &str, aggregate_id: &str, n: i32) -> Uuid {
    use amiquip::{AmqpProperties, AmqpValue, FieldTable, Publish};
    let (connection, channel) = txoutbox::broker::connect(&broker.url).unwrap();
    let id = Uuid::new_v4();
    let mut headers = FieldTable::default();
    headers.insert("aggregate_id".into(), AmqpValue::LongString(aggregate_id.into()));
    let properties = AmqpProperties::default()
        .with_delivery_mode(2)
        .with_message_id(id.to_string())
        .with_type_(event_type.into())
        .with_headers(headers);
    channel
        .basic_publish(
            "",
            Publish::with_properties(&body(n), broker.topology.queue.as_str(), properties),
        )
        .unwrap();
    let _ = channel.close();
    let _ = connection.close();
    id
}

/// Poison deliveries (issue 10): a NUL in the type or the aggregate id, or an aggregate id too
/// long for an index row, can never be recorded. They are dead-lettered with the reason at
/// once, and the messages behind them are applied (they used to loop forever and stall the queue).
#[test]
fn poison_headers_are_dead_lettered_with_the_reason_and_the_queue_moves_on() {
    let t = TestDb::new();
    with_effects_table(&t);
    let broker = TestBroker::new();
    publish_with_headers(&broker, "Test\u{0}Happened", "a-1", 1);
    publish_with_headers(&broker, "TestHappened", "a-\u{0}2", 2);
    publish_with_headers(&broker, "TestHappened", &"x".repeat(5000), 3);
    for n in 4..=6 {
        publish_with_headers(&broker, "TestHappened", &format!("a-{n}"), n);
    }
    let handle = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        config(),
        record_effect,
    )
    .unwrap();
    let dlq = broker.topology.dead_letter_queue();
    wait_until(
        "the three good ones are applied and the three poison ones dead-lettered",
        WAIT,
        || handle.stats().applied() == 3 && broker.ready(&dlq) == 3,
    );
    handle.stop();
    assert_eq!(t.count("SELECT count(*) FROM effects"), 3);
    assert_eq!(broker.ready_main(), 0);
    let mut reasons = broker.dead_letter_reasons();
    reasons.sort();
    assert!(
        reasons[0].contains("aggregate_id header contains a NUL"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("aggregate_id header is 5000 bytes"),
        "{reasons:?}"
    );
    assert!(reasons[2].contains("type contains a NUL"), "{reasons:?}");
}

/// An effect Postgres refuses at COMMIT (a deferred constraint) is the message's own failure:
/// retried a bounded number of times, then dead-lettered; the session goes on.
#[test]
fn an_effect_refused_at_commit_is_retried_then_dead_lettered_and_the_rest_applied() {
    let t = TestDb::new();
    t.client()
        .batch_execute(
            "CREATE TABLE effects (message_id uuid NOT NULL, n int NOT NULL,
                 CONSTRAINT one_per_n UNIQUE (n) DEFERRABLE INITIALLY DEFERRED);
             INSERT INTO effects VALUES (gen_random_uuid(), 2)",
        )
        .unwrap();
    let broker = TestBroker::new();
    for n in 1..=3 {
        broker.publish_raw(Some(&Uuid::new_v4().to_string()), "TestHappened", &body(n));
    }
    let config = ConsumerConfig {
        max_retries: 2,
        ..config()
    };
    let handle = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        config,
        record_effect,
    )
    .unwrap();
    let dlq = broker.topology.dead_letter_queue();
    wait_until("1 and 3 are applied and 2 dead-lettered", WAIT, || {
        handle.stats().applied() == 2 && broker.ready(&dlq) == 1
    });
    handle.stop();
    let reasons = broker.dead_letter_reasons();
    assert!(
        reasons[0].contains("failed 3 times")
            && reasons[0].contains("cannot commit the consumer transaction"),
        "{reasons:?}"
    );
    assert_eq!(
        t.count("SELECT count(*) FROM effects"),
        3,
        "the pre-existing row and 1 and 3"
    );
}

/// Round trips to Postgres of the second delivery a consumer with `handler` applies, alone in
/// its batch, on a pool of one connection (the first delivery prepares what is kept).
fn round_trips_of_a_delivery(t: &TestDb, handler: impl consumer::Handler + 'static) -> u64 {
    let proxy = RoundTripProxy::new(&t.url);
    // No validation round trip however slow the machine is between the deliveries.
    let options = PoolOptions {
        max_size: 1,
        validate_after_idle: Duration::from_secs(3600),
        ..PoolOptions::default()
    };
    let db = Database::connect(&proxy.url, &options).unwrap();
    let broker = TestBroker::new();
    let handle = consumer::start(db, &broker.url, broker.topology.clone(), config(), handler).unwrap();
    broker.publish_raw(Some(&Uuid::new_v4().to_string()), "TestHappened", &body(1));
    wait_until("the first delivery is applied", WAIT, || {
        handle.stats().applied() == 1
    });
    let before = proxy.round_trips();
    broker.publish_raw(Some(&Uuid::new_v4().to_string()), "TestHappened", &body(2));
    wait_until("the second delivery is applied", WAIT, || {
        handle.stats().applied() == 2
    });
    let cost = proxy.round_trips() - before;
    handle.stop();
    cost
}

/// A delivery costs the consumer three round trips to Postgres besides its handler's: begin,
/// the dedupe statement (prepared once per connection), commit. (The dedupe statement was
/// prepared anew per batch: two round trips, and a third to close it.)
#[test]
fn a_delivery_costs_three_round_trips_besides_the_handlers() {
    let t = TestDb::new();
    let nothing = |_: &mut Transaction<'_>, _: &Message| Ok(());
    assert_eq!(
        round_trips_of_a_delivery(&t, nothing),
        3,
        "round trips for one delivery"
    );
}

/// A handler's statement prepared with `consumer::prepared` is prepared once per connection:
/// a delivery then costs four round trips (begin, dedupe, the handler's insert, commit), where
/// the statement's text would cost six (prepare, execute, and its close).
#[test]
fn a_handlers_prepared_statement_costs_one_round_trip_a_delivery() {
    let t = TestDb::new();
    with_effects_table(&t);
    let handler = |tx: &mut Transaction<'_>, message: &Message| -> Result<(), HandlerError> {
        let insert = consumer::prepared(tx, "INSERT INTO effects (message_id, n) VALUES ($1, $2)")?;
        let n = message.payload["n"].as_i64().unwrap_or(-1) as i32;
        tx.execute(&insert, &[&message.message_id, &n])?;
        Ok(())
    };
    assert_eq!(
        round_trips_of_a_delivery(&t, handler),
        4,
        "round trips for one delivery"
    );
    assert_eq!(t.count("SELECT count(*) FROM effects"), 2);
}

#[test]
fn prepared_outside_a_handler_prepares_anew() {
    let t = TestDb::new();
    let proxy = RoundTripProxy::new(&t.url);
    let mut client = postgres::Client::connect(&proxy.url, postgres::NoTls).unwrap();
    let mut tx = client.transaction().unwrap();
    let before = proxy.round_trips();
    let first = consumer::prepared(&mut tx, "SELECT 1").unwrap();
    let second = consumer::prepared(&mut tx, "SELECT 1").unwrap();
    assert_eq!(
        proxy.round_trips() - before,
        2,
        "nothing is kept outside a handler"
    );
    for statement in [first, second] {
        let one: i32 = tx.query_one(&statement, &[]).unwrap().get(0);
        assert_eq!(one, 1);
    }
}

/// A handler's kept statement that a migration made stale ("cached plan must not change result
/// type") is not the message's fault: the consumer drops its statements, the delivery comes back
/// without counting as a failed attempt, and applies.
#[test]
fn a_statement_made_stale_by_a_migration_is_prepared_again_not_dead_lettered() {
    let t = TestDb::new();
    t.client()
        .batch_execute("CREATE TABLE shape (n int); INSERT INTO shape VALUES (1)")
        .unwrap();
    let broker = TestBroker::new();
    // No retries: a failure counted against the message would dead-letter it.
    let config = ConsumerConfig {
        max_retries: 0,
        ..config()
    };
    let handler = |tx: &mut Transaction<'_>, _: &Message| -> Result<(), HandlerError> {
        let read = consumer::prepared(tx, "SELECT * FROM shape")?;
        tx.query(&read, &[])?;
        Ok(())
    };
    // One connection: the one whose statement goes stale.
    let options = PoolOptions {
        max_size: 1,
        ..PoolOptions::default()
    };
    let db = Database::connect(&t.url, &options).unwrap();
    let handle = consumer::start(db, &broker.url, broker.topology.clone(), config, handler).unwrap();
    broker.publish_raw(Some(&Uuid::new_v4().to_string()), "TestHappened", &body(1));
    wait_until("the first delivery is applied", WAIT, || {
        handle.stats().applied() == 1
    });
    t.client()
        .batch_execute("ALTER TABLE shape ADD COLUMN added int")
        .unwrap();
    // Alone in its batch: a failure of a batch of several is retried one by one uncounted.
    broker.publish_raw(Some(&Uuid::new_v4().to_string()), "TestHappened", &body(2));
    wait_until("the delivery after the migration is applied", WAIT, || {
        handle.stats().applied() == 2
    });
    let failed = handle.stats().failed();
    handle.stop();
    assert_eq!(failed, 0, "the stale statement counted against a message");
    assert_eq!(broker.ready(&broker.topology.dead_letter_queue()), 0);
    assert_eq!(t.count("SELECT count(*) FROM processed_messages"), 2);
}

/// `prepared` on a transaction other than the handler's (here another connection's) prepares
/// there, instead of handing out a statement of the consumer's connection, which that other
/// connection does not have.
#[test]
fn prepared_on_another_connection_in_a_handler_prepares_there() {
    let t = TestDb::new();
    with_effects_table(&t);
    let broker = TestBroker::new();
    let insert = "INSERT INTO effects (message_id, n) VALUES ($1, $2)";
    let mut other = t.client();
    let handler = move |tx: &mut Transaction<'_>, message: &Message| -> Result<(), HandlerError> {
        let here = consumer::prepared(tx, insert)?;
        tx.execute(&here, &[&message.message_id, &1])?;
        let mut elsewhere = other.transaction()?;
        let there = consumer::prepared(&mut elsewhere, insert)?;
        elsewhere.execute(&there, &[&message.message_id, &2])?;
        elsewhere.commit()?;
        Ok(())
    };
    let handle = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        config(),
        handler,
    )
    .unwrap();
    for n in 1..=3 {
        broker.publish_raw(Some(&Uuid::new_v4().to_string()), "TestHappened", &body(n));
    }
    wait_until("every delivery is applied", WAIT, || {
        handle.stats().applied() == 3
    });
    handle.stop();
    assert_eq!(t.count("SELECT count(*) FROM effects WHERE n = 2"), 3);
    assert_eq!(broker.ready(&broker.topology.dead_letter_queue()), 0);
}
