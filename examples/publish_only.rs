//! A service that only publishes, on a plain `postgres::Client`: each shipment and its
//! `ShipmentDispatched` event commit in the caller's own `BEGIN ... COMMIT`; an in-process relay
//! publishes to an exchange it declares, and declares no queue (whoever consumes binds their own).
//!
//! ```text
//! cargo run --example publish_only        # DATABASE_URL, AMQP_URL, AMQP_EXCHANGE, COUNT
//! ```
//! The database must be migrated (`txoutbox migrate`). Events no queue is bound for end failed,
//! with the reason (`txoutbox failed list`).

use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use serde_json::json;
use txoutbox::{relay, Database, Error, NewEvent, PoolOptions, RelayConfig, Topology};
use uuid::Uuid;

const SHIPMENTS: &str = "CREATE TABLE IF NOT EXISTS shipments (
    id uuid PRIMARY KEY,
    parcel text NOT NULL
)";

/// Writes a shipment and its event in one transaction of a plain client; rolls back instead
/// when `commit` is false (then neither exists).
fn dispatch(client: &mut Client, db: &Database, parcel: &str, commit: bool) -> txoutbox::Result<Uuid> {
    let id = Uuid::now_v7();
    client.batch_execute("BEGIN").map_err(|e| Error::db("begin", e))?;
    client
        .execute(
            "INSERT INTO shipments (id, parcel) VALUES ($1, $2)",
            &[&id, &parcel],
        )
        .map_err(|e| Error::db("insert shipment", e))?;
    let event = NewEvent::new(
        "shipment",
        id.to_string(),
        "ShipmentDispatched",
        json!({ "shipment_id": id.to_string(), "parcel": parcel }),
    );
    db.outbox().enqueue(client, &event)?;
    let end = if commit { "COMMIT" } else { "ROLLBACK" };
    client.batch_execute(end).map_err(|e| Error::db(end, e))?;
    Ok(id)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let setting = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let database_url = setting(
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/txoutbox_example",
    );
    let amqp_url = setting("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let exchange = setting("AMQP_EXCHANGE", "shipping.events");
    let count: usize = setting("COUNT", "10").parse()?;

    let db = Database::connect(
        &database_url,
        &PoolOptions {
            max_size: 2,
            ..PoolOptions::default()
        },
    )?;
    let mut client = Client::connect(&database_url, NoTls)?;
    client.batch_execute(SHIPMENTS)?;
    dispatch(&mut client, &db, "changed my mind", false)?;
    for n in 1..=count {
        dispatch(&mut client, &db, &format!("parcel-{n}"), true)?;
    }
    println!("dispatched {count} shipments (and rolled one back)");

    let relay = relay::start(
        db,
        &amqp_url,
        Topology::publish_only(exchange.clone()),
        RelayConfig::default(),
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.stats().published() < count as u64 {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {count} published after 30 s",
                relay.stats().published()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("published {count} events to exchange {exchange}");
    relay.stop();
    Ok(())
}
