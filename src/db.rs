//! Postgres: connection settings, the pool (the library's own or the embedder's), and (for the
//! CLI) database creation.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::{Client, Statement};

use crate::config::redact_url;
use crate::outbox::Outbox;
use crate::schema::Schema;
use crate::tls::PgTls;
use crate::{Error, Result};

/// The library's own pool of blocking Postgres connections, each with its prepared statements.
pub type Pool = r2d2::Pool<Manager>;

/// A Postgres connection that keeps the statements it prepared, so that a hot statement is
/// parsed and planned once per connection instead of once per use.
pub struct Connection {
    client: Client,
    statements: HashMap<String, Statement>,
    /// When the connection was last known to work: opened, validated, or given back whole.
    known_good_at: Instant,
}

/// Most statements one pooled connection keeps prepared; past it, the cache starts over.
const MAX_PREPARED: usize = 256;

impl Connection {
    /// The prepared form of `sql` on this connection, preparing it on first use.
    pub fn prepared(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        let client = &mut self.client;
        kept(&mut self.statements, sql, |sql| client.prepare(sql))
    }
}

/// The statement of `sql` in `statements`, or prepared with `prepare` and kept there (the
/// cache starts over past [`MAX_PREPARED`]).
pub(crate) fn kept(
    statements: &mut HashMap<String, Statement>,
    sql: &str,
    prepare: impl FnOnce(&str) -> Result<Statement, postgres::Error>,
) -> Result<Statement, postgres::Error> {
    if let Some(statement) = statements.get(sql) {
        return Ok(statement.clone());
    }
    let statement = prepare(sql)?;
    if statements.len() >= MAX_PREPARED {
        statements.clear();
    }
    statements.insert(sql.to_string(), statement.clone());
    Ok(statement)
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
    /// [`PoolOptions::validate_after_idle`].
    validate_after_idle: Duration,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Connection;
    type Error = postgres::Error;

    fn connect(&self) -> Result<Connection, postgres::Error> {
        Ok(Connection {
            client: self.tls.connect(&self.config)?,
            statements: HashMap::new(),
            known_good_at: Instant::now(),
        })
    }

    /// Called at every checkout: a round trip only for a connection idle past
    /// `validate_after_idle`, the one a restart or an idle timeout of the server may have
    /// ended. Under load each connection comes back within milliseconds, and a round trip per
    /// checkout was a sixth of a request handler's CPU.
    fn is_valid(&self, conn: &mut Connection) -> Result<(), postgres::Error> {
        if conn.known_good_at.elapsed() < self.validate_after_idle {
            return Ok(());
        }
        conn.client.simple_query("")?;
        conn.known_good_at = Instant::now();
        Ok(())
    }

    /// Called when a connection is given back: a closed one is dropped, a working one counts
    /// as known good from now.
    fn has_broken(&self, conn: &mut Connection) -> bool {
        let broken = conn.client.is_closed();
        if !broken {
            conn.known_good_at = Instant::now();
        }
        broken
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

/// A pool the embedder already has, lending [`postgres::Client`]s: any
/// `r2d2::Pool<M>` whose connections are `postgres::Client`s (`r2d2_postgres` with any TLS
/// connector) is one. See [`Database::from_pool`].
pub trait ClientPool: Send + Sync + 'static {
    /// A connection for one short transaction, returned to the pool when dropped.
    fn checkout(&self) -> Result<Box<dyn DerefMut<Target = Client> + Send>>;
}

impl<M> ClientPool for r2d2::Pool<M>
where
    M: r2d2::ManageConnection<Connection = Client>,
{
    fn checkout(&self) -> Result<Box<dyn DerefMut<Target = Client> + Send>> {
        let client = self
            .get()
            .map_err(|e| Error::pool("no database connection available in the caller's pool", e))?;
        Ok(Box::new(client))
    }
}

/// A connection checked out of the [`Database`]'s pool; derefs to [`postgres::Client`] and
/// goes back to the pool when dropped.
pub struct PooledClient(Checkout);

// The library's own pool is the common case: its connection stays unboxed, so a checkout
// allocates nothing.
#[allow(clippy::large_enum_variant)]
enum Checkout {
    Own(r2d2::PooledConnection<Manager>),
    Lent(Box<dyn DerefMut<Target = Client> + Send>),
}

impl PooledClient {
    /// The prepared form of `sql` on this connection: kept per connection of the library's own
    /// pool, prepared anew on each call with a pool of the caller's.
    pub fn prepared(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        match &mut self.0 {
            Checkout::Own(connection) => connection.prepared(sql),
            Checkout::Lent(client) => client.prepare(sql),
        }
    }
}

impl PooledClient {
    /// Takes this connection's prepared statements out, to lend them to a handler (none with a
    /// pool of the caller's); give them back with [`restore_statements`](Self::restore_statements).
    pub(crate) fn take_statements(&mut self) -> HashMap<String, Statement> {
        match &mut self.0 {
            Checkout::Own(connection) => std::mem::take(&mut connection.statements),
            Checkout::Lent(_) => HashMap::new(),
        }
    }

    /// Puts back the statements [`take_statements`](Self::take_statements) took, with any added.
    pub(crate) fn restore_statements(&mut self, statements: HashMap<String, Statement>) {
        if let Checkout::Own(connection) = &mut self.0 {
            connection.statements = statements;
        }
    }
}

impl Deref for PooledClient {
    type Target = Client;
    fn deref(&self) -> &Client {
        match &self.0 {
            Checkout::Own(connection) => connection,
            Checkout::Lent(client) => client,
        }
    }
}

impl DerefMut for PooledClient {
    fn deref_mut(&mut self) -> &mut Client {
        match &mut self.0 {
            Checkout::Own(connection) => connection,
            Checkout::Lent(client) => client,
        }
    }
}

#[derive(Clone)]
enum Source {
    Own(Pool),
    Lent(Arc<dyn ClientPool>),
}

/// Where the database is and how to reach it: a pool for short transactions (the library's
/// own, or the caller's), the connection settings for dedicated connections (relay workers,
/// LISTEN), and the schema of the library's tables.
#[derive(Clone)]
pub struct Database {
    config: postgres::Config,
    source: Source,
    url: String,
    outbox: Arc<Outbox>,
    tls: PgTls,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("url", &redact_url(&self.url))
            .field("schema", self.schema())
            .finish()
    }
}

/// Options for [`Database::connect`].
#[derive(Clone, Debug)]
pub struct PoolOptions {
    /// Most connections the pool opens (default 24).
    pub max_size: u32,
    /// How long a caller waits for a free connection before an error (default 2 s).
    pub checkout_timeout: Duration,
    /// Server-side limit for any one statement (default 30 s).
    pub statement_timeout: Duration,
    /// A connection back in the pool for longer than this is checked with a round trip
    /// before it is lent again, and replaced if dead (default 1 s); one used more recently is
    /// lent as it is, so a busy pool pays no round trip per checkout. `Duration::ZERO`
    /// checks every checkout.
    pub validate_after_idle: Duration,
    /// Postgres schema holding the library's tables (default `public`). Letters, digits and
    /// `_` only. The pool's connections search it first, then `public`.
    pub schema: String,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_size: 24,
            checkout_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(30),
            validate_after_idle: Duration::from_secs(1),
            schema: crate::migrate::DEFAULT_SCHEMA.to_string(),
        }
    }
}

impl PoolOptions {
    /// Checks the values, naming the field that is wrong.
    pub fn validate(&self) -> Result<Schema> {
        if self.max_size == 0 {
            return Err(Error::Config("PoolOptions::max_size must be at least 1".into()));
        }
        if self.checkout_timeout.is_zero() {
            return Err(Error::Config(
                "PoolOptions::checkout_timeout must be more than zero".into(),
            ));
        }
        Schema::new(&self.schema).map_err(|e| Error::Config(format!("PoolOptions::schema: {e}")))
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
    if config.get_tcp_user_timeout().is_none() {
        // Data the server never acknowledges (a partition) fails the connection within this,
        // instead of the kernel's default of about 15 minutes.
        config.tcp_user_timeout(Duration::from_secs(30));
    }
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
    /// Opens the library's own pool and checks that its tables are at the version it needs.
    ///
    /// Never creates the database nor changes the schema: when the tables are missing or
    /// behind, the error says what to run (`txoutbox migrate`, or [`migrate::run`](crate::migrate::run)).
    pub fn connect(url: &str, options: &PoolOptions) -> Result<Self> {
        let schema = options.validate()?;
        let (mut config, tls) = parse_url_tls(url, options.statement_timeout)?;
        if schema.name() != crate::migrate::DEFAULT_SCHEMA {
            // The library names its schema in every statement; this is for the caller's own
            // statements on pooled connections (and the free `enqueue` functions).
            let search = format!(
                "{} -c search_path={},public",
                config.get_options().unwrap_or_default(),
                schema.name()
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
        let checked = crate::migrate::check(&mut client, schema.name());
        let _ = client.close();
        checked?;
        let manager = Manager {
            config: config.clone(),
            tls: tls.clone(),
            validate_after_idle: options.validate_after_idle,
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
            source: Source::Own(pool),
            url: url.to_string(),
            outbox: Arc::new(Outbox::new(schema)),
            tls,
        })
    }

    /// Uses the caller's pool for short transactions (consumer, metrics, retention, admin),
    /// after checking the library's tables in `schema` are at the version it needs.
    ///
    /// `url` still says how to open the few dedicated connections the relay keeps (one per
    /// worker and one for LISTEN), which must not come from a shared pool: they hold session
    /// settings and a LISTEN for their whole life. Its `sslmode` and `sslrootcert` apply to
    /// them as in [`connect`](Self::connect). A consume-only service never opens them.
    ///
    /// ```no_run
    /// # fn demo() -> txoutbox::Result<()> {
    /// let url = "postgres://app@127.0.0.1/app";
    /// let manager = r2d2_postgres::PostgresConnectionManager::new(url.parse().unwrap(), postgres::NoTls);
    /// let pool = r2d2::Pool::builder().max_size(16).build(manager).unwrap();
    /// let db = txoutbox::Database::from_pool(url, pool.clone(), txoutbox::Schema::default())?;
    /// # Ok(()) }
    /// ```
    pub fn from_pool(url: &str, pool: impl ClientPool, schema: Schema) -> Result<Self> {
        let (config, tls) = parse_url_tls(url, PoolOptions::default().statement_timeout)?;
        let mut client = pool.checkout()?;
        crate::migrate::check(&mut **client, schema.name())?;
        drop(client);
        Ok(Database {
            config,
            source: Source::Lent(Arc::new(pool)),
            url: url.to_string(),
            outbox: Arc::new(Outbox::new(schema)),
            tls,
        })
    }

    /// The schema of the library's tables.
    pub fn schema(&self) -> &Schema {
        self.outbox.schema()
    }

    /// The outbox in this database's schema: enqueue events with it.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// A connection from the pool, or an error after the pool's checkout timeout.
    pub fn get(&self) -> Result<PooledClient> {
        match &self.source {
            Source::Own(pool) => pool
                .get()
                .map(|c| PooledClient(Checkout::Own(c)))
                .map_err(|e| Error::pool("no database connection available", e)),
            Source::Lent(pool) => pool.checkout().map(|c| PooledClient(Checkout::Lent(c))),
        }
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
