//! Per-aggregate ordering (`RELAY_ORDERING=aggregate`) and order cancellation, against the real
//! Postgres and RabbitMQ.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use txoutbox::config::RelayOrdering;
use txoutbox::outbox::enqueue_ordered;
use txoutbox::{relay, NewEvent, RelayConfig};
use txoutbox_testkit::{wait_until, TestBroker, TestDb};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

fn ordered_relay(workers: usize, batch: i64) -> RelayConfig {
    RelayConfig {
        workers,
        batch_size: batch,
        ordering: RelayOrdering::Aggregate,
        poll_interval: Duration::from_millis(200),
        retry_delay: Duration::from_millis(50),
        max_attempts: 1000,
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        ..RelayConfig::default()
    }
}

/// Routes only `event_types` to the test queue: other events come back unroutable (refused).
/// Call it once the relay is connected: the relay declares the usual binding when it connects.
fn route_only(
    broker: &TestBroker,
    relay: &relay::RelayHandle,
    workers: u64,
    event_types: &[&str],
) -> (amiquip::Connection, amiquip::Channel) {
    wait_until("the relay is connected", WAIT, || {
        relay.stats().connected_workers() == workers
    });
    let (connection, channel) = txoutbox::broker::connect(&broker.url).unwrap();
    let (queue, exchange) = (broker.topology.queue.as_str(), broker.topology.exchange.as_str());
    channel
        .queue_unbind(queue, exchange, "#", Default::default())
        .unwrap();
    for event_type in event_types {
        channel
            .queue_bind(queue, exchange, *event_type, Default::default())
            .unwrap();
    }
    (connection, channel)
}

fn route_everything(broker: &TestBroker, channel: &amiquip::Channel) {
    let (queue, exchange) = (broker.topology.queue.as_str(), broker.topology.exchange.as_str());
    channel
        .queue_bind(queue, exchange, "#", Default::default())
        .unwrap();
}

/// `(aggregate, seq)` of every message in the queue, in queue order.
fn drained_sequences(broker: &TestBroker) -> Vec<(String, i64)> {
    broker
        .drain(&broker.topology.queue)
        .iter()
        .map(|m| {
            let body: Value = serde_json::from_slice(&m.body).expect("JSON body");
            let aggregate = body["aggregate"].as_str().expect("aggregate").to_string();
            (aggregate, body["seq"].as_i64().expect("seq"))
        })
        .collect()
}

/// Asserts that each aggregate's events arrived as 1, 2, ..., `expected[aggregate]`; a
/// redelivered event may repeat right where it was, never after a later one.
fn assert_commit_order(got: &[(String, i64)], expected: &HashMap<String, i64>) {
    let mut per_aggregate: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (aggregate, seq) in got {
        per_aggregate.entry(aggregate).or_default().push(*seq);
    }
    assert_eq!(per_aggregate.len(), expected.len(), "aggregates seen");
    for (aggregate, seqs) in &per_aggregate {
        let mut deduped = seqs.clone();
        deduped.dedup();
        let want: Vec<i64> = (1..=expected[*aggregate]).collect();
        assert_eq!(
            deduped, want,
            "aggregate {aggregate}: events arrived out of commit order: {seqs:?}"
        );
    }
}

/// Writes one event of `aggregate` whose `seq` is its place in the aggregate's commit order.
///
/// The event is inserted first and its `seq` taken afterwards from a counter row, whose lock is
/// held until commit: so `seq` follows commit order. The pauses let transactions of other
/// aggregates (and, without the ordering lock, of this one) commit in between.
fn write_event(client: &mut postgres::Client, aggregate: &str, event_type: &str, pause_ms: f64) {
    let mut tx = client.transaction().unwrap();
    let event = NewEvent::new("test", aggregate, event_type, json!({ "aggregate": aggregate }));
    enqueue_ordered(&mut tx, &event).unwrap();
    tx.execute("SELECT pg_sleep($1::float8 / 1000)", &[&pause_ms])
        .unwrap();
    let seq: i64 = tx
        .query_one(
            "UPDATE seqs SET n = n + 1 WHERE aggregate = $1 RETURNING n",
            &[&aggregate],
        )
        .unwrap()
        .get(0);
    tx.execute(
        "UPDATE outbox SET payload = jsonb_set(payload, '{seq}', to_jsonb($2::bigint))
         WHERE message_id = $1",
        &[&event.message_id, &seq],
    )
    .unwrap();
    tx.execute("SELECT pg_sleep($1::float8 / 1000)", &[&pause_ms])
        .unwrap();
    tx.commit().unwrap();
}

#[test]
fn each_aggregates_events_arrive_in_commit_order_with_five_workers_and_refusals() {
    const AGGREGATES: usize = 200;
    const PER_AGGREGATE: usize = 5;
    const WRITERS: usize = 8;
    let t = TestDb::new();
    let broker = TestBroker::new();
    let mut setup = t.client();
    setup
        .batch_execute(
            "CREATE TABLE seqs (aggregate text PRIMARY KEY, n bigint NOT NULL DEFAULT 0);
             INSERT INTO seqs SELECT 'agg-' || g FROM generate_series(0, 199) g;",
        )
        .unwrap();
    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        ordered_relay(5, 20),
    )
    .unwrap();
    // "Flaky" events come back unroutable until the binding below is added: they are retried
    // while the events behind them in their aggregate must wait.
    let (connection, channel) = route_only(&broker, &relay, 5, &["Steady"]);

    // Writes of one aggregate are queued next to each other, so that several writers work on
    // the same aggregate at once.
    let mut jobs = Vec::new();
    for a in 0..AGGREGATES {
        for n in 0..PER_AGGREGATE {
            let flaky = (a * PER_AGGREGATE + n) % 7 == 3;
            jobs.push((format!("agg-{a}"), if flaky { "Flaky" } else { "Steady" }));
        }
    }
    jobs.reverse();
    let jobs = Arc::new(Mutex::new(jobs));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let jobs = jobs.clone();
            let mut client = t.client();
            std::thread::spawn(move || {
                let mut k = w;
                loop {
                    let Some((aggregate, event_type)) = jobs.lock().unwrap().pop() else {
                        break;
                    };
                    k += 1;
                    write_event(&mut client, &aggregate, event_type, (k % 4) as f64);
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("writer thread");
    }
    wait_until("some flaky events are refused", WAIT, || {
        relay.stats().refused() >= 20
    });
    route_everything(&broker, &channel);
    wait_until("the outbox is empty", WAIT, || {
        t.count("SELECT count(*) FROM outbox") == 0
    });
    relay.stop();

    let got = drained_sequences(&broker);
    let expected: HashMap<String, i64> = (0..AGGREGATES)
        .map(|a| (format!("agg-{a}"), PER_AGGREGATE as i64))
        .collect();
    assert!(got.len() >= AGGREGATES * PER_AGGREGATE);
    assert_commit_order(&got, &expected);
    let _ = channel.close();
    let _ = connection.close();
}

#[test]
fn a_failed_event_blocks_only_its_own_aggregate_until_it_is_requeued() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    // Batches of 2: the ordered claim's first look covers the oldest 10 rows only (2 workers'
    // batches and 3 more), which the blocked aggregate fills, so the other aggregates are found
    // by the look beyond.
    let config = RelayConfig {
        max_attempts: 2,
        ..ordered_relay(2, 2)
    };
    let relay = relay::start(t.db.clone(), &broker.url, broker.topology.clone(), config).unwrap();
    let (connection, channel) = route_only(&broker, &relay, 2, &["Steady"]);
    let mut client = t.client();
    let write = |client: &mut postgres::Client, aggregate: &str, event_type: &str, seq: i64| {
        let mut tx = client.transaction().unwrap();
        let payload = json!({ "aggregate": aggregate, "seq": seq });
        enqueue_ordered(&mut tx, &NewEvent::new("test", aggregate, event_type, payload)).unwrap();
        tx.commit().unwrap();
    };
    // The blocked aggregate's events come first: were they not held back, they would go first.
    write(&mut client, "blocked", "Flaky", 1);
    for seq in 2..=20 {
        write(&mut client, "blocked", "Steady", seq);
    }
    for a in 0..10 {
        for seq in 1..=3 {
            write(&mut client, &format!("free-{a}"), "Steady", seq);
        }
    }
    wait_until("the flaky event is marked failed", WAIT, || {
        relay.stats().failed() == 1
    });
    wait_until("the other aggregates' events are published", WAIT, || {
        t.count("SELECT count(*) FROM outbox WHERE aggregate_id <> 'blocked'") == 0
    });
    assert_eq!(
        t.count("SELECT count(*) FROM outbox WHERE aggregate_id = 'blocked'"),
        20,
        "the events behind the failed one must wait"
    );

    route_everything(&broker, &channel);
    let failed = txoutbox::Outbox::default()
        .failed_events(&mut client, 10)
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(
        txoutbox::Outbox::default()
            .requeue_failed(&mut client, Some(failed[0].id))
            .unwrap(),
        1
    );
    wait_until(
        "the re-queued event and those behind it are published",
        WAIT,
        || t.count("SELECT count(*) FROM outbox") == 0,
    );
    relay.stop();
    let got = drained_sequences(&broker);
    let mut expected: HashMap<String, i64> = (0..10).map(|a| (format!("free-{a}"), 3)).collect();
    expected.insert("blocked".into(), 20);
    assert_commit_order(&got, &expected);
    let _ = channel.close();
    let _ = connection.close();
}

// ---- POST /orders/{id}/cancel ----

use txoutbox::{consumer, ConsumerConfig, Handler, Message};
use txoutbox_service::config::Secret;
use txoutbox_service::orders::{Announce, OrderEvents};
use txoutbox_service::{http, HttpConfig};
use txoutbox_testkit::{http_raw, post_order, HttpReply};

fn serve_with(t: &TestDb, api_token: Option<&str>) -> http::HttpHandle {
    let config = HttpConfig {
        addr: "127.0.0.1:0".into(),
        threads: 4,
        api_token: api_token.map(Secret::new),
        ..HttpConfig::default()
    };
    http::serve(&config, t.db.clone(), Announce::Notify).unwrap()
}

fn create_order(addr: std::net::SocketAddr) -> String {
    let user = Uuid::new_v4();
    let reply = post_order(addr, &format!(r#"{{"user_id":"{user}","amount":"12.50"}}"#));
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    reply.body["id"].as_str().expect("id").to_string()
}

fn cancel(addr: std::net::SocketAddr, id: &str, extra_headers: &str) -> HttpReply {
    http_raw(
        addr,
        &format!("POST /orders/{id}/cancel HTTP/1.1\r\nContent-Length: 0{extra_headers}"),
        b"",
    )
}

/// Rows of orders and outbox, and the orders' last change: what a refused request must not move.
fn snapshot(t: &TestDb) -> (i64, i64, String) {
    let row = t
        .client()
        .query_one(
            "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM outbox),
                    coalesce((SELECT string_agg(status || updated_at::text, ',' ORDER BY id) FROM orders), '')",
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[test]
fn cancel_answers_the_cancelled_order_and_writes_order_cancelled_in_the_same_transaction() {
    let t = TestDb::new();
    let server = serve_with(&t, None);
    let id = create_order(server.addr());
    let reply = cancel(server.addr(), &id, "");
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["id"], id.as_str());
    assert_eq!(reply.body["status"], "CANCELLED");
    assert_eq!(reply.body["amount"], "12.50");

    let mut client = t.client();
    let event = client
        .query_one(
            "SELECT e.aggregate_type, e.payload, e.created_at = o.updated_at
             FROM outbox e JOIN orders o ON o.id::text = e.aggregate_id
             WHERE e.event_type = 'OrderCancelled'",
            &[],
        )
        .unwrap();
    assert_eq!(event.get::<_, String>(0), "order");
    let payload: Value = event.get(1);
    assert_eq!(payload["order_id"], id.as_str());
    assert_eq!(payload["user_id"], reply.body["user_id"]);
    assert_eq!(payload["amount"], "12.50");
    assert_eq!(payload["cancelled_at"], reply.body["updated_at"]);
    // now() is the transaction's start: equal only when written by the same transaction.
    assert!(
        event.get::<_, bool>(2),
        "status change and event in one transaction"
    );
    let order_ids: Vec<String> = client
        .query("SELECT event_type FROM outbox ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(order_ids, ["OrderCreated", "OrderCancelled"]);
    server.stop();
}

#[test]
fn cancel_refuses_bad_unknown_and_cancelled_orders_and_writes_nothing() {
    let t = TestDb::new();
    let server = serve_with(&t, None);
    let addr = server.addr();
    let id = create_order(addr);
    assert_eq!(cancel(addr, &id, "").status, 200);
    let before = snapshot(&t);

    let again = cancel(addr, &id, "");
    assert_eq!(again.status, 409, "{:?}", again.body);
    assert!(again.body["error"]
        .as_str()
        .is_some_and(|e| e.contains("already cancelled")));
    assert_eq!(again.body["status"], "CANCELLED");

    let unknown = cancel(addr, &Uuid::new_v4().to_string(), "");
    assert_eq!(unknown.status, 404, "{:?}", unknown.body);
    assert!(unknown.body["error"].is_string());

    let bad = cancel(addr, "not-a-uuid", "");
    assert_eq!(bad.status, 400, "{:?}", bad.body);
    assert!(bad.body["error"].as_str().is_some_and(|e| e.contains("UUID")));

    let get = http_raw(addr, &format!("GET /orders/{id}/cancel HTTP/1.1"), b"");
    assert_eq!(get.status, 405);
    assert_eq!(get.header("Allow"), Some("POST"));

    assert_eq!(snapshot(&t), before, "a refused cancel must write nothing");
    server.stop();
}

#[test]
fn cancel_needs_the_api_token_when_one_is_set() {
    let t = TestDb::new();
    let server = serve_with(&t, Some("s3cret"));
    let addr = server.addr();
    let user = Uuid::new_v4();
    let body = format!(r#"{{"user_id":"{user}","amount":"1"}}"#);
    let created = http_raw(
        addr,
        &format!(
            "POST /orders HTTP/1.1\r\nAuthorization: Bearer s3cret\r\nContent-Type: application/json\r\nContent-Length: {}",
            body.len()
        ),
        body.as_bytes(),
    );
    assert_eq!(created.status, 201);
    let id = created.body["id"].as_str().unwrap().to_string();
    let before = snapshot(&t);
    let refused = cancel(addr, &id, "");
    assert_eq!(refused.status, 401);
    assert_eq!(refused.header("WWW-Authenticate"), Some("Bearer"));
    assert_eq!(cancel(addr, &id, "\r\nAuthorization: Bearer wrong").status, 401);
    assert_eq!(snapshot(&t), before);
    assert_eq!(cancel(addr, &id, "\r\nAuthorization: Bearer s3cret").status, 200);
    server.stop();
}

#[test]
fn a_cancel_whose_event_cannot_be_written_leaves_the_order_as_it_was() {
    let t = TestDb::new();
    let server = serve_with(&t, None);
    let id = create_order(server.addr());
    t.client()
        .batch_execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'outbox refused by test'; END $$;
             CREATE TRIGGER refuse BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION refuse();",
        )
        .unwrap();
    let before = snapshot(&t);
    let reply = cancel(server.addr(), &id, "");
    assert_eq!(reply.status, 500, "{:?}", reply.body);
    assert_eq!(
        snapshot(&t),
        before,
        "the status change must roll back with the event"
    );
    server.stop();
}

fn order_message(event_type: &str, order_id: Uuid) -> Message {
    Message {
        message_id: Uuid::now_v7(),
        event_type: Some(event_type.into()),
        aggregate_type: Some("order".into()),
        aggregate_id: Some(order_id.to_string()),
        aggregate_sequence: None,
        payload: json!({ "order_id": order_id.to_string() }),
        redelivered: false,
        trace_context: None,
    }
}

#[test]
fn the_consumer_applies_order_events_in_the_order_they_arrive() {
    let t = TestDb::new();
    let mut client = t.client();
    let status_after = |client: &mut postgres::Client, events: &[&str]| -> String {
        let order_id: Uuid = client
            .query_one(
                "INSERT INTO orders (id, user_id, amount) VALUES ($1, $1, 1) RETURNING id",
                &[&Uuid::now_v7()],
            )
            .unwrap()
            .get(0);
        let messages: Vec<Message> = events.iter().map(|e| order_message(e, order_id)).collect();
        let mut tx = client.transaction().unwrap();
        // One batch, as the consumer hands it over in delivery order.
        OrderEvents
            .handle_batch(&mut tx, &messages.iter().collect::<Vec<_>>())
            .unwrap();
        tx.commit().unwrap();
        client
            .query_one("SELECT status FROM orders WHERE id = $1", &[&order_id])
            .unwrap()
            .get(0)
    };
    assert_eq!(status_after(&mut client, &["OrderCreated"]), "COMPLETED");
    assert_eq!(
        status_after(&mut client, &["OrderCreated", "OrderCancelled"]),
        "CANCELLED"
    );
    // Applied out of order (a redelivery, a replay), a cancelled order stays CANCELLED: only a
    // PENDING order is completed (issue 10; it used to end COMPLETED).
    assert_eq!(
        status_after(&mut client, &["OrderCancelled", "OrderCreated"]),
        "CANCELLED"
    );
}

/// The race of issue 10: the order is cancelled over HTTP while its `OrderCreated` is still on
/// its way to the consumer. Applied afterwards, the event must not complete the cancelled order,
/// and a second cancel must find it cancelled (409, no second `OrderCancelled`).
#[test]
fn a_late_order_created_does_not_undo_a_cancel_and_a_second_cancel_writes_nothing() {
    let t = TestDb::new();
    let server = serve_with(&t, None);
    let addr = server.addr();
    let id = create_order(addr);
    let order_id = Uuid::parse_str(&id).unwrap();
    assert_eq!(cancel(addr, &id, "").status, 200);
    let mut client = t.client();
    let mut tx = client.transaction().unwrap();
    let late = order_message("OrderCreated", order_id);
    OrderEvents.handle_batch(&mut tx, &[&late]).unwrap();
    tx.commit().unwrap();
    let status: String = client
        .query_one("SELECT status FROM orders WHERE id = $1", &[&order_id])
        .unwrap()
        .get(0);
    assert_eq!(status, "CANCELLED");
    assert_eq!(cancel(addr, &id, "").status, 409);
    assert_eq!(
        t.count(&format!(
            "SELECT count(*) FROM outbox WHERE event_type = 'OrderCancelled' AND aggregate_id = '{id}'"
        )),
        1,
        "one OrderCancelled per order"
    );
    server.stop();
}

#[test]
fn orders_cancelled_right_after_creation_end_up_cancelled_with_aggregate_ordering() {
    const ORDERS: usize = 40;
    let t = TestDb::new();
    let broker = TestBroker::new();
    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        ordered_relay(5, 10),
    )
    .unwrap();
    // OrderCreated comes back unroutable for a while, OrderCancelled would go through: an
    // unordered relay would deliver each cancellation before its creation.
    let (connection, channel) = route_only(&broker, &relay, 5, &["OrderCancelled"]);
    let server = serve_with(&t, None);
    let ids: Vec<String> = (0..ORDERS)
        .map(|_| {
            let id = create_order(server.addr());
            assert_eq!(cancel(server.addr(), &id, "").status, 200);
            id
        })
        .collect();
    wait_until("creations are refused", WAIT, || {
        relay.stats().refused() >= ORDERS as u64
    });
    let consumer = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        ConsumerConfig::default(),
        OrderEvents,
    )
    .unwrap();
    route_everything(&broker, &channel);
    wait_until("every event is applied", WAIT, || {
        consumer.stats().applied() == 2 * ORDERS as u64
    });
    consumer.stop();
    relay.stop();
    server.stop();
    assert_eq!(
        t.count("SELECT count(*) FROM orders WHERE status = 'CANCELLED'"),
        ids.len() as i64,
        "every created-then-cancelled order must end CANCELLED"
    );
    let _ = channel.close();
    let _ = connection.close();
}

#[test]
fn the_server_documents_relay_ordering_and_refuses_an_unknown_value() {
    let server = env!("CARGO_BIN_EXE_txoutbox-server");
    let help = std::process::Command::new(server).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    assert!(help.contains("RELAY_ORDERING"), "{help}");
    assert!(help.contains("POST /orders/{id}/cancel"), "{help}");
    let refused = std::process::Command::new(server)
        .env("RELAY_ORDERING", "strict")
        .env("HTTP_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("RELAY_ORDERING=\"strict\" is not valid: expected none or aggregate"),
        "{stderr}"
    );
}
