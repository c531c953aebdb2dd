//! What the binaries share: settings from the environment, `--help`, logging and exit codes.

use std::fmt::Display;
use std::str::FromStr;

/// One documented setting: its environment variable, default and meaning.
#[derive(Clone, Copy)]
pub struct Setting {
    /// The environment variable.
    pub name: &'static str,
    /// Its value when unset, as `--help` prints it.
    pub default: &'static str,
    /// What it sets.
    pub help: &'static str,
}

/// Where the services are: the settings every binary shares.
pub const SERVICE_SETTINGS: &[Setting] = &[
    Setting {
        name: "DATABASE_URL",
        default: crate::config::DEFAULT_DATABASE_URL,
        help: "Postgres URL; its schema is checked, never changed (run `txoutbox migrate` first)",
    },
    Setting {
        name: "AMQP_URL",
        default: crate::config::DEFAULT_AMQP_URL,
        help: "RabbitMQ URL (heartbeat=10, connection_timeout=5000 added unless set)",
    },
    Setting {
        name: "AMQP_EXCHANGE",
        default: "txoutbox.events",
        help: "topic exchange events are published to",
    },
    Setting {
        name: "AMQP_QUEUE",
        default: "order_events",
        help: "queue bound to the exchange; dead letters go to <queue>.dlx -> <queue>.dlq",
    },
    Setting {
        name: "AMQP_QUEUE_TYPE",
        default: "classic",
        help: "classic, or quorum (replicated; for a clustered RabbitMQ)",
    },
    Setting {
        name: "AMQP_SINGLE_ACTIVE_CONSUMER",
        default: "true",
        help: "true: the queue delivers to one consumer at a time, others stand by (aggregate order)",
    },
    Setting {
        name: "RUST_LOG",
        default: "info",
        help: "log filter (error, warn, info, debug, trace)",
    },
];

/// The exchange and queues named by `AMQP_EXCHANGE` and `AMQP_QUEUE`, of `AMQP_QUEUE_TYPE`,
/// with a single active consumer unless `AMQP_SINGLE_ACTIVE_CONSUMER=false`.
pub fn topology_from_env() -> Result<txoutbox::Topology, String> {
    let defaults = txoutbox::Topology::default();
    let queue_type =
        txoutbox::QueueType::parse(&env_or("AMQP_QUEUE_TYPE", "classic")).map_err(|e| e.to_string())?;
    Ok(txoutbox::Topology::new(
        env_or("AMQP_EXCHANGE", &defaults.exchange),
        env_or("AMQP_QUEUE", &defaults.queue),
    )
    .with_queue_type(queue_type)
    .with_single_active_consumer(env_parse("AMQP_SINGLE_ACTIVE_CONSUMER", true)?))
}

/// Prints `--help` for a binary: what it does, then each setting with its default.
pub fn print_help(binary: &str, about: &str, usage: &str, settings: &[Setting]) {
    println!("{binary}: {about}\n\nUsage: {usage}\n\nSettings (environment variables):");
    for s in settings {
        println!("  {:<22} {}\n  {:<22} default: {}", s.name, s.help, "", s.default);
    }
}

/// True when the command line asks for help.
pub fn wants_help() -> bool {
    std::env::args().skip(1).any(|a| a == "--help" || a == "-h")
}

/// The value of `name`, or `default` when unset or empty.
pub fn env_or(name: &str, default: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => default.to_string(),
    }
}

/// Parses `name` from the environment, or `default` when unset; a bad value is an error that
/// names the variable.
pub fn env_parse<T: FromStr>(name: &str, default: T) -> Result<T, String>
where
    T::Err: Display,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|e| format!("{name}={v:?} is not valid: {e}")),
        _ => Ok(default),
    }
}

/// Logs at `info` by default; `RUST_LOG` overrides.
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
}

/// Runs `try_main`, prints its error and exits with 1 on failure.
pub fn run(try_main: impl FnOnce() -> Result<(), String>) {
    if let Err(e) = try_main() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// SIGTERM and SIGINT, caught from the moment [`install`](Self::install) returns: a binary
/// installs it first thing, so that a signal arriving while it starts up is a clean shutdown
/// too (the default action would kill it). From the first signal on, a second one ends the
/// process at once (exit code 1), so a stuck shutdown can always be cut short.
pub struct ShutdownSignal(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl ShutdownSignal {
    /// Installs the handlers.
    pub fn install() -> Result<ShutdownSignal, String> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for signal in [SIGTERM, SIGINT] {
            // Registered first, so it sees the flag still false on the first signal.
            signal_hook::flag::register_conditional_shutdown(signal, 1, asked.clone())
                .map_err(|e| format!("cannot install the signal handler: {e}"))?;
            signal_hook::flag::register(signal, asked.clone())
                .map_err(|e| format!("cannot install the signal handler: {e}"))?;
        }
        Ok(ShutdownSignal(asked))
    }

    /// Blocks until the first signal (returns at once if it came already).
    pub fn wait(&self) {
        while !self.0.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        log::info!("shutdown: signal received, finishing work in hand (a second signal exits at once)");
    }
}
