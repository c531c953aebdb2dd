//! The bench's own world: a fresh Postgres database and fresh RabbitMQ names per scenario,
//! removed when dropped, and free ports for the servers it starts.

use std::cell::Cell;
use std::net::TcpListener;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amiquip::{AmqpValue, Channel, Connection};
use postgres::{Client, NoTls};
use txoutbox::db::{parse_url, quote_identifier};
use txoutbox::{Database, Error, PoolOptions, Result, Topology};

/// Database name prefix; `txo_bench_<unix seconds>_<n>_<label>`.
const DB_PREFIX: &str = "txo_bench_";
/// Bench databases older than this are left-overs of an interrupted run and are dropped.
const STALE_AFTER: Duration = Duration::from_secs(3600);
/// Statement timeout of the bench's own connections (the fill of a backlog is one statement).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Versions and the settings that bound the results.
#[derive(Clone, Debug, Default)]
pub struct Servers {
    /// `SHOW server_version`.
    pub postgres_version: String,
    /// `SHOW synchronous_commit`: `on` means one WAL flush per commit (or per group).
    pub synchronous_commit: String,
    /// `SHOW fsync`.
    pub fsync: String,
    /// The broker's `version` server property.
    pub rabbitmq_version: String,
}

/// Where Postgres and RabbitMQ are, and a counter that makes every scenario's names unique.
pub struct Infra {
    /// Postgres URL naming any database; scenarios create theirs beside it.
    pub base_url: String,
    /// RabbitMQ URL.
    pub amqp_url: String,
    /// What the servers are, for the record.
    pub servers: Servers,
    /// Unix seconds when this run started; part of every name.
    run_id: u64,
    next: Cell<usize>,
}

impl Infra {
    /// Checks that both servers answer and drops databases that interrupted runs left behind.
    pub fn connect(base_url: &str, amqp_url: &str) -> Result<Infra> {
        let mut infra = Infra {
            base_url: base_url.to_string(),
            amqp_url: amqp_url.to_string(),
            servers: Servers::default(),
            run_id: unix_now(),
            next: Cell::new(0),
        };
        let mut admin = infra.admin()?;
        sweep_stale_databases(&mut admin, infra.run_id)?;
        let mut show = |setting: &str| -> Result<String> {
            admin
                .query_one(&format!("SHOW {setting}"), &[])
                .map(|row| row.get(0))
                .map_err(|e| Error::db(format!("cannot read the Postgres setting {setting}"), e))
        };
        infra.servers.postgres_version = show("server_version")?;
        infra.servers.synchronous_commit = show("synchronous_commit")?;
        infra.servers.fsync = show("fsync")?;
        let _ = admin.close();
        let (connection, channel) = txoutbox::broker::connect(amqp_url)?;
        if let Some(AmqpValue::LongString(version)) = connection.server_properties().get("version") {
            infra.servers.rabbitmq_version = version.clone();
        }
        let _ = channel.close();
        let _ = connection.close();
        Ok(infra)
    }

    /// A connection to the `postgres` maintenance database.
    pub fn admin(&self) -> Result<Client> {
        let url = url_with_database(&self.base_url, "postgres");
        connect(&url)
    }

    fn next_suffix(&self, label: &str) -> String {
        let n = self.next.get() + 1;
        self.next.set(n);
        format!("{}_{n}_{label}", self.run_id)
    }

    /// A new database with the txoutbox schema and a pool of `pool_size` connections.
    pub fn fresh_db(&self, label: &str, pool_size: u32) -> Result<FreshDb> {
        let name = format!("{DB_PREFIX}{}", self.next_suffix(label));
        let url = url_with_database(&self.base_url, &name);
        let options = PoolOptions {
            max_size: pool_size,
            statement_timeout: STATEMENT_TIMEOUT,
            ..PoolOptions::default()
        };
        let db = Database::connect(&url, &options)?;
        Ok(FreshDb {
            admin_url: url_with_database(&self.base_url, "postgres"),
            name,
            url,
            db,
        })
    }

    /// A new exchange and queue (with its dead-letter pair), declared now.
    pub fn fresh_broker(&self, label: &str) -> Result<FreshBroker> {
        let suffix = self.next_suffix(label);
        let topology = Topology::new(
            format!("txo_bench.{suffix}.events"),
            format!("txo_bench.{suffix}.q"),
        );
        let (connection, channel) = txoutbox::broker::connect(&self.amqp_url)?;
        topology.declare(&channel)?;
        Ok(FreshBroker {
            topology,
            channel: Some(channel),
            connection: Some(connection),
        })
    }
}

/// A database of one scenario; dropped (with its connections) when this value is.
pub struct FreshDb {
    /// Database name.
    pub name: String,
    /// URL of the database, for the processes the scenario starts.
    pub url: String,
    /// Pool on the database, schema installed.
    pub db: Database,
    admin_url: String,
}

impl FreshDb {
    /// A plain connection outside the pool, for counting and checking.
    pub fn client(&self) -> Result<Client> {
        connect(&self.url)
    }
}

impl Drop for FreshDb {
    fn drop(&mut self) {
        let drop = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_identifier(&self.name)
        );
        match connect(&self.admin_url).and_then(|mut admin| {
            admin
                .batch_execute(&drop)
                .map_err(|e| Error::db(format!("cannot drop database {}", self.name), e))
        }) {
            Ok(()) => {}
            Err(e) => log::warn!("bench: {e}; drop it by hand"),
        }
    }
}

/// An exchange and queues of one scenario; deleted when this value is dropped.
pub struct FreshBroker {
    /// The names, for in-process relays and consumers.
    pub topology: Topology,
    // Field order matters: the channel closes before its connection.
    channel: Option<Channel>,
    connection: Option<Connection>,
}

/// Messages waiting in a scenario's queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Ready messages in the main queue.
    pub ready: u64,
    /// Consumers attached to the main queue.
    pub consumers: u64,
    /// Messages in the dead-letter queue.
    pub dead_lettered: u64,
}

impl FreshBroker {
    fn channel(&self) -> Result<&Channel> {
        self.channel
            .as_ref()
            .ok_or_else(|| Error::Other("the bench's broker channel is closed".into()))
    }

    /// Counts the queues' messages and consumers (a passive declare of each).
    pub fn depth(&self) -> Result<QueueDepth> {
        let channel = self.channel()?;
        let context = |queue: &str| format!("cannot inspect queue {queue}");
        let queue = channel
            .queue_declare_passive(self.topology.queue.as_str())
            .map_err(|e| Error::broker(context(&self.topology.queue), e))?;
        let dlq_name = self.topology.dead_letter_queue();
        let dlq = channel
            .queue_declare_passive(dlq_name.as_str())
            .map_err(|e| Error::broker(context(&dlq_name), e))?;
        Ok(QueueDepth {
            ready: u64::from(queue.declared_message_count().unwrap_or(0)),
            consumers: u64::from(queue.declared_consumer_count().unwrap_or(0)),
            dead_lettered: u64::from(dlq.declared_message_count().unwrap_or(0)),
        })
    }
}

impl Drop for FreshBroker {
    fn drop(&mut self) {
        if let Some(channel) = self.channel.take() {
            if let Err(e) = self.topology.delete(&channel) {
                log::warn!(
                    "bench: {e}; delete exchange {} and queue {} by hand",
                    self.topology.exchange,
                    self.topology.queue
                );
            }
            let _ = channel.close();
        }
        if let Some(connection) = self.connection.take() {
            let _ = connection.close();
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound, read, released: good until someone else takes it).
pub fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| Error::Other(format!("cannot find a free port on 127.0.0.1: {e}")))
}

/// A plain connection with txoutbox's timeouts.
pub fn connect(url: &str) -> Result<Client> {
    parse_url(url, STATEMENT_TIMEOUT)?.connect(NoTls).map_err(|e| {
        Error::db(
            format!(
                "cannot connect to {} (is Postgres running?)",
                txoutbox::config::redact_url(url)
            ),
            e,
        )
    })
}

/// `url` with its database name replaced by `name` (query parameters kept).
pub fn url_with_database(url: &str, name: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((head, query)) => (head, format!("?{query}")),
        None => (url, String::new()),
    };
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let host_end = head[scheme_end..]
        .find('/')
        .map_or(head.len(), |i| scheme_end + i);
    format!("{}/{name}{query}", &head[..host_end])
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Drops `txo_bench_<unix>_...` databases created more than [`STALE_AFTER`] before `now`.
fn sweep_stale_databases(admin: &mut Client, now: u64) -> Result<()> {
    let rows = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'txo\\_bench\\_%'",
            &[],
        )
        .map_err(|e| Error::db("cannot list old bench databases", e))?;
    let cutoff = now.saturating_sub(STALE_AFTER.as_secs());
    for row in rows {
        let name: String = row.get(0);
        let created = name[DB_PREFIX.len()..]
            .split('_')
            .next()
            .and_then(|t| t.parse::<u64>().ok());
        if created.is_some_and(|t| t < cutoff) {
            let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_identifier(&name));
            match admin.batch_execute(&drop) {
                Ok(()) => log::info!("bench: dropped stale database {name}"),
                Err(e) => log::warn!("bench: cannot drop stale database {name}: {e:?}"),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::url_with_database;

    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            url_with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(url_with_database("postgres://h", "x"), "postgres://h/x");
        assert_eq!(
            url_with_database("postgres://h/db?sslmode=disable", "x"),
            "postgres://h/x?sslmode=disable"
        );
    }
}
