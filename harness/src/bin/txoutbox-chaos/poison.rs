//! The poison deliveries of the `poison-header` case: messages the consumer can never record,
//! published straight to the case's exchange (not through the outbox) beside the normal
//! orders; and their copies read back from the dead-letter queue with the reason the consumer
//! gave.

use std::collections::BTreeMap;
use std::time::Duration;

use amiquip::AmqpValue;
use txoutbox::broker::{OutgoingEvent, Publisher};
use txoutbox::{Error, Result, Topology};
use txoutbox_service::orders::ORDER_CREATED;
use uuid::Uuid;

/// How long the broker may take to confirm the poison.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Routing key of the poison (the queue is bound with `#`): not its `type`, which holds a NUL.
const ROUTING_KEY: &str = "poison";
/// Longest a dead-letter queue is read for.
const MAX_DEAD_LETTERS: usize = 1000;

/// One poison delivery that was published.
#[derive(Clone, Debug)]
pub struct Poison {
    /// What is wrong with it, for the report.
    pub kind: &'static str,
    /// Its AMQP `message_id`, to find its dead-lettered copy.
    pub message_id: String,
    /// What the reason the consumer dead-letters it with must say.
    pub expected_reason: &'static str,
}

/// A dead-lettered copy: the reason and the queue it was taken from, from its headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeadLetter {
    /// `x-txoutbox-reason`, empty without one.
    pub reason: String,
    /// `x-txoutbox-queue`, empty without one.
    pub queue: String,
}

/// An event as the relay would publish it, for an order that does not exist, with `change`
/// made to it.
fn poison(
    kind: &'static str,
    expected_reason: &'static str,
    change: impl FnOnce(&mut OutgoingEvent),
) -> (Poison, OutgoingEvent) {
    let order = Uuid::new_v4().to_string();
    let message_id = Uuid::new_v4().to_string();
    let mut event = OutgoingEvent {
        key: 0,
        message_id: message_id.clone(),
        event_type: ORDER_CREATED.into(),
        aggregate_type: "order".into(),
        aggregate_id: order.clone(),
        body: format!(r#"{{"order_id":"{order}"}}"#).into_bytes(),
        exchange: None,
        routing_key: Some(ROUTING_KEY.into()),
        aggregate_sequence: None,
        trace_context: None,
        created_at: None,
        source: None,
    };
    change(&mut event);
    let poison = Poison {
        kind,
        message_id,
        expected_reason,
    };
    (poison, event)
}

/// `length` random hexadecimal characters: Postgres cannot compress them below the size of an
/// index row (`"x".repeat(5000)` would compress to almost nothing and fit).
fn incompressible(length: usize) -> String {
    let mut text = String::with_capacity(length + 32);
    while text.len() < length {
        text.push_str(&Uuid::new_v4().simple().to_string());
    }
    text.truncate(length);
    text
}

/// The four poisons: a NUL in `type` and in `aggregate_id` (Postgres text cannot hold one),
/// an `aggregate_id` of 5,000 characters (more than an index row of `processed_messages`
/// holds, error 54000), a body that is not UTF-8 (so not JSON).
fn poisons() -> Vec<(Poison, OutgoingEvent)> {
    vec![
        poison("NUL in type", "type contains a NUL character", |e| {
            e.event_type = "Order\0Created".into()
        }),
        poison(
            "NUL in aggregate_id",
            "aggregate_id header contains a NUL character",
            |e| e.aggregate_id.push('\0'),
        ),
        poison(
            "5,000-character aggregate_id",
            "aggregate_id header is 5000 bytes",
            |e| e.aggregate_id = incompressible(5000),
        ),
        poison("body not UTF-8", "body is not JSON", |e| {
            e.body = vec![0xff, 0xfe, 0x00, 0xc3, 0x28, b'{', 0x80]
        }),
    ]
}

/// Publishes the poisons to `topology`'s exchange with publisher confirms; returns them.
pub fn publish(amqp_url: &str, topology: &Topology) -> Result<Vec<Poison>> {
    let (poisons, mut events): (Vec<Poison>, Vec<OutgoingEvent>) = poisons().into_iter().unzip();
    for (key, event) in events.iter_mut().enumerate() {
        event.key = key as i64;
    }
    let mut publisher = Publisher::connect(amqp_url, topology)?;
    let outcome = publisher.publish_batch(&events, CONFIRM_TIMEOUT);
    publisher.close();
    let outcome = outcome?;
    if let Some((key, reason)) = outcome.refused.first() {
        let kind = usize::try_from(*key)
            .ok()
            .and_then(|k| poisons.get(k))
            .map_or("?", |p| p.kind);
        return Err(Error::Other(format!(
            "RabbitMQ did not take the poison delivery with {kind}: {reason}"
        )));
    }
    Ok(poisons)
}

/// Takes every message out of `topology`'s dead-letter queue; their headers by message id
/// (`""` for one without a message id).
pub fn take_dead_letters(amqp_url: &str, topology: &Topology) -> Result<BTreeMap<String, DeadLetter>> {
    let (connection, channel) = txoutbox::broker::connect(amqp_url)?;
    let queue = topology.dead_letter_queue();
    let mut letters = BTreeMap::new();
    let taken = (|| {
        while letters.len() < MAX_DEAD_LETTERS {
            let Some(get) = channel
                .basic_get(queue.as_str(), true)
                .map_err(|e| Error::broker(format!("cannot read queue {queue}"), e))?
            else {
                return Ok(());
            };
            let properties = &get.delivery.properties;
            let header = |name: &str| match properties.headers().as_ref().and_then(|h| h.get(name)) {
                Some(AmqpValue::LongString(text)) => text.clone(),
                _ => String::new(),
            };
            let letter = DeadLetter {
                reason: header("x-txoutbox-reason"),
                queue: header("x-txoutbox-queue"),
            };
            letters.insert(properties.message_id().clone().unwrap_or_default(), letter);
        }
        Ok(())
    })();
    let _ = channel.close();
    let _ = connection.close();
    taken.map(|()| letters)
}

/// For each poison that is not in `letters` with the reason it must have and the queue it came
/// from, what is wrong; then any letter that is not one of the poisons.
pub fn unexpected(poisons: &[Poison], letters: &BTreeMap<String, DeadLetter>, queue: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for poison in poisons {
        match letters.get(&poison.message_id) {
            None => problems.push(format!("{}: not dead-lettered", poison.kind)),
            Some(letter) if !letter.reason.contains(poison.expected_reason) => problems.push(format!(
                "{}: reason {:?}, expected one saying {:?}",
                poison.kind, letter.reason, poison.expected_reason
            )),
            Some(letter) if letter.queue != queue => problems.push(format!(
                "{}: from queue {:?}, not {queue}",
                poison.kind, letter.queue
            )),
            Some(_) => {}
        }
    }
    for (id, letter) in letters {
        if !poisons.iter().any(|p| &p.message_id == id) {
            problems.push(format!("message {id:?} dead-lettered too: {}", letter.reason));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_poison_is_found_by_id_with_its_reason() {
        let poisons: Vec<Poison> = poisons().into_iter().map(|(p, _)| p).collect();
        assert_eq!(poisons.len(), 4);
        let letter = |p: &Poison| DeadLetter {
            reason: format!("consumer says: {}", p.expected_reason),
            queue: "q".into(),
        };
        let mut letters: BTreeMap<String, DeadLetter> = poisons
            .iter()
            .map(|p| (p.message_id.clone(), letter(p)))
            .collect();
        assert!(unexpected(&poisons, &letters, "q").is_empty());
        letters.insert(
            poisons[0].message_id.clone(),
            DeadLetter {
                reason: "failed 6 times, last: invalid byte sequence".into(),
                queue: "q".into(),
            },
        );
        letters.remove(&poisons[1].message_id);
        letters.insert("other".into(), DeadLetter::default());
        let problems = unexpected(&poisons, &letters, "q");
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("NUL in type: reason"), "{problems:?}");
        assert!(problems[1].contains("not dead-lettered"), "{problems:?}");
    }
}
