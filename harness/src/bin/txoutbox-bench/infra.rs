//! The bench's own world: a fresh Postgres database and fresh RabbitMQ names per scenario,
//! removed when dropped, and free ports for the servers it starts.

use std::cell::Cell;
use std::time::Duration;

use amiquip::{AmqpValue, Channel, Connection};
use postgres::{Client, NoTls};
use txoutbox::db::parse_url;
use txoutbox::{Database, Error, PoolOptions, Result, Topology};

use txoutbox_harness::support::database::{
    drop_database, sweep_stale_databases, unix_now, url_with_database,
};

/// Database (and role) name prefix; `txo_bench_<unix seconds>_<n>_<label>`.
pub const DB_PREFIX: &str = "txo_bench_";
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
    /// `SHOW autovacuum`: with `off`, deleted rows are never reclaimed and tables only grow.
    pub autovacuum: String,
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
        sweep_stale_databases(&mut admin, DB_PREFIX, "bench", infra.run_id)?;
        sweep_stale_roles(&mut admin, infra.run_id);
        let mut show = |setting: &str| -> Result<String> {
            admin
                .query_one(&format!("SHOW {setting}"), &[])
                .map(|row| row.get(0))
                .map_err(|e| Error::db(format!("cannot read the Postgres setting {setting}"), e))
        };
        infra.servers.postgres_version = show("server_version")?;
        infra.servers.synchronous_commit = show("synchronous_commit")?;
        infra.servers.fsync = show("fsync")?;
        infra.servers.autovacuum = show("autovacuum")?;
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

    /// A name suffix no other scenario of this run has: `<unix seconds>_<n>_<label>`.
    pub fn run_suffix(&self, label: &str) -> String {
        self.next_suffix(label)
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
        txoutbox_service::orders::prepare_database(&url)?;
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
        self.fresh_broker_with(label, true)
    }

    /// [`Infra::fresh_broker`], its queue with or without a single active consumer.
    pub fn fresh_broker_with(&self, label: &str, single_active_consumer: bool) -> Result<FreshBroker> {
        let suffix = self.next_suffix(label);
        let topology = Topology::new(
            format!("txo_bench.{suffix}.events"),
            format!("txo_bench.{suffix}.q"),
        )
        .with_single_active_consumer(single_active_consumer);
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

    /// The URL of the database for `role`, whose password is its name.
    pub fn url_as(&self, role: &str) -> String {
        url_with_user(&self.url, role)
    }
}

/// `url` logging in as `role` with password `role`: `postgres://role:role@host/db`, or
/// ` user=role password=role` added to a `key=value` connection string.
fn url_with_user(url: &str, role: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return format!("{url} user={role} password={role}");
    };
    let authority_end = url[scheme_end..]
        .find(['/', '?'])
        .map_or(url.len(), |i| scheme_end + i);
    let host_start = url[scheme_end..authority_end]
        .rfind('@')
        .map_or(scheme_end, |i| scheme_end + i + 1);
    format!("{}{role}:{role}@{}", &url[..scheme_end], &url[host_start..])
}

#[cfg(test)]
mod tests {
    use super::url_with_user;

    #[test]
    fn the_user_of_a_url_is_replaced() {
        assert_eq!(
            url_with_user("postgres://postgres:pw@127.0.0.1:5432/db?x=1", "r"),
            "postgres://r:r@127.0.0.1:5432/db?x=1"
        );
        assert_eq!(url_with_user("postgresql://h/db", "r"), "postgresql://r:r@h/db");
        assert_eq!(
            url_with_user("host=h dbname=d", "r"),
            "host=h dbname=d user=r password=r"
        );
    }
}

impl Drop for FreshDb {
    fn drop(&mut self) {
        match connect(&self.admin_url).and_then(|mut admin| drop_database(&mut admin, &self.name)) {
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

/// Drops the `txo_bench_<unix>_...` roles (statements.rs) an interrupted run left, an hour on.
fn sweep_stale_roles(admin: &mut Client, now: u64) {
    let pattern = format!("{}%", DB_PREFIX.replace('_', "\\_"));
    let Ok(rows) = admin.query(
        "SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1",
        &[&pattern],
    ) else {
        return;
    };
    let cutoff = now.saturating_sub(txoutbox_harness::support::database::STALE_AFTER.as_secs());
    for row in rows {
        let name: String = row.get(0);
        let created: Option<u64> = name
            .strip_prefix(DB_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|t| t.parse().ok());
        if created.is_some_and(|t| t < cutoff) {
            let drop = format!("DROP ROLE IF EXISTS {}", txoutbox::db::quote_identifier(&name));
            match admin.batch_execute(&drop) {
                Ok(()) => log::info!("bench: dropped stale role {name}"),
                Err(e) => log::warn!("bench: cannot drop stale role {name}: {e:?}"),
            }
        }
    }
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
