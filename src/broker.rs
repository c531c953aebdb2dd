//! RabbitMQ: connecting with safe defaults, declaring the topology, and publishing a batch of
//! events with publisher confirms.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amiquip::{
    AmqpProperties, AmqpValue, Channel, Confirm, Connection, ExchangeDeclareOptions, ExchangeType,
    FieldTable, Publish, QueueDeclareOptions, Return,
};
use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::config::redact_url;
use crate::trace::{self, TraceContext};
use crate::{Error, Result};

/// Heartbeat interval (seconds) added to an AMQP URL that sets none: without heartbeats a
/// silently dead link looks alive forever.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// Connection timeout (milliseconds) added to an AMQP URL that sets none.
pub const DEFAULT_CONNECTION_TIMEOUT_MS: u32 = 5000;

/// Names of the exchange and queues txoutbox publishes to and consumes from.
///
/// Relay and consumer both declare all of it, idempotently, so either may start first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Durable topic exchange the relay publishes to, with the event type as routing key.
    /// Default `txoutbox.events`.
    pub exchange: String,
    /// Durable queue bound to the exchange with `#` (every event). Default `order_events`.
    pub queue: String,
    /// Kind of the queue and its dead-letter queue. Default [`QueueType::Classic`].
    pub queue_type: QueueType,
    /// True for a service that only publishes: its relay declares the exchange and no queue
    /// (see [`Topology::publish_only`]).
    pub publish_only: bool,
    /// Declare the queue with `x-single-active-consumer`: however many consumers attach, the
    /// broker delivers to one at a time and the others stand by, so a handler sees each
    /// aggregate's events in order. Default true; turn it off only for a handler that does not
    /// depend on order and needs several consumers of one queue.
    pub single_active_consumer: bool,
}

/// The kind of RabbitMQ queue to declare.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QueueType {
    /// A classic queue: one node holds it. Fine for a single RabbitMQ node.
    #[default]
    Classic,
    /// A quorum queue, replicated with Raft across a cluster's nodes: what a clustered
    /// RabbitMQ should use for messages that must not be lost with one node.
    Quorum,
}

impl QueueType {
    /// Parses `classic` or `quorum` (the values of `AMQP_QUEUE_TYPE`).
    pub fn parse(text: &str) -> Result<QueueType> {
        match text.trim().to_ascii_lowercase().as_str() {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            other => Err(Error::Config(format!(
                "AMQP_QUEUE_TYPE must be `classic` or `quorum`, not `{other}`"
            ))),
        }
    }

    /// The value of the `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            exchange: "txoutbox.events".into(),
            queue: "order_events".into(),
            queue_type: QueueType::Classic,
            publish_only: false,
            single_active_consumer: true,
        }
    }
}

impl Topology {
    /// Topology with the given exchange and queue names and classic queues.
    pub fn new(exchange: impl Into<String>, queue: impl Into<String>) -> Self {
        Topology {
            exchange: exchange.into(),
            queue: queue.into(),
            queue_type: QueueType::Classic,
            publish_only: false,
            single_active_consumer: true,
        }
    }

    /// Topology of a service that only publishes to `exchange`: its relay declares the
    /// exchange and nothing else, and whoever consumes declares and binds their own queues.
    /// Events no queue is bound for come back unroutable and end failed, with the reason.
    pub fn publish_only(exchange: impl Into<String>) -> Self {
        Topology {
            exchange: exchange.into(),
            queue: String::new(),
            queue_type: QueueType::Classic,
            publish_only: true,
            single_active_consumer: false,
        }
    }

    /// The same topology with queues of the given type.
    pub fn with_queue_type(self, queue_type: QueueType) -> Self {
        Topology { queue_type, ..self }
    }

    /// The same topology with [`single_active_consumer`](Self::single_active_consumer) set.
    pub fn with_single_active_consumer(self, single_active_consumer: bool) -> Self {
        Topology {
            single_active_consumer,
            ..self
        }
    }

    /// Fanout exchange that receives what the queue dead-letters: `<queue>.dlx`.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.queue)
    }

    /// Queue holding dead-lettered messages: `<queue>.dlq`.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.queue)
    }

    /// Declares the durable topic exchange the relay publishes to. Idempotent.
    pub fn declare_exchange(&self, channel: &Channel) -> Result<()> {
        let options = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(ExchangeType::Topic, self.exchange.as_str(), options)
            .map_err(|e| {
                Error::broker(
                    format!("cannot declare exchange {} on RabbitMQ", self.exchange),
                    e,
                )
            })?;
        Ok(())
    }

    /// Declares the exchange, the queue and its dead-letter exchange and queue. Idempotent.
    ///
    /// Fails for a [`publish_only`](Self::publish_only) topology, which has no queue.
    ///
    /// Fails when a queue of the same name exists with other arguments, e.g. a classic queue
    /// where [`QueueType::Quorum`] is asked for: RabbitMQ cannot convert a queue in place.
    pub fn declare(&self, channel: &Channel) -> Result<()> {
        if self.publish_only {
            return Err(Error::Config(format!(
                "topology of exchange {} is publish-only: it has no queue to consume from",
                self.exchange
            )));
        }
        let durable_exchange = || ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let durable_queue = |mut arguments: FieldTable| {
            // Classic stays implicit so queues declared before the setting existed still match.
            if self.queue_type == QueueType::Quorum {
                arguments.insert(
                    "x-queue-type".into(),
                    AmqpValue::LongString(self.queue_type.as_str().into()),
                );
            }
            QueueDeclareOptions {
                durable: true,
                arguments,
                ..Default::default()
            }
        };
        let context = |what: &str| format!("cannot declare {what} on RabbitMQ");
        let queue_context = |name: &str| {
            format!(
                "cannot declare queue {name} on RabbitMQ as a {} queue{} (if it exists with other \
                 arguments, e.g. of another AMQP_QUEUE_TYPE or AMQP_SINGLE_ACTIVE_CONSUMER, delete \
                 it once it is drained or choose another AMQP_QUEUE with CONSUMER_NAME set to the old \
                 queue's name, so that messages already applied are not applied again)",
                self.queue_type.as_str(),
                if self.single_active_consumer && name == self.queue {
                    " with a single active consumer"
                } else {
                    ""
                }
            )
        };

        let dlx = channel
            .exchange_declare(
                ExchangeType::Fanout,
                self.dead_letter_exchange(),
                durable_exchange(),
            )
            .map_err(|e| Error::broker(context("the dead-letter exchange"), e))?;
        let dlq = channel
            .queue_declare(self.dead_letter_queue(), durable_queue(FieldTable::default()))
            .map_err(|e| Error::broker(queue_context(&self.dead_letter_queue()), e))?;
        dlq.bind(&dlx, "", FieldTable::default())
            .map_err(|e| Error::broker(context("the dead-letter binding"), e))?;

        let exchange = channel
            .exchange_declare(ExchangeType::Topic, self.exchange.as_str(), durable_exchange())
            .map_err(|e| Error::broker(context(&format!("exchange {}", self.exchange)), e))?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AmqpValue::LongString(self.dead_letter_exchange()),
        );
        if self.single_active_consumer {
            arguments.insert("x-single-active-consumer".into(), AmqpValue::Boolean(true));
        }
        let queue = channel
            .queue_declare(self.queue.as_str(), durable_queue(arguments))
            .map_err(|e| Error::broker(queue_context(&self.queue), e))?;
        queue
            .bind(&exchange, "#", FieldTable::default())
            .map_err(|e| Error::broker(context(&format!("binding of queue {}", self.queue)), e))?;
        Ok(())
    }

    /// Deletes everything [`declare`](Self::declare) created. Meant for tests and tear-down.
    pub fn delete(&self, channel: &Channel) -> Result<()> {
        let context = |what: &str| format!("cannot delete {what}");
        for queue in [self.queue.clone(), self.dead_letter_queue()] {
            channel
                .queue_delete(queue.as_str(), Default::default())
                .map_err(|e| Error::broker(context(&queue), e))?;
        }
        for exchange in [self.exchange.clone(), self.dead_letter_exchange()] {
            channel
                .exchange_delete(exchange.as_str(), false)
                .map_err(|e| Error::broker(context(&exchange), e))?;
        }
        Ok(())
    }
}

/// Returns `url` with a heartbeat and a connection timeout added when it sets none.
pub fn with_safe_defaults(url: &str) -> String {
    let mut url = url.to_string();
    for (key, value) in [
        ("heartbeat", DEFAULT_HEARTBEAT_SECS.to_string()),
        ("connection_timeout", DEFAULT_CONNECTION_TIMEOUT_MS.to_string()),
    ] {
        let already = url
            .split_once('?')
            .is_some_and(|(_, query)| query.split('&').any(|kv| kv.split('=').next() == Some(key)));
        if !already {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&format!("{key}={value}"));
        }
    }
    url
}

/// Opens a connection (with [`with_safe_defaults`]) and one channel on it.
pub fn connect(url: &str) -> Result<(Connection, Channel)> {
    let mut connection = crate::amqp_url::open(&with_safe_defaults(url))
        .map_err(|e| Error::Other(format!("cannot connect to RabbitMQ at {}: {e}", redact_url(url))))?;
    let channel = connection
        .open_channel(None)
        .map_err(|e| Error::broker("cannot open a RabbitMQ channel", e))?;
    Ok((connection, channel))
}

/// Puts `channel` in confirm mode and returns its confirms. The listener is registered first:
/// registered after, it could miss the earliest confirms.
pub fn enable_confirms(channel: &Channel) -> Result<Receiver<Confirm>> {
    let confirms = channel
        .listen_for_publisher_confirms()
        .map_err(|e| Error::broker("cannot listen for publisher confirms", e))?;
    channel
        .enable_publisher_confirms()
        .map_err(|e| Error::broker("cannot enable publisher confirms", e))?;
    Ok(confirms)
}

/// Waits until the broker has confirmed the publish with delivery tag `tag` (and so all before
/// it, which the caller has already waited for). `Err` on a nack, a timeout or a lost channel.
pub fn wait_for_confirm(confirms: &Receiver<Confirm>, tag: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match confirms.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Confirm::Ack(p)) if p.delivery_tag >= tag => return Ok(()),
            Ok(Confirm::Nack(p)) if p.delivery_tag >= tag => {
                return Err(Error::Other("RabbitMQ refused the message (nack)".into()))
            }
            Ok(_) => continue,
            Err(RecvTimeoutError::Timeout) => {
                return Err(Error::Other(format!(
                    "RabbitMQ did not confirm within {timeout:?}"
                )))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Error::Other(
                    "RabbitMQ connection lost while waiting for a confirm".into(),
                ))
            }
        }
    }
}

/// One event as it goes onto the wire.
#[derive(Clone, Debug)]
pub struct OutgoingEvent {
    /// Caller's key for the event (the outbox row id); reported back in [`PublishOutcome`].
    pub key: i64,
    /// AMQP `message_id`: the consumer's dedupe key.
    pub message_id: String,
    /// AMQP `type` and routing key.
    pub event_type: String,
    /// Sent as the `aggregate_type` header.
    pub aggregate_type: String,
    /// Sent as the `aggregate_id` header.
    pub aggregate_id: String,
    /// JSON body.
    pub body: Vec<u8>,
    /// Exchange to publish to; `None`: the publisher's topology exchange.
    pub exchange: Option<String>,
    /// Routing key; `None`: the event type.
    pub routing_key: Option<String>,
    /// Sent as the `aggregate_sequence` header: a number that grows with each event of the
    /// aggregate (the outbox id), set only when the events of an aggregate are published in
    /// order. The consumer refuses an event older than one of its aggregate already applied.
    pub aggregate_sequence: Option<i64>,
    /// Sent as the headers `traceparent` and `tracestate` ([`trace`]).
    pub trace_context: Option<TraceContext>,
    /// When the event was recorded, RFC 3339 in UTC: sent as `cloudEvents:time`.
    pub created_at: Option<String>,
    /// Sent as `cloudEvents:source`; `None`: [`DEFAULT_CLOUDEVENTS_SOURCE`] for the event's
    /// aggregate type ([`cloudevents_source`]).
    pub source: Option<String>,
}

/// The header carrying [`OutgoingEvent::aggregate_sequence`].
pub const AGGREGATE_SEQUENCE_HEADER: &str = "aggregate_sequence";

/// Prefix of the CloudEvents attributes in the headers: the CloudEvents AMQP protocol binding
/// (binary content mode) names each attribute `cloudEvents:<name>` in the message's
/// application properties, which AMQP 0-9-1 carries as headers. `datacontenttype` is the AMQP
/// `content-type` property (`application/json`) instead.
pub const CLOUDEVENTS_PREFIX: &str = "cloudEvents:";
/// `cloudEvents:specversion` header: always [`CLOUDEVENTS_SPECVERSION`].
pub const CE_SPECVERSION: &str = "cloudEvents:specversion";
/// `cloudEvents:id` header: the message id.
pub const CE_ID: &str = "cloudEvents:id";
/// `cloudEvents:type` header: the event type.
pub const CE_TYPE: &str = "cloudEvents:type";
/// `cloudEvents:source` header: [`OutgoingEvent::source`].
pub const CE_SOURCE: &str = "cloudEvents:source";
/// `cloudEvents:subject` header: the aggregate id.
pub const CE_SUBJECT: &str = "cloudEvents:subject";
/// `cloudEvents:time` header: when the event was recorded (its transaction), RFC 3339 UTC.
pub const CE_TIME: &str = "cloudEvents:time";
/// The CloudEvents version the headers follow.
pub const CLOUDEVENTS_SPECVERSION: &str = "1.0";

/// The `cloudEvents:source` unless configured otherwise
/// ([`RelayConfig::cloudevents_source`](crate::RelayConfig::cloudevents_source)):
/// `{aggregate_type}` becomes the event's aggregate type, e.g. `/txoutbox/order`.
pub const DEFAULT_CLOUDEVENTS_SOURCE: &str = "/txoutbox/{aggregate_type}";

/// Characters of an aggregate type kept as they are in a source: RFC 3986 `unreserved`.
const SOURCE_ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `template` with each `{aggregate_type}` replaced by `aggregate_type`, percent-encoded so
/// that the result stays a URI reference.
pub fn cloudevents_source(template: &str, aggregate_type: &str) -> String {
    if !template.contains("{aggregate_type}") {
        return template.to_string();
    }
    let encoded = percent_encoding::utf8_percent_encode(aggregate_type, SOURCE_ESCAPED).to_string();
    template.replace("{aggregate_type}", &encoded)
}

/// The reason in [`PublishOutcome::refused`] of an event the broker nacked.
pub const NACKED: &str = "RabbitMQ refused the message (nack)";
/// The start of the reason in [`PublishOutcome::refused`] of an event whose exchange does not
/// exist; the exchange's name follows.
pub const NO_EXCHANGE: &str = "no such exchange";
/// The reason in [`PublishOutcome::refused`] of an event no queue was bound for.
pub const UNROUTABLE: &str = "unroutable: no queue is bound for it";

/// What the broker said about each event of a batch.
#[derive(Debug, Default)]
pub struct PublishOutcome {
    /// Keys of events the broker confirmed and routed to at least one queue.
    pub confirmed: Vec<i64>,
    /// Keys of events the broker refused (nack) or could not route, with the reason.
    pub refused: Vec<(i64, String)>,
}

/// Longest exchange name, routing key, type or message id AMQP carries (a "short string").
const MAX_SHORT_STRING: usize = 255;

/// Most exchanges other than its topology's a publisher remembers as existing.
const MAX_KNOWN_EXCHANGES: usize = 1024;

/// A channel in confirm mode that publishes batches and waits for every confirm.
pub struct Publisher {
    // Field order matters: the channels close before their connection.
    channel: Channel,
    /// A second channel to check that an event's exchange exists before publishing to it:
    /// publishing to a missing one would close the confirm channel with the whole batch.
    probe: Option<Channel>,
    connection: Connection,
    confirms: Receiver<Confirm>,
    returns: Receiver<Return>,
    next_tag: u64,
    exchange: String,
    /// Exchanges seen to exist on this connection.
    known_exchanges: HashSet<String>,
}

impl Publisher {
    /// Connects, declares `topology` (only its exchange when it is
    /// [`publish_only`](Topology::publish_only)) and puts a fresh channel in confirm mode.
    pub fn connect(url: &str, topology: &Topology) -> Result<Self> {
        let (connection, channel) = connect(url)?;
        if topology.publish_only {
            topology.declare_exchange(&channel)?;
        } else {
            topology.declare(&channel)?;
        }
        let returns = channel
            .listen_for_returns()
            .map_err(|e| Error::broker("cannot listen for returns", e))?;
        let confirms = enable_confirms(&channel)?;
        Ok(Publisher {
            channel,
            probe: None,
            connection,
            confirms,
            returns,
            next_tag: 1,
            exchange: topology.exchange.clone(),
            known_exchanges: HashSet::from([topology.exchange.clone()]),
        })
    }

    /// The events of `events` that cannot be published, by key, with the reason: a name
    /// longer than AMQP allows (255 bytes), or an exchange that does not exist or that the
    /// broker refuses (the default exchange `""` is always there). `Err` only when the broker
    /// could not be asked.
    fn unpublishable(&mut self, events: &[OutgoingEvent]) -> Result<HashMap<i64, String>> {
        let mut refused = HashMap::new();
        let mut bad_exchanges: HashMap<String, String> = HashMap::new();
        for event in events {
            let routing_key = event.routing_key.as_deref().unwrap_or(&event.event_type);
            let too_long = [
                ("exchange name", event.exchange.as_deref().unwrap_or("")),
                ("routing key", routing_key),
                ("event type", event.event_type.as_str()),
                ("message id", event.message_id.as_str()),
            ]
            .into_iter()
            .find(|(_, value)| value.len() > MAX_SHORT_STRING);
            if let Some((what, value)) = too_long {
                refused.insert(
                    event.key,
                    format!(
                        "{what} of {} bytes, longer than AMQP's {MAX_SHORT_STRING}",
                        value.len()
                    ),
                );
                continue;
            }
            let Some(name) = event.exchange.as_deref().filter(|n| !n.is_empty()) else {
                continue;
            };
            if !self.known_exchanges.contains(name) && !bad_exchanges.contains_key(name) {
                if let Some(reason) = self.probe_exchange(name)? {
                    bad_exchanges.insert(name.to_string(), reason);
                }
            }
            if let Some(reason) = bad_exchanges.get(name) {
                refused.insert(event.key, reason.clone());
            }
        }
        Ok(refused)
    }

    /// Why events cannot go to exchange `name`, or `None` when it exists (and is remembered).
    fn probe_exchange(&mut self, name: &str) -> Result<Option<String>> {
        let probe = match self.probe.take() {
            Some(probe) => probe,
            None => self
                .connection
                .open_channel(None)
                .map_err(|e| Error::broker("cannot open a RabbitMQ channel", e))?,
        };
        match probe.exchange_declare_passive(name) {
            Ok(_) => {
                if self.known_exchanges.len() >= MAX_KNOWN_EXCHANGES {
                    self.known_exchanges.retain(|known| *known == self.exchange);
                }
                self.known_exchanges.insert(name.to_string());
                self.probe = Some(probe);
                Ok(None)
            }
            // The broker closed the probe channel (only it): the exchange is the problem.
            Err(amiquip::Error::ServerClosedChannel { code: 404, .. }) => {
                Ok(Some(format!("{NO_EXCHANGE}: {name}")))
            }
            Err(amiquip::Error::ServerClosedChannel { code, message, .. }) => Ok(Some(format!(
                "{NO_EXCHANGE}: {name} cannot be published to ({code} {message})"
            ))),
            Err(e) => Err(Error::broker(
                format!("cannot check that exchange {name} exists"),
                e,
            )),
        }
    }

    /// Publishes every event (persistent, mandatory) and waits up to `timeout` for all confirms.
    ///
    /// Returns `Err` when the connection failed or a confirm did not arrive in time: nothing of
    /// the batch may then be treated as published, and the publisher should be dropped.
    ///
    /// An event whose exchange does not exist is not published: it is refused with the reason.
    pub fn publish_batch(&mut self, events: &[OutgoingEvent], timeout: Duration) -> Result<PublishOutcome> {
        let unpublishable = self.unpublishable(events)?;
        let mut refused = Vec::new();
        let mut pending: BTreeMap<u64, usize> = BTreeMap::new();
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for (index, event) in events.iter().enumerate() {
            if let Some(reason) = unpublishable.get(&event.key) {
                refused.push((event.key, reason.clone()));
                continue;
            }
            let exchange = event.exchange.as_deref().unwrap_or(&self.exchange);
            let mut headers = FieldTable::default();
            headers.insert(
                "aggregate_type".into(),
                AmqpValue::LongString(event.aggregate_type.clone()),
            );
            headers.insert(
                "aggregate_id".into(),
                AmqpValue::LongString(event.aggregate_id.clone()),
            );
            if let Some(sequence) = event.aggregate_sequence {
                headers.insert(AGGREGATE_SEQUENCE_HEADER.into(), AmqpValue::LongLongInt(sequence));
            }
            if let Some(context) = &event.trace_context {
                headers.insert(
                    trace::TRACEPARENT.into(),
                    AmqpValue::LongString(context.traceparent().to_string()),
                );
                if let Some(state) = context.tracestate() {
                    headers.insert(trace::TRACESTATE.into(), AmqpValue::LongString(state.to_string()));
                }
            }
            let source = match &event.source {
                Some(source) => source.clone(),
                None => cloudevents_source(DEFAULT_CLOUDEVENTS_SOURCE, &event.aggregate_type),
            };
            let mut cloudevent = vec![
                (CE_SPECVERSION, CLOUDEVENTS_SPECVERSION.to_string()),
                (CE_ID, event.message_id.clone()),
                (CE_TYPE, event.event_type.clone()),
                (CE_SOURCE, source),
                (CE_SUBJECT, event.aggregate_id.clone()),
            ];
            if let Some(time) = &event.created_at {
                cloudevent.push((CE_TIME, time.clone()));
            }
            for (name, value) in cloudevent {
                headers.insert(name.into(), AmqpValue::LongString(value));
            }
            let properties = AmqpProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(event.message_id.clone())
                .with_type_(event.event_type.clone())
                .with_timestamp(timestamp)
                .with_headers(headers);
            let publish = Publish {
                body: &event.body,
                routing_key: event
                    .routing_key
                    .clone()
                    .unwrap_or_else(|| event.event_type.clone()),
                mandatory: true,
                immediate: false,
                properties,
            };
            self.channel
                .basic_publish(exchange, publish)
                .map_err(|e| Error::broker("cannot publish to RabbitMQ", e))?;
            pending.insert(self.next_tag, index);
            self.next_tag += 1;
        }

        let deadline = Instant::now() + timeout;
        let mut acked = Vec::with_capacity(events.len());
        while !pending.is_empty() {
            let wait = deadline.saturating_duration_since(Instant::now());
            let confirm = match self.confirms.recv_timeout(wait) {
                Ok(confirm) => confirm,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::Other(format!(
                        "RabbitMQ confirmed only {} of {} messages within {:?}",
                        events.len() - pending.len(),
                        events.len(),
                        timeout
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Other(
                        "RabbitMQ connection lost while waiting for confirms".into(),
                    ))
                }
            };
            let (payload, ok) = match confirm {
                Confirm::Ack(p) => (p, true),
                Confirm::Nack(p) => (p, false),
            };
            let settled: Vec<usize> = if payload.multiple {
                let rest = pending.split_off(&(payload.delivery_tag + 1));
                std::mem::replace(&mut pending, rest).into_values().collect()
            } else {
                pending.remove(&payload.delivery_tag).into_iter().collect()
            };
            for index in settled {
                if ok {
                    acked.push(index);
                } else {
                    refused.push((events[index].key, NACKED.to_string()));
                }
            }
        }

        // A mandatory message that reached no queue is returned before its ack arrives.
        let mut unroutable: HashSet<String> = HashSet::new();
        while let Ok(returned) = self.returns.try_recv() {
            if let Some(id) = returned.properties.message_id() {
                unroutable.insert(id.clone());
                log::warn!(
                    "broker: message_id={id} trace_id={} returned as unroutable: {} {}",
                    trace_id_of(returned.properties.headers().as_ref()),
                    returned.reply_code,
                    returned.reply_text
                );
            }
        }
        let mut outcome = PublishOutcome {
            confirmed: Vec::with_capacity(acked.len()),
            refused,
        };
        for index in acked {
            let event = &events[index];
            if unroutable.contains(&event.message_id) {
                outcome.refused.push((event.key, UNROUTABLE.to_string()));
            } else {
                outcome.confirmed.push(event.key);
            }
        }
        Ok(outcome)
    }

    /// Closes the channels and the connection (dropping the publisher does the same).
    pub fn close(self) {
        if let Some(probe) = self.probe {
            let _ = probe.close();
        }
        let _ = self.channel.close();
        let _ = self.connection.close();
    }
}

/// The text of header `name`, when it is a string.
pub fn text_header<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a str> {
    match headers?.get(name)? {
        AmqpValue::LongString(text) => Some(text.as_str()),
        _ => None,
    }
}

/// The valid trace context the headers carry, if any: an invalid or non-string `traceparent`
/// counts as none, an invalid `tracestate` is dropped ([`TraceContext::from_headers`]).
pub fn trace_context_of(headers: Option<&FieldTable>) -> Option<TraceContext> {
    TraceContext::from_headers(
        text_header(headers, trace::TRACEPARENT),
        text_header(headers, trace::TRACESTATE),
    )
}

/// The trace id for a log line about a message with these headers: its valid trace context's,
/// or `-`.
pub fn trace_id_of(headers: Option<&FieldTable>) -> String {
    trace_context_of(headers).map_or_else(|| "-".to_string(), |c| c.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_template_takes_the_aggregate_type_percent_encoded() {
        assert_eq!(
            cloudevents_source(DEFAULT_CLOUDEVENTS_SOURCE, "order"),
            "/txoutbox/order"
        );
        assert_eq!(
            cloudevents_source("urn:shop:{aggregate_type}", "line item/é"),
            "urn:shop:line%20item%2F%C3%A9"
        );
        assert_eq!(
            cloudevents_source("https://shop.example/orders", "order"),
            "https://shop.example/orders"
        );
    }
}
