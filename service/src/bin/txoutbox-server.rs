//! `txoutbox-server`: the orders HTTP API and the outbox relay in one process.

use txoutbox_service::settings as common;

use common::{env_or, env_parse, Setting};
use std::time::Duration;

use txoutbox::{relay, Database, PoolOptions, RelayConfig, RelayOrdering};
use txoutbox_service::config::{Secret, DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL};
use txoutbox_service::{http, orders, HttpConfig};

const SETTINGS: &[Setting] = &[
    Setting {
        name: "HTTP_ADDR",
        default: "127.0.0.1:8080",
        help: "address the API listens on",
    },
    Setting {
        name: "HTTP_THREADS",
        default: "16",
        help: "request handler threads",
    },
    Setting {
        name: "HTTP_MAX_CONNECTIONS",
        default: "256",
        help: "open client connections at most; past it a new one gets 503 and is closed at once",
    },
    Setting {
        name: "HTTP_REQUEST_TIMEOUT",
        default: "10",
        help: "seconds from a request's first byte to its last; slower gets 408 and a close",
    },
    Setting {
        name: "HTTP_MAX_HEADER_BYTES",
        default: "32768",
        help: "largest request head (request line and header fields); larger gets 431",
    },
    Setting {
        name: "API_TOKEN",
        default: "unset (no authentication)",
        help: "when set, POST needs Authorization: Bearer <API_TOKEN> (401 otherwise)",
    },
    Setting {
        name: "DB_POOL_SIZE",
        default: "HTTP_THREADS + 2 (the relay has its own connections)",
        help: "Postgres connections in the pool",
    },
    Setting {
        name: "RELAY_WORKERS",
        default: "5",
        help: "relay threads, each with its own RabbitMQ connection",
    },
    Setting {
        name: "RELAY_BATCH",
        default: "200",
        help: "outbox rows claimed, published and deleted per round",
    },
    Setting {
        name: "RELAY_LINGER_MS",
        default: "2",
        help: "milliseconds a relay worker woken by a new event waits before it claims, so that the \
               events of the next moments join its round (0..=1000; 0: claim at once)",
    },
    Setting {
        name: "RELAY_ORDERING",
        default: "aggregate",
        help: "none | aggregate: publish each order's events in commit order (the consumer needs it)",
    },
    Setting {
        name: "RELAY_CONFIRM_TIMEOUT",
        default: "10",
        help: "seconds a relay round waits for the broker's confirms; a relay session idle in its \
               transaction for twice this plus 5 s is ended by Postgres (its rows go to others)",
    },
    Setting {
        name: "RELAY_MAX_ATTEMPTS",
        default: "10",
        help: "broker refusals (nack, unroutable) before an event is marked failed",
    },
    Setting {
        name: "RELAY_CLOUDEVENTS_SOURCE",
        default: txoutbox::broker::DEFAULT_CLOUDEVENTS_SOURCE,
        help: "CloudEvents source of each message (cloudEvents:source header), a URI reference; \
               {aggregate_type} is replaced by the event's aggregate type",
    },
];

fn main() {
    if common::wants_help() {
        common::print_help(
            "txoutbox-server",
            "HTTP API for orders (POST /orders, GET /orders/{id}, POST /orders/{id}/cancel) plus the \
             outbox relay to RabbitMQ; status page at /, OpenAPI document at /openapi.yaml",
            "txoutbox-server [--help]",
            &[common::SERVICE_SETTINGS, SETTINGS].concat(),
        );
        return;
    }
    common::init_logging();
    common::run(try_main);
}

fn try_main() -> Result<(), String> {
    let shutdown = common::ShutdownSignal::install()?;
    let http_config = HttpConfig {
        addr: env_or("HTTP_ADDR", "127.0.0.1:8080"),
        threads: env_parse("HTTP_THREADS", 16)?,
        max_connections: env_parse("HTTP_MAX_CONNECTIONS", 256)?,
        request_timeout: Duration::from_secs(env_parse("HTTP_REQUEST_TIMEOUT", 10)?),
        max_header_bytes: env_parse("HTTP_MAX_HEADER_BYTES", 32 * 1024)?,
        api_token: std::env::var("API_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .map(Secret::new),
        ..HttpConfig::default()
    };
    let relay_config = RelayConfig {
        workers: env_parse("RELAY_WORKERS", 5)?,
        batch_size: env_parse("RELAY_BATCH", 200)?,
        linger: Duration::from_millis(env_parse(
            "RELAY_LINGER_MS",
            txoutbox::config::DEFAULT_RELAY_LINGER.as_millis() as u64,
        )?),
        max_attempts: env_parse("RELAY_MAX_ATTEMPTS", 10)?,
        confirm_timeout: Duration::from_secs(env_parse("RELAY_CONFIRM_TIMEOUT", 10)?),
        // The order consumer applies each event's transition as it arrives, so the service
        // keeps per-aggregate order unless told otherwise (the library default is none).
        ordering: env_parse("RELAY_ORDERING", RelayOrdering::Aggregate)?,
        cloudevents_source: env_or(
            "RELAY_CLOUDEVENTS_SOURCE",
            txoutbox::broker::DEFAULT_CLOUDEVENTS_SOURCE,
        ),
        ..RelayConfig::default()
    };
    let pool_size = http_config.threads + 2;
    let pool = PoolOptions {
        max_size: env_parse("DB_POOL_SIZE", pool_size as u32)?,
        ..PoolOptions::default()
    };
    let topology = common::topology_from_env()?;
    let database_url = env_or("DATABASE_URL", DEFAULT_DATABASE_URL);
    let amqp_url = env_or("AMQP_URL", DEFAULT_AMQP_URL);

    http_config.validate().map_err(|e| e.to_string())?;
    relay_config.validate().map_err(|e| e.to_string())?;

    let db = Database::connect(&database_url, &pool).map_err(|e| e.to_string())?;
    orders::install_table(&db).map_err(|e| e.to_string())?;
    orders::start_key_purge(db.clone()).map_err(|e| e.to_string())?;
    let broker = http::BrokerAccess {
        amqp_url: amqp_url.clone(),
        topology: topology.clone(),
    };
    let relay = relay::start(db.clone(), &amqp_url, topology, relay_config).map_err(|e| e.to_string())?;
    let announce = orders::Announce::Wake(relay.waker());
    let server = http::serve_with(&http_config, db, announce, Some(relay.health()), Some(broker))
        .map_err(|e| e.to_string())?;
    println!("txoutbox-server listening on http://{}", server.addr());
    shutdown.wait();
    // Stop taking requests and answer those in flight, then let the relay finish its batches.
    server.stop();
    relay.stop();
    log::info!("shutdown: done");
    Ok(())
}
