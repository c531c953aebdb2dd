//! The write side: recording events inside the caller's own transaction.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postgres::{GenericClient, ToStatement};
use uuid::Uuid;

use crate::schema::Schema;
use crate::trace::TraceContext;
use crate::{Error, Result};

/// Channel the relay LISTENs on; [`Outbox::enqueue`] notifies it, and Postgres delivers the
/// notification only when the caller's transaction commits. One channel for every schema: a
/// relay woken by another schema's event finds nothing and waits again.
pub const NOTIFY_CHANNEL: &str = "txoutbox_outbox";

/// Takes the transaction-scoped advisory lock of an aggregate given as `$1` (type) and `$2`
/// (id): a 64-bit hash of both, length-prefixed so that no two (type, id) pairs share a text.
pub const LOCK_AGGREGATE: &str = "\
    SELECT pg_advisory_xact_lock(hashtextextended(length($1::text) || ':' || $1::text || $2::text, 0))";

/// The outbox columns an event is written to, in the order the statements here bind them and
/// [`Outbox::insert_select_sql`]'s `select` yields them: `message_id` (uuid, the consumers'
/// dedupe key), `aggregate_type`, `aggregate_id`, `event_type` (text), `payload` (jsonb),
/// `exchange`, `routing_key`, `traceparent`, `tracestate` (text, may be NULL).
pub const EVENT_COLUMNS: &str =
    "message_id, aggregate_type, aggregate_id, event_type, payload, exchange, routing_key, traceparent, tracestate";
const COLUMNS: &str = EVENT_COLUMNS;

/// One event: parameters `$1..$9` in [`COLUMNS`] order.
const INSERT_ONE: &str = "\
    INSERT INTO {schema}.outbox ({columns})
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// One event under its aggregate's lock: the materialised CTE runs first, so the row's id is
/// drawn under the lock.
const INSERT_ONE_ORDERED: &str = "\
    WITH locked AS MATERIALIZED (
        SELECT pg_advisory_xact_lock(hashtextextended(length($2::text) || ':' || $2::text || $3::text, 0))
    )
    INSERT INTO {schema}.outbox ({columns})
    SELECT $1::uuid, $2::text, $3::text, $4::text, $5::jsonb, $6::text, $7::text, $8::text, $9::text
    FROM locked";

/// Many events from arrays `$1..$9`, ids drawn in the order given.
const INSERT_MANY: &str = "\
    INSERT INTO {schema}.outbox ({columns})
    SELECT e.m, e.at, e.ai, e.et, e.p, e.ex, e.rk, e.tp, e.ts
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::text[], $7::text[],
                $8::text[], $9::text[])
         WITH ORDINALITY AS e(m, at, ai, et, p, ex, rk, tp, ts, n)
    ORDER BY e.n";

/// [`INSERT_MANY`] after locking each distinct aggregate, in sorted order (so two such
/// statements cannot deadlock on each other).
const INSERT_MANY_ORDERED: &str = "\
    WITH locked AS MATERIALIZED (
        SELECT count(pg_advisory_xact_lock(hashtextextended(length(k.t) || ':' || k.t || k.i, 0))) AS n
        FROM (SELECT DISTINCT t, i FROM unnest($2::text[], $3::text[]) AS a(t, i) ORDER BY t, i) k
    )
    INSERT INTO {schema}.outbox ({columns})
    SELECT e.m, e.at, e.ai, e.et, e.p, e.ex, e.rk, e.tp, e.ts
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::text[], $7::text[],
                $8::text[], $9::text[])
         WITH ORDINALITY AS e(m, at, ai, et, p, ex, rk, tp, ts, n)
         CROSS JOIN locked
    ORDER BY e.n";

/// One scheduled event: [`COLUMNS`] as `$1..$9`, and `$10` its not-before time in seconds since
/// the Unix epoch.
const INSERT_SCHEDULED_ONE: &str = "\
    INSERT INTO {schema}.outbox_scheduled (not_before, {columns})
    VALUES (to_timestamp($10::float8), $1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// Many scheduled events from arrays `$1..$10` (as [`INSERT_SCHEDULED_ONE`]).
const INSERT_SCHEDULED_MANY: &str = "\
    INSERT INTO {schema}.outbox_scheduled (not_before, {columns})
    SELECT to_timestamp(e.nb), e.m, e.at, e.ai, e.et, e.p, e.ex, e.rk, e.tp, e.ts
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::text[], $7::text[],
                $8::text[], $9::text[], $10::float8[])
         WITH ORDINALITY AS e(m, at, ai, et, p, ex, rk, tp, ts, nb, n)
    ORDER BY e.n";

/// An event to publish once the transaction that records it commits.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// Unique id of this event; becomes the AMQP `message_id` the consumer dedupes on.
    pub message_id: Uuid,
    /// Kind of entity the event is about, e.g. `order`.
    pub aggregate_type: String,
    /// Id of that entity; sent as the `aggregate_id` header.
    pub aggregate_id: String,
    /// Event name, e.g. `OrderCreated`: the AMQP `type`, and the routing key unless
    /// [`routing_key`](Self::routing_key) is set.
    pub event_type: String,
    /// JSON body of the message.
    pub payload: serde_json::Value,
    /// Exchange to publish to; `None`: the relay's [`Topology::exchange`](crate::Topology::exchange).
    pub exchange: Option<String>,
    /// Routing key; `None`: the event type.
    pub routing_key: Option<String>,
    /// W3C trace context of the work that wrote the event, sent as the AMQP headers
    /// `traceparent` and `tracestate` and handed to the consumer's handler as
    /// [`Message::trace_context`](crate::Message::trace_context); `None`: the message carries
    /// none. Set it with [`with_trace_context`](Self::with_trace_context).
    pub trace_context: Option<TraceContext>,
    /// Not published before this time; `None`: as soon as the transaction commits. Set it with
    /// [`not_before`](Self::not_before) or [`delayed_by`](Self::delayed_by).
    pub not_before: Option<SystemTime>,
}

impl NewEvent {
    /// An event with a fresh time-ordered message id (UUIDv7), published to the relay's
    /// exchange with the event type as routing key.
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        NewEvent {
            message_id: Uuid::now_v7(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload,
            exchange: None,
            routing_key: None,
            trace_context: None,
            not_before: None,
        }
    }

    /// The same event, published no earlier than `at` (and within a relay poll interval after
    /// it, `RELAY_POLL_INTERVAL`, 1 s by default).
    ///
    /// It waits in the table `outbox_scheduled`, which the relay's claims never read, and is
    /// moved into the outbox when due. In aggregate order it takes its place among its
    /// aggregate's events then, as if written at that time: it holds back none of them, and the
    /// events of its aggregate written after it came due are published after it. The relay
    /// compares `at` with the database's clock.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use txoutbox::NewEvent;
    ///
    /// let reminder = NewEvent::new("invoice", "42", "PaymentReminder", serde_json::json!({"id": 42}))
    ///     .not_before(SystemTime::now() + Duration::from_secs(7 * 24 * 3600));
    /// assert!(reminder.not_before.is_some());
    /// ```
    pub fn not_before(self, at: SystemTime) -> Self {
        NewEvent {
            not_before: Some(at),
            ..self
        }
    }

    /// The same event, published no earlier than `delay` from now (this process's clock): see
    /// [`not_before`](Self::not_before). A delay past what a clock can hold is taken as 1,000
    /// years.
    pub fn delayed_by(self, delay: Duration) -> Self {
        const MOST: Duration = Duration::from_secs(1000 * 365 * 24 * 3600);
        let now = SystemTime::now();
        self.not_before(now.checked_add(delay.min(MOST)).unwrap_or(now))
    }

    /// [`not_before`](Self::not_before) in seconds since the Unix epoch, for the database.
    pub(crate) fn not_before_epoch(&self) -> Result<Option<f64>> {
        let Some(at) = self.not_before else {
            return Ok(None);
        };
        at.duration_since(UNIX_EPOCH)
            .map(|since| Some(since.as_secs_f64()))
            .map_err(|_| {
                Error::Config(format!(
                    "NewEvent {}: not_before is before 1970; leave it unset to publish at once",
                    self.message_id
                ))
            })
    }

    /// The same event, published to `exchange` (which must exist on the broker: the relay
    /// marks the event failed, with the reason, when it does not).
    pub fn to_exchange(self, exchange: impl Into<String>) -> Self {
        NewEvent {
            exchange: Some(exchange.into()),
            ..self
        }
    }

    /// The same event, carrying `trace_context`: the trace of the request or job that writes
    /// it, so that whoever consumes the event can continue that trace.
    ///
    /// txoutbox sends the context as it is given (it records no span of its own): pass the
    /// context of *your* current span, so that the consumer's span becomes its child. From an
    /// incoming request, [`TraceContext::from_headers`] reads its `traceparent` and
    /// `tracestate` (an invalid one gives `None`: start a new trace with
    /// [`TraceContext::new_root`]).
    ///
    /// ```
    /// use txoutbox::trace::TraceContext;
    /// use txoutbox::NewEvent;
    ///
    /// let incoming = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    /// let context = TraceContext::from_headers(incoming, Some("congo=t61rcWkgMzE"))
    ///     .unwrap_or_else(TraceContext::new_root);
    /// let event = NewEvent::new("invoice", "42", "InvoiceSent", serde_json::json!({"id": 42}))
    ///     .with_trace_context(context);
    /// assert_eq!(
    ///     event.trace_context.as_ref().map(|c| c.trace_id()),
    ///     Some("4bf92f3577b34da6a3ce929d0e0e4736")
    /// );
    /// ```
    pub fn with_trace_context(self, trace_context: TraceContext) -> Self {
        NewEvent {
            trace_context: Some(trace_context),
            ..self
        }
    }

    /// The `traceparent` to store, if any.
    fn traceparent(&self) -> Option<&str> {
        self.trace_context.as_ref().map(TraceContext::traceparent)
    }

    /// The `tracestate` to store, if any.
    fn tracestate(&self) -> Option<&str> {
        self.trace_context.as_ref().and_then(TraceContext::tracestate)
    }

    /// The same event, published with `routing_key` instead of its event type.
    pub fn with_routing_key(self, routing_key: impl Into<String>) -> Self {
        NewEvent {
            routing_key: Some(routing_key.into()),
            ..self
        }
    }
}

/// The outbox table of one [`Schema`], and the statements that write to it.
///
/// Every method takes the caller's client: a [`postgres::Transaction`], or a
/// [`postgres::Client`] (pooled or not) inside the caller's own `BEGIN`. On a client in
/// autocommit the insert is a transaction of its own, which is rarely what the caller wants.
/// Nothing is sent at once: if the caller's transaction commits, the relay publishes each
/// event (at least once, until the broker confirms it); if it rolls back, the events never
/// existed.
///
/// [`Database::outbox`](crate::Database::outbox) gives the one of the database's schema; the
/// free functions [`enqueue`], [`enqueue_ordered`] and [`enqueue_many`] use the one the
/// connection's `search_path` finds.
#[derive(Clone, Debug)]
pub struct Outbox {
    schema: Schema,
    /// False for the free functions' outbox: table names without a schema, found through the
    /// connection's `search_path`.
    qualified: bool,
    notify: bool,
    insert_one: String,
    insert_one_ordered: String,
    insert_many: String,
    insert_many_ordered: String,
    insert_scheduled_one: String,
    insert_scheduled_many: String,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox::new(Schema::default())
    }
}

impl Outbox {
    /// The outbox in `schema`, notifying the relay at commit.
    pub fn new(schema: Schema) -> Outbox {
        Outbox::render(schema, true, true)
    }

    /// The outbox the connection's `search_path` finds (`public` unless the connection says
    /// otherwise; a [`Database`](crate::Database) with a schema of its own sets it on its
    /// pool's connections): what the free functions [`enqueue`] and co. write to.
    pub fn on_search_path() -> Outbox {
        Outbox::render(Schema::default(), false, true)
    }

    /// The same outbox without the notification at commit.
    ///
    /// Postgres serializes the commits of transactions that NOTIFY, which caps how many of them
    /// commit per second. Use this when the relay runs in the same process and the caller wakes
    /// it after the commit ([`Waker::wake`](crate::relay::Waker::wake)), or when a relay finding
    /// the event at its next poll is soon enough.
    pub fn without_notify(self) -> Outbox {
        Outbox::render(self.schema, self.qualified, false)
    }

    /// `template` with its tables named for this outbox.
    fn sql(&self, template: &str) -> String {
        if self.qualified {
            self.schema.qualify(template)
        } else {
            template.replace("{schema}.", "")
        }
    }

    fn render(schema: Schema, qualified: bool, notify: bool) -> Outbox {
        let mut outbox = Outbox {
            schema,
            qualified,
            notify,
            insert_one: String::new(),
            insert_one_ordered: String::new(),
            insert_many: String::new(),
            insert_many_ordered: String::new(),
            insert_scheduled_one: String::new(),
            insert_scheduled_many: String::new(),
        };
        // Scheduled events need no notification: the relay moves them when they are due.
        let scheduled = |template: &str| outbox.sql(&template.replace("{columns}", COLUMNS));
        let (one, many) = (scheduled(INSERT_SCHEDULED_ONE), scheduled(INSERT_SCHEDULED_MANY));
        (outbox.insert_scheduled_one, outbox.insert_scheduled_many) = (one, many);
        let sql = |template: &str| {
            let insert = outbox.sql(&template.replace("{columns}", COLUMNS));
            if !notify {
                return insert;
            }
            // Postgres folds equal notifications of one transaction into one.
            format!(
                "WITH inserted AS ({insert} RETURNING 1) \
                 SELECT pg_notify('{NOTIFY_CHANNEL}', '') WHERE EXISTS (SELECT 1 FROM inserted)"
            )
        };
        let statements = [
            sql(INSERT_ONE),
            sql(INSERT_ONE_ORDERED),
            sql(INSERT_MANY),
            sql(INSERT_MANY_ORDERED),
        ];
        [
            outbox.insert_one,
            outbox.insert_one_ordered,
            outbox.insert_many,
            outbox.insert_many_ordered,
        ] = statements;
        outbox
    }

    /// The schema this outbox lives in.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Whether the inserts notify the relay at commit.
    pub fn notifies(&self) -> bool {
        self.notify
    }

    /// Records `event` in the caller's transaction.
    ///
    /// With a relay publishing in aggregate order
    /// ([`RelayOrdering::Aggregate`](crate::config::RelayOrdering::Aggregate)), events of an
    /// aggregate that several transactions may write at once must get their outbox ids in
    /// commit order: write them with [`enqueue_ordered`](Self::enqueue_ordered), or have those
    /// transactions lock a row of the aggregate first.
    ///
    /// ```no_run
    /// # fn demo(db: &txoutbox::Database, client: &mut postgres::Client) -> txoutbox::Result<()> {
    /// use txoutbox::NewEvent;
    /// let mut tx = client.transaction().map_err(|e| txoutbox::Error::db("begin", e))?;
    /// // ... the caller's own writes on `tx` ...
    /// let event = NewEvent::new("invoice", "42", "InvoiceSent", serde_json::json!({"id": 42}));
    /// db.outbox().enqueue(&mut tx, &event)?;
    /// tx.commit().map_err(|e| txoutbox::Error::db("commit", e))?;
    /// # Ok(()) }
    /// ```
    pub fn enqueue(&self, client: &mut impl GenericClient, event: &NewEvent) -> Result<()> {
        match event.not_before {
            Some(_) => self.enqueue_scheduled(client, event),
            None => insert_event(client, self.insert_one.as_str(), event),
        }
    }

    /// Records an event with a [not-before time](NewEvent::not_before) in `outbox_scheduled`.
    fn enqueue_scheduled(&self, client: &mut impl GenericClient, event: &NewEvent) -> Result<()> {
        check(event)?;
        let not_before = event.not_before_epoch()?;
        execute_event(
            client,
            self.insert_scheduled_one.as_str(),
            event,
            Some(&not_before),
            "schedule",
        )
    }

    /// An `INSERT` into this outbox of one event per row of `select`, to put in a data-modifying
    /// `WITH` of the caller's own statement: the caller's row and its event are then written by
    /// one statement, in one round trip, and, when that statement is the whole transaction,
    /// without a `BEGIN` and a `COMMIT` around it. `select` yields [`EVENT_COLUMNS`] in order
    /// and may read the statement's other `WITH` queries (a `RETURNING` of the caller's insert).
    /// The insert notifies the relay at commit as [`enqueue`](Self::enqueue) does, unless this
    /// outbox is [`without_notify`](Self::without_notify).
    ///
    /// Unlike `enqueue` it cannot check the event first: keep `event_type`, `exchange` and
    /// `routing_key` within [`MAX_NAME_BYTES`] (the broker would refuse the event, which ends
    /// failed), give every event a new `message_id`, and record scheduled events with `enqueue`.
    /// Nor does it take the aggregate's lock as [`enqueue_ordered`](Self::enqueue_ordered) does:
    /// with a relay in aggregate order, use it for an aggregate's first event (a row the
    /// statement itself creates, as the example service's orders), or run
    /// [`LOCK_AGGREGATE`] first in the same transaction.
    ///
    /// ```no_run
    /// # fn demo(db: &txoutbox::Database, client: &mut postgres::Client) -> Result<(), postgres::Error> {
    /// let event = db.outbox().insert_select_sql(
    ///     "SELECT gen_random_uuid(), 'invoice', i.id::text, 'InvoiceSent',
    ///             jsonb_build_object('id', i.id, 'total', i.total), NULL, NULL, NULL, NULL
    ///      FROM sent i",
    /// );
    /// let sql = format!(
    ///     "WITH sent AS (INSERT INTO invoices (total) VALUES ($1::text::numeric) RETURNING id, total),
    ///           event AS ({event})
    ///      SELECT id FROM sent"
    /// );
    /// // One statement, one transaction: the invoice and its event, or neither.
    /// let row = client.query_one(&sql, &[&"12.50"])?;
    /// # Ok(()) }
    /// ```
    pub fn insert_select_sql(&self, select: &str) -> String {
        // The same wrapping with or without the notification, so that `select` is typed alike.
        let insert = self.sql(&format!(
            "INSERT INTO {{schema}}.outbox ({COLUMNS}) SELECT e.* FROM ({select}) AS e ({COLUMNS})"
        ));
        if !self.notify {
            return insert;
        }
        // A notification for each row inserted, which Postgres folds into one per transaction.
        format!(
            "{insert} CROSS JOIN LATERAL \
             (SELECT pg_notify('{NOTIFY_CHANNEL}', '') WHERE e.message_id IS NOT NULL) AS n"
        )
    }

    /// The statement that records a scheduled event (`$1..$9` as [`insert_sql`](Self::insert_sql),
    /// `$10` the not-before time in seconds since the Unix epoch), for other drivers.
    pub fn insert_scheduled_sql(&self) -> &str {
        &self.insert_scheduled_one
    }

    /// Runs `statement` on the events of `events` with no not-before time, and records the
    /// others in `outbox_scheduled`.
    fn enqueue_split(
        &self,
        client: &mut impl GenericClient,
        statement: &str,
        events: &[NewEvent],
    ) -> Result<u64> {
        let (later, now): (Vec<&NewEvent>, Vec<&NewEvent>) =
            events.iter().partition(|e| e.not_before.is_some());
        if later.is_empty() || now.is_empty() {
            let (statement, events) = match later.is_empty() {
                true => (statement, &now),
                false => (self.insert_scheduled_many.as_str(), &later),
            };
            return insert_events(client, statement, events, !later.is_empty());
        }
        // Two statements: in a transaction of their own (a savepoint inside the caller's), so
        // that a failure of the second leaves nothing of the first, even on a client that is
        // not in a transaction.
        let mut tx = client.transaction().map_err(|e| {
            Error::db(
                "cannot begin the transaction (or savepoint) that records the events",
                e,
            )
        })?;
        let recorded = insert_events(&mut tx, statement, &now, false)?
            + insert_events(&mut tx, &self.insert_scheduled_many, &later, true)?;
        tx.commit()
            .map_err(|e| Error::db("cannot commit the events (nothing of them was recorded)", e))?;
        Ok(recorded)
    }

    /// Like [`enqueue`](Self::enqueue), taking the aggregate's lock first, so that outbox id
    /// order is commit order among the events of one aggregate, which a relay with
    /// [`RelayOrdering::Aggregate`](crate::config::RelayOrdering::Aggregate) publishes in.
    ///
    /// The lock is a transaction-scoped advisory lock on a 64-bit hash of the event's
    /// `aggregate_type` and `aggregate_id` (`pg_advisory_xact_lock`), held until the
    /// transaction ends and taken in the same statement as the insert, so the row's id is drawn
    /// under it. Writers of one aggregate take turns; writers of different aggregates do not
    /// wait for each other (barring a hash collision, which only costs a wait). Caveats:
    ///
    /// - A transaction that enqueues for several aggregates can deadlock with another that
    ///   locks the same aggregates in another order; Postgres then aborts one of them (SQLSTATE
    ///   `40P01`, retryable). Enqueue in a fixed order, or all at once with
    ///   [`enqueue_many_ordered`](Self::enqueue_many_ordered), which locks in sorted order.
    /// - Each distinct aggregate holds one entry of Postgres' lock table until the transaction
    ///   ends: one enqueuing for many thousands of distinct aggregates can fail with "out of
    ///   shared memory" (raise `max_locks_per_transaction`, or split it).
    ///
    /// An event with a [not-before time](NewEvent::not_before) takes no lock: it joins its
    /// aggregate's order when the relay moves it into the outbox, under the lock then.
    pub fn enqueue_ordered(&self, client: &mut impl GenericClient, event: &NewEvent) -> Result<()> {
        match event.not_before {
            Some(_) => self.enqueue_scheduled(client, event),
            None => insert_event(client, self.insert_one_ordered.as_str(), event),
        }
    }

    /// Records every event of `events` in one statement, their outbox ids in the order given:
    /// all of them, or none and an error. Returns how many were recorded. (Events with a
    /// [not-before time](NewEvent::not_before) go to `outbox_scheduled` in a second statement,
    /// both under a savepoint, or a transaction of their own on a client outside one: an error
    /// in either records none.)
    pub fn enqueue_many(&self, client: &mut impl GenericClient, events: &[NewEvent]) -> Result<u64> {
        self.enqueue_split(client, &self.insert_many, events)
    }

    /// [`enqueue_many`](Self::enqueue_many) under the lock of each aggregate involved (see
    /// [`enqueue_ordered`](Self::enqueue_ordered)), taken in sorted order.
    pub fn enqueue_many_ordered(&self, client: &mut impl GenericClient, events: &[NewEvent]) -> Result<u64> {
        self.enqueue_split(client, &self.insert_many_ordered, events)
    }

    /// The statement [`enqueue`](Self::enqueue) (or, with `ordered`,
    /// [`enqueue_ordered`](Self::enqueue_ordered)) runs, for callers that prepare it once per
    /// connection and record with [`insert_event`].
    pub fn insert_sql(&self, ordered: bool) -> &str {
        if ordered {
            &self.insert_one_ordered
        } else {
            &self.insert_one
        }
    }
}

static ON_SEARCH_PATH: LazyLock<Outbox> = LazyLock::new(Outbox::on_search_path);

/// [`Outbox::enqueue`] on the outbox the connection's `search_path` finds
/// ([`Outbox::on_search_path`]): `public`, or the schema of the [`Database`](crate::Database)
/// the connection came from. Prefer `db.outbox()` where a `Database` is at hand.
pub fn enqueue(client: &mut impl GenericClient, event: &NewEvent) -> Result<()> {
    ON_SEARCH_PATH.enqueue(client, event)
}

/// [`Outbox::enqueue_ordered`] on the outbox the connection's `search_path` finds.
pub fn enqueue_ordered(client: &mut impl GenericClient, event: &NewEvent) -> Result<()> {
    ON_SEARCH_PATH.enqueue_ordered(client, event)
}

/// [`Outbox::enqueue_many`] on the outbox the connection's `search_path` finds.
pub fn enqueue_many(client: &mut impl GenericClient, events: &[NewEvent]) -> Result<u64> {
    ON_SEARCH_PATH.enqueue_many(client, events)
}

/// Longest event type, exchange or routing key: AMQP carries them as short strings.
pub const MAX_NAME_BYTES: usize = 255;

/// Refuses an event the broker could never take, before it is written.
pub(crate) fn check(event: &NewEvent) -> Result<()> {
    let names = [
        ("event_type", Some(event.event_type.as_str())),
        ("exchange", event.exchange.as_deref()),
        ("routing_key", event.routing_key.as_deref()),
    ];
    for (field, value) in names {
        if let Some(value) = value.filter(|v| v.len() > MAX_NAME_BYTES) {
            return Err(Error::Config(format!(
                "NewEvent::{field} is {} bytes; AMQP allows at most {MAX_NAME_BYTES}",
                value.len()
            )));
        }
    }
    Ok(())
}

/// Refuses a scheduled event on a path that writes to the outbox itself.
fn check_not_scheduled(event: &NewEvent) -> Result<()> {
    match event.not_before {
        None => Ok(()),
        Some(_) => Err(Error::Config(format!(
            "NewEvent {} has a not-before time: record it with Outbox::enqueue (or \
             Outbox::insert_scheduled_sql), which writes it to outbox_scheduled",
            event.message_id
        ))),
    }
}

/// Inserts `event` with `statement`: [`Outbox::insert_sql`], as text or prepared. An event
/// with a [not-before time](NewEvent::not_before) is refused: use [`Outbox::enqueue`].
pub fn insert_event<S>(client: &mut impl GenericClient, statement: &S, event: &NewEvent) -> Result<()>
where
    S: ToStatement + ?Sized,
{
    check(event)?;
    check_not_scheduled(event)?;
    execute_event(client, statement, event, None, "enqueue")
}

/// Runs `statement` with `event`'s values in [`COLUMNS`] order as `$1..$9`, and `extra` as
/// `$10` when given; an error names the event and what was being done (`verb`).
fn execute_event<S>(
    client: &mut impl GenericClient,
    statement: &S,
    event: &NewEvent,
    extra: Option<&(dyn postgres::types::ToSql + Sync)>,
    verb: &str,
) -> Result<()>
where
    S: ToStatement + ?Sized,
{
    let (traceparent, tracestate) = (event.traceparent(), event.tracestate());
    let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> = vec![
        &event.message_id,
        &event.aggregate_type,
        &event.aggregate_id,
        &event.event_type,
        &event.payload,
        &event.exchange,
        &event.routing_key,
        &traceparent,
        &tracestate,
    ];
    params.extend(extra);
    client.execute(statement, &params).map_err(|e| {
        Error::db(
            format!("cannot {verb} {} event {}", event.event_type, event.message_id),
            e,
        )
    })?;
    Ok(())
}

/// Inserts `events` with `statement`, bound as arrays: [`COLUMNS`], and with `scheduled` their
/// not-before times as a tenth.
fn insert_events(
    client: &mut impl GenericClient,
    statement: &str,
    events: &[&NewEvent],
    scheduled: bool,
) -> Result<u64> {
    if events.is_empty() {
        return Ok(0);
    }
    events.iter().copied().try_for_each(check)?;
    let not_before: Vec<Option<f64>> = events
        .iter()
        .map(|e| e.not_before_epoch())
        .collect::<Result<_>>()?;
    let ids: Vec<Uuid> = events.iter().map(|e| e.message_id).collect();
    let aggregate_types: Vec<&str> = events.iter().map(|e| e.aggregate_type.as_str()).collect();
    let aggregate_ids: Vec<&str> = events.iter().map(|e| e.aggregate_id.as_str()).collect();
    let event_types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let payloads: Vec<&serde_json::Value> = events.iter().map(|e| &e.payload).collect();
    let exchanges: Vec<Option<&str>> = events.iter().map(|e| e.exchange.as_deref()).collect();
    let routing_keys: Vec<Option<&str>> = events.iter().map(|e| e.routing_key.as_deref()).collect();
    let traceparents: Vec<Option<&str>> = events.iter().map(|e| e.traceparent()).collect();
    let tracestates: Vec<Option<&str>> = events.iter().map(|e| e.tracestate()).collect();
    let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> = vec![
        &ids,
        &aggregate_types,
        &aggregate_ids,
        &event_types,
        &payloads,
        &exchanges,
        &routing_keys,
        &traceparents,
        &tracestates,
    ];
    if scheduled {
        params.push(&not_before);
    }
    client
        .execute(statement, &params)
        .map_err(|e| Error::db(format!("cannot enqueue {} events", events.len()), e))?;
    // One statement: every event was recorded, or none (and the error says why).
    Ok(events.len() as u64)
}

/// An event the relay gave up on after `RELAY_MAX_ATTEMPTS` refusals.
#[derive(Clone, Debug, PartialEq)]
pub struct FailedEvent {
    /// Outbox row id (use it to re-queue).
    pub id: i64,
    /// The event's message id.
    pub message_id: Uuid,
    /// Event type.
    pub event_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Refusals so far.
    pub attempts: i32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// Seconds since the event was written.
    pub age_secs: f64,
}

const SELECT_FAILED: &str = "\
    SELECT id, message_id, event_type, aggregate_id, attempts, last_error,
           extract(epoch FROM now() - created_at)::float8
    FROM {schema}.outbox WHERE failed_at IS NOT NULL ORDER BY id LIMIT $1";

const REQUEUE_FAILED: &str = "\
    UPDATE {schema}.outbox SET failed_at = NULL, attempts = 0, available_at = now(), held = false
    WHERE failed_at IS NOT NULL AND ($1::bigint IS NULL OR id = $1)";

impl Outbox {
    /// Up to `limit` failed events, oldest first.
    pub fn failed_events(&self, client: &mut impl GenericClient, limit: i64) -> Result<Vec<FailedEvent>> {
        let rows = client
            .query(self.sql(SELECT_FAILED).as_str(), &[&limit])
            .map_err(|e| Error::db("cannot list failed events", e))?;
        Ok(rows
            .iter()
            .map(|row| FailedEvent {
                id: row.get(0),
                message_id: row.get(1),
                event_type: row.get(2),
                aggregate_id: row.get(3),
                attempts: row.get(4),
                last_error: row.get(5),
                age_secs: row.get(6),
            })
            .collect())
    }

    /// Puts failed events back in line for the relay with a fresh attempt count: the one with
    /// outbox id `id`, or all of them with `None`. Returns how many were re-queued. Notifies
    /// the relay, so a listening relay picks them up at once.
    pub fn requeue_failed(&self, client: &mut impl GenericClient, id: Option<i64>) -> Result<u64> {
        let context = "cannot re-queue failed events";
        let mut tx = client.transaction().map_err(|e| Error::db(context, e))?;
        let count = tx
            .execute(self.sql(REQUEUE_FAILED).as_str(), &[&id])
            .map_err(|e| Error::db(context, e))?;
        tx.execute("SELECT pg_notify($1, '')", &[&NOTIFY_CHANNEL])
            .map_err(|e| Error::db("cannot notify the relay", e))?;
        tx.commit().map_err(|e| Error::db(context, e))?;
        Ok(count)
    }
}
