//! Test helpers: each test owns a fresh database and its own exchange and queue names, and
//! removes them when dropped. Stale databases of crashed runs are swept at start.
//! A test makes a fresh one per call of `new`, which is why neither implements `Default`.
#![allow(clippy::new_without_default)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amiquip::{AmqpProperties, Channel, Connection, Publish};
use postgres::{Client, NoTls};
use txoutbox::{Database, PoolOptions, QueueType, RelayConfig, Topology};

pub mod round_trips;
pub mod tls;
pub use round_trips::RoundTripProxy;
use uuid::Uuid;

/// Admin URL: any database on the test server; tests create their own databases beside it.
pub fn base_database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Broker URL for tests.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// `url` with its database name replaced by `name`.
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

fn unique_suffix() -> String {
    Uuid::new_v4().simple().to_string()[..12].to_string()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

const DB_PREFIX: &str = "txo_test_";

/// The example service's `orders` table (the service applies the same file).
pub const ORDERS_TABLE: &str = include_str!("../../service/schema/orders.sql");

fn admin_client() -> Client {
    let url = url_with_database(&base_database_url(), "postgres");
    Client::connect(&url, NoTls).expect("tests need Postgres: set DATABASE_URL or start it locally")
}

/// Drops test databases left behind by runs that ended more than an hour ago.
fn sweep_stale_databases(admin: &mut Client) {
    let cutoff = unix_now().saturating_sub(3600);
    let names: Vec<String> = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'txo\\_test\\_%'",
            &[],
        )
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default();
    for name in names {
        let created = name[DB_PREFIX.len()..]
            .split('_')
            .next()
            .and_then(|t| t.parse::<u64>().ok());
        if created.is_some_and(|t| t < cutoff) {
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"));
        }
    }
}

/// A database of this test's own, with the schema installed; dropped with the value.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub db: Database,
    /// Owns the database: dropped after the pool above, and drops the database with it.
    _database: EmptyDb,
}

impl TestDb {
    pub fn new() -> TestDb {
        Self::with_pool(PoolOptions {
            max_size: 8,
            ..PoolOptions::default()
        })
    }

    pub fn with_pool(options: PoolOptions) -> TestDb {
        let _ = env_logger::builder().is_test(true).try_init();
        let database = EmptyDb::new();
        let mut client = database.client();
        txoutbox::migrate::run(&mut client, &options.schema).expect("the migrations apply");
        // The example service's own table, for the tests of the service and the harness.
        client
            .batch_execute(ORDERS_TABLE)
            .expect("the orders table is created");
        drop(client);
        let db = Database::connect(&database.url, &options).expect("cannot open the test database");
        TestDb {
            name: database.name.clone(),
            url: database.url.clone(),
            db,
            _database: database,
        }
    }

    /// A plain connection, outside the pool.
    pub fn client(&self) -> Client {
        Client::connect(&self.url, NoTls).expect("cannot connect to the test database")
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.client()
            .query_one(sql, &[])
            .expect("count query failed")
            .get(0)
    }
}

/// Exchange and queues of this test's own; deleted with the value.
pub struct TestBroker {
    pub topology: Topology,
    pub url: String,
    connection: Option<Connection>,
    channel: Option<Channel>,
}

/// A message as read back from a queue.
#[derive(Debug, Clone)]
pub struct Received {
    pub message_id: Option<String>,
    pub event_type: Option<String>,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub body: Vec<u8>,
}

impl TestBroker {
    pub fn new() -> TestBroker {
        TestBroker::with_queue_type(QueueType::Classic)
    }

    /// A fresh topology whose queues are of `queue_type`.
    pub fn with_queue_type(queue_type: QueueType) -> TestBroker {
        let suffix = unique_suffix();
        let topology = Topology::new(
            format!("txo_test.{suffix}.events"),
            format!("txo_test.{suffix}.q"),
        )
        .with_queue_type(queue_type);
        let url = amqp_url();
        let (connection, channel) = txoutbox::broker::connect(&url).expect("tests need RabbitMQ");
        topology
            .declare(&channel)
            .expect("cannot declare the test topology");
        TestBroker {
            topology,
            url,
            connection: Some(connection),
            channel: Some(channel),
        }
    }

    fn channel(&self) -> &Channel {
        self.channel.as_ref().expect("channel open")
    }

    /// Messages ready in `queue` (not counting unacked ones).
    pub fn ready(&self, queue: &str) -> u32 {
        self.channel()
            .queue_declare_passive(queue)
            .expect("queue exists")
            .declared_message_count()
            .unwrap_or(0)
    }

    /// Messages ready in the main queue.
    pub fn ready_main(&self) -> u32 {
        self.ready(&self.topology.queue)
    }

    /// Consumers registered on the main queue (a single-active-consumer queue counts its
    /// standbys too).
    pub fn consumers_of_main(&self) -> u32 {
        self.channel()
            .queue_declare_passive(self.topology.queue.as_str())
            .expect("queue exists")
            .declared_consumer_count()
            .unwrap_or(0)
    }

    /// Takes every message off the dead-letter queue and returns the reason each carries.
    pub fn dead_letter_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        while let Some(got) = self
            .channel()
            .basic_get(self.topology.dead_letter_queue(), true)
            .expect("basic_get")
        {
            let headers = got.delivery.properties.headers().clone().unwrap_or_default();
            match headers.get("x-txoutbox-reason") {
                Some(amiquip::AmqpValue::LongString(reason)) => reasons.push(reason.clone()),
                other => panic!("dead letter without a reason header: {other:?}"),
            }
        }
        reasons
    }

    /// Takes every ready message off `queue` (acking them).
    pub fn drain(&self, queue: &str) -> Vec<Received> {
        let mut out = Vec::new();
        while let Some(got) = self.channel().basic_get(queue, true).expect("basic_get") {
            let p = &got.delivery.properties;
            out.push(Received {
                message_id: p.message_id().clone(),
                event_type: p.type_().clone(),
                content_type: p.content_type().clone(),
                delivery_mode: *p.delivery_mode(),
                body: got.delivery.body.clone(),
            });
        }
        out
    }

    /// Publishes a raw message straight to the main queue (through the default exchange).
    pub fn publish_raw(&self, message_id: Option<&str>, event_type: &str, body: &[u8]) {
        let mut properties = AmqpProperties::default()
            .with_delivery_mode(2)
            .with_type_(event_type.into());
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.into());
        }
        self.channel()
            .basic_publish(
                "",
                Publish::with_properties(body, self.topology.queue.as_str(), properties),
            )
            .expect("publish");
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(channel) = self.channel.take() {
            let _ = self.topology.delete(&channel);
            let _ = channel.close();
        }
        if let Some(connection) = self.connection.take() {
            let _ = connection.close();
        }
    }
}

/// A relay configuration for tests: `workers` workers that poll every 50 ms (tests do not wait
/// for the default poll interval when a notification is missed).
pub fn quick_relay(workers: usize) -> RelayConfig {
    RelayConfig {
        workers,
        poll_interval: Duration::from_millis(50),
        ..RelayConfig::default()
    }
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `rabbitmqctl` with `args`, panicking with its output on failure.
pub fn rabbitmqctl(args: &[&str]) {
    let output = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A RabbitMQ policy set for the life of the value (cleared on drop, even after a panic).
pub struct Policy {
    name: String,
}

impl Policy {
    /// Applies `definition` (JSON) to the one queue named `queue`.
    pub fn on_queue(queue: &str, definition: &str) -> Policy {
        let name = format!("{queue}-policy");
        let pattern = format!("^{}$", queue.replace('.', "\\."));
        rabbitmqctl(&["set_policy", "--apply-to", "queues", &name, &pattern, definition]);
        Policy { name }
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["clear_policy", &self.name])
            .output();
    }
}

/// A response read off the wire.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `head` (request line and headers, without the blank line) and `body` on a fresh
/// connection with `Connection: close`, and reads the whole response.
pub fn http_raw(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> HttpReply {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the test server");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut request = format!("{head}\r\nHost: {addr}\r\nConnection: close\r\n\r\n").into_bytes();
    request.extend_from_slice(body);
    // The server may answer (413) and close before reading everything: ignore write errors.
    let _ = stream.write_all(&request);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let body = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    HttpReply {
        status,
        headers,
        body,
    }
}

/// POST /orders with a JSON content type.
pub fn post_order(addr: std::net::SocketAddr, body: &str) -> HttpReply {
    http_raw(
        addr,
        &format!(
            "POST /orders HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}",
            body.len()
        ),
        body.as_bytes(),
    )
}

/// Sends the headers of a POST whose body never comes (1 of 20,000 bytes) and keeps the
/// connection open: a client stalled mid-body.
pub fn stall_a_body(addr: impl std::net::ToSocketAddrs) -> std::net::TcpStream {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).expect("the server listens");
    stream
        .write_all(
            b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 20000\r\n\r\n{",
        )
        .expect("the headers are sent");
    stream
}

/// Path of a binary of another crate of this workspace (`txoutbox-server`, say), built beside
/// the running test (`cargo build --workspace --bins`, as `make test` does first).
pub fn workspace_binary(name: &str) -> String {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    // target/<profile>/deps/<test binary>: the binaries are in target/<profile>.
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary runs from target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (make test does)",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

/// A database of this test's own with nothing in it (no migrations); dropped with the value.
pub struct EmptyDb {
    /// Its name.
    pub name: String,
    /// Its URL, as the test's superuser.
    pub url: String,
}

impl EmptyDb {
    /// Creates it.
    pub fn new() -> EmptyDb {
        let mut admin = admin_client();
        sweep_stale_databases(&mut admin);
        let name = format!("{DB_PREFIX}{}_{}", unix_now(), unique_suffix());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("cannot create the test database");
        let url = url_with_database(&base_database_url(), &name);
        EmptyDb { name, url }
    }

    /// A plain connection as the test's superuser.
    pub fn client(&self) -> Client {
        Client::connect(&self.url, NoTls).expect("cannot connect to the test database")
    }
}

impl Drop for EmptyDb {
    fn drop(&mut self) {
        let mut admin = admin_client();
        let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name));
    }
}

/// A login role of this test's own (roles are cluster-wide); dropped with the value, after
/// the databases it was granted rights in (drop those first).
pub struct TestRole {
    /// The role's name, also its password.
    pub name: String,
}

impl TestRole {
    /// Creates a role that can log in and nothing else.
    pub fn new() -> TestRole {
        let name = format!("txo_role_{}", unique_suffix());
        admin_client()
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN PASSWORD '{name}' NOSUPERUSER NOCREATEDB NOCREATEROLE"
            ))
            .expect("cannot create the test role");
        TestRole { name }
    }

    /// `url` logged in as this role instead.
    pub fn url_for(&self, url: &str) -> String {
        let scheme_end = url.find("://").map_or(0, |i| i + 3);
        let host_start = url[scheme_end..]
            .find('@')
            .map_or(scheme_end, |i| scheme_end + i + 1);
        format!(
            "{}{}:{}@{}",
            &url[..scheme_end],
            self.name,
            self.name,
            &url[host_start..]
        )
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        let _ = admin_client().batch_execute(&format!("DROP ROLE IF EXISTS {}", self.name));
    }
}
