//! Operator tasks against the real Postgres and RabbitMQ.

use std::time::Duration;

use serde_json::json;
use txoutbox::retention::{self, RetentionConfig};
use txoutbox::{admin, enqueue, NewEvent};
use txoutbox_testkit::{RoundTripProxy, TestBroker, TestDb};
use uuid::Uuid;

#[test]
fn status_reports_backlog_failed_and_queue_depths() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let mut client = t.client();
    let mut tx = client.transaction().unwrap();
    for n in 0..3 {
        enqueue(
            &mut tx,
            &NewEvent::new("test", n.to_string(), "TestHappened", json!({})),
        )
        .unwrap();
    }
    tx.commit().unwrap();
    client
        .batch_execute("UPDATE outbox SET failed_at = now() WHERE aggregate_id = '0'")
        .unwrap();
    broker.publish_raw(Some(&Uuid::new_v4().to_string()), "TestHappened", b"{}");
    txoutbox_testkit::wait_until("the message is in the queue", Duration::from_secs(10), || {
        broker.ready_main() == 1
    });

    let status = admin::status(&mut client, &Default::default(), &broker.url, &broker.topology).unwrap();
    assert_eq!((status.backlog, status.failed), (2, 1));
    assert!(status.oldest_age_secs >= 0.0);
    assert_eq!((status.queue_depth, status.dlq_depth), (Some(1), Some(0)));
}

#[test]
fn dead_letters_are_replayed_onto_the_main_queue_once() {
    let broker = TestBroker::new();
    let (connection, channel) = txoutbox::broker::connect(&broker.url).unwrap();
    for n in 0..5 {
        let body = format!("{{\"n\":{n}}}");
        channel
            .basic_publish(
                broker.topology.dead_letter_exchange(),
                amiquip::Publish::new(body.as_bytes(), "TestHappened"),
            )
            .unwrap();
    }
    let dlq = broker.topology.dead_letter_queue();
    txoutbox_testkit::wait_until("five dead letters", Duration::from_secs(10), || {
        broker.ready(&dlq) == 5
    });
    assert_eq!(
        admin::replay_dead_letters_at_most(&broker.url, &broker.topology, 2).unwrap(),
        2,
        "a bounded replay stops at its limit"
    );
    assert_eq!((broker.ready(&dlq), broker.ready_main()), (3, 2));
    assert_eq!(
        admin::replay_dead_letters(&broker.url, &broker.topology).unwrap(),
        3
    );
    assert_eq!(broker.ready(&dlq), 0);
    assert_eq!(broker.ready_main(), 5);
    assert_eq!(
        admin::replay_dead_letters(&broker.url, &broker.topology).unwrap(),
        0,
        "nothing left to move"
    );
    let _ = channel.close();
    let _ = connection.close();
}

#[test]
fn purging_processed_messages_keeps_the_recent_ones() {
    let t = TestDb::new();
    let mut client = t.client();
    client
        .batch_execute(
            "INSERT INTO processed_messages (message_id, processed_at)
             SELECT gen_random_uuid(), now() - interval '8 days' FROM generate_series(1, 2500);
             INSERT INTO processed_messages (message_id)
             SELECT gen_random_uuid() FROM generate_series(1, 10);",
        )
        .unwrap();
    assert_eq!(purge_older_than_a_week(&mut client), 2500);
    assert_eq!(t.count("SELECT count(*) FROM processed_messages"), 10);
}

/// `admin::purge_processed` of the rows older than seven days, in batches of 1,000.
fn purge_older_than_a_week(client: &mut postgres::Client) -> u64 {
    admin::purge_processed(client, &Default::default(), Duration::from_secs(7 * 86_400), 1000).unwrap()
}

/// A purge prepares its statement once and runs it per batch: three batches are four round
/// trips (the statement's text per batch was two each, and a close).
#[test]
fn a_purge_prepares_its_statement_once_for_all_its_batches() {
    let t = TestDb::new();
    t.client()
        .batch_execute(
            "INSERT INTO processed_messages (message_id, processed_at)
             SELECT gen_random_uuid(), now() - interval '8 days' FROM generate_series(1, 2500);",
        )
        .unwrap();
    let proxy = RoundTripProxy::new(&t.url);
    let mut client = txoutbox::db::connect_url(&proxy.url, Duration::from_secs(30)).unwrap();
    let before = proxy.round_trips();
    let deleted = purge_older_than_a_week(&mut client);
    let cost = proxy.round_trips() - before;
    assert_eq!(deleted, 2500);
    assert_eq!(cost, 4, "round trips for a purge of three batches");
}

#[test]
fn retention_purges_old_dedupe_rows_in_batches_and_keeps_recent_ones() {
    let t = TestDb::new();
    t.client()
        .batch_execute(
            "INSERT INTO processed_messages (message_id, event_type, aggregate_id, processed_at)
             SELECT gen_random_uuid(), 'TestHappened', n::text, now() - interval '8 days'
             FROM generate_series(1, 2500) n;
             INSERT INTO processed_messages (message_id, event_type, aggregate_id, processed_at)
             SELECT gen_random_uuid(), 'TestHappened', n::text, now() - interval '6 days'
             FROM generate_series(1, 10) n;
             CREATE TABLE delete_statements (at timestamptz DEFAULT now());
             CREATE FUNCTION count_delete() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO delete_statements DEFAULT VALUES; RETURN NULL; END $$;
             CREATE TRIGGER count_delete AFTER DELETE ON processed_messages
               FOR EACH STATEMENT EXECUTE FUNCTION count_delete();",
        )
        .unwrap();
    let handle = retention::start(
        t.db.clone(),
        RetentionConfig {
            keep: Duration::from_secs(7 * 86_400),
            interval: Duration::from_millis(100),
            batch: 300,
        },
    )
    .unwrap();
    txoutbox_testkit::wait_until("old rows are purged", Duration::from_secs(30), || {
        t.count("SELECT count(*) FROM processed_messages WHERE processed_at < now() - interval '7 days'") == 0
    });
    // 2,500 rows in batches of 300: at least 9 statements, none holding every row's lock.
    assert!(t.count("SELECT count(*) FROM delete_statements") >= 9);
    // Rows that age past the window later are purged by a later run.
    t.client()
        .batch_execute(
            "UPDATE processed_messages SET processed_at = now() - interval '9 days'
             WHERE aggregate_id IN ('1', '2')",
        )
        .unwrap();
    txoutbox_testkit::wait_until(
        "a later run purges newly aged rows",
        Duration::from_secs(30),
        || t.count("SELECT count(*) FROM processed_messages") == 8,
    );
    handle.stop();
    assert_eq!(t.count("SELECT count(*) FROM processed_messages"), 8);
}

#[test]
fn retention_refuses_an_empty_batch() {
    let t = TestDb::new();
    let config = RetentionConfig {
        batch: 0,
        ..RetentionConfig::default()
    };
    let error = retention::start(t.db.clone(), config)
        .err()
        .expect("a batch of 0 is refused");
    assert!(error.to_string().contains("batch"), "{error}");
}
