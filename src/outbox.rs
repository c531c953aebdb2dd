//! The write side: recording an event inside the caller's own transaction.

use postgres::{GenericClient, ToStatement, Transaction};
use uuid::Uuid;

use crate::{Error, Result};

/// Channel the relay LISTENs on; [`enqueue`] notifies it, and Postgres delivers the
/// notification only when the caller's transaction commits.
pub const NOTIFY_CHANNEL: &str = "txoutbox_outbox";

/// Takes the transaction-scoped advisory lock of an aggregate given as `$1` (type) and `$2`
/// (id): a 64-bit hash of both, length-prefixed so that no two (type, id) pairs share a text.
pub const LOCK_AGGREGATE: &str = "\
    SELECT pg_advisory_xact_lock(hashtextextended(length($1::text) || ':' || $1::text || $2::text, 0))";

/// Inserts an event and notifies [`NOTIFY_CHANNEL`] (delivered at commit). Takes no aggregate
/// lock (see [`enqueue_ordered`]).
pub const INSERT_EVENT_AND_NOTIFY: &str = "\
    WITH inserted AS (
        INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, payload)
        VALUES ($1, $2, $3, $4, $5)
        RETURNING id
    )
    SELECT pg_notify('txoutbox_outbox', '') FROM inserted";

/// Inserts an event without a notification or aggregate lock.
pub const INSERT_EVENT: &str = "\
    INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, payload)
    VALUES ($1, $2, $3, $4, $5)";

/// Takes the aggregate's lock (as [`LOCK_AGGREGATE`]), then inserts the event and notifies, in
/// one statement: the materialised CTE runs first, so the row's id is drawn under the lock.
const LOCK_AND_INSERT_EVENT_AND_NOTIFY: &str = "\
    WITH locked AS MATERIALIZED (
        SELECT pg_advisory_xact_lock(hashtextextended(length($2::text) || ':' || $2::text || $3::text, 0))
    ), inserted AS (
        INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, payload)
        SELECT $1::uuid, $2::text, $3::text, $4::text, $5::jsonb FROM locked
        RETURNING id
    )
    SELECT pg_notify('txoutbox_outbox', '') FROM inserted";

/// [`LOCK_AND_INSERT_EVENT_AND_NOTIFY`] without the notification.
const LOCK_AND_INSERT_EVENT: &str = "\
    WITH locked AS MATERIALIZED (
        SELECT pg_advisory_xact_lock(hashtextextended(length($2::text) || ':' || $2::text || $3::text, 0))
    )
    INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, payload)
    SELECT $1::uuid, $2::text, $3::text, $4::text, $5::jsonb FROM locked";

/// An event to publish once the transaction that records it commits.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// Unique id of this event; becomes the AMQP `message_id` the consumer dedupes on.
    pub message_id: Uuid,
    /// Kind of entity the event is about, e.g. `order`.
    pub aggregate_type: String,
    /// Id of that entity; sent as the `aggregate_id` header.
    pub aggregate_id: String,
    /// Event name, e.g. `OrderCreated`: the AMQP `type` and routing key.
    pub event_type: String,
    /// JSON body of the message.
    pub payload: serde_json::Value,
}

impl NewEvent {
    /// An event with a fresh time-ordered message id (UUIDv7).
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
        }
    }
}

/// Records `event` in the outbox as part of the caller's transaction `tx`.
///
/// Nothing is sent now. If `tx` commits, the relay publishes the event (at least once, until the
/// broker confirms it); if `tx` rolls back, the event never existed. The relay is woken by a
/// notification that Postgres delivers at commit.
///
/// With a relay publishing in aggregate order
/// ([`RelayOrdering::Aggregate`](crate::config::RelayOrdering::Aggregate)), events of an
/// aggregate that several transactions may write at once must get their outbox ids in commit
/// order: write them with [`enqueue_ordered`], or have those transactions lock a row of the
/// aggregate first (as cancelling an order locks the order's row).
///
/// ```no_run
/// # fn demo(client: &mut postgres::Client) -> txoutbox::Result<()> {
/// use txoutbox::{enqueue, NewEvent};
/// let mut tx = client.transaction().map_err(|e| txoutbox::Error::db("begin", e))?;
/// // ... the caller's own writes on `tx` ...
/// enqueue(&mut tx, &NewEvent::new("invoice", "42", "InvoiceSent", serde_json::json!({"id": 42})))?;
/// tx.commit().map_err(|e| txoutbox::Error::db("commit", e))?;
/// # Ok(()) }
/// ```
pub fn enqueue(tx: &mut Transaction<'_>, event: &NewEvent) -> Result<()> {
    insert_event(tx, INSERT_EVENT_AND_NOTIFY, event)
}

/// Like [`enqueue`], taking the aggregate's lock first, so that outbox id order is commit
/// order among the events of one aggregate, which a relay with
/// [`RelayOrdering::Aggregate`](crate::config::RelayOrdering::Aggregate) publishes in.
///
/// The lock is a transaction-scoped advisory lock on a 64-bit hash of the event's
/// `aggregate_type` and `aggregate_id` (`pg_advisory_xact_lock`), held until `tx` ends and
/// taken in the same statement as the insert, so the row's id is drawn under it. Writers of
/// one aggregate take turns; writers of different aggregates do not wait for each other
/// (barring a hash collision, which only costs a wait). Caveats:
///
/// - A transaction that enqueues for several aggregates can deadlock with another that locks
///   the same aggregates in another order; Postgres then aborts one of them (SQLSTATE `40P01`,
///   retryable). Enqueue in a fixed order (e.g. sorted by aggregate) to avoid it, and take the
///   aggregate's lock before locking rows that other transactions lock after enqueuing.
/// - Each distinct aggregate holds one entry of Postgres' lock table until `tx` ends: a
///   transaction enqueuing for many thousands of distinct aggregates can fail with "out of
///   shared memory" (raise `max_locks_per_transaction`, or split it).
pub fn enqueue_ordered(tx: &mut Transaction<'_>, event: &NewEvent) -> Result<()> {
    insert_event(tx, LOCK_AND_INSERT_EVENT_AND_NOTIFY, event)
}

/// Like [`enqueue`], without the notification.
///
/// Postgres serializes the commits of transactions that NOTIFY, which caps how many of them
/// commit per second. Use this when the relay runs in the same process and the caller wakes it
/// after the commit ([`Waker::wake`](crate::relay::Waker::wake)), or when a relay finding the
/// event at its next poll is soon enough.
pub fn enqueue_silently(tx: &mut Transaction<'_>, event: &NewEvent) -> Result<()> {
    insert_event(tx, INSERT_EVENT, event)
}

/// Like [`enqueue_ordered`], without the notification (see [`enqueue_silently`]).
pub fn enqueue_ordered_silently(tx: &mut Transaction<'_>, event: &NewEvent) -> Result<()> {
    insert_event(tx, LOCK_AND_INSERT_EVENT, event)
}

/// Inserts `event` with `statement`: one of the insert statements above (parameters message
/// id, aggregate type, aggregate id, event type, payload), as text or prepared.
pub fn insert_event<S>(tx: &mut Transaction<'_>, statement: &S, event: &NewEvent) -> Result<()>
where
    S: ToStatement + ?Sized,
{
    tx.execute(
        statement,
        &[
            &event.message_id,
            &event.aggregate_type,
            &event.aggregate_id,
            &event.event_type,
            &event.payload,
        ],
    )
    .map_err(|e| {
        Error::db(
            format!("cannot enqueue {} event {}", event.event_type, event.message_id),
            e,
        )
    })?;
    Ok(())
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
}

const SELECT_FAILED: &str = "\
    SELECT id, message_id, event_type, aggregate_id, attempts, last_error
    FROM outbox WHERE failed_at IS NOT NULL ORDER BY id LIMIT $1";

const REQUEUE_FAILED: &str = "\
    UPDATE outbox SET failed_at = NULL, attempts = 0, available_at = now()
    WHERE failed_at IS NOT NULL AND ($1::bigint IS NULL OR id = $1)";

/// Up to `limit` failed events, oldest first.
pub fn failed_events(client: &mut impl GenericClient, limit: i64) -> Result<Vec<FailedEvent>> {
    let rows = client
        .query(SELECT_FAILED, &[&limit])
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
        })
        .collect())
}

/// Puts failed events back in line for the relay with a fresh attempt count: the one with
/// outbox id `id`, or all of them with `None`. Returns how many were re-queued. Notifies the
/// relay, so a listening relay picks them up at once.
pub fn requeue_failed(client: &mut impl GenericClient, id: Option<i64>) -> Result<u64> {
    let mut tx = client
        .transaction()
        .map_err(|e| Error::db("cannot re-queue failed events", e))?;
    let count = tx
        .execute(REQUEUE_FAILED, &[&id])
        .map_err(|e| Error::db("cannot re-queue failed events", e))?;
    tx.execute("SELECT pg_notify($1, '')", &[&NOTIFY_CHANNEL])
        .map_err(|e| Error::db("cannot notify the relay", e))?;
    tx.commit()
        .map_err(|e| Error::db("cannot re-queue failed events", e))?;
    Ok(count)
}
