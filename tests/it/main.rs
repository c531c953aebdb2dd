//! Integration tests, one binary for the crate (each module a file beside this one).

mod admin;
mod aggregate_order;
mod consumer;
mod dependencies;
mod destinations;
#[cfg(feature = "diesel")]
mod diesel;
mod examples;
mod hot_aggregate;
mod linger;
mod migrate;
mod outbox;
mod pool;
mod quorum;
mod regressions;
mod scheduled;
mod tls;
mod trace;
