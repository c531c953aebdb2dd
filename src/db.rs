//! Postgres: connection settings, the pool, and (for the CLI) database creation.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use postgres::{Client, Statement};

use crate::config::redact_url;
use crate::tls::PgTls;
use crate::{Error, Result};

/// A pool of blocking Postgres connections, each with its prepared statements.
pub type Pool = r2d2::Pool<Manager>;

/// A connection checked out of a [`Pool`]; derefs to [`postgres::Client`].
pub type PooledClient = r2d2::PooledConnection<Manager>;

/// A Postgres connection that keeps the statements it prepared, so that a hot statement is
/// parsed and planned once per connection instead of once per use.
pub struct Connection {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl Connection {
    /// The prepared form of `sql` on this connection, preparing it on first use.
    pub fn prepared(&mut self, sql: &'static str) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }
}

impl Deref for Connection {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// r2d2 manager of [`Connection`]s (with the URL's TLS settings).
#[derive(Debug)]
pub struct Manager {
    config: postgres::Config,
    tls: PgTls,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Connection;
    type Error = postgres::Error;

    fn connect(&self) -> Result<Connection, postgres::Error> {
        Ok(Connection {
            client: self.tls.connect(&self.config)?,
            statements: HashMap::new(),
        })
    }

    fn is_valid(&self, conn: &mut Connection) -> Result<(), postgres::Error> {
        conn.client.simple_query("").map(|_| ())
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        conn.client.is_closed()
    }
}

/// Logs the pool's failures (a connection it cannot open, a pooled one found broken) once per
/// outage: r2d2's default logs each at error level, several a second while Postgres is down.
/// The flag is true while failing; a newly opened connection clears it.
#[derive(Debug)]
struct PoolErrors(Arc<AtomicBool>);

impl r2d2::HandleError<postgres::Error> for PoolErrors {
    fn handle_error(&self, error: postgres::Error) {
        // The driver's Display of an I/O or connect error leaves out its cause.
        let cause = match (error.as_db_error(), std::error::Error::source(&error)) {
            (None, Some(cause)) => format!(" ({cause})"),
            _ => String::new(),
        };
        let error = Error::db("a pooled database connection failed", error);
        if !self.0.swap(true, Ordering::Relaxed) {
            log::warn!("db: {error}{cause}; the pool keeps retrying (logged again only after it recovered)");
        } else {
            log::debug!("db: still failing: {error}{cause}");
        }
    }
}

/// Clears the [`PoolErrors`] flag when the pool opens a connection again.
#[derive(Debug)]
struct PoolEvents(Arc<AtomicBool>);

impl r2d2::HandleEvent for PoolEvents {
    fn handle_acquire(&self, _: r2d2::event::AcquireEvent) {
        if self.0.swap(false, Ordering::Relaxed) {
            log::info!("db: the pool opens connections again");
        }
    }
}

/// Where the database is and how to reach it: the pool for short transactions, and the parsed
/// config for dedicated connections (LISTEN).
#[derive(Clone)]
pub struct Database {
    config: postgres::Config,
    pool: Pool,
    url: String,
    tls: PgTls,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("url", &redact_url(&self.url))
            .finish()
    }
}

/// Options for [`Database::connect`].
#[derive(Clone, Debug)]
pub struct PoolOptions {
    /// Most connections the pool opens (`DB_POOL_SIZE`; default 24).
    pub max_size: u32,
    /// How long a caller waits for a free connection before an error (default 2 s).
    pub checkout_timeout: Duration,
    /// Server-side limit for any one statement (default 30 s).
    pub statement_timeout: Duration,
    /// Postgres schema holding the library's tables (default `public`); the pool's connections
    /// search it first, then `public`. Letters, digits and `_` only.
    pub schema: String,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_size: 24,
            checkout_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(30),
            schema: crate::migrate::DEFAULT_SCHEMA.to_string(),
        }
    }
}

/// Parses a `postgres://` URL (or key=value string) and adds the timeouts txoutbox relies on:
/// a connect timeout, TCP keepalives, and the given statement timeout. The TLS keys
/// (`sslmode=verify-full` etc., see [`crate::tls`]) need [`parse_url_tls`]'s connector.
pub fn parse_url(url: &str, statement_timeout: Duration) -> Result<postgres::Config> {
    parse_url_tls(url, statement_timeout).map(|(config, _)| config)
}

/// [`parse_url`], with the connector for the URL's TLS settings (pass it to `connect`).
pub fn parse_url_tls(url: &str, statement_timeout: Duration) -> Result<(postgres::Config, PgTls)> {
    let (rest, tls) = PgTls::from_url(url)?;
    let mut config: postgres::Config = rest.parse().map_err(|e: postgres::Error| {
        Error::Config(format!(
            "DATABASE_URL {} is not a valid Postgres URL: {e}",
            redact_url(url)
        ))
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(2));
    }
    config.keepalives(true).keepalives_idle(Duration::from_secs(30));
    let options = format!(
        "{} -c statement_timeout={}",
        config.get_options().unwrap_or_default(),
        statement_timeout.as_millis()
    );
    config.options(options.trim());
    tls.apply(&mut config);
    Ok((config, tls))
}

/// A connection outside any pool to the database of `url`, with its TLS settings.
pub fn connect_url(url: &str, statement_timeout: Duration) -> Result<Client> {
    let (config, tls) = parse_url_tls(url, statement_timeout)?;
    tls.connect(&config).map_err(|e| {
        let advice = tls.explain(&e, &config);
        Error::db(format!("cannot connect to {}{advice}", redact_url(url)), e)
    })
}

impl Database {
    /// Opens the pool and checks that the library's tables are at the version it needs.
    ///
    /// Never creates the database nor changes the schema: when the tables are missing or
    /// behind, the error says what to run (`txoutbox migrate`, or [`migrate::run`](crate::migrate::run)).
    pub fn connect(url: &str, options: &PoolOptions) -> Result<Self> {
        if !is_plain_identifier(&options.schema) {
            return Err(Error::Config(format!(
                "PoolOptions::schema must be letters, digits and _ (not starting with a digit), got {:?}",
                options.schema
            )));
        }
        let (mut config, tls) = parse_url_tls(url, options.statement_timeout)?;
        if options.schema != crate::migrate::DEFAULT_SCHEMA {
            let search = format!(
                "{} -c search_path={},public",
                config.get_options().unwrap_or_default(),
                options.schema
            );
            config.options(search.trim());
        }
        let mut client = tls.connect(&config).map_err(|e| {
            Error::db(
                format!(
                    "cannot connect to {} (is Postgres running, and does the database exist? \
                     `txoutbox migrate --create-database` creates it){}",
                    redact_url(url),
                    tls.explain(&e, &config)
                ),
                e,
            )
        })?;
        let checked = crate::migrate::check(&mut client, &options.schema);
        let _ = client.close();
        checked?;
        let manager = Manager {
            config: config.clone(),
            tls: tls.clone(),
        };
        let health = Arc::new(AtomicBool::new(false));
        let pool = r2d2::Pool::builder()
            .max_size(options.max_size)
            .min_idle(Some(options.max_size.min(4)))
            .connection_timeout(options.checkout_timeout)
            .test_on_check_out(true)
            .error_handler(Box::new(PoolErrors(health.clone())))
            .event_handler(Box::new(PoolEvents(health)))
            .build(manager)
            .map_err(|e| Error::pool(format!("cannot open a connection pool to {}", redact_url(url)), e))?;
        Ok(Database {
            config,
            pool,
            url: url.to_string(),
            tls,
        })
    }

    /// The pool for short transactions.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// A connection from the pool, or an error after the pool's checkout timeout.
    pub fn get(&self) -> Result<PooledClient> {
        self.pool
            .get()
            .map_err(|e| Error::pool("no database connection available", e))
    }

    /// Runs `read` in a transaction of a pooled connection whose statements may take at most
    /// `timeout` (whatever the pool's statement timeout), then rolls it back: for figures read
    /// on a request (status page, metrics scrape) that must not hang when the database is slow.
    pub fn read_bounded<T>(
        &self,
        timeout: Duration,
        context: &'static str,
        read: impl FnOnce(&mut postgres::Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut client = self.get()?;
        let mut tx = client.transaction().map_err(|e| Error::db(context, e))?;
        tx.batch_execute(&format!("SET LOCAL statement_timeout = {}", timeout.as_millis()))
            .map_err(|e| Error::db(context, e))?;
        // Rolled back when dropped: the timeout ends with the transaction.
        read(&mut tx)
    }

    /// A new connection outside the pool (for LISTEN, which must not return to a pool).
    pub fn dedicated(&self) -> Result<Client> {
        self.tls.connect(&self.config).map_err(|e| {
            let advice = self.tls.explain(&e, &self.config);
            Error::db(format!("cannot connect to {}{advice}", redact_url(&self.url)), e)
        })
    }

    /// The parsed connection settings.
    pub fn config(&self) -> &postgres::Config {
        &self.config
    }
}

/// Creates the database named in `config` when it does not exist, by connecting to the
/// `postgres` maintenance database with the same credentials.
pub fn ensure_database(config: &postgres::Config, url: &str) -> Result<()> {
    let name = config.get_dbname().unwrap_or("postgres").to_string();
    let (_, tls) = PgTls::from_url(url)?;
    match tls.connect(config) {
        Ok(client) => {
            let _ = client.close();
            return Ok(());
        }
        Err(e) if e.code() == Some(&postgres::error::SqlState::INVALID_CATALOG_NAME) => {}
        Err(e) => {
            return Err(Error::db(
                format!(
                    "cannot connect to {} (is Postgres running? `make up` starts one){}",
                    redact_url(url),
                    tls.explain(&e, config)
                ),
                e,
            ))
        }
    }
    let mut admin_config = config.clone();
    admin_config.dbname("postgres");
    let how = format!("create it by hand with: createdb {name}  (or psql -c 'CREATE DATABASE \"{name}\"')");
    let mut admin = tls.connect(&admin_config).map_err(|e| {
        Error::db(
            format!("database {name} does not exist and the server refused a maintenance connection; {how}"),
            e,
        )
    })?;
    let statement = format!("CREATE DATABASE {}", quote_identifier(&name));
    match admin.batch_execute(&statement) {
        Ok(()) => {
            log::info!("db: created database {name}");
            Ok(())
        }
        // Someone else created it in the meantime (two processes starting together).
        Err(e)
            if e.code() == Some(&postgres::error::SqlState::DUPLICATE_DATABASE)
                || e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) =>
        {
            Ok(())
        }
        Err(e) => Err(Error::db(
            format!("database {name} does not exist and cannot be created; {how}"),
            e,
        )),
    }
}

/// Quotes a Postgres identifier (doubling embedded quotes), for the few statements that
/// cannot take parameters.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// True for a name that needs no quoting in SQL: `[A-Za-z_][A-Za-z0-9_]*`, at most 63 bytes.
pub fn is_plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}
