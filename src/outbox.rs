//! The write side: recording an event inside the caller's own transaction.

use postgres::{GenericClient, ToStatement, Transaction};
use uuid::Uuid;

use crate::{Error, Result};

/// Channel the relay LISTENs on; [`enqueue`] notifies it, and Postgres delivers the
/// notification only when the caller's transaction commits.
pub const NOTIFY_CHANNEL: &str = "txoutbox_outbox";

/// Inserts an event and notifies [`NOTIFY_CHANNEL`] (delivered at commit).
pub(crate) const INSERT_EVENT_AND_NOTIFY: &str = "\
    WITH inserted AS (
        INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, payload)
        VALUES ($1, $2, $3, $4, $5)
        RETURNING id
    )
    SELECT pg_notify('txoutbox_outbox', '') FROM inserted";

/// Inserts an event without a notification.
pub(crate) const INSERT_EVENT: &str = "\
    INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, payload)
    VALUES ($1, $2, $3, $4, $5)";

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

/// Like [`enqueue`], without the notification.
///
/// Postgres serializes the commits of transactions that NOTIFY, which caps how many of them
/// commit per second. Use this when the relay runs in the same process and the caller wakes it
/// after the commit ([`Waker::wake`](crate::relay::Waker::wake)), or when a relay finding the
/// event at its next poll is soon enough.
pub fn enqueue_silently(tx: &mut Transaction<'_>, event: &NewEvent) -> Result<()> {
    insert_event(tx, INSERT_EVENT, event)
}

/// Inserts `event` with `statement`: [`INSERT_EVENT`] or [`INSERT_EVENT_AND_NOTIFY`], as text
/// or prepared.
pub(crate) fn insert_event<S>(tx: &mut Transaction<'_>, statement: &S, event: &NewEvent) -> Result<()>
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
