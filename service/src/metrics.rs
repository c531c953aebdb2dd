//! The service's metrics: what the HTTP server counts, and a `/metrics` listener of its own
//! (the consumer's `CONSUMER_METRICS_ADDR`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;
use tiny_http::{Header, Method, Response, StatusCode};
use txoutbox::metrics::{encode, seconds_histogram, Registry, CONTENT_TYPE};
use txoutbox::{Error, Result};

use crate::front::Front;
use crate::gate::{GateStats, Limits};

/// Labels of an HTTP request: the route template (never the raw path), method and status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

/// What the HTTP server counts: requests by route, method and status, their latency by route,
/// and orders created.
#[derive(Debug)]
pub(crate) struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    durations: Family<RouteLabel, Histogram, fn() -> Histogram>,
    orders_created: Counter,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            requests: Family::default(),
            durations: Family::new_with_constructor(seconds_histogram),
            orders_created: Counter::default(),
        }
    }
}

impl HttpMetrics {
    /// Counts one answered request. `route` and `method` come from fixed sets.
    pub(crate) fn observe(&self, route: &'static str, method: &'static str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                method,
                status,
            })
            .inc();
        self.durations
            .get_or_create(&RouteLabel { route })
            .observe(took.as_secs_f64());
    }

    /// Counts one order created.
    pub(crate) fn order_created(&self) {
        self.orders_created.inc();
    }

    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "txoutbox_http_requests",
            "HTTP requests answered, by route template, method and status",
            self.requests.clone(),
        );
        registry.register_with_unit(
            "txoutbox_http_request_duration",
            "Time from taking an HTTP request to having written its response, by route template",
            Unit::Seconds,
            self.durations.clone(),
        );
        registry.register(
            "txoutbox_orders_created",
            "Orders created (each with its OrderCreated event in the outbox)",
            self.orders_created.clone(),
        );
    }
}

/// How long a connection to a [`MetricsServer`] may stay silent before it is closed.
pub const SCRAPER_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A `/metrics` (and `/healthz`) listener on an address of its own; stops when dropped.
pub struct MetricsServer {
    front: Arc<Front>,
    thread: Option<JoinHandle<()>>,
}

/// Serves `registry` at `GET /metrics` on `addr` (setting name `setting`, for errors), with
/// `GET /healthz` answering 200 while the process runs. One thread answers the requests; a
/// scraper silent for [`SCRAPER_IDLE_TIMEOUT`] is disconnected so it cannot hold that thread.
pub fn serve(setting: &str, addr: &str, registry: Registry) -> Result<MetricsServer> {
    let limits = Limits {
        max_connections: 32,
        max_header_bytes: 16 * 1024,
        max_headers: crate::config::MAX_HEADERS,
        max_body_bytes: 0,
        request_timeout: SCRAPER_IDLE_TIMEOUT,
        idle_timeout: SCRAPER_IDLE_TIMEOUT,
        handler_timeout: Duration::from_secs(30),
        upstream_connections: 1,
    };
    let front = Arc::new(Front::bind(setting, addr, limits, GateStats::default(), false)?);
    let server = front.clone();
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            while let Some(request) = server.next_request() {
                answer(request, &registry);
            }
        })
        .map_err(|e| Error::Other(format!("cannot start the metrics thread: {e}")))?;
    log::info!("metrics: listening on {}", front.addr());
    Ok(MetricsServer {
        front,
        thread: Some(thread),
    })
}

impl MetricsServer {
    /// The address the listener is bound to (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.front.addr()
    }

    /// Stops listening and joins the thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.front.stop(1);
            let _ = thread.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn answer(request: tiny_http::Request, registry: &Registry) {
    let path = request.url().split('?').next().unwrap_or("");
    let (status, content_type, body, allow) = match (path, request.method()) {
        ("/metrics", Method::Get) => (200, CONTENT_TYPE, encode(registry), None),
        ("/healthz", Method::Get) => (200, "application/json", r#"{"status":"ok"}"#.into(), None),
        ("/metrics" | "/healthz", _) => (
            405,
            "application/json",
            r#"{"error":"method not allowed; use GET"}"#.into(),
            Some("GET"),
        ),
        _ => (
            404,
            "application/json",
            r#"{"error":"no route; try GET /metrics"}"#.into(),
            None,
        ),
    };
    let mut response = Response::from_data(body.into_bytes())
        .with_status_code(StatusCode(status))
        .with_header(ascii_header("Content-Type", content_type));
    if let Some(allow) = allow {
        response.add_header(ascii_header("Allow", allow));
    }
    if let Err(e) = request.respond(response) {
        log::debug!("metrics: cannot send the response: {e}");
    }
}

fn ascii_header(name: &str, value: &str) -> Header {
    // Both are static ASCII here, which tiny_http always accepts.
    Header::from_bytes(name.as_bytes(), value.as_bytes()).unwrap_or_else(|()| unreachable!("ASCII header"))
}
