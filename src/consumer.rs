//! The idempotent consumer: applies each delivery's effect and records its message id in
//! `processed_messages` in one transaction, and acknowledges only after that commit.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amiquip::{AmqpValue, Channel, Confirm, ConsumerMessage, ConsumerOptions, Delivery, Publish};
use crossbeam_channel::RecvTimeoutError;
use postgres::Transaction;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;
use uuid::Uuid;

mod statements;

pub use statements::prepared;
use statements::Statements;

use crate::broker::{self, Topology};
use crate::config::ConsumerConfig;
use crate::db::{Database, PooledClient};
use crate::metrics::{self, Reason, Registry};
use crate::trace::TraceContext;
use crate::wakeup::{Backoff, FailureLog, Wakeup};
use crate::{Error, Result};

/// Records a batch of message ids for consumer `$1` in one statement. Returns each id it
/// recorded (not recorded before, by this consumer or before schema version 3, consumer ''),
/// with `false`, and each id it refused as superseded, with `true`: a message with a sequence
/// that is new, but older than one of its aggregate this consumer already applied. Ids it
/// returns neither way are duplicates.
const RECORD_PROCESSED: &str = "\
    WITH m AS (
        SELECT * FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::int8[])
            AS m(id, type, aggregate_type, aggregate, sequence)
    ), superseded AS (
        SELECT m.id FROM m
        WHERE m.sequence IS NOT NULL
          AND EXISTS (
              SELECT 1 FROM {schema}.processed_messages p
              WHERE p.consumer = $1 AND p.aggregate_type = m.aggregate_type
                AND p.aggregate_id = m.aggregate AND p.aggregate_sequence > m.sequence)
          AND NOT EXISTS (
              SELECT 1 FROM {schema}.processed_messages p
              WHERE p.consumer IN ($1, '') AND p.message_id = m.id)
    ), recorded AS (
        INSERT INTO {schema}.processed_messages
            (consumer, message_id, event_type, aggregate_type, aggregate_id, aggregate_sequence)
        SELECT $1, m.id, m.type, m.aggregate_type, m.aggregate, m.sequence FROM m
        WHERE m.id NOT IN (SELECT id FROM superseded)
          AND NOT EXISTS (
              SELECT 1 FROM {schema}.processed_messages p WHERE p.consumer = '' AND p.message_id = m.id)
        ON CONFLICT (consumer, message_id) DO NOTHING
        RETURNING message_id
    )
    SELECT message_id, false FROM recorded
    UNION ALL
    SELECT id, true FROM superseded";

/// A delivery that passed the envelope checks, as a handler sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// The event's unique id (AMQP `message_id`).
    pub message_id: Uuid,
    /// AMQP `type`, e.g. `OrderCreated`, when the publisher set it.
    pub event_type: Option<String>,
    /// The `aggregate_type` header, when the publisher set it.
    pub aggregate_type: Option<String>,
    /// The `aggregate_id` header, when the publisher set it.
    pub aggregate_id: Option<String>,
    /// The `aggregate_sequence` header: the event's place among its aggregate's events, set
    /// when the relay publishes in aggregate order.
    pub aggregate_sequence: Option<i64>,
    /// The parsed JSON body.
    pub payload: serde_json::Value,
    /// True when the broker delivered this message before (it may or may not have been applied).
    pub redelivered: bool,
    /// The W3C trace context of the work that wrote the event (the `traceparent` and
    /// `tracestate` headers), when it carries a valid one: start the handler's span as its
    /// child. An invalid `traceparent` counts as none and an invalid `tracestate` is dropped;
    /// neither makes the message unusable.
    pub trace_context: Option<TraceContext>,
}

impl Message {
    /// The trace id for log lines: the trace context's, or `-` when there is none.
    pub fn trace_id(&self) -> &str {
        self.trace_context.as_ref().map_or("-", TraceContext::trace_id)
    }
}

/// Why a handler could not apply a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerError {
    /// What went wrong, for the log.
    pub reason: String,
    /// True when retrying cannot help (the message itself is wrong).
    pub permanent: bool,
    /// True when the database itself is unreachable: not the message's fault, so the consumer
    /// reconnects and the delivery is retried without counting against it.
    pub database_unavailable: bool,
}

impl HandlerError {
    /// A failure that may pass on a later try (the message is redelivered).
    pub fn transient(reason: impl Into<String>) -> Self {
        HandlerError {
            reason: reason.into(),
            permanent: false,
            database_unavailable: false,
        }
    }

    /// A failure retrying cannot fix (the message is dead-lettered).
    pub fn permanent(reason: impl Into<String>) -> Self {
        HandlerError {
            reason: reason.into(),
            permanent: true,
            database_unavailable: false,
        }
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl From<postgres::Error> for HandlerError {
    fn from(e: postgres::Error) -> Self {
        // A stale prepared statement is not the message's fault either: the consumer drops
        // its connection's statements, and the retry prepares them again.
        let database_unavailable = crate::is_transient_db_error(&e) || crate::error::is_stale_statement(&e);
        HandlerError {
            database_unavailable,
            ..HandlerError::transient(Error::db("handler query failed", e).to_string())
        }
    }
}

/// Applies a message's effect inside the consumer's transaction.
///
/// The transaction already holds the message's row in `processed_messages`; the effect and that
/// row commit together, and the handler runs only for messages not applied before. Return `Err`
/// to roll both back.
pub trait Handler: Send {
    /// Applies `message` on `tx`. Do not commit: the consumer does.
    fn handle(&mut self, tx: &mut Transaction<'_>, message: &Message) -> Result<(), HandlerError>;

    /// Applies several new messages on `tx`, in delivery order. The default calls
    /// [`handle`](Self::handle) for each; override it to apply a batch in fewer statements.
    fn handle_batch(&mut self, tx: &mut Transaction<'_>, messages: &[&Message]) -> Result<(), HandlerError> {
        messages.iter().try_for_each(|message| self.handle(tx, message))
    }
}

impl<F> Handler for F
where
    F: FnMut(&mut Transaction<'_>, &Message) -> Result<(), HandlerError> + Send,
{
    fn handle(&mut self, tx: &mut Transaction<'_>, message: &Message) -> Result<(), HandlerError> {
        self(tx, message)
    }
}

/// Counters a running consumer keeps; read them through [`ConsumerHandle::stats`], or expose
/// them to Prometheus with [`register`](Self::register).
#[derive(Debug)]
pub struct ConsumerStats {
    applied: Counter,
    duplicates: Counter,
    dead_lettered: Family<Reason, Counter>,
    malformed: Counter,
    permanent: Counter,
    exhausted: Counter,
    superseded: Counter,
    failed: Counter,
    transaction_duration: Histogram,
}

impl Default for ConsumerStats {
    fn default() -> Self {
        let (dead_lettered, [malformed, permanent, exhausted, superseded]) =
            metrics::counters_by_reason(["malformed", "permanent", "retries_exhausted", "superseded"]);
        ConsumerStats {
            applied: Counter::default(),
            duplicates: Counter::default(),
            dead_lettered,
            malformed,
            permanent,
            exhausted,
            superseded,
            failed: Counter::default(),
            transaction_duration: metrics::seconds_histogram(),
        }
    }
}

impl ConsumerStats {
    /// Adds this consumer's metrics to `registry` (once per registry):
    /// `txoutbox_consumer_processed_total`, `txoutbox_consumer_duplicates_total`,
    /// `txoutbox_consumer_dead_lettered_total{reason}`, `txoutbox_consumer_retries_total` and
    /// `txoutbox_consumer_handler_duration_seconds`. They keep counting after the call.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "txoutbox_consumer_processed",
            "Messages whose effect committed (the first delivery of each message id)",
            self.applied.clone(),
        );
        registry.register(
            "txoutbox_consumer_duplicates",
            "Deliveries of an already processed message id, acked with no effect",
            self.duplicates.clone(),
        );
        registry.register(
            "txoutbox_consumer_dead_lettered",
            "Deliveries moved to the dead-letter queue: reason malformed (no UUID message_id or \
             not JSON), permanent (the handler said retrying cannot help), retries_exhausted, \
             superseded (older than an event of its aggregate already applied)",
            self.dead_lettered.clone(),
        );
        registry.register(
            "txoutbox_consumer_retries",
            "Deliveries whose handler failed transiently and were redelivered or, past \
             CONSUMER_MAX_RETRIES, dead-lettered",
            self.failed.clone(),
        );
        registry.register_with_unit(
            "txoutbox_consumer_handler_duration",
            "Time of one committed consumer transaction: dedupe insert, handler, commit \
             (one observation per batch of deliveries)",
            Unit::Seconds,
            self.transaction_duration.clone(),
        );
    }

    /// Messages whose effect committed (first delivery of each message id).
    pub fn applied(&self) -> u64 {
        self.applied.get()
    }
    /// Deliveries of an already applied message id, acked with no effect.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.get()
    }
    /// Deliveries rejected without requeue (dead-lettered): malformed, permanently failing,
    /// out of retries or superseded.
    pub fn rejected(&self) -> u64 {
        self.malformed.get() + self.permanent.get() + self.exhausted.get() + self.superseded.get()
    }
    /// Deliveries whose handler failed transiently; they were redelivered (or, past the
    /// retries, dead-lettered).
    pub fn failed(&self) -> u64 {
        self.failed.get()
    }
}

/// A running consumer thread. Dropping it stops the consumer like [`stop`](Self::stop).
pub struct ConsumerHandle {
    wakeup: Arc<Wakeup>,
    stats: Arc<ConsumerStats>,
    thread: Option<JoinHandle<()>>,
}

impl ConsumerHandle {
    /// Counters of this consumer.
    pub fn stats(&self) -> &ConsumerStats {
        &self.stats
    }

    /// Finishes the batch in hand (commit, then ack), closes the connection, joins the thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Blocks until the consumer thread ends (it runs until stopped).
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn shutdown(&mut self) {
        self.wakeup.stop();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("consumer: the consumer thread panicked");
            }
        }
    }
}

impl Drop for ConsumerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts a consumer thread on `topology.queue` that runs `handler` for each new message.
///
/// It reconnects with backoff after any broker or database failure; unacknowledged deliveries
/// are then redelivered by the broker and deduplicated here.
pub fn start<H: Handler + 'static>(
    db: Database,
    amqp_url: &str,
    topology: Topology,
    config: ConsumerConfig,
    handler: H,
) -> Result<ConsumerHandle> {
    config.validate()?;
    if topology.publish_only {
        return Err(Error::Config(format!(
            "consumer::start needs a queue, and the topology of exchange {} is publish-only",
            topology.exchange
        )));
    }
    let wakeup = Arc::new(Wakeup::default());
    let stats = Arc::new(ConsumerStats::default());
    let name = config.name.clone().unwrap_or_else(|| topology.queue.clone());
    if name.is_empty() {
        return Err(Error::Config(
            "consumer::start needs a name to record processed messages under: set \
             ConsumerConfig::name (CONSUMER_NAME) when the queue has no name of its own"
                .into(),
        ));
    }
    let record_processed = db.schema().qualify(RECORD_PROCESSED);
    let mut worker = Worker {
        name,
        record_processed,
        db,
        amqp_url: amqp_url.to_string(),
        topology,
        config,
        handler,
        wakeup: wakeup.clone(),
        stats: stats.clone(),
        attempts: HashMap::new(),
    };
    let thread = std::thread::Builder::new()
        .name("consumer".into())
        .spawn(move || worker.run())
        .map_err(|e| Error::Other(format!("cannot start the consumer thread: {e}")))?;
    Ok(ConsumerHandle {
        wakeup,
        stats,
        thread: Some(thread),
    })
}

struct Worker<H> {
    /// The consumer name processed ids are recorded under.
    name: String,
    /// [`RECORD_PROCESSED`] for the database's schema.
    record_processed: String,
    db: Database,
    amqp_url: String,
    topology: Topology,
    config: ConsumerConfig,
    handler: H,
    wakeup: Arc<Wakeup>,
    stats: Arc<ConsumerStats>,
    /// Transient failures per message id, to give up after `max_retries`.
    attempts: HashMap<Uuid, u32>,
}

/// Forget failure counts beyond this many messages (they restart from zero).
const MAX_TRACKED_FAILURES: usize = 10_000;

/// Why a session with the broker ended.
enum SessionEnd {
    Stopped,
    Failed(Error),
    /// A delivery failed and is to be retried: closing the channel returns it and every later
    /// unacked delivery to the queue in their order, so no later event of its aggregate is
    /// applied before it (a requeue alone would let the prefetched ones go first).
    Redeliver,
}

/// What to do after settling deliveries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    /// End the session so that the broker redelivers, in order, what is not settled.
    Redeliver,
}

/// What one consumer transaction did.
struct Applied {
    applied: u64,
    duplicates: u64,
    /// New messages older than an event of their aggregate already applied: not applied.
    superseded: HashSet<Uuid>,
}

impl<H: Handler> Worker<H> {
    fn run(&mut self) {
        let mut backoff = Backoff::new(self.config.min_backoff, self.config.max_backoff);
        let mut failures = FailureLog::new("consumer");
        log::info!(
            "consumer: started name={} queue={} prefetch={}",
            self.name,
            self.topology.queue,
            self.config.prefetch
        );
        while !self.wakeup.is_stopping() {
            match self.session(&mut backoff, &mut failures) {
                SessionEnd::Stopped => break,
                // Give a failing dependency a moment before the redelivery.
                SessionEnd::Redeliver => {
                    self.wakeup.sleep(self.config.retry_delay);
                }
                SessionEnd::Failed(e) => {
                    failures.failed(e);
                    self.wakeup.sleep(backoff.next_delay());
                }
            }
        }
        log::info!("consumer: stopped");
    }

    /// One broker connection: consume until stopped or until something fails.
    fn session(&mut self, backoff: &mut Backoff, failures: &mut FailureLog) -> SessionEnd {
        let (connection, channel) = match broker::connect(&self.amqp_url) {
            Ok(pair) => pair,
            Err(e) => return SessionEnd::Failed(e),
        };
        let end = self.consume(&channel, backoff, failures);
        let _ = channel.close();
        let _ = connection.close();
        end
    }

    fn consume(&mut self, channel: &Channel, backoff: &mut Backoff, failures: &mut FailureLog) -> SessionEnd {
        if let Err(e) = self.topology.declare(channel) {
            return SessionEnd::Failed(e);
        }
        if let Err(e) = channel.qos(0, self.config.prefetch, false) {
            return SessionEnd::Failed(Error::broker("cannot set the prefetch limit", e));
        }
        let mut dead_letters = match DeadLetters::enable(channel, &self.topology) {
            Ok(d) => d,
            Err(e) => return SessionEnd::Failed(e),
        };
        let consumer = match channel.basic_consume(
            self.topology.queue.as_str(),
            ConsumerOptions {
                no_ack: false,
                ..Default::default()
            },
        ) {
            Ok(c) => c,
            Err(e) => return SessionEnd::Failed(Error::broker("cannot start consuming", e)),
        };
        // Recovered only once a batch went through or there was nothing to do: a broker
        // session alone is not enough while the database is away, or every reconnect would
        // log the failure again and reset the backoff.
        let receiver = consumer.receiver();
        loop {
            if self.wakeup.is_stopping() {
                let _ = consumer.cancel();
                // amiquip tells the consumer of the cancel after answering it: wait for that
                // notice before dropping the receiver, or its I/O thread logs an internal error.
                // Deliveries that arrive meanwhile stay unacked; the broker requeues them.
                let deadline = Instant::now() + Duration::from_secs(2);
                while let Ok(message) =
                    receiver.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                {
                    if !matches!(message, ConsumerMessage::Delivery(_)) {
                        break;
                    }
                }
                return SessionEnd::Stopped;
            }
            let first = match receiver.recv_timeout(Duration::from_millis(200)) {
                Ok(message) => message,
                Err(RecvTimeoutError::Timeout) => {
                    failures.recovered();
                    backoff.reset();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return SessionEnd::Failed(Error::Other("RabbitMQ consumer channel closed".into()))
                }
            };
            let mut batch = Vec::with_capacity(self.config.batch_size);
            let mut end = None;
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    ConsumerMessage::Delivery(delivery) => batch.push(delivery),
                    other => {
                        end = Some(SessionEnd::Failed(Error::Other(format!(
                            "RabbitMQ ended the consumer: {other:?}"
                        ))));
                        break;
                    }
                }
                if batch.len() < self.config.batch_size {
                    next = receiver.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                match self.process(channel, &mut dead_letters, batch) {
                    Err(e) => return SessionEnd::Failed(e),
                    Ok(Flow::Redeliver) => return SessionEnd::Redeliver,
                    Ok(Flow::Continue) => {}
                }
                failures.recovered();
                backoff.reset();
            }
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// Applies a batch and settles its deliveries, in order, up to the first one to retry
    /// (then [`Flow::Redeliver`]: that one and the rest go back to the broker unsettled).
    /// `Err` means the session must end (unsettled deliveries are then redelivered).
    fn process(
        &mut self,
        channel: &Channel,
        dead_letters: &mut DeadLetters,
        batch: Vec<Delivery>,
    ) -> Result<Flow> {
        let mut valid = Vec::with_capacity(batch.len());
        for delivery in batch {
            match parse(&delivery) {
                Ok(message) => valid.push((delivery, message)),
                Err(reason) => {
                    let headers = delivery.properties.headers().as_ref();
                    log::warn!(
                        "consumer: dead-lettering delivery message_id={} trace_id={} tag={} \
                         routing_key={}: {reason}",
                        delivery.properties.message_id().as_deref().unwrap_or("-"),
                        broker::trace_id_of(headers),
                        delivery.delivery_tag(),
                        delivery.routing_key
                    );
                    dead_letters.send(channel, delivery, &reason)?;
                    self.stats.malformed.inc();
                }
            }
        }
        if valid.is_empty() {
            return Ok(Flow::Continue);
        }
        let messages: Vec<&Message> = valid.iter().map(|(_, m)| m).collect();
        match self.apply(&messages) {
            Ok(outcome) if outcome.superseded.is_empty() => {
                self.count(&outcome);
                // Every delivery up to the last one is settled now: one ack covers them all.
                if let Some((last, _)) = valid.pop() {
                    last.ack_multiple(channel)
                        .map_err(|e| Error::broker("cannot ack deliveries", e))?;
                }
                Ok(Flow::Continue)
            }
            Ok(outcome) => {
                self.count(&outcome);
                for (delivery, message) in valid {
                    self.settle_applied(channel, dead_letters, delivery, message, &outcome)?;
                }
                Ok(Flow::Continue)
            }
            Err(ApplyError::Db(e)) => Err(e),
            Err(ApplyError::Handler(failure)) if valid.len() == 1 => {
                let Some((delivery, message)) = valid.pop() else {
                    return Ok(Flow::Continue);
                };
                self.settle(
                    channel,
                    dead_letters,
                    delivery,
                    &message,
                    Err(ApplyError::Handler(failure)),
                )
            }
            Err(ApplyError::Handler(_)) => {
                // Some handler failed: the batch rolled back. Apply one by one to isolate it,
                // stopping at the first one to retry.
                for (delivery, message) in valid {
                    let outcome = self.apply(&[&message]);
                    if self.settle(channel, dead_letters, delivery, &message, outcome)? == Flow::Redeliver {
                        return Ok(Flow::Redeliver);
                    }
                }
                Ok(Flow::Continue)
            }
        }
    }

    fn count(&self, outcome: &Applied) {
        self.stats.applied.inc_by(outcome.applied);
        self.stats.duplicates.inc_by(outcome.duplicates);
    }

    /// Acks a delivery whose transaction committed, or dead-letters it when it was superseded.
    fn settle_applied(
        &mut self,
        channel: &Channel,
        dead_letters: &mut DeadLetters,
        delivery: Delivery,
        message: Message,
        outcome: &Applied,
    ) -> Result<()> {
        let id = message.message_id;
        self.attempts.remove(&id);
        if !outcome.superseded.contains(&id) {
            return delivery
                .ack(channel)
                .map_err(|e| Error::broker("cannot ack a delivery", e));
        }
        let reason = format!(
            "superseded: an event of aggregate {}/{} later than sequence {} was already applied",
            message.aggregate_type.as_deref().unwrap_or(""),
            message.aggregate_id.as_deref().unwrap_or(""),
            message.aggregate_sequence.unwrap_or_default()
        );
        log::warn!(
            "consumer: message_id={id} trace_id={} {reason}; dead-lettering",
            message.trace_id()
        );
        dead_letters.send(channel, delivery, &reason)?;
        self.stats.superseded.inc();
        Ok(())
    }

    /// Acks, dead-letters or hands back for redelivery one delivery according to how applying
    /// it went.
    fn settle(
        &mut self,
        channel: &Channel,
        dead_letters: &mut DeadLetters,
        delivery: Delivery,
        message: &Message,
        outcome: Result<Applied, ApplyError>,
    ) -> Result<Flow> {
        let id = message.message_id;
        match outcome {
            Ok(outcome) => {
                self.count(&outcome);
                self.settle_applied(channel, dead_letters, delivery, message.clone(), &outcome)?;
                Ok(Flow::Continue)
            }
            Err(ApplyError::Db(e)) => Err(e),
            Err(ApplyError::Handler(failure)) if failure.permanent => {
                log::warn!(
                    "consumer: message_id={id} trace_id={} failed permanently, dead-lettering: {failure}",
                    message.trace_id()
                );
                self.attempts.remove(&id);
                dead_letters.send(channel, delivery, &format!("permanent failure: {failure}"))?;
                self.stats.permanent.inc();
                Ok(Flow::Continue)
            }
            Err(ApplyError::Handler(failure)) => {
                self.stats.failed.inc();
                if self.attempts.len() > MAX_TRACKED_FAILURES {
                    self.attempts.clear();
                }
                let attempts = self.attempts.entry(id).or_insert(0);
                *attempts += 1;
                if *attempts > self.config.max_retries {
                    let reason = format!("failed {} times, last: {failure}", *attempts);
                    log::warn!(
                        "consumer: message_id={id} trace_id={} {reason}; dead-lettering",
                        message.trace_id()
                    );
                    self.attempts.remove(&id);
                    dead_letters.send(channel, delivery, &reason)?;
                    self.stats.exhausted.inc();
                    return Ok(Flow::Continue);
                }
                log::warn!(
                    "consumer: message_id={id} trace_id={} failed (attempt {}), redelivering it \
                     and the deliveries after it: {failure}",
                    message.trace_id(),
                    *attempts
                );
                Ok(Flow::Redeliver)
            }
        }
    }

    /// One transaction: dedupe row and effect for each message, then commit.
    fn apply(&mut self, messages: &[&Message]) -> Result<Applied, ApplyError> {
        let mut client = self.db.get().map_err(ApplyError::Db)?;
        let mut statements = client.take_statements();
        let applied = self.apply_on(&mut client, &mut statements, messages);
        if applied.is_err() {
            // One of them may be stale (see `is_stale_statement`); failures are rare, and
            // preparing again is cheap.
            statements.clear();
        }
        client.restore_statements(statements);
        applied
    }

    /// [`apply`](Self::apply) on `client`, whose prepared statements are `statements`.
    fn apply_on(
        &mut self,
        client: &mut PooledClient,
        statements: &mut Statements,
        messages: &[&Message],
    ) -> Result<Applied, ApplyError> {
        let started = Instant::now();
        let db = |context: &'static str| move |e| ApplyError::Db(Error::db(context, e));
        // A lost connection ends the session (the broker redelivers, nothing is counted); any
        // other refusal (invalid text, a constraint checked at commit) is the messages' own
        // and counts as a failed attempt, which ends in the dead-letter queue.
        let classify = |context: &'static str| {
            move |e: postgres::Error| {
                if crate::is_transient_db_error(&e) || crate::error::is_stale_statement(&e) {
                    ApplyError::Db(Error::db(context, e))
                } else {
                    ApplyError::Handler(HandlerError::transient(Error::db(context, e).to_string()))
                }
            }
        };
        let record_processed = crate::db::kept(statements, &self.record_processed, |sql| client.prepare(sql))
            .map_err(db("cannot prepare the statement that records processed messages"))?;
        let mut tx = client
            .transaction()
            .map_err(db("cannot begin the consumer transaction"))?;
        let ids: Vec<Uuid> = messages.iter().map(|m| m.message_id).collect();
        let types: Vec<Option<&str>> = messages.iter().map(|m| m.event_type.as_deref()).collect();
        let aggregate_types: Vec<Option<&str>> =
            messages.iter().map(|m| m.aggregate_type.as_deref()).collect();
        let aggregates: Vec<Option<&str>> = messages.iter().map(|m| m.aggregate_id.as_deref()).collect();
        // Order is guarded only where one consumer applies the queue's messages: with several
        // at once, a later event may legitimately commit first.
        let sequences: Vec<Option<i64>> = messages
            .iter()
            .map(|m| {
                m.aggregate_sequence
                    .filter(|_| self.topology.single_active_consumer)
            })
            .collect();
        let mut new_ids = HashSet::with_capacity(messages.len());
        let mut superseded = HashSet::new();
        for row in tx
            .query(
                &record_processed,
                &[
                    &self.name,
                    &ids,
                    &types,
                    &aggregate_types,
                    &aggregates,
                    &sequences,
                ],
            )
            .map_err(classify("cannot record processed messages"))?
        {
            let id: Uuid = row.get(0);
            if row.get::<_, bool>(1) {
                superseded.insert(id);
            } else {
                new_ids.insert(id);
            }
        }
        // `remove` also keeps a message delivered twice within one batch to one effect.
        let new: Vec<&Message> = messages
            .iter()
            .copied()
            .filter(|m| new_ids.remove(&m.message_id))
            .collect();
        if !new.is_empty() {
            // A panicking handler fails its batch like an error (the transaction rolls back)
            // instead of ending the consumer thread; the message is retried, then dead-lettered.
            let handler = &mut self.handler;
            let at = statements::address_of(&tx);
            let call = || handler.handle_batch(&mut tx, &new);
            statements::lend(statements, at, || {
                std::panic::catch_unwind(AssertUnwindSafe(call))
            })
            .unwrap_or_else(|panic| {
                Err(HandlerError::transient(format!(
                    "the handler panicked: {}",
                    panic_message(panic.as_ref())
                )))
            })
            .map_err(|failure| {
                if failure.database_unavailable {
                    // Not the message's fault: redelivered without counting against it.
                    ApplyError::Db(Error::Other(failure.reason))
                } else {
                    ApplyError::Handler(failure)
                }
            })?;
        }
        let applied = new.len() as u64;
        let duplicates = messages.len() as u64 - applied - superseded.len() as u64;
        tx.commit()
            .map_err(classify("cannot commit the consumer transaction"))?;
        metrics::observe_since(&self.stats.transaction_duration, started);
        if log::log_enabled!(log::Level::Debug) {
            let applied_ids: HashSet<Uuid> = new.iter().map(|m| m.message_id).collect();
            for message in messages {
                let id = message.message_id;
                let outcome = if applied_ids.contains(&id) {
                    "applied"
                } else if superseded.contains(&id) {
                    "superseded"
                } else {
                    "duplicate, no effect"
                };
                log::debug!(
                    "consumer: message_id={id} trace_id={} type={} {outcome}",
                    message.trace_id(),
                    message.event_type.as_deref().unwrap_or("-")
                );
            }
        }
        Ok(Applied {
            applied,
            duplicates,
            superseded,
        })
    }
}

/// The text a panic was raised with, when it was a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

enum ApplyError {
    Db(Error),
    Handler(HandlerError),
}

/// Checks the envelope: a UUID message id and a JSON body.
fn parse(delivery: &Delivery) -> Result<Message, String> {
    let properties = &delivery.properties;
    let raw_id = properties.message_id().as_ref().ok_or("no message_id")?;
    let message_id = Uuid::parse_str(raw_id).map_err(|_| format!("message_id {raw_id:?} is not a UUID"))?;
    let payload = serde_json::from_slice(&delivery.body).map_err(|e| format!("body is not JSON: {e}"))?;
    let header = |name: &str| properties.headers().as_ref().and_then(|h| h.get(name));
    let text_header = |name: &str| match header(name) {
        Some(AmqpValue::LongString(s)) => Some(s.clone()),
        _ => None,
    };
    let trace_context = broker::trace_context_of(properties.headers().as_ref());
    let aggregate_type = text_header("aggregate_type");
    let aggregate_id = text_header("aggregate_id");
    let aggregate_sequence = match header(broker::AGGREGATE_SEQUENCE_HEADER) {
        None => None,
        Some(AmqpValue::LongLongInt(n)) => Some(*n),
        Some(AmqpValue::LongInt(n)) => Some(i64::from(*n)),
        Some(other) => {
            return Err(format!(
                "{} header is not an integer: {other:?}",
                broker::AGGREGATE_SEQUENCE_HEADER
            ))
        }
    };
    let event_type = properties.type_().clone();
    check_text("type", event_type.as_deref(), MAX_EVENT_TYPE_BYTES)?;
    check_text(
        "aggregate_type header",
        aggregate_type.as_deref(),
        MAX_EVENT_TYPE_BYTES,
    )?;
    check_text(
        "aggregate_id header",
        aggregate_id.as_deref(),
        MAX_AGGREGATE_ID_BYTES,
    )?;
    Ok(Message {
        message_id,
        event_type,
        aggregate_type,
        aggregate_id,
        aggregate_sequence,
        payload,
        redelivered: delivery.redelivered,
        trace_context,
    })
}

/// Longest AMQP `type` the consumer records (AMQP's own limit for a short string).
const MAX_EVENT_TYPE_BYTES: usize = 255;
/// Longest `aggregate_id` header the consumer records: well under what one row of a Postgres
/// btree index holds (about 2,700 bytes), so `processed_messages` always takes it.
const MAX_AGGREGATE_ID_BYTES: usize = 1024;

/// Refuses a text Postgres would refuse (a NUL character) or that is longer than `max` bytes,
/// before any SQL: such a delivery can never be recorded, so it is dead-lettered at once.
fn check_text(what: &str, value: Option<&str>, max: usize) -> Result<(), String> {
    let Some(value) = value else { return Ok(()) };
    if value.contains('\0') {
        return Err(format!(
            "{what} contains a NUL character, which Postgres text cannot hold"
        ));
    }
    if value.len() > max {
        return Err(format!(
            "{what} is {} bytes, more than the {max} the consumer records",
            value.len()
        ));
    }
    Ok(())
}

/// Publishes a copy of an unusable delivery to the dead-letter exchange with the reason in its
/// headers, waits for the broker to confirm the copy, and only then acks the original.
struct DeadLetters {
    exchange: String,
    queue: String,
    confirms: crossbeam_channel::Receiver<Confirm>,
    next_tag: u64,
}

/// How long to wait for the broker to confirm a dead-lettered copy.
const DEAD_LETTER_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

impl DeadLetters {
    /// Puts `channel` in confirm mode (it keeps consuming as before).
    fn enable(channel: &Channel, topology: &Topology) -> Result<DeadLetters> {
        let confirms = broker::enable_confirms(channel)?;
        Ok(DeadLetters {
            exchange: topology.dead_letter_exchange(),
            queue: topology.queue.clone(),
            confirms,
            next_tag: 1,
        })
    }

    fn send(&mut self, channel: &Channel, delivery: Delivery, reason: &str) -> Result<()> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            "x-txoutbox-reason".into(),
            AmqpValue::LongString(reason.to_string()),
        );
        headers.insert(
            "x-txoutbox-queue".into(),
            AmqpValue::LongString(self.queue.clone()),
        );
        let properties = delivery.properties.clone().with_headers(headers);
        let copy = Publish::with_properties(&delivery.body, delivery.routing_key.clone(), properties);
        channel
            .basic_publish(self.exchange.as_str(), copy)
            .map_err(|e| Error::broker("cannot dead-letter a delivery", e))?;
        let tag = self.next_tag;
        self.next_tag += 1;
        broker::wait_for_confirm(&self.confirms, tag, DEAD_LETTER_CONFIRM_TIMEOUT)?;
        delivery
            .ack(channel)
            .map_err(|e| Error::broker("cannot ack a dead-lettered delivery", e))
    }
}
