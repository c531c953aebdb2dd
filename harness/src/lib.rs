//! txoutbox's measuring tools: the load generator behind `make stress` ([`stress`]) and what
//! the benchmark and the failure tests share ([`support`]). Not part of the library.

pub mod stress;
pub mod support;
