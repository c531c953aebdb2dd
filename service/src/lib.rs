//! # txoutbox-service
//!
//! The example order service built on the [`txoutbox`] library: `txoutbox-server` (the HTTP
//! API of [`http`], which writes an order and its `OrderCreated` event in one transaction, plus
//! the relay) and `txoutbox-consumer` (which marks orders `COMPLETED` exactly once in effect).
//! The orders domain is [`orders`]; the binaries read their settings through [`settings`].
#![warn(missing_docs)]

pub mod config;
mod front;
mod gate;
pub mod http;
pub mod metrics;
pub mod orders;
pub mod settings;
mod status;

pub use config::{HttpConfig, Secret};
