//! Trace context and CloudEvents end to end, read by other software: the `traceparent` sent
//! with `POST /orders` is stored in the outbox row, read back from the AMQP message by a Python
//! consumer (pika), and handed to a library handler on `Message`; the `cloudevents` package
//! from PyPI parses the delivered message into the event with the right attributes and data.
//!
//! The Python side is `service/tests/python/read_message.py`; it needs `python3` with the
//! modules `pika` and `cloudevents` (`.ci/run` installs them; by hand:
//! `pip install pika cloudevents`).

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amiquip::{Channel, Connection, ExchangeDeclareOptions, FieldTable, QueueDeclareOptions};
use postgres::Transaction;
use serde_json::{json, Value};
use txoutbox::{consumer, relay, ConsumerConfig, HandlerError, Message, RelayConfig, TraceContext};
use txoutbox_service::orders::Announce;
use txoutbox_service::{http, HttpConfig};
use txoutbox_testkit::{http_raw, quick_relay, wait_until, TestBroker, TestDb};

const WAIT: Duration = Duration::from_secs(60);
const USER: &str = "5b0c7b52-8d0c-4d53-9a55-1f5b1d0f4e0a";
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const TRACESTATE: &str = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE";

/// A queue of the test's own bound to the test exchange, for the Python consumer (the library
/// consumer keeps the main queue): both get every message. Deleted on drop.
struct PikaQueue {
    name: String,
    channel: Option<Channel>,
    connection: Option<Connection>,
}

impl PikaQueue {
    fn bind(broker: &TestBroker) -> PikaQueue {
        let name = format!("{}.pika", broker.topology.queue);
        let (connection, channel) = txoutbox::broker::connect(&broker.url).expect("tests need RabbitMQ");
        let exchange = channel
            .exchange_declare(
                amiquip::ExchangeType::Topic,
                broker.topology.exchange.as_str(),
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
            )
            .expect("the test exchange");
        let queue = channel
            .queue_declare(name.as_str(), QueueDeclareOptions::default())
            .expect("the pika queue");
        queue
            .bind(&exchange, "#", FieldTable::default())
            .expect("the pika binding");
        PikaQueue {
            name,
            channel: Some(channel),
            connection: Some(connection),
        }
    }
}

impl Drop for PikaQueue {
    fn drop(&mut self) {
        if let Some(channel) = self.channel.take() {
            let _ = channel.queue_delete(self.name.as_str(), Default::default());
            let _ = channel.close();
        }
        if let Some(connection) = self.connection.take() {
            let _ = connection.close();
        }
    }
}

/// Runs `read_message.py` on `queue`: the first message, as pika and the cloudevents package
/// see it. Fails with what to install when python3, pika or cloudevents is missing.
fn read_with_pika(amqp_url: &str, queue: &str) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/read_message.py");
    // pika refuses URL options it does not know (amiquip's connection_timeout, say).
    let url = amqp_url.split('?').next().unwrap_or(amqp_url);
    let output = Command::new("python3")
        .args([script, url, queue, "30"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): install Python 3 (.ci/run needs it too)"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    match output.status.code() {
        Some(0) => {}
        Some(3) => panic!(
            "{stderr}the Python modules this test needs are missing: `pip install pika cloudevents` \
             (.ci/run installs them)"
        ),
        _ => panic!("read_message.py failed ({}): {stderr}", output.status),
    }
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("read_message.py printed no JSON ({e}): {stderr}"))
}

/// Messages a library consumer's handler was given.
type Seen = Arc<Mutex<Vec<Message>>>;

fn record_into(seen: Seen) -> impl FnMut(&mut Transaction<'_>, &Message) -> Result<(), HandlerError> + Send {
    move |_tx: &mut Transaction<'_>, message: &Message| {
        seen.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(message.clone());
        Ok(())
    }
}

fn serve(t: &TestDb, announce: Announce, relay: Option<&relay::RelayHandle>) -> http::HttpHandle {
    let config = HttpConfig {
        addr: "127.0.0.1:0".into(),
        threads: 2,
        ..HttpConfig::default()
    };
    http::serve_with_relay(&config, t.db.clone(), announce, relay.map(|r| r.health())).unwrap()
}

fn post_order_with(addr: std::net::SocketAddr, extra_headers: &str) -> txoutbox_testkit::HttpReply {
    let body = format!(r#"{{"user_id":"{USER}","amount":"100.50"}}"#);
    http_raw(
        addr,
        &format!(
            "POST /orders HTTP/1.1\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}",
            body.len()
        ),
        body.as_bytes(),
    )
}

#[test]
fn a_traceparent_sent_with_the_post_is_stored_published_and_handed_to_the_handler() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let pika_queue = PikaQueue::bind(&broker);
    // No relay yet: the row stays in the outbox to be looked at.
    let server = serve(&t, Announce::Notify, None);
    let reply = post_order_with(
        server.addr(),
        &format!("traceparent: {TRACEPARENT}\r\ntracestate: {TRACESTATE}\r\n"),
    );
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    let order_id = reply.body["id"].as_str().expect("order id").to_string();
    println!("HTTP request:  traceparent: {TRACEPARENT}  (order {order_id})");

    let row = t
        .client()
        .query_one(
            "SELECT message_id, traceparent, tracestate FROM outbox WHERE aggregate_id = $1",
            &[&order_id],
        )
        .expect("the order's event is in the outbox");
    let (message_id, traceparent, tracestate): (uuid::Uuid, Option<String>, Option<String>) =
        (row.get(0), row.get(1), row.get(2));
    println!("outbox row:    message_id={message_id} traceparent={traceparent:?} tracestate={tracestate:?}");
    assert_eq!(traceparent.as_deref(), Some(TRACEPARENT));
    assert_eq!(tracestate.as_deref(), Some(TRACESTATE));

    let relay = relay::start(t.db.clone(), &broker.url, broker.topology.clone(), quick_relay(1)).unwrap();
    let seen = Seen::default();
    let consumer = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        ConsumerConfig::default(),
        record_into(seen.clone()),
    )
    .unwrap();

    let read = read_with_pika(&broker.url, &pika_queue.name);
    let headers = &read["properties"]["headers"];
    println!(
        "AMQP headers:  traceparent: {}  tracestate: {}  (pika, message_id {})",
        headers["traceparent"], headers["tracestate"], read["properties"]["message_id"]
    );
    assert_eq!(headers["traceparent"], TRACEPARENT, "{read}");
    assert_eq!(headers["tracestate"], TRACESTATE, "{read}");
    assert_eq!(read["properties"]["message_id"], message_id.to_string());

    wait_until("the library consumer's handler saw the event", WAIT, || {
        !seen.lock().unwrap().is_empty()
    });
    let message = seen.lock().unwrap()[0].clone();
    let context = message
        .trace_context
        .as_ref()
        .expect("the handler sees the trace context");
    println!(
        "handler:       message_id={} trace_id={} traceparent={} tracestate={:?}",
        message.message_id,
        message.trace_id(),
        context.traceparent(),
        context.tracestate()
    );
    assert_eq!(message.message_id, message_id);
    assert_eq!(context.traceparent(), TRACEPARENT);
    assert_eq!(context.trace_id(), "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(context.tracestate(), Some(TRACESTATE));

    consumer.stop();
    relay.stop();
    server.stop();
}

#[test]
fn an_invalid_or_missing_traceparent_starts_a_new_trace_and_the_order_is_still_created() {
    let t = TestDb::new();
    let server = serve(&t, Announce::Notify, None);
    let cases = [
        ("no header", String::new()),
        (
            "all-zero trace id",
            "traceparent: 00-00000000000000000000000000000000-b7ad6b7169203331-01\r\ntracestate: congo=x\r\n"
                .to_string(),
        ),
        (
            "version ff",
            "traceparent: ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n".to_string(),
        ),
        (
            "two traceparents",
            format!("traceparent: {TRACEPARENT}\r\ntraceparent: {TRACEPARENT}\r\n"),
        ),
    ];
    for (case, headers) in &cases {
        let reply = post_order_with(server.addr(), headers);
        assert_eq!(reply.status, 201, "{case}: {:?}", reply.body);
        let order_id = reply.body["id"].as_str().expect("order id").to_string();
        let row = t
            .client()
            .query_one(
                "SELECT traceparent, tracestate FROM outbox WHERE aggregate_id = $1",
                &[&order_id],
            )
            .unwrap();
        let (traceparent, tracestate): (Option<String>, Option<String>) = (row.get(0), row.get(1));
        let stored = TraceContext::parse(traceparent.as_deref().unwrap_or(""))
            .unwrap_or_else(|e| panic!("{case}: the event has no valid new trace: {e}"));
        assert_ne!(stored.trace_id(), "0af7651916cd43dd8448eb211c80319c", "{case}");
        assert!(!stored.is_sampled(), "{case}: a new trace is not sampled");
        assert_eq!(
            tracestate, None,
            "{case}: a tracestate without its traceparent is dropped"
        );
    }

    // A valid traceparent with an invalid tracestate keeps the traceparent only.
    let reply = post_order_with(
        server.addr(),
        &format!("traceparent: {TRACEPARENT}\r\ntracestate: Not A Key=x\r\n"),
    );
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    let order_id = reply.body["id"].as_str().expect("order id").to_string();
    let row = t
        .client()
        .query_one(
            "SELECT traceparent, tracestate FROM outbox WHERE aggregate_id = $1",
            &[&order_id],
        )
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some(TRACEPARENT));
    assert_eq!(row.get::<_, Option<String>>(1), None);
    server.stop();
}

#[test]
fn the_cloudevents_package_parses_a_delivered_message_into_the_event() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let pika_queue = PikaQueue::bind(&broker);
    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        RelayConfig {
            cloudevents_source: "urn:txoutbox-test:{aggregate_type}".into(),
            ..quick_relay(1)
        },
    )
    .unwrap();
    let server = serve(&t, Announce::Wake(relay.waker()), Some(&relay));
    let reply = post_order_with(server.addr(), "");
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    let order = reply.body.clone();

    let read = read_with_pika(&broker.url, &pika_queue.name);
    let event = &read["cloudevent"];
    assert!(
        event.is_object(),
        "the cloudevents package did not parse it: {read}"
    );
    println!("cloudevents:   {event}");
    let message_id = read["properties"]["message_id"].as_str().expect("message id");
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["id"], message_id);
    assert_eq!(event["type"], "OrderCreated");
    assert_eq!(event["source"], "urn:txoutbox-test:order");
    assert_eq!(event["subject"], order["id"]);
    // The event's time is its transaction's, which is also the order's creation time.
    assert_eq!(event["time"], order["created_at"]);
    assert_eq!(event["datacontenttype"], "application/json");
    assert_eq!(
        event["data"],
        json!({
            "order_id": order["id"],
            "user_id": USER,
            "amount": "100.50",
            "created_at": order["created_at"],
        })
    );
    // Without a traceparent the server started a trace; the message carries it.
    let traceparent = read["properties"]["headers"]["traceparent"]
        .as_str()
        .unwrap_or("");
    assert!(TraceContext::parse(traceparent).is_ok(), "{read}");
    server.stop();
    relay.stop();
}
