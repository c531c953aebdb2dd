//! A service that only consumes, on its own r2d2 pool: it binds its queue to another service's
//! exchange and applies each event once, recording it under its own consumer name, with
//! transactions from the pool the rest of the program uses too.
//!
//! ```text
//! cargo run --example consume_only        # DATABASE_URL, AMQP_URL, AMQP_EXCHANGE, AMQP_QUEUE, EXPECT
//! ```
//! The database must be migrated (`txoutbox migrate`).

use std::time::{Duration, Instant};

use postgres::{NoTls, Transaction};
use r2d2_postgres::PostgresConnectionManager;
use txoutbox::{consumer, ConsumerConfig, Database, HandlerError, Message, Schema, Topology};

const SHIPMENT_LOG: &str = "CREATE TABLE IF NOT EXISTS shipment_log (
    message_id uuid PRIMARY KEY,
    parcel text NOT NULL
)";

/// The effect: one log row per event, in the consumer's transaction.
fn log_shipment(tx: &mut Transaction<'_>, message: &Message) -> Result<(), HandlerError> {
    let parcel = message.payload["parcel"]
        .as_str()
        .ok_or_else(|| HandlerError::permanent("ShipmentDispatched without a parcel"))?;
    tx.execute(
        "INSERT INTO shipment_log (message_id, parcel) VALUES ($1, $2)",
        &[&message.message_id, &parcel],
    )?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let setting = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let database_url = setting(
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/txoutbox_example",
    );
    let amqp_url = setting("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let topology = Topology::new(
        setting("AMQP_EXCHANGE", "shipping.events"),
        setting("AMQP_QUEUE", "shipment_log"),
    );
    let expect: u64 = setting("EXPECT", "10").parse()?;

    // The program's own pool; txoutbox borrows connections from it.
    let manager = PostgresConnectionManager::new(database_url.parse()?, NoTls);
    let pool = r2d2::Pool::builder().max_size(4).build(manager)?;
    pool.get()?.batch_execute(SHIPMENT_LOG)?;
    let db = Database::from_pool(&database_url, pool, Schema::default())?;

    let config = ConsumerConfig {
        name: Some("shipment-log".into()),
        ..ConsumerConfig::default()
    };
    let consumer = consumer::start(db, &amqp_url, topology, config, log_shipment)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while consumer.stats().applied() < expect {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {expect} applied after 30 s",
                consumer.stats().applied()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("applied {expect} events");
    consumer.stop();
    Ok(())
}
