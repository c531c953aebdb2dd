//! What the two long-running harnesses, `txoutbox-bench` and `txoutbox-chaos`, share: start-up,
//! the command-line form, the run's timestamp, per-run databases and the release binaries as
//! child processes; each uses it as `txoutbox_harness::support`, beside
//! `mod common;` (which [`startup`] reads the environment with); what differs between them (a
//! name, a database prefix, a log level) is a parameter. Both use every item here; what only one
//! needs stays in that binary (here it would be dead code in the other). [`args`] is the one
//! exception: the bench now parses its command line with lexopt, and the chaos harness will
//! follow once the cases being rewritten on another branch have landed.

pub mod args;
pub mod database;
pub mod process;
pub mod startup;
pub mod timestamp;
