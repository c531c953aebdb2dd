//! Enqueueing on a [`diesel::PgConnection`](::diesel::PgConnection) (feature `diesel`).
//!
//! [`Outbox::enqueue_diesel`] and [`Outbox::enqueue_ordered_diesel`] record an event inside the
//! caller's own [`Connection::transaction`](::diesel::Connection::transaction): the event is
//! published if and only if that transaction commits. They run the very statements of
//! [`Outbox::insert_sql`], bound with diesel, so both drivers write the same rows.
//!
//! [`Error`] converts from [`diesel::result::Error`](::diesel::result::Error), so a
//! transaction closure can return `txoutbox::Result` and use `?` on diesel calls and on the
//! enqueue alike:
//!
//! ```no_run
//! use diesel::{Connection, PgConnection, RunQueryDsl};
//! use txoutbox::{NewEvent, Outbox};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut conn = PgConnection::establish("postgres://postgres@127.0.0.1/app")?;
//! let outbox = Outbox::default();
//! conn.transaction(|conn| {
//!     diesel::sql_query("UPDATE tickets SET state = 'CLOSED' WHERE id = 7").execute(conn)?;
//!     let event = NewEvent::new("ticket", "7", "TicketClosed", serde_json::json!({ "id": 7 }));
//!     outbox.enqueue_diesel(conn, &event)?;
//!     Ok::<_, txoutbox::Error>(())
//! })?;
//! # Ok(()) }
//! ```

use ::diesel::pg::PgConnection;
use ::diesel::sql_types::{Double, Jsonb, Nullable, Text, Uuid};
use ::diesel::RunQueryDsl;

use crate::{Error, NewEvent, Outbox, Result};

impl Outbox {
    /// [`enqueue`](Self::enqueue) on a diesel connection: records `event` in the caller's
    /// transaction (call it inside [`Connection::transaction`](::diesel::Connection::transaction);
    /// outside one, the insert commits on its own at once).
    ///
    /// ```no_run
    /// # use diesel::{Connection, PgConnection};
    /// # fn demo(conn: &mut PgConnection, db: &txoutbox::Database) -> txoutbox::Result<()> {
    /// let event = txoutbox::NewEvent::new("ticket", "7", "TicketOpened", serde_json::json!({}));
    /// conn.transaction(|conn| {
    ///     // ... the caller's own diesel writes on `conn` ...
    ///     db.outbox().enqueue_diesel(conn, &event)
    /// })
    /// # }
    /// ```
    pub fn enqueue_diesel(&self, conn: &mut PgConnection, event: &NewEvent) -> Result<()> {
        self.insert_diesel(conn, false, event)
    }

    /// [`enqueue_ordered`](Self::enqueue_ordered) on a diesel connection: takes the aggregate's
    /// advisory lock first, so that outbox id order is commit order among the events of one
    /// aggregate (see there for the caveats).
    pub fn enqueue_ordered_diesel(&self, conn: &mut PgConnection, event: &NewEvent) -> Result<()> {
        self.insert_diesel(conn, true, event)
    }

    /// [`insert_sql`](Self::insert_sql), or [`insert_scheduled_sql`](Self::insert_scheduled_sql)
    /// for an event with a not-before time.
    fn insert_diesel(&self, conn: &mut PgConnection, ordered: bool, event: &NewEvent) -> Result<()> {
        match event.not_before_epoch()? {
            None => insert_event_diesel(conn, self.insert_sql(ordered), event, None),
            Some(at) => insert_event_diesel(conn, self.insert_scheduled_sql(), event, Some(at)),
        }
    }
}

/// Runs `statement` ([`Outbox::insert_sql`]: `$1..$9` in the order of the outbox's columns;
/// with `not_before`, [`Outbox::insert_scheduled_sql`], which takes it as `$10`).
fn insert_event_diesel(
    conn: &mut PgConnection,
    statement: &str,
    event: &NewEvent,
    not_before: Option<f64>,
) -> Result<()> {
    crate::outbox::check(event)?;
    let query = ::diesel::sql_query(statement)
        .bind::<Uuid, _>(event.message_id)
        .bind::<Text, _>(&event.aggregate_type)
        .bind::<Text, _>(&event.aggregate_id)
        .bind::<Text, _>(&event.event_type)
        .bind::<Jsonb, _>(&event.payload)
        .bind::<Nullable<Text>, _>(event.exchange.as_deref())
        .bind::<Nullable<Text>, _>(event.routing_key.as_deref())
        .bind::<Nullable<Text>, _>(event.trace_context.as_ref().map(|c| c.traceparent()))
        .bind::<Nullable<Text>, _>(event.trace_context.as_ref().and_then(|c| c.tracestate()));
    let done = match not_before {
        None => query.execute(conn),
        Some(at) => query.bind::<Double, _>(at).execute(conn),
    };
    done.map_err(|e| {
        Error::diesel(
            format!("cannot enqueue {} event {}", event.event_type, event.message_id),
            e,
        )
    })?;
    Ok(())
}
