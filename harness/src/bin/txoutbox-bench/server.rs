//! `txoutbox-server`'s composition (HTTP API and relay on one pool) inside the bench's own
//! process, for the scenario that reads the relay's confirm-latency histogram. It must stay
//! what `src/bin/txoutbox-server.rs` builds with its default settings.

use txoutbox::relay::{self, RelayHandle};
use txoutbox::{RelayConfig, RelayOrdering, Result};
use txoutbox_service::http::{self, HttpHandle};
use txoutbox_service::orders::Announce;
use txoutbox_service::HttpConfig;

use crate::infra::{FreshBroker, FreshDb};

/// The server's pool size with default settings: `HTTP_THREADS + RELAY_WORKERS + 2`.
pub fn server_pool_size() -> u32 {
    (HttpConfig::default().threads + RelayConfig::default().workers + 2) as u32
}

/// The relay settings `txoutbox-server` runs with by default: the library's, but with
/// `RELAY_ORDERING=aggregate` (the server keeps each order's events in order unless told not to).
pub fn server_relay_config() -> RelayConfig {
    RelayConfig {
        ordering: RelayOrdering::Aggregate,
        ..RelayConfig::default()
    }
}

/// A running API and relay. Dropping it stops the API first, then the relay, as the server does.
pub struct Stack {
    // Field order matters: the API stops before the relay.
    http: HttpHandle,
    relay: RelayHandle,
}

impl Stack {
    /// Starts the relay and the API on `fresh` (whose pool should have [`server_pool_size`]
    /// connections), the API on a free port of 127.0.0.1.
    pub fn start(fresh: &FreshDb, broker: &FreshBroker, amqp_url: &str) -> Result<Stack> {
        let relay = relay::start(
            fresh.db.clone(),
            amqp_url,
            broker.topology.clone(),
            server_relay_config(),
        )?;
        let config = HttpConfig {
            addr: "127.0.0.1:0".into(),
            ..HttpConfig::default()
        };
        let http = http::serve(&config, fresh.db.clone(), Announce::Wake(relay.waker()))?;
        Ok(Stack { http, relay })
    }

    /// Base URL of the API.
    pub fn url(&self) -> String {
        format!("http://{}", self.http.addr())
    }

    /// The relay, for its statistics.
    pub fn relay(&self) -> &RelayHandle {
        &self.relay
    }

    /// The announcement the server's API makes after each order, without a relay to receive
    /// it: the transaction is then exactly the server's, with nothing running beside it.
    ///
    /// A relay waker can only be had from a relay, so one is started on `fresh` and `broker`
    /// and stopped at once (before any order exists, so it publishes nothing); waking it
    /// afterwards only bumps a counter nobody waits on.
    pub fn announce_without_relay(fresh: &FreshDb, broker: &FreshBroker, amqp_url: &str) -> Result<Announce> {
        let config = RelayConfig {
            workers: 1,
            ..RelayConfig::default()
        };
        let relay = relay::start(fresh.db.clone(), amqp_url, broker.topology.clone(), config)?;
        let waker = relay.waker();
        relay.stop();
        Ok(Announce::Wake(waker))
    }
}
