//! Integration tests, one binary for the crate (each module a file beside this one).

mod docs;
mod http;
mod http_connections;
mod idempotency;
mod metrics;
mod openapi;
mod operator_actions;
mod ordering;
mod parsing_properties;
mod relay;
mod schema;
mod status_page;
mod trace;
