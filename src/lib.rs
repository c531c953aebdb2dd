//! # txoutbox
//!
//! A transactional outbox for Postgres and RabbitMQ, synchronous and thread-pool based.
//!
//! - [`Outbox::enqueue`] (and [`enqueue`], for tables in schema `public`) writes an event on
//!   the caller's own Postgres transaction or client: it is published if and only if that
//!   transaction commits. [`Outbox::enqueue_many`] writes a batch in one statement.
//! - [`relay::start`] runs worker threads that claim outbox rows with `FOR UPDATE SKIP LOCKED`,
//!   publish them with publisher confirms, and delete them only after the broker confirmed.
//! - [`consumer::start`] applies each delivery through a [`Handler`] in a transaction that also
//!   records the message id in `processed_messages` under the consumer's name, and acks only
//!   after that commit: a redelivered message has no second effect.
//! - [`migrate`] owns the tables: [`Database::connect`] and [`Database::from_pool`] only check
//!   their version.
//! - With the `diesel` feature, `Outbox::enqueue_diesel` (module `diesel`) enqueues inside a
//!   `diesel::PgConnection::transaction`.
//! - [`trace`]: an event can carry the W3C trace context of the work that wrote it
//!   ([`NewEvent::with_trace_context`]), sent as the AMQP headers `traceparent`/`tracestate`
//!   and read back onto [`Message::trace_context`]; every message also carries the CloudEvents
//!   AMQP binding's `cloudEvents:*` headers ([`broker`]).
//! - [`metrics`] exposes what the relay and the consumer count (their `stats().register(..)`)
//!   and the outbox backlog in the Prometheus text format.
//!
//! ```no_run
//! use txoutbox::{consumer, relay, ConsumerConfig, Database, PoolOptions, RelayConfig, Topology};
//!
//! fn main() -> txoutbox::Result<()> {
//!     let db = Database::connect("postgres://postgres@127.0.0.1/app", &PoolOptions::default())?;
//!     let amqp = "amqp://guest:guest@127.0.0.1:5672/%2f";
//!     let relay = relay::start(db.clone(), amqp, Topology::default(), RelayConfig::default())?;
//!     let consumer = consumer::start(
//!         db.clone(),
//!         amqp,
//!         Topology::default(),
//!         ConsumerConfig::default(),
//!         |tx: &mut postgres::Transaction<'_>, msg: &txoutbox::Message| {
//!             tx.execute("UPDATE accounts SET events = events + 1 WHERE id = $1", &[&msg.aggregate_id])?;
//!             Ok(())
//!         },
//!     )?;
//!     // ... write events with txoutbox::enqueue(&mut tx, &event) in your transactions ...
//!     consumer.stop();
//!     relay.stop();
//!     Ok(())
//! }
//! ```
#![warn(missing_docs)]

pub mod admin;
mod amqp_url;
pub mod broker;
pub mod config;
pub mod consumer;
pub mod db;
/// Available with the `diesel` feature: [`Outbox::enqueue_diesel`] on a `diesel::PgConnection`.
#[cfg(feature = "diesel")]
pub mod diesel;
mod error;
pub mod metrics;
pub mod migrate;
pub mod outbox;
pub mod relay;
pub mod retention;
pub mod scheduler;
pub mod schema;
pub mod tls;
pub mod trace;
pub mod wakeup;

pub use broker::{QueueType, Topology};
pub use config::{ConsumerConfig, RelayConfig, RelayOrdering};
pub use consumer::{Handler, HandlerError, Message};
pub use db::{Database, PoolOptions};
pub use error::{is_transient_db_error, Error, Result};
pub use outbox::{enqueue, enqueue_many, enqueue_ordered, NewEvent, Outbox};
pub use schema::Schema;
pub use trace::TraceContext;
