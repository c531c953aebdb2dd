//! Settings of the example service: the HTTP API's, the token, and the services' default URLs.

use std::time::Duration;

use txoutbox::{Error, Result};

/// Default `DATABASE_URL`: the project's docker-compose.yml and a local Postgres both answer it.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres:postgres@127.0.0.1:5432/txoutbox";
/// Default `AMQP_URL`.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Settings of the HTTP API.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Address to listen on (`HTTP_ADDR`, default `127.0.0.1:8080`).
    pub addr: String,
    /// Request handler threads (`HTTP_THREADS`, default 16).
    pub threads: usize,
    /// Largest accepted request body in bytes (default 64 KiB); larger gets 413.
    pub max_body_bytes: usize,
    /// When set, `POST` requests need `Authorization: Bearer <token>` (`API_TOKEN`, default
    /// unset: no authentication).
    pub api_token: Option<Secret>,
    /// How long a connection may stay silent, mid-request or between keep-alive requests,
    /// before it is closed (default 10 s). A request whose body stalls that long gets 408, so a
    /// slow or stalled client cannot hold a handler thread.
    pub idle_timeout: Duration,
    /// How long a shutdown waits for requests in hand before leaving them (default 8 s).
    pub shutdown_grace: Duration,
    /// Open client connections at most (`HTTP_MAX_CONNECTIONS`, default 256); past it a new
    /// connection gets 503 and is closed at once.
    pub max_connections: usize,
    /// Time from a request's first byte to its last (`HTTP_REQUEST_TIMEOUT`, default 10 s);
    /// a request still arriving then gets 408 and the connection is closed.
    pub request_timeout: Duration,
    /// Largest request head, request line and header fields (`HTTP_MAX_HEADER_BYTES`, default
    /// 32 KiB); larger gets 431.
    pub max_header_bytes: usize,
}

/// Most header fields in one request; more get 431.
pub const MAX_HEADERS: usize = 100;

/// How long a handler has to answer before the client gets 503.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: "127.0.0.1:8080".into(),
            threads: 16,
            max_body_bytes: 64 * 1024,
            api_token: None,
            idle_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(8),
            max_connections: 256,
            request_timeout: Duration::from_secs(10),
            max_header_bytes: 32 * 1024,
        }
    }
}

impl HttpConfig {
    /// Checks that the values can work together.
    pub fn validate(&self) -> Result<()> {
        if self.threads == 0 || self.threads > 1024 {
            return Err(Error::Config(format!(
                "HTTP_THREADS must be 1..=1024, got {}",
                self.threads
            )));
        }
        if self.idle_timeout.is_zero() {
            return Err(Error::Config("the HTTP idle timeout must be more than 0".into()));
        }
        if !(1..=100_000).contains(&self.max_connections) {
            return Err(Error::Config(format!(
                "HTTP_MAX_CONNECTIONS must be 1..=100000, got {}",
                self.max_connections
            )));
        }
        if self.request_timeout.is_zero() {
            return Err(Error::Config("HTTP_REQUEST_TIMEOUT must be more than 0".into()));
        }
        if !(1024..=1024 * 1024).contains(&self.max_header_bytes) {
            return Err(Error::Config(format!(
                "HTTP_MAX_HEADER_BYTES must be 1024..=1048576, got {}",
                self.max_header_bytes
            )));
        }
        Ok(())
    }

    /// What the gate allows clients: these settings, and as many connections to the handlers
    /// as two per handler thread.
    pub(crate) fn gate_limits(&self) -> crate::gate::Limits {
        crate::gate::Limits {
            max_connections: self.max_connections,
            max_header_bytes: self.max_header_bytes,
            max_headers: MAX_HEADERS,
            max_body_bytes: self.max_body_bytes,
            request_timeout: self.request_timeout,
            idle_timeout: self.idle_timeout,
            handler_timeout: HANDLER_TIMEOUT,
            upstream_connections: self.threads * 2,
        }
    }
}

/// A secret value (a token): printed as `***` by `Debug`, so it cannot slip into a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}
