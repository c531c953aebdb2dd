//! Enqueueing with diesel: a ticket and its event written in one `PgConnection::transaction`.
//!
//! A help desk opens tickets through diesel's query builder. Each ticket and its `TicketOpened`
//! event commit together; a transaction that rolls back leaves neither the ticket nor the
//! event. The relay (not run here) publishes the committed event like any other.
//!
//! ```text
//! cargo run --example diesel --features diesel     # the local Postgres, database postgres
//! DATABASE_URL=... cargo run --example diesel --features diesel
//! ```
//!
//! The database must already hold txoutbox's tables (`txoutbox migrate`); the example creates
//! its own `tickets` table if missing.

use diesel::prelude::*;
use serde_json::json;
use txoutbox::{NewEvent, Outbox};
use uuid::Uuid;

diesel::table! {
    tickets (id) {
        id -> Uuid,
        title -> Text,
        state -> Text,
    }
}

// The columns of txoutbox's outbox this program reads back (the table has more).
diesel::table! {
    outbox (id) {
        id -> BigInt,
        message_id -> Uuid,
        aggregate_id -> Text,
        event_type -> Text,
    }
}

const TICKETS: &str = "CREATE TABLE IF NOT EXISTS tickets (
    id uuid PRIMARY KEY,
    title text NOT NULL CHECK (title <> ''),
    state text NOT NULL DEFAULT 'OPEN'
)";

#[derive(Insertable)]
#[diesel(table_name = tickets)]
struct NewTicket<'a> {
    id: Uuid,
    title: &'a str,
}

/// Opens a ticket and records its event atomically: both commit, or neither does.
fn open_ticket(conn: &mut PgConnection, outbox: &Outbox, title: &str) -> txoutbox::Result<(Uuid, Uuid)> {
    conn.transaction(|conn| {
        let id = Uuid::now_v7();
        diesel::insert_into(tickets::table)
            .values(&NewTicket { id, title })
            .execute(conn)?;
        let event = NewEvent::new(
            "ticket",
            id.to_string(),
            "TicketOpened",
            json!({ "ticket_id": id.to_string(), "title": title }),
        );
        outbox.enqueue_diesel(conn, &event)?;
        Ok((id, event.message_id))
    })
}

/// Writes a ticket and its event, then fails before the commit: diesel rolls back both.
/// `attempted` gets the ticket's id, to look for it afterwards.
fn open_ticket_then_fail(
    conn: &mut PgConnection,
    outbox: &Outbox,
    title: &str,
    attempted: &mut Option<Uuid>,
) -> txoutbox::Result<()> {
    conn.transaction(|conn| {
        let id = Uuid::now_v7();
        *attempted = Some(id);
        diesel::insert_into(tickets::table)
            .values(&NewTicket { id, title })
            .execute(conn)?;
        let event = NewEvent::new(
            "ticket",
            id.to_string(),
            "TicketOpened",
            json!({ "ticket_id": id.to_string() }),
        );
        outbox.enqueue_diesel(conn, &event)?;
        Err(txoutbox::Error::Other(format!(
            "ticket {id} cancelled before its transaction committed"
        )))
    })
}

fn count_events(conn: &mut PgConnection, aggregate_id: Uuid) -> QueryResult<i64> {
    outbox::table
        .filter(outbox::aggregate_id.eq(aggregate_id.to_string()))
        .count()
        .get_result(conn)
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());

    // txoutbox's tables must be there: migrations are applied only when asked.
    let mut client = postgres::Client::connect(&database_url, postgres::NoTls)?;
    txoutbox::migrate::check(&mut client, "public")?;
    drop(client);

    let mut conn = PgConnection::establish(&database_url)?;
    diesel::sql_query(TICKETS).execute(&mut conn)?;
    let outbox = Outbox::default();

    // 1. Committed: the ticket and its event.
    let (id, message_id) = open_ticket(&mut conn, &outbox, "printer on fire")?;
    let event_type: String = outbox::table
        .filter(outbox::message_id.eq(message_id))
        .select(outbox::event_type)
        .first(&mut conn)?;
    let state: String = tickets::table.find(id).select(tickets::state).first(&mut conn)?;
    println!("committed: ticket {id} ({state}) with its {event_type} event {message_id} in the outbox");

    // 2. Rolled back: neither the ticket nor its event.
    let mut attempted = None;
    let err = match open_ticket_then_fail(&mut conn, &outbox, "false alarm", &mut attempted) {
        Ok(()) => return Err("the cancelled ticket committed, but it should have rolled back".into()),
        Err(err) => err,
    };
    println!("rolled back: {err}");
    let cancelled = attempted.ok_or("the cancelled transaction never ran")?;
    let rows: i64 = tickets::table.find(cancelled).count().get_result(&mut conn)?;
    let events = count_events(&mut conn, cancelled)?;
    if rows != 0 || events != 0 {
        return Err(
            format!("the rolled-back ticket {cancelled} left {rows} row(s) and {events} event(s)").into(),
        );
    }

    let committed_events = count_events(&mut conn, id)?;
    let total_events: i64 = outbox::table.count().get_result(&mut conn)?;
    if committed_events != 1 {
        return Err(format!("ticket {id} has {committed_events} events in the outbox, not 1").into());
    }
    println!(
        "ticket {id} and its event committed together; the rolled-back ticket left no row and no \
         event ({total_events} event(s) in the outbox)"
    );
    Ok(())
}
