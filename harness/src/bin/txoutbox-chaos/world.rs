//! Each case's own world: a fresh database (with the txoutbox schema and the harness's audit
//! triggers) and fresh RabbitMQ names, removed when dropped; free ports; leftovers of
//! interrupted runs swept at the start.

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use postgres::Client;
use txoutbox::db::quote_identifier;
use txoutbox::{Error, Result, Topology};

use crate::services::{connect_admin, Services};
use txoutbox_harness::support::database::{
    drop_database, sweep_stale_databases, unix_now, url_with_database,
};

/// Database name prefix: `txo_chaos_<unix seconds>_<case>`.
const DB_PREFIX: &str = "txo_chaos_";

/// Audit of every delivery the consumer applied in a committed transaction, and of every
/// change to an order. Triggers, so the binaries under test run unchanged:
/// - `chaos_deliveries` gets a row for each row the consumer offers to `processed_messages`,
///   including those `ON CONFLICT DO NOTHING` skips (a BEFORE INSERT trigger fires before the
///   conflict check). More rows than distinct message ids = redeliveries that reached the
///   database; they are harmless as long as each order changed once.
/// - `chaos_effects` gets a row for each update that changed an order's status: an order with
///   two rows had a second effect.
const AUDIT: &str = "
    CREATE TABLE chaos_deliveries (
        message_id   uuid NOT NULL,
        aggregate_id text,
        at           timestamptz NOT NULL DEFAULT clock_timestamp()
    );
    CREATE FUNCTION chaos_record_delivery() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO chaos_deliveries (message_id, aggregate_id) VALUES (NEW.message_id, NEW.aggregate_id);
        RETURN NEW;
    END $$;
    CREATE TRIGGER chaos_record_delivery BEFORE INSERT ON processed_messages
        FOR EACH ROW EXECUTE FUNCTION chaos_record_delivery();

    CREATE TABLE chaos_effects (
        order_id   uuid NOT NULL,
        old_status text NOT NULL,
        new_status text NOT NULL,
        at         timestamptz NOT NULL DEFAULT clock_timestamp()
    );
    CREATE FUNCTION chaos_record_effect() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO chaos_effects (order_id, old_status, new_status) VALUES (NEW.id, OLD.status, NEW.status);
        RETURN NEW;
    END $$;
    CREATE TRIGGER chaos_record_effect AFTER UPDATE ON orders
        FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION chaos_record_effect();
";

/// Where the services are and where this run writes.
pub struct World {
    /// Postgres URL naming any database of the server.
    pub base_url: String,
    /// RabbitMQ URL.
    pub amqp_url: String,
    /// Run id: the UTC timestamp, part of every queue name.
    pub run_id: String,
    /// Logs and results of this run.
    pub out_dir: PathBuf,
    /// Unix seconds of the start, part of every database name.
    unix: u64,
}

impl World {
    /// Checks that both services answer and sweeps stale chaos databases.
    pub fn connect(base_url: &str, amqp_url: &str, run_id: &str, out_dir: &Path) -> Result<World> {
        let world = World {
            base_url: base_url.to_string(),
            amqp_url: amqp_url.to_string(),
            run_id: run_id.to_string(),
            out_dir: out_dir.to_path_buf(),
            unix: unix_now(),
        };
        let mut admin = world.admin()?;
        sweep_stale_databases(&mut admin, DB_PREFIX, "chaos", world.unix)?;
        let _ = admin.close();
        let (connection, channel) = txoutbox::broker::connect(amqp_url)?;
        let _ = channel.close();
        let _ = connection.close();
        Ok(world)
    }

    /// A connection to the `postgres` maintenance database.
    pub fn admin(&self) -> Result<Client> {
        connect_admin(&url_with_database(&self.base_url, "postgres"))
    }

    /// A new database for `case` with the txoutbox schema and the audit triggers.
    pub fn fresh_db<'s>(&self, case: &str, services: &'s Services) -> Result<ChaosDb<'s>> {
        let name = format!("{DB_PREFIX}{}_{}", self.unix, case.replace('-', "_"));
        let url = url_with_database(&self.base_url, &name);
        services.register_database(&name);
        let db = ChaosDb {
            name,
            url,
            admin_url: url_with_database(&self.base_url, "postgres"),
            services,
        };
        // Creates the database, the library's tables and the service's orders table.
        txoutbox_service::orders::prepare_database(&db.url)?;
        db.client()?
            .batch_execute(AUDIT)
            .map_err(|e| Error::db("cannot install the audit triggers", e))?;
        Ok(db)
    }

    /// A new exchange and queue (with its dead-letter pair) for `case`, declared now.
    pub fn fresh_broker<'s>(&self, case: &str, services: &'s Services) -> Result<ChaosBroker<'s>> {
        let topology = Topology::new(
            format!("txo_chaos.{}.{case}.events", self.run_id),
            format!("txo_chaos.{}.{case}.q", self.run_id),
        );
        services.register_topology(&topology);
        let broker = ChaosBroker {
            topology,
            amqp_url: self.amqp_url.clone(),
            services,
        };
        let (connection, channel) = txoutbox::broker::connect(&self.amqp_url)?;
        let declared = broker.topology.declare(&channel);
        let _ = channel.close();
        let _ = connection.close();
        declared.map(|()| broker)
    }
}

/// A case's database; dropped (connections and all) with this value.
pub struct ChaosDb<'s> {
    /// Database name.
    pub name: String,
    /// Its URL, for the processes of the case.
    pub url: String,
    admin_url: String,
    services: &'s Services,
}

/// Sessions of an application in a database.
const SESSIONS: &str = "\
    SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2";
/// Ends them (the count of those signalled).
const TERMINATE: &str = "\
    SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
    WHERE datname = $1 AND application_name = $2";
/// How long the sessions of a cut application may take to go.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(10);

impl ChaosDb<'_> {
    /// A new plain connection (the harness reconnects after a restart by asking again).
    pub fn client(&self) -> Result<Client> {
        connect_admin(&self.url)
    }

    /// Cuts the database from under `application_name` while Postgres keeps running: new
    /// connections to it are refused (`ALTER DATABASE ... ALLOW_CONNECTIONS false`, for every
    /// application: the ones already open stay) and the application's sessions are
    /// terminated, again until none is left. The guard allows connections again when ended or
    /// dropped.
    pub fn cut(&self, application_name: &str) -> Result<Cut<'_>> {
        let mut admin = connect_admin(&self.admin_url)?;
        let mut cut = Cut {
            db: self,
            application_name: application_name.to_string(),
            allowed: false,
            terminated: 0,
        };
        admin
            .batch_execute(&allow_connections(&self.name, false))
            .map_err(|e| Error::db(format!("cannot refuse connections to {}", self.name), e))?;
        let deadline = Instant::now() + TERMINATE_TIMEOUT;
        // A session that was authenticating during the ALTER shows up after the first pass.
        while cut.sessions(&mut admin)? > 0 {
            if Instant::now() >= deadline {
                return Err(Error::Other(format!(
                    "the {application_name} sessions in {} are still there {} s after                      pg_terminate_backend",
                    self.name,
                    TERMINATE_TIMEOUT.as_secs()
                )));
            }
            let row = admin
                .query_one(TERMINATE, &[&self.name, &cut.application_name])
                .map_err(|e| Error::db("cannot terminate the sessions", e))?;
            cut.terminated += usize::try_from(row.get::<_, i64>(0)).unwrap_or(0);
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(cut)
    }

    /// Sessions of `application_name` in the database now, asked through `admin` (a
    /// connection to another database: this one may be refusing them).
    pub fn sessions(&self, admin: &mut Client, application_name: &str) -> Result<usize> {
        let row = admin
            .query_one(SESSIONS, &[&self.name, &application_name])
            .map_err(|e| Error::db("cannot read pg_stat_activity", e))?;
        Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    /// A connection to the maintenance database, for [`sessions`](Self::sessions).
    pub fn admin(&self) -> Result<Client> {
        connect_admin(&self.admin_url)
    }
}

fn allow_connections(database: &str, allow: bool) -> String {
    format!(
        "ALTER DATABASE {} ALLOW_CONNECTIONS {allow}",
        quote_identifier(database)
    )
}

/// A database refusing new connections ([`ChaosDb::cut`]); allowed again by
/// [`end`](Self::end) or when dropped.
pub struct Cut<'a> {
    db: &'a ChaosDb<'a>,
    application_name: String,
    allowed: bool,
    /// Sessions of the application terminated.
    pub terminated: usize,
}

impl Cut<'_> {
    /// Sessions of the cut application in the database now (0 while the cut holds).
    pub fn sessions(&self, admin: &mut Client) -> Result<usize> {
        self.db.sessions(admin, &self.application_name)
    }

    /// Allows connections to the database again.
    pub fn end(mut self) -> Result<()> {
        self.allowed = true;
        self.allow()
    }

    fn allow(&self) -> Result<()> {
        connect_admin(&self.db.admin_url)?
            .batch_execute(&allow_connections(&self.db.name, true))
            .map_err(|e| Error::db(format!("cannot allow connections to {} again", self.db.name), e))
    }
}

impl Drop for Cut<'_> {
    fn drop(&mut self) {
        if !self.allowed {
            if let Err(e) = self.allow() {
                eprintln!("txoutbox-chaos: {e}; the database is dropped at the end of the case anyway");
            }
        }
    }
}

impl Drop for ChaosDb<'_> {
    fn drop(&mut self) {
        let dropped =
            connect_admin(&self.admin_url).and_then(|mut admin| drop_database(&mut admin, &self.name));
        match dropped {
            Ok(()) => self.services.unregister_database(&self.name),
            Err(e) => eprintln!("txoutbox-chaos: {e}; drop it by hand"),
        }
    }
}

/// A case's exchange and queues; deleted when dropped.
pub struct ChaosBroker<'s> {
    /// The names, for the processes of the case.
    pub topology: Topology,
    amqp_url: String,
    services: &'s Services,
}

/// Messages and consumers of a case's queues.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueState {
    /// Ready messages in the main queue.
    pub ready: u32,
    /// Consumers of the main queue.
    pub consumers: u32,
    /// Messages in the dead-letter queue.
    pub dead_lettered: u32,
}

impl ChaosBroker<'_> {
    /// The queues' state, through a short-lived connection (passive declares).
    pub fn state(&self) -> Result<QueueState> {
        let (connection, channel) = txoutbox::broker::connect(&self.amqp_url)?;
        let inspect = |queue: &str| {
            channel
                .queue_declare_passive(queue)
                .map_err(|e| Error::broker(format!("cannot inspect queue {queue}"), e))
        };
        let state = inspect(&self.topology.queue).and_then(|queue| {
            let dlq = inspect(&self.topology.dead_letter_queue())?;
            Ok(QueueState {
                ready: queue.declared_message_count().unwrap_or(0),
                consumers: queue.declared_consumer_count().unwrap_or(0),
                dead_lettered: dlq.declared_message_count().unwrap_or(0),
            })
        });
        let _ = channel.close();
        let _ = connection.close();
        state
    }
}

impl Drop for ChaosBroker<'_> {
    fn drop(&mut self) {
        let deleted = txoutbox::broker::connect(&self.amqp_url).and_then(|(connection, channel)| {
            let deleted = self.topology.delete(&channel);
            let _ = channel.close();
            let _ = connection.close();
            deleted
        });
        match deleted {
            Ok(()) => self.services.unregister_topology(&self.topology),
            Err(e) => eprintln!(
                "txoutbox-chaos: {e}; delete exchange {} and queue {} by hand",
                self.topology.exchange, self.topology.queue
            ),
        }
    }
}
