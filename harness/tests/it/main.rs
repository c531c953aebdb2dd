//! Integration tests, one binary for the crate (each module a file beside this one).

mod end_to_end;
mod frozen_relay;
mod hostile;
mod proxy;
