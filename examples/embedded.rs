//! Embedding txoutbox in a plain synchronous program with its own table and event type.
//!
//! A billing program issues invoices. Each invoice and its `InvoiceIssued` event are written in
//! one transaction; the relay runs in-process on threads; a consumer handler marks the invoice
//! `SENT` in the same transaction that records the message as processed.
//!
//! ```text
//! cargo run --example embedded            # uses the local Postgres and RabbitMQ
//! DATABASE_URL=... AMQP_URL=... cargo run --example embedded
//! ```
//!
//! `AMQP_EXCHANGE` and `AMQP_QUEUE` override its names (`billing.events`, `invoice_events`).

use std::time::{Duration, Instant};

use postgres::Transaction;
use serde_json::json;
use txoutbox::{
    consumer, enqueue, relay, ConsumerConfig, Database, Error, HandlerError, Message, NewEvent, PoolOptions,
    RelayConfig, Topology,
};
use uuid::Uuid;

const INVOICES: &str = "CREATE TABLE IF NOT EXISTS invoices (
    id uuid PRIMARY KEY,
    customer text NOT NULL,
    total_cents bigint NOT NULL CHECK (total_cents > 0),
    state text NOT NULL DEFAULT 'ISSUED'
)";

/// Issues an invoice and its event atomically: both commit or neither does.
fn issue_invoice(db: &Database, customer: &str, total_cents: i64) -> txoutbox::Result<Uuid> {
    let mut client = db.get()?;
    let mut tx = client.transaction().map_err(|e| Error::db("begin", e))?;
    let id = Uuid::now_v7();
    tx.execute(
        "INSERT INTO invoices (id, customer, total_cents) VALUES ($1, $2, $3)",
        &[&id, &customer, &total_cents],
    )
    .map_err(|e| Error::db("insert invoice", e))?;
    let event = NewEvent::new(
        "invoice",
        id.to_string(),
        "InvoiceIssued",
        json!({ "invoice_id": id.to_string(), "customer": customer, "total_cents": total_cents }),
    );
    enqueue(&mut tx, &event)?;
    tx.commit().map_err(|e| Error::db("commit", e))?;
    Ok(id)
}

/// The consumer's effect: runs once per message id, in the consumer's transaction.
fn mark_sent(tx: &mut Transaction<'_>, message: &Message) -> Result<(), HandlerError> {
    if message.event_type.as_deref() != Some("InvoiceIssued") {
        return Ok(());
    }
    let id = message.payload["invoice_id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| HandlerError::permanent("InvoiceIssued without an invoice_id"))?;
    // Prepared once per connection: one round trip per message, planned once.
    let sent = txoutbox::consumer::prepared(tx, "UPDATE invoices SET state = 'SENT' WHERE id = $1")?;
    tx.execute(&sent, &[&id])?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/txoutbox_example".into());
    let amqp_url =
        std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());

    let db = Database::connect(
        &database_url,
        &PoolOptions {
            max_size: 8,
            ..PoolOptions::default()
        },
    )?;
    db.get()?
        .batch_execute(INVOICES)
        .map_err(|e| Error::db("create invoices", e))?;
    let setting = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let topology = Topology::new(
        setting("AMQP_EXCHANGE", "billing.events"),
        setting("AMQP_QUEUE", "invoice_events"),
    );

    let relay = relay::start(db.clone(), &amqp_url, topology.clone(), RelayConfig::default())?;
    let consumer = consumer::start(
        db.clone(),
        &amqp_url,
        topology,
        ConsumerConfig::default(),
        mark_sent,
    )?;

    let ids: Vec<Uuid> = (1..=100)
        .map(|n| issue_invoice(&db, &format!("customer-{n}"), n * 1_000))
        .collect::<Result<_, _>>()?;
    println!("issued {} invoices", ids.len());

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sent: i64 = db
            .get()?
            .query_one(
                "SELECT count(*) FROM invoices WHERE id = ANY($1) AND state = 'SENT'",
                &[&ids],
            )
            .map_err(|e| Error::db("count", e))?
            .get(0);
        if sent == ids.len() as i64 {
            println!("all {sent} invoices SENT");
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("only {sent} of {} invoices SENT after 30 s", ids.len()).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    consumer.stop();
    relay.stop();
    Ok(())
}
