//! An embedder's trace context travels with its event: the outbox row, the AMQP headers (with
//! the CloudEvents attributes beside them), the handler's `Message`, and a dead letter and its
//! replay. A delivery with an invalid trace context is applied like one without: never a poison.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amiquip::{AmqpProperties, AmqpValue, FieldTable, Publish};
use postgres::Transaction;
use serde_json::json;
use txoutbox::broker::{CE_ID, CE_SOURCE, CE_SPECVERSION, CE_SUBJECT, CE_TIME, CE_TYPE};
use txoutbox::{
    admin, consumer, enqueue, relay, ConsumerConfig, HandlerError, Message, NewEvent, TraceContext,
};
use txoutbox_testkit::{quick_relay, wait_until, TestBroker, TestDb};

const WAIT: Duration = Duration::from_secs(60);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACESTATE: &str = "congo=t61rcWkgMzE";

type Seen = Arc<Mutex<Vec<Message>>>;

fn seen_ids(seen: &Seen) -> usize {
    seen.lock().unwrap().len()
}

fn find(seen: &Seen, id: uuid::Uuid) -> Message {
    seen.lock()
        .unwrap()
        .iter()
        .find(|m| m.message_id == id)
        .cloned()
        .unwrap_or_else(|| panic!("the handler never saw {id}"))
}

fn traced_event(n: i32) -> NewEvent {
    let context = TraceContext::parse(TRACEPARENT)
        .and_then(|c| c.with_tracestate(TRACESTATE))
        .unwrap();
    NewEvent::new("account", n.to_string(), "AccountOpened", json!({ "n": n })).with_trace_context(context)
}

/// Publishes `body` straight to the main queue with `headers`.
fn publish_with_headers(broker: &TestBroker, id: uuid::Uuid, headers: FieldTable) {
    let (connection, channel) = txoutbox::broker::connect(&broker.url).unwrap();
    let properties = AmqpProperties::default()
        .with_delivery_mode(2)
        .with_message_id(id.to_string())
        .with_type_("AccountOpened".into())
        .with_headers(headers);
    channel
        .basic_publish(
            "",
            Publish::with_properties(b"{}", broker.topology.queue.as_str(), properties),
        )
        .unwrap();
    let _ = channel.close();
    let _ = connection.close();
}

fn text(value: &str) -> AmqpValue {
    AmqpValue::LongString(value.to_string())
}

#[test]
fn an_embedders_trace_context_reaches_the_handler_and_an_invalid_one_is_no_poison() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let traced = traced_event(1);
    let plain = NewEvent::new("account", "2", "AccountOpened", json!({ "n": 2 }));
    {
        let mut client = t.client();
        let mut tx = client.transaction().unwrap();
        enqueue(&mut tx, &traced).unwrap();
        t.db.outbox()
            .enqueue_many(&mut tx, std::slice::from_ref(&plain))
            .unwrap();
        tx.commit().unwrap();
    }
    let row = t
        .client()
        .query_one(
            "SELECT traceparent, tracestate FROM outbox WHERE message_id = $1",
            &[&traced.message_id],
        )
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some(TRACEPARENT));
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some(TRACESTATE));
    let plain_row: Option<String> = t
        .client()
        .query_one(
            "SELECT traceparent FROM outbox WHERE message_id = $1",
            &[&plain.message_id],
        )
        .unwrap()
        .get(0);
    assert_eq!(plain_row, None);

    // Deliveries from other publishers: an invalid traceparent, a non-string one, a valid one
    // with an invalid tracestate.
    let garbage = uuid::Uuid::now_v7();
    publish_with_headers(
        &broker,
        garbage,
        FieldTable::from([
            ("traceparent".to_string(), text("00-not-a-trace-01")),
            ("tracestate".to_string(), text(TRACESTATE)),
        ]),
    );
    let number = uuid::Uuid::now_v7();
    publish_with_headers(
        &broker,
        number,
        FieldTable::from([("traceparent".to_string(), AmqpValue::LongLongInt(7))]),
    );
    let bad_state = uuid::Uuid::now_v7();
    publish_with_headers(
        &broker,
        bad_state,
        FieldTable::from([
            ("traceparent".to_string(), text(TRACEPARENT)),
            ("tracestate".to_string(), text("Bad Key=\u{1}")),
        ]),
    );

    let relay = relay::start(t.db.clone(), &broker.url, broker.topology.clone(), quick_relay(1)).unwrap();
    let seen = Seen::default();
    let record = seen.clone();
    let consumer = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        ConsumerConfig::default(),
        move |_tx: &mut Transaction<'_>, message: &Message| -> Result<(), HandlerError> {
            record.lock().unwrap().push(message.clone());
            Ok(())
        },
    )
    .unwrap();
    wait_until("all five messages are applied", WAIT, || seen_ids(&seen) == 5);
    assert_eq!(consumer.stats().rejected(), 0, "a trace header made a poison");

    let message = find(&seen, traced.message_id);
    let context = message.trace_context.as_ref().expect("the trace context arrives");
    assert_eq!(context.traceparent(), TRACEPARENT);
    assert_eq!(context.tracestate(), Some(TRACESTATE));
    assert_eq!(message.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(find(&seen, plain.message_id).trace_context, None);
    assert_eq!(find(&seen, plain.message_id).trace_id(), "-");
    assert_eq!(find(&seen, garbage).trace_context, None);
    assert_eq!(find(&seen, number).trace_context, None);
    let kept = find(&seen, bad_state)
        .trace_context
        .expect("the valid traceparent is kept");
    assert_eq!((kept.traceparent(), kept.tracestate()), (TRACEPARENT, None));
    consumer.stop();
    relay.stop();
}

#[test]
fn a_dead_letter_keeps_its_trace_and_cloudevents_headers_through_replay() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let event = traced_event(7);
    {
        let mut client = t.client();
        let mut tx = client.transaction().unwrap();
        enqueue(&mut tx, &event).unwrap();
        tx.commit().unwrap();
    }
    let refuse = Arc::new(AtomicBool::new(true));
    let seen = Seen::default();
    let (record, refusing) = (seen.clone(), refuse.clone());
    let relay = relay::start(t.db.clone(), &broker.url, broker.topology.clone(), quick_relay(1)).unwrap();
    let consumer = consumer::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        ConsumerConfig::default(),
        move |_tx: &mut Transaction<'_>, message: &Message| -> Result<(), HandlerError> {
            if refusing.load(Ordering::SeqCst) {
                return Err(HandlerError::permanent("not yet"));
            }
            record.lock().unwrap().push(message.clone());
            Ok(())
        },
    )
    .unwrap();
    let dlq = broker.topology.dead_letter_queue();
    wait_until("the event is dead-lettered", WAIT, || broker.ready(&dlq) == 1);

    // What the dead letter carries, as any AMQP client sees it.
    let (connection, channel) = txoutbox::broker::connect(&broker.url).unwrap();
    let got = channel
        .basic_get(dlq.as_str(), false)
        .unwrap()
        .expect("the dead letter");
    let headers = got.delivery.properties.headers().clone().unwrap_or_default();
    let header = |name: &str| match headers.get(name) {
        Some(AmqpValue::LongString(s)) => s.clone(),
        other => panic!("header {name} is {other:?}"),
    };
    assert_eq!(header("traceparent"), TRACEPARENT);
    assert_eq!(header("tracestate"), TRACESTATE);
    assert_eq!(header(CE_SPECVERSION), "1.0");
    assert_eq!(header(CE_ID), event.message_id.to_string());
    assert_eq!(header(CE_TYPE), "AccountOpened");
    assert_eq!(header(CE_SOURCE), "/txoutbox/account");
    assert_eq!(header(CE_SUBJECT), "7");
    let time = header(CE_TIME);
    assert!(
        time.len() == 27 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "cloudEvents:time {time:?} is not RFC 3339 UTC with microseconds"
    );
    assert_eq!(
        got.delivery.properties.content_type().as_deref(),
        Some("application/json")
    );
    // Back onto the queue untouched, for the replay.
    got.delivery.nack(&channel, true).unwrap();
    let _ = channel.close();
    let _ = connection.close();

    refuse.store(false, Ordering::SeqCst);
    wait_until("the dead letter is back in its queue", WAIT, || {
        broker.ready(&dlq) == 1
    });
    assert_eq!(
        admin::replay_dead_letters(&broker.url, &broker.topology).unwrap(),
        1
    );
    wait_until("the replayed event is applied", WAIT, || seen_ids(&seen) == 1);
    let replayed = find(&seen, event.message_id);
    assert_eq!(
        replayed.trace_context.as_ref().map(TraceContext::traceparent),
        Some(TRACEPARENT),
        "the replay lost the trace context"
    );
    consumer.stop();
    relay.stop();
}
