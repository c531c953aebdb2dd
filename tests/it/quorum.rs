//! `AMQP_QUEUE_TYPE=quorum`: the same guarantees over quorum queues, on the real RabbitMQ.

use std::time::Duration;

use postgres::Transaction;
use serde_json::json;
use txoutbox::{
    consumer, enqueue, relay, ConsumerConfig, HandlerError, Message, NewEvent, QueueType, RelayConfig,
};
use txoutbox_testkit::{wait_until, TestBroker, TestDb};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);
const EVENTS: usize = 300;

/// The type RabbitMQ reports for `queue`.
fn queue_type(queue: &str) -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "--quiet", "--no-table-headers", "name", "type"])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| {
            let (name, kind) = line.split_once('\t')?;
            (name == queue).then(|| kind.trim().to_string())
        })
        .unwrap_or_else(|| panic!("rabbitmqctl does not list queue {queue}"))
}

fn count_effect(tx: &mut Transaction<'_>, message: &Message) -> Result<(), HandlerError> {
    tx.execute(
        "INSERT INTO effects (message_id) VALUES ($1)",
        &[&message.message_id],
    )?;
    Ok(())
}

#[test]
fn quorum_queues_carry_every_event_once_and_dead_letter_the_malformed() {
    let t = TestDb::new();
    t.client()
        .batch_execute("CREATE TABLE effects (message_id uuid NOT NULL)")
        .unwrap();
    let broker = TestBroker::with_queue_type(QueueType::Quorum);
    assert_eq!(queue_type(&broker.topology.queue), "quorum");
    assert_eq!(queue_type(&broker.topology.dead_letter_queue()), "quorum");

    let mut client = t.client();
    let mut tx = client.transaction().unwrap();
    for n in 0..EVENTS {
        let event = NewEvent::new("test", n.to_string(), "TestHappened", json!({ "n": n }));
        enqueue(&mut tx, &event).unwrap();
    }
    tx.commit().unwrap();
    // A redelivery of a message the relay also publishes, and one the consumer cannot parse.
    let duplicate_id: Uuid = t
        .client()
        .query_one("SELECT message_id FROM outbox ORDER BY id LIMIT 1", &[])
        .unwrap()
        .get(0);
    broker.publish_raw(Some(&duplicate_id.to_string()), "TestHappened", b"{\"n\": 0}");
    broker.publish_raw(Some(&Uuid::new_v4().to_string()), "TestHappened", b"not json");

    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        RelayConfig {
            poll_interval: Duration::from_millis(200),
            ..RelayConfig::default()
        },
    )
    .unwrap();
    let consumer = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        ConsumerConfig::default(),
        count_effect,
    )
    .unwrap();
    wait_until("every event is published and applied", WAIT, || {
        t.count("SELECT count(*) FROM outbox") == 0
            && consumer.stats().applied() as usize == EVENTS
            && consumer.stats().duplicates() == 1
            && consumer.stats().rejected() == 1
    });
    relay.stop();
    consumer.stop();

    assert_eq!(t.count("SELECT count(*) FROM effects"), EVENTS as i64);
    assert_eq!(
        t.count("SELECT count(DISTINCT message_id) FROM effects"),
        EVENTS as i64
    );
    assert_eq!(broker.ready_main(), 0);
    wait_until(
        "the malformed message reaches the dead-letter queue",
        WAIT,
        || broker.ready(&broker.topology.dead_letter_queue()) == 1,
    );
}

#[test]
fn a_classic_queue_is_not_silently_taken_for_a_quorum_one() {
    let broker = TestBroker::new();
    let (connection, channel) = txoutbox::broker::connect(&broker.url).unwrap();
    let quorum = broker.topology.clone().with_queue_type(QueueType::Quorum);
    let error = quorum
        .declare(&channel)
        .expect_err("RabbitMQ refuses to redeclare a classic queue as quorum");
    let _ = connection.close();
    let message = error.to_string();
    assert!(message.contains(&broker.topology.queue), "{message}");
    assert!(message.contains("AMQP_QUEUE_TYPE"), "{message}");
}

#[test]
fn queue_types_parse_and_bad_ones_are_named() {
    assert_eq!(QueueType::parse("quorum").unwrap(), QueueType::Quorum);
    assert_eq!(QueueType::parse(" Classic ").unwrap(), QueueType::Classic);
    let error = QueueType::parse("stream").unwrap_err().to_string();
    assert!(
        error.contains("AMQP_QUEUE_TYPE") && error.contains("stream"),
        "{error}"
    );
}
