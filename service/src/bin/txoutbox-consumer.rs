//! `txoutbox-consumer`: the standalone consumer that marks orders `COMPLETED`, exactly once in
//! effect.

use txoutbox_service::settings as common;

use common::{env_or, env_parse, Setting};
use txoutbox::retention::{self, RetentionConfig};
use txoutbox::{admin, consumer, metrics, ConsumerConfig, Database, PoolOptions};
use txoutbox_service::config::{DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL};
use txoutbox_service::orders;

/// Default of `CONSUMER_METRICS_ADDR`.
const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9091";

const SETTINGS: &[Setting] = &[
    Setting {
        name: "CONSUMER_PREFETCH",
        default: "256",
        help: "unacknowledged deliveries the broker may push ahead",
    },
    Setting {
        name: "CONSUMER_BATCH",
        default: "100",
        help: "deliveries applied per transaction and acked together",
    },
    Setting {
        name: "CONSUMER_MAX_RETRIES",
        default: "5",
        help: "redeliveries after a transient handler failure before dead-lettering",
    },
    Setting {
        name: "CONSUMER_NAME",
        default: "the queue's name",
        help: "name processed message ids are recorded under (instances of one consumer share it)",
    },
    Setting {
        name: "PROCESSED_RETENTION",
        default: "7d",
        help: "age after which processed_messages rows are purged (d, h, m, s; `off` keeps them)",
    },
    Setting {
        name: "RETENTION_INTERVAL",
        default: "1h",
        help: "pause between two purges of processed_messages (batches of 1000 rows)",
    },
    Setting {
        name: "DB_POOL_SIZE",
        default: "2",
        help: "Postgres connections in the pool",
    },
    Setting {
        name: "CONSUMER_METRICS_ADDR",
        default: DEFAULT_METRICS_ADDR,
        help: "address of GET /metrics (Prometheus text) and GET /healthz; empty or off disables",
    },
];

fn main() {
    if common::wants_help() {
        common::print_help(
            "txoutbox-consumer",
            "consumes order events from RabbitMQ and marks orders COMPLETED, once per message id",
            "txoutbox-consumer [--help]",
            &[common::SERVICE_SETTINGS, SETTINGS].concat(),
        );
        return;
    }
    common::init_logging();
    common::run(try_main);
}

fn try_main() -> Result<(), String> {
    let shutdown = common::ShutdownSignal::install()?;
    let config = ConsumerConfig {
        prefetch: env_parse("CONSUMER_PREFETCH", 256)?,
        batch_size: env_parse("CONSUMER_BATCH", 100)?,
        max_retries: env_parse("CONSUMER_MAX_RETRIES", 5)?,
        name: std::env::var("CONSUMER_NAME")
            .ok()
            .filter(|name| !name.is_empty()),
        ..ConsumerConfig::default()
    };
    let pool = PoolOptions {
        max_size: env_parse("DB_POOL_SIZE", 2)?,
        ..PoolOptions::default()
    };
    let topology = common::topology_from_env()?;
    let database_url = env_or("DATABASE_URL", DEFAULT_DATABASE_URL);
    let amqp_url = env_or("AMQP_URL", DEFAULT_AMQP_URL);
    // Unset: the default; set but empty, or `off`: no listener.
    let metrics_addr = match std::env::var("CONSUMER_METRICS_ADDR") {
        Err(_) => Some(DEFAULT_METRICS_ADDR.to_string()),
        Ok(addr) if addr.trim().is_empty() || addr.trim().eq_ignore_ascii_case("off") => None,
        Ok(addr) => Some(addr.trim().to_string()),
    };

    let retention = retention_from_env()?;

    let db = Database::connect(&database_url, &pool).map_err(|e| e.to_string())?;
    orders::install_table(&db).map_err(|e| e.to_string())?;
    let purge = match retention {
        Some(config) => Some(retention::start(db.clone(), config).map_err(|e| e.to_string())?),
        None => None,
    };
    let handle =
        consumer::start(db, &amqp_url, topology, config, orders::OrderEvents).map_err(|e| e.to_string())?;
    let metrics_server = match metrics_addr {
        Some(addr) => {
            let mut registry = metrics::Registry::default();
            handle.stats().register(&mut registry);
            let server = txoutbox_service::metrics::serve("CONSUMER_METRICS_ADDR", &addr, registry)
                .map_err(|e| format!("{e} (set CONSUMER_METRICS_ADDR to a free address, or off)"))?;
            println!("txoutbox-consumer metrics on http://{}/metrics", server.addr());
            Some(server)
        }
        None => None,
    };
    println!("txoutbox-consumer consuming");
    shutdown.wait();
    // Commit and ack the batch in hand, then close the connection.
    handle.stop();
    if let Some(server) = metrics_server {
        server.stop();
    }
    if let Some(purge) = purge {
        purge.stop();
    }
    log::info!("shutdown: done");
    Ok(())
}

/// `PROCESSED_RETENTION` and `RETENTION_INTERVAL`; `None` when retention is `off`.
fn retention_from_env() -> Result<Option<RetentionConfig>, String> {
    let keep = env_or("PROCESSED_RETENTION", "7d");
    if keep.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let age = |name: &str, text: &str| admin::parse_age(text).map_err(|e| format!("{name}: {e}"));
    let keep = age("PROCESSED_RETENTION", &keep)?;
    let interval = age("RETENTION_INTERVAL", &env_or("RETENTION_INTERVAL", "1h"))?;
    if interval.is_zero() {
        return Err("RETENTION_INTERVAL must be more than 0 s".into());
    }
    Ok(Some(RetentionConfig {
        keep,
        interval,
        ..RetentionConfig::default()
    }))
}
