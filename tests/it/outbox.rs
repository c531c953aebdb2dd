//! Enqueueing from any sync stack: a transaction, a plain client inside its own BEGIN, many
//! events in one statement, tables in a schema of their own whatever the connection's
//! search_path.

use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use serde_json::json;
use txoutbox::{enqueue, enqueue_many, relay, NewEvent, Outbox, PoolOptions, Schema};
use txoutbox_testkit::{quick_relay, wait_until, TestBroker, TestDb};

fn event(n: i32) -> NewEvent {
    NewEvent::new("ticket", format!("t-{n}"), "TicketOpened", json!({ "n": n }))
}

fn message_ids_in_id_order(t: &TestDb, table: &str) -> Vec<uuid::Uuid> {
    t.client()
        .query(&format!("SELECT message_id FROM {table} ORDER BY id"), &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[test]
fn a_plain_client_inside_its_own_begin_enqueues_and_rolls_back_with_it() {
    let t = TestDb::new();
    let mut client = t.client();
    client.batch_execute("BEGIN").unwrap();
    enqueue(&mut client, &event(1)).unwrap();
    client.batch_execute("ROLLBACK").unwrap();
    assert_eq!(
        t.count("SELECT count(*) FROM outbox"),
        0,
        "a rolled-back event never existed"
    );

    client.batch_execute("BEGIN").unwrap();
    enqueue(&mut client, &event(2)).unwrap();
    assert_eq!(
        t.count("SELECT count(*) FROM outbox"),
        0,
        "not visible before the commit"
    );
    client.batch_execute("COMMIT").unwrap();
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 1);

    // A pooled connection is a client too.
    let mut pooled = t.db.get().unwrap();
    let mut tx = pooled.transaction().unwrap();
    t.db.outbox().enqueue_ordered(&mut tx, &event(3)).unwrap();
    tx.commit().unwrap();
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 2);
}

#[test]
fn many_events_go_in_one_statement_in_the_order_given_or_not_at_all() {
    let t = TestDb::new();
    let events: Vec<NewEvent> = (0..50).map(event).collect();
    let mut client = t.client();
    let mut tx = client.transaction().unwrap();
    assert_eq!(enqueue_many(&mut tx, &events).unwrap(), 50);
    assert_eq!(enqueue_many(&mut tx, &[]).unwrap(), 0);
    tx.commit().unwrap();
    let expected: Vec<uuid::Uuid> = events.iter().map(|e| e.message_id).collect();
    assert_eq!(message_ids_in_id_order(&t, "outbox"), expected);

    // One duplicate message id fails the whole statement: nothing of the batch is written.
    let mut again: Vec<NewEvent> = (50..60).map(event).collect();
    again.push(events[0].clone());
    let mut tx = client.transaction().unwrap();
    let error = t.db.outbox().enqueue_many_ordered(&mut tx, &again).unwrap_err();
    assert!(error.to_string().contains("cannot enqueue 11 events"), "{error}");
    drop(tx);
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 50);

    // Ordered: events of one aggregate keep their order, the locks are taken in sorted order.
    let ordered: Vec<NewEvent> = (0..20)
        .map(|n| NewEvent::new("ticket", format!("t-{}", n % 3), "TicketNoted", json!({ "n": n })))
        .collect();
    let mut tx = client.transaction().unwrap();
    t.db.outbox().enqueue_many_ordered(&mut tx, &ordered).unwrap();
    tx.commit().unwrap();
    let tail: Vec<uuid::Uuid> = message_ids_in_id_order(&t, "outbox").split_off(50);
    assert_eq!(tail, ordered.iter().map(|e| e.message_id).collect::<Vec<_>>());
}

#[test]
fn destinations_are_stored_with_the_event() {
    let t = TestDb::new();
    let mut client = t.client();
    let routed = event(1)
        .to_exchange("billing.events")
        .with_routing_key("billing.ticket");
    let plain = event(2);
    enqueue_many(&mut client, &[routed, plain]).unwrap();
    let rows = client
        .query("SELECT exchange, routing_key FROM outbox ORDER BY id", &[])
        .unwrap();
    let stored: Vec<(Option<String>, Option<String>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        stored,
        vec![
            (Some("billing.events".into()), Some("billing.ticket".into())),
            (None, None)
        ]
    );
}

/// The library names its tables with their schema: a connection whose search_path does not
/// include it (the caller's own, never told about txoutbox) enqueues into it all the same, and
/// a relay on that schema publishes the event.
#[test]
fn a_schema_of_its_own_works_on_any_connection_whatever_its_search_path() {
    let t = TestDb::with_pool(PoolOptions {
        max_size: 4,
        schema: "billing_outbox".into(),
        ..PoolOptions::default()
    });
    let outbox = Outbox::new(Schema::new("billing_outbox").unwrap());
    let mut client = t.client();
    let search_path: String = client.query_one("SHOW search_path", &[]).unwrap().get(0);
    assert!(!search_path.contains("billing_outbox"), "{search_path}");
    let mut tx = client.transaction().unwrap();
    outbox.enqueue(&mut tx, &event(1)).unwrap();
    tx.commit().unwrap();
    assert_eq!(t.count("SELECT count(*) FROM billing_outbox.outbox"), 1);
    // The free function writes to what the connection's search_path finds: here public, which
    // this database has no outbox in.
    let error = enqueue(&mut client, &event(2)).unwrap_err();
    assert!(error.to_string().contains("cannot enqueue"), "{error}");

    let broker = TestBroker::new();
    let handle = relay::start(t.db.clone(), &broker.url, broker.topology.clone(), quick_relay(1)).unwrap();
    wait_until(
        "the relay publishes the event of schema billing_outbox",
        Duration::from_secs(30),
        || handle.stats().published() == 1,
    );
    handle.stop();
    assert_eq!(t.count("SELECT count(*) FROM billing_outbox.outbox"), 0);
    assert_eq!(broker.ready_main(), 1);
}

#[test]
fn a_row_and_its_event_go_in_one_statement_of_the_callers_or_not_at_all() {
    let t = TestDb::with_pool(PoolOptions {
        max_size: 2,
        schema: "shop_outbox".into(),
        ..PoolOptions::default()
    });
    let mut client = t.client();
    client
        .batch_execute("CREATE TABLE invoices (id bigserial PRIMARY KEY, total numeric(12, 2) NOT NULL CHECK (total > 0))")
        .unwrap();
    let event = t.db.outbox().insert_select_sql(
        "SELECT gen_random_uuid(), 'invoice', i.id::text, 'InvoiceSent',
                jsonb_build_object('id', i.id, 'total', i.total::text), NULL, NULL, NULL, NULL
         FROM sent i",
    );
    let sql = format!(
        "WITH sent AS (INSERT INTO invoices (total) VALUES ($1::text::numeric) RETURNING id, total),
              event AS ({event})
         SELECT id FROM sent"
    );
    let mut listener = t.client();
    listener.batch_execute("LISTEN txoutbox_outbox").unwrap();

    let id: i64 = client.query_one(&sql, &[&"12.50"]).unwrap().get(0);
    let payload: serde_json::Value = client
        .query_one(
            "SELECT payload FROM shop_outbox.outbox WHERE aggregate_id = $1",
            &[&id.to_string()],
        )
        .unwrap()
        .get(0);
    assert_eq!(payload, json!({ "id": id, "total": "12.50" }));
    let notified = listener
        .notifications()
        .timeout_iter(Duration::from_secs(10))
        .next()
        .unwrap();
    assert!(notified.is_some(), "the insert notifies the relay at commit");

    // A refused row: no event either.
    let refused = client.query_one(&sql, &[&"0.00"]).unwrap_err();
    let reason = refused.as_db_error().map(|e| e.message().to_string());
    assert!(
        reason.as_deref().is_some_and(|m| m.contains("check constraint")),
        "{refused:?}"
    );
    assert_eq!(t.count("SELECT count(*) FROM invoices"), 1);
    assert_eq!(t.count("SELECT count(*) FROM shop_outbox.outbox"), 1);

    let broker = TestBroker::new();
    let handle = relay::start(t.db.clone(), &broker.url, broker.topology.clone(), quick_relay(1)).unwrap();
    wait_until("the relay publishes the event", Duration::from_secs(30), || {
        handle.stats().published() == 1
    });
    handle.stop();
    assert_eq!(broker.ready_main(), 1);
}
