//! The HTTP API on tiny_http: a fixed pool of handler threads, routing, JSON in and out, and
//! the mapping from errors to status codes.

use std::io::{ErrorKind, Read};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, StatusCode};
use uuid::Uuid;

use crate::config::{HttpConfig, Secret, MAX_HEADERS};
use crate::front::Front;
use crate::gate::GateStats;
use crate::metrics::HttpMetrics;
use crate::orders::{self, Announce, Cancellation, Creation};
pub use crate::status::BrokerAccess;
use crate::status::{self, Sampler, StatusPage};
use txoutbox::db::Database;
use txoutbox::metrics::{self, Registry};
use txoutbox::outbox::Outbox;
use txoutbox::relay::RelayHealth;
use txoutbox::trace::{self, TraceContext};
use txoutbox::{Error, Result};

/// The OpenAPI document of this API, served at `GET /openapi.yaml`.
pub const OPENAPI: &str = include_str!("../openapi.yaml");

/// A running HTTP server. Dropping it stops the server like [`stop`](Self::stop).
pub struct HttpHandle {
    front: Arc<Front>,
    threads: Vec<JoinHandle<()>>,
    shutdown_grace: Duration,
    /// Stopped after the handler threads, when the handle is dropped.
    _sampler: Option<Sampler>,
}

impl HttpHandle {
    /// The address the server listens on (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.front.addr()
    }

    /// Stops taking requests and lets handlers finish the ones in hand, waiting at most the
    /// configured shutdown grace; handlers still busy then are left to the process's exit.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.front.stop(self.threads.len());
        let deadline = Instant::now() + self.shutdown_grace;
        while self.threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (finished, busy): (Vec<_>, Vec<_>) = self.threads.drain(..).partition(|t| t.is_finished());
        for thread in finished {
            if thread.join().is_err() {
                log::error!("http: a handler thread panicked");
            }
        }
        if !busy.is_empty() {
            log::warn!(
                "http: {} request(s) still in hand after {:?}; leaving them",
                busy.len(),
                self.shutdown_grace
            );
        }
    }
}

impl Drop for HttpHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Binds `config.addr` and serves the orders API on `config.threads` handler threads.
/// `announce` says how a new order's event reaches the relay.
pub fn serve(config: &HttpConfig, db: Database, announce: Announce) -> Result<HttpHandle> {
    serve_with_relay(config, db, announce, None)
}

/// Like [`serve`], with a relay running in this process whose health `GET /readyz` reports and
/// whose metrics `GET /metrics` includes.
pub fn serve_with_relay(
    config: &HttpConfig,
    db: Database,
    announce: Announce,
    relay: Option<RelayHealth>,
) -> Result<HttpHandle> {
    serve_with(config, db, announce, relay, None)
}

/// Like [`serve_with_relay`], with access to RabbitMQ for the dead-letter queue: its depth on
/// the status page and `POST /dead-letters/replay` (without it, replay answers 503).
pub fn serve_with(
    config: &HttpConfig,
    db: Database,
    announce: Announce,
    relay: Option<RelayHealth>,
    broker: Option<BrokerAccess>,
) -> Result<HttpHandle> {
    config.validate()?;
    let gate_stats = GateStats::default();
    let front = Arc::new(Front::bind(
        "HTTP_ADDR",
        &config.addr,
        config.gate_limits(),
        gate_stats.clone(),
        true,
    )?);
    let (status, sampler) = StatusPage::start(db.clone(), relay.clone(), broker, config.api_token.is_some())?;
    let metrics = HttpMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    gate_stats.register(&mut registry);
    metrics::register_outbox_gauges(&mut registry, db.clone());
    if let Some(relay) = &relay {
        relay.stats().register(&mut registry);
    }
    let api = Arc::new(Api {
        outbox: announce.outbox(db.outbox()),
        db,
        relay,
        status,
        metrics,
        registry,
        announce,
        api_token: config.api_token.clone(),
        max_body_bytes: config.max_body_bytes,
    });
    let mut threads = Vec::with_capacity(config.threads);
    for index in 0..config.threads {
        let front = front.clone();
        let api = api.clone();
        let thread = std::thread::Builder::new()
            .name(format!("http-{index}"))
            .spawn(move || {
                while let Some(request) = front.next_request() {
                    api.respond(request);
                }
            })
            .map_err(|e| Error::Other(format!("cannot start an HTTP thread: {e}")))?;
        threads.push(thread);
    }
    log::info!("http: listening on {} threads={}", front.addr(), config.threads);
    Ok(HttpHandle {
        front,
        threads,
        shutdown_grace: config.shutdown_grace,
        _sampler: sampler,
    })
}

/// A response before it is encoded.
struct Reply {
    status: u16,
    body: Body,
    /// Extra header, e.g. `Allow` on a 405 or `WWW-Authenticate` on a 401.
    header: Option<(&'static str, &'static str)>,
}

/// A response body: JSON for the API; text for `/metrics`, the status page and the document.
enum Body {
    Json(Value),
    Text {
        content_type: &'static str,
        text: String,
    },
}

impl Reply {
    fn json(status: u16, body: Value) -> Self {
        Reply {
            status,
            body: Body::Json(body),
            header: None,
        }
    }

    /// 200 with a text body of `content_type`, such as the status page or the metrics.
    fn text(content_type: &'static str, text: impl Into<String>) -> Self {
        Reply {
            status: 200,
            body: Body::Text {
                content_type,
                text: text.into(),
            },
            header: None,
        }
    }

    fn error(status: u16, message: impl Into<String>) -> Self {
        Reply::json(status, json!({ "error": message.into() }))
    }

    fn method_not_allowed(allow: &'static str) -> Self {
        Reply {
            header: Some(("Allow", allow)),
            ..Reply::error(405, format!("method not allowed; use {allow}"))
        }
    }
}

struct Api {
    db: Database,
    relay: Option<RelayHealth>,
    status: StatusPage,
    metrics: HttpMetrics,
    /// What `GET /metrics` renders: `metrics`, the outbox gauges and the relay's metrics.
    registry: Registry,
    api_token: Option<Secret>,
    announce: Announce,
    /// The database's outbox, notifying or not as `announce` needs.
    outbox: Outbox,
    max_body_bytes: usize,
}

impl Api {
    fn respond(&self, mut request: Request) {
        let started = Instant::now();
        let route = route_template(request.url());
        let method = method_label(request.method());
        let reply = self.route(&mut request);
        let (content_type, body) = match reply.body {
            Body::Json(value) => ("application/json", serde_json::to_vec(&value).unwrap_or_default()),
            Body::Text { content_type, text } => (content_type, text.into_bytes()),
        };
        let mut response = Response::from_data(body)
            .with_status_code(StatusCode(reply.status))
            .with_header(header("Content-Type", content_type));
        if let Some((name, value)) = reply.header {
            response.add_header(header(name, value));
        }
        if let Err(e) = request.respond(response) {
            log::debug!("http: cannot send the response: {e}");
        }
        self.metrics
            .observe(route, method, reply.status, started.elapsed());
    }

    fn route(&self, request: &mut Request) -> Reply {
        if request.headers().len() > MAX_HEADERS {
            return Reply::error(431, format!("more than {MAX_HEADERS} header fields"));
        }
        let path = request.url().split('?').next().unwrap_or("").to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (segments.as_slice(), request.method()) {
            ([""], Method::Get) => Reply::text("text/html; charset=utf-8", status::PAGE),
            ([""], _) => Reply::method_not_allowed("GET"),
            (["status.json"], Method::Get) => Reply::json(200, self.status.snapshot()),
            (["status.json"], _) => Reply::method_not_allowed("GET"),
            (["openapi.yaml"], Method::Get) => Reply::text("application/yaml", OPENAPI),
            (["openapi.yaml"], _) => Reply::method_not_allowed("GET"),
            (["healthz"], Method::Get) => Reply::json(200, json!({ "status": "ok" })),
            (["healthz"], _) => Reply::method_not_allowed("GET"),
            (["readyz"], Method::Get) => self.readiness(),
            (["readyz"], _) => Reply::method_not_allowed("GET"),
            (["metrics"], Method::Get) => Reply::text(metrics::CONTENT_TYPE, metrics::encode(&self.registry)),
            (["metrics"], _) => Reply::method_not_allowed("GET"),
            (["orders"], Method::Post) => self.create_order(request),
            (["orders"], _) => Reply::method_not_allowed("POST"),
            (["orders", id], Method::Get) => self.get_order(id),
            (["orders", _], _) => Reply::method_not_allowed("GET"),
            (["orders", id, "cancel"], Method::Post) => self.cancel_order(request, id),
            (["orders", _, "cancel"], _) => Reply::method_not_allowed("POST"),
            (["failed-events", "retry"], Method::Post) => {
                self.operator(request, |api| api.retry_failed(None))
            }
            (["failed-events", "retry"], _) => Reply::method_not_allowed("POST"),
            (["failed-events", id, "retry"], Method::Post) => match id.parse::<i64>() {
                Ok(id) if id > 0 => self.operator(request, |api| api.retry_failed(Some(id))),
                _ => Reply::error(400, format!("{id:?} is not an outbox id (a positive integer)")),
            },
            (["failed-events", _, "retry"], _) => Reply::method_not_allowed("POST"),
            (["dead-letters", "replay"], Method::Post) => self.operator(request, Api::replay_dead_letters),
            (["dead-letters", "replay"], _) => Reply::method_not_allowed("POST"),
            _ => Reply::error(404, format!("no route for {path}")),
        }
    }

    /// 200 when the database answers and the relay (if any) is connected; 503 with reasons.
    fn readiness(&self) -> Reply {
        let mut problems = Vec::new();
        let database = self.db.get().and_then(|mut conn| {
            conn.simple_query("SELECT 1")
                .map_err(|e| Error::db("database check failed", e))
        });
        if let Err(e) = database {
            problems.push(format!("database: {e}"));
        }
        if let Some(Err(e)) = self.relay.as_ref().map(RelayHealth::check) {
            problems.push(e);
        }
        if problems.is_empty() {
            Reply::json(200, json!({ "status": "ready" }))
        } else {
            Reply::json(
                503,
                json!({ "status": "not ready", "error": problems.join("; "), "reasons": problems }),
            )
        }
    }

    /// 401 when an API token is set and the request does not carry it.
    fn unauthorized(&self, request: &Request) -> Option<Reply> {
        let token = self.api_token.as_ref()?;
        if has_bearer_token(request, token.expose()) {
            return None;
        }
        Some(Reply {
            header: Some(("WWW-Authenticate", "Bearer")),
            ..Reply::error(
                401,
                "missing or wrong bearer token (Authorization: Bearer <API_TOKEN>)",
            )
        })
    }

    /// Runs an operator action once the request passed the token check; the status page's
    /// cached figures are dropped so that its next view shows the effect.
    fn operator(&self, request: &Request, action: impl FnOnce(&Self) -> Reply) -> Reply {
        if let Some(reply) = self.unauthorized(request) {
            return reply;
        }
        let reply = action(self);
        self.status.invalidate();
        reply
    }

    /// `POST /failed-events/retry` (all) and `POST /failed-events/{id}/retry` (one): the
    /// library's [`Outbox::requeue_failed`], as `txoutbox failed retry` runs it.
    fn retry_failed(&self, id: Option<i64>) -> Reply {
        let result = self
            .db
            .get()
            .and_then(|mut client| self.db.outbox().requeue_failed(&mut *client, id));
        match (result, id) {
            (Ok(0), Some(id)) => Reply::error(404, format!("no failed event with outbox id {id}")),
            (Ok(requeued), _) => {
                log::info!("http: operator re-queued {requeued} failed event(s) ({id:?})");
                Reply::json(200, json!({ "requeued": requeued }))
            }
            (Err(e), _) => failure("cannot re-queue failed events", &e),
        }
    }

    /// `POST /dead-letters/replay`: the library's [`txoutbox::admin::replay_dead_letters`], as
    /// `txoutbox dlq replay` runs it.
    fn replay_dead_letters(&self) -> Reply {
        let Some(broker) = self.status.broker() else {
            return Reply::error(
                503,
                "this server was started without access to RabbitMQ's dead-letter queue",
            );
        };
        let result = txoutbox::admin::replay_dead_letters_at_most(
            &broker.amqp_url,
            &broker.topology,
            REPLAY_PER_REQUEST,
        );
        self.status.refresh_dead_letters();
        match result {
            Ok(replayed) => {
                log::info!("http: operator replayed {replayed} dead letter(s)");
                Reply::json(200, json!({ "replayed": replayed, "limit": REPLAY_PER_REQUEST }))
            }
            Err(e) => {
                log::warn!("http: cannot replay the dead letters: {e}");
                Reply::error(503, format!("cannot replay the dead letters: {e}"))
            }
        }
    }

    fn create_order(&self, request: &mut Request) -> Reply {
        if let Some(reply) = self.unauthorized(request) {
            return reply;
        }
        if !has_json_content_type(request) {
            return Reply::error(415, "Content-Type must be application/json");
        }
        let body = match read_body(request, self.max_body_bytes) {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let new_order = match orders::parse_new_order(&body) {
            Ok(order) => order,
            Err(invalid) => {
                let mut body = json!({ "error": invalid.error });
                if let Some(field) = invalid.field {
                    body["field"] = Value::String(field);
                }
                return Reply::json(400, body);
            }
        };
        let key = match idempotency_key(request) {
            Ok(key) => key,
            Err(reply) => return reply,
        };
        let trace = trace_context(request);
        let result = self.db.get().and_then(|mut client| match &key {
            None => orders::create(
                &mut client,
                &self.outbox,
                &new_order,
                Some(&trace),
                &self.announce,
            )
            .map(Creation::Created),
            Some(key) => orders::create_idempotent(
                &mut client,
                &self.outbox,
                &new_order,
                key,
                Some(&trace),
                &self.announce,
            ),
        });
        match result {
            Ok(Creation::Created(order)) => {
                self.metrics.order_created();
                log::debug!(
                    "http: order {} created trace_id={} traceparent={}",
                    order.id,
                    trace.trace_id(),
                    trace.traceparent()
                );
                Reply::json(201, order.to_json())
            }
            Ok(Creation::Replayed(order)) => Reply {
                header: Some(("Idempotent-Replayed", "true")),
                ..Reply::json(201, order.to_json())
            },
            Ok(Creation::KeyReused) => Reply::error(
                422,
                "this Idempotency-Key was used for another order in the last 24 hours; use a new key",
            ),
            Err(e) => failure("cannot create the order", &e),
        }
    }

    /// `POST /orders/{id}/cancel`: no body; 200 with the cancelled order, 400 for an id that is
    /// not a UUID, 404 for an unknown order, 409 for an order already cancelled.
    fn cancel_order(&self, request: &Request, id: &str) -> Reply {
        if let Some(reply) = self.unauthorized(request) {
            return reply;
        }
        let Ok(id) = Uuid::parse_str(id) else {
            return Reply::error(400, format!("order id must be a UUID, got {id:?}"));
        };
        let trace = trace_context(request);
        let result = self.db.get().and_then(|mut client| {
            orders::cancel(&mut client, &self.outbox, id, Some(&trace), &self.announce)
        });
        match result {
            Ok(Cancellation::Cancelled(order)) => {
                log::debug!(
                    "http: order {} cancelled trace_id={} traceparent={}",
                    order.id,
                    trace.trace_id(),
                    trace.traceparent()
                );
                Reply::json(200, order.to_json())
            }
            Ok(Cancellation::AlreadyCancelled(order)) => Reply::json(
                409,
                json!({
                    "error": format!("order {id} is already cancelled (since {})", order.updated_at),
                    "status": order.status,
                }),
            ),
            Ok(Cancellation::NotFound) => Reply::error(404, format!("no order with id {id}")),
            Err(e) => failure("cannot cancel the order", &e),
        }
    }

    fn get_order(&self, id: &str) -> Reply {
        let Ok(id) = Uuid::parse_str(id) else {
            return Reply::error(404, format!("no order with id {id:?}"));
        };
        match self.db.get().and_then(|mut client| orders::get(&mut client, id)) {
            Ok(Some(order)) => Reply::json(200, order.to_json()),
            Ok(None) => Reply::error(404, format!("no order with id {id}")),
            Err(e) => failure("cannot read the order", &e),
        }
    }
}

/// The route template a request path matches: the `route` label of the HTTP metrics. Never
/// the raw path, which would make one time series per order id.
fn route_template(url: &str) -> &'static str {
    let path = url.split('?').next().unwrap_or("");
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        [""] => "/",
        ["status.json"] => "/status.json",
        ["openapi.yaml"] => "/openapi.yaml",
        ["healthz"] => "/healthz",
        ["readyz"] => "/readyz",
        ["metrics"] => "/metrics",
        ["orders"] => "/orders",
        ["orders", _] => "/orders/{id}",
        ["orders", _, "cancel"] => "/orders/{id}/cancel",
        ["failed-events", "retry"] => "/failed-events/retry",
        ["failed-events", _, "retry"] => "/failed-events/{id}/retry",
        ["dead-letters", "replay"] => "/dead-letters/replay",
        _ => "unmatched",
    }
}

/// The method as a label value, from a fixed set.
fn method_label(method: &Method) -> &'static str {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Patch => "PATCH",
        Method::Options => "OPTIONS",
        Method::Connect => "CONNECT",
        Method::Trace => "TRACE",
        Method::NonStandard(_) => "other",
    }
}

/// Dead letters one `POST /dead-letters/replay` moves at most (each waits for its confirm, a
/// millisecond or so): a request holds its handler thread for seconds, not for the whole queue.
const REPLAY_PER_REQUEST: u32 = 1000;

/// 503 when the database is away (the client may retry), 500 otherwise.
fn failure(what: &str, error: &Error) -> Reply {
    if error.is_unavailable() {
        log::warn!("http: {what}: {error}");
        Reply::error(503, "database unavailable, retry later")
    } else {
        log::error!("http: {what}: {error}");
        Reply::error(500, "internal error")
    }
}

/// The request's `Idempotency-Key`, if any: 1 to 255 visible ASCII characters, else 400.
fn idempotency_key(request: &Request) -> Result<Option<String>, Reply> {
    let mut keys = request
        .headers()
        .iter()
        .filter(|h| h.field.equiv("Idempotency-Key"))
        .map(|h| h.value.as_str().trim().to_string());
    let Some(key) = keys.next() else {
        return Ok(None);
    };
    if keys.next().is_some() {
        return Err(Reply::error(400, "send one Idempotency-Key header, not several"));
    }
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Reply::error(
            400,
            "Idempotency-Key must be 1 to 255 visible ASCII characters (a UUID is a good key)",
        ));
    }
    Ok(Some(key))
}

/// The request's W3C trace context, which its event carries: its `traceparent` if it sent
/// exactly one valid one (with its `tracestate` headers, joined by commas, kept if valid),
/// else a new trace, as the specification asks of a receiver. Never refuses the request.
fn trace_context(request: &Request) -> TraceContext {
    let values = |name: &'static str| {
        request
            .headers()
            .iter()
            .filter(move |h| h.field.equiv(name))
            .map(|h| h.value.as_str().trim_matches([' ', '\t']))
    };
    let parents: Vec<&str> = values(trace::TRACEPARENT).collect();
    let states: Vec<&str> = values(trace::TRACESTATE).collect();
    let state = (!states.is_empty()).then(|| states.join(","));
    let given = match parents.as_slice() {
        [one] => TraceContext::from_headers(Some(one), state.as_deref()),
        _ => None,
    };
    given.unwrap_or_else(|| {
        let root = TraceContext::new_root();
        if !parents.is_empty() {
            log::debug!(
                "http: ignoring {} traceparent header(s) (not exactly one valid one); new trace_id={}",
                parents.len(),
                root.trace_id()
            );
        }
        root
    })
}

/// True when the request carries `Authorization: Bearer <token>`, compared in constant time.
fn has_bearer_token(request: &Request, token: &str) -> bool {
    request
        .headers()
        .iter()
        .filter(|h| h.field.equiv("Authorization"))
        .filter_map(|h| h.value.as_str().strip_prefix("Bearer "))
        .any(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes()))
}

/// Compares without an early exit, so the time taken does not reveal how much matched.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = given.len() ^ expected.len();
    for (index, byte) in expected.iter().enumerate() {
        let other = given.get(index).copied().unwrap_or(!byte);
        difference |= usize::from(other ^ byte);
    }
    difference == 0
}

fn has_json_content_type(request: &Request) -> bool {
    request.headers().iter().any(|h| {
        h.field.equiv("Content-Type")
            && h.value
                .as_str()
                .split(';')
                .next()
                .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
    })
}

/// Reads at most `max` bytes; refuses a declared or actual larger body with 413.
fn read_body(request: &mut Request, max: usize) -> Result<Vec<u8>, Reply> {
    let too_large = || Reply::error(413, format!("body larger than {max} bytes"));
    if request.body_length().is_some_and(|len| len > max) {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(request.body_length().unwrap_or(0));
    // take(max + 1) also bounds a chunked body, whose length is not declared.
    request
        .as_reader()
        .take(max as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                Reply::error(408, "the request body stopped arriving; send it without pauses")
            }
            _ => Reply::error(400, format!("cannot read the body: {e}")),
        })?;
    if body.len() > max {
        return Err(too_large());
    }
    Ok(body)
}

fn header(name: &str, value: &str) -> Header {
    // Both are static ASCII here, which tiny_http always accepts.
    Header::from_bytes(name.as_bytes(), value.as_bytes()).unwrap_or_else(|()| unreachable!("ASCII header"))
}

#[cfg(test)]
mod tests {
    use super::{constant_time_eq, route_template};

    #[test]
    fn every_route_has_its_template_label() {
        for (url, template) in [
            ("/", "/"),
            ("/status.json", "/status.json"),
            ("/openapi.yaml", "/openapi.yaml"),
            ("/healthz", "/healthz"),
            ("/readyz", "/readyz"),
            ("/metrics", "/metrics"),
            ("/orders", "/orders"),
            ("/orders/0b1c?x=1", "/orders/{id}"),
            ("/orders/0b1c/cancel", "/orders/{id}/cancel"),
            ("/orders/0b1c/other", "unmatched"),
            ("/nope", "unmatched"),
        ] {
            assert_eq!(route_template(url), template, "{url}");
        }
    }

    #[test]
    fn tokens_match_only_exactly() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret"));
        assert!(!constant_time_eq(b"s3cretX", b"s3cret"));
        assert!(!constant_time_eq(b"", b"s3cret"));
        assert!(!constant_time_eq(b"S3cret", b"s3cret"));
    }
}
