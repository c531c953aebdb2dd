//! Prometheus metrics: the server's `GET /metrics` (HTTP, orders, relay, outbox backlog read
//! from the database) and the consumer's own listener, read back by parsing the exposition text.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use txoutbox::{enqueue, metrics, relay, NewEvent, RelayConfig};
use txoutbox_service::orders::Announce;
use txoutbox_service::{http, HttpConfig};
use txoutbox_testkit::{amqp_url, post_order, wait_until, Policy, TestBroker, TestDb};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);
const USER: &str = "5b0c7b52-8d0c-4d53-9a55-1f5b1d0f4e0a";

/// One sample of the exposition: `name{labels} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format (0.0.4): comment lines are skipped, label values unescaped.
fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            let mut key = String::new();
            loop {
                let (i, c) = chars
                    .next()
                    .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                match c {
                    '}' => {
                        rest = &inner[i + 1..];
                        break;
                    }
                    ',' => {}
                    '=' => {
                        assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line:?}");
                        let mut value = String::new();
                        loop {
                            match chars.next().map(|(_, c)| c) {
                                Some('"') => break,
                                Some('\\') => match chars.next().map(|(_, c)| c) {
                                    Some('n') => value.push('\n'),
                                    Some(other) => value.push(other),
                                    None => panic!("bad escape: {line:?}"),
                                },
                                Some(other) => value.push(other),
                                None => panic!("unclosed label value: {line:?}"),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    other => key.push(other),
                }
            }
        }
        let value = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no numeric value: {line:?}"));
        samples.push(Sample { name, labels, value });
    }
    samples
}

/// The value of the sample `name` whose labels are exactly `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == wanted)
        .map(|s| s.value)
}

/// Like [`value`], panicking with the whole exposition when the sample is missing.
fn must(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    value(samples, name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?} in {samples:#?}"))
}

/// `GET path` on a fresh connection: status, content type and body as text.
fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read the response");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {raw:?}"));
    let content_type = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-type"))
        .map_or(String::new(), |(_, v)| v.trim().to_string());
    (status, content_type, body.to_string())
}

/// Scrapes `GET /metrics`, checking status and content type.
fn scrape(addr: SocketAddr) -> Vec<Sample> {
    let (status, content_type, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    parse(&body)
}

fn http_config() -> HttpConfig {
    HttpConfig {
        addr: "127.0.0.1:0".into(),
        threads: 2,
        ..HttpConfig::default()
    }
}

fn valid_order() -> String {
    format!(r#"{{"user_id":"{USER}","amount":"12.50"}}"#)
}

#[test]
fn the_server_counts_requests_by_route_template_and_orders_created() {
    let t = TestDb::new();
    let server = http::serve(&http_config(), t.db.clone(), Announce::Notify).unwrap();
    let addr = server.addr();
    for _ in 0..3 {
        assert_eq!(post_order(addr, &valid_order()).status, 201);
    }
    let bad = post_order(addr, &format!(r#"{{"user_id":"{USER}","amount":"abc"}}"#));
    assert_eq!(bad.status, 400);
    let unknown = Uuid::new_v4().to_string();
    assert_eq!(get(addr, &format!("/orders/{unknown}")).0, 404);
    assert_eq!(get(addr, "/orders/not-a-uuid").0, 404);
    assert_eq!(get(addr, "/no/such/route").0, 404);
    let wrong_method = txoutbox_testkit::http_raw(addr, "DELETE /metrics HTTP/1.1", b"");
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.header("Allow"), Some("GET"));

    let samples = scrape(addr);
    let requests = "txoutbox_http_requests_total";
    let count = |route: &str, method: &str, status: &str| {
        value(
            &samples,
            requests,
            &[("route", route), ("method", method), ("status", status)],
        )
    };
    assert_eq!(must(&samples, "txoutbox_orders_created_total", &[]), 3.0);
    assert_eq!(count("/orders", "POST", "201"), Some(3.0));
    assert_eq!(count("/orders", "POST", "400"), Some(1.0));
    assert_eq!(count("/orders/{id}", "GET", "404"), Some(2.0));
    assert_eq!(count("unmatched", "GET", "404"), Some(1.0));
    assert_eq!(count("/metrics", "DELETE", "405"), Some(1.0));
    let orders_route = [("route", "/orders")];
    let duration = "txoutbox_http_request_duration_seconds";
    assert_eq!(must(&samples, &format!("{duration}_count"), &orders_route), 4.0);
    assert_eq!(
        must(
            &samples,
            &format!("{duration}_bucket"),
            &[("route", "/orders"), ("le", "+Inf")]
        ),
        4.0
    );
    assert!(must(&samples, &format!("{duration}_sum"), &orders_route) > 0.0);
    // Raw paths never become label values: one series per route, not per id.
    for sample in &samples {
        for value in sample.labels.values() {
            assert!(
                !value.contains(&unknown) && !value.contains("not-a-uuid") && !value.contains("no/such"),
                "raw path in a label: {sample:?}"
            );
        }
    }
    // No relay runs: the three events wait in the outbox.
    assert_eq!(must(&samples, "txoutbox_outbox_backlog", &[]), 3.0);
    assert_eq!(must(&samples, "txoutbox_outbox_failed", &[]), 0.0);
    assert_eq!(must(&samples, "txoutbox_outbox_scrape_error", &[]), 0.0);
    let age = must(&samples, "txoutbox_outbox_oldest_pending_age_seconds", &[]);
    assert!((0.0..60.0).contains(&age), "age {age}");

    // An older pending event and a failed one, as the database sees them at the next scrape.
    let mut client = t.client();
    client
        .batch_execute(
            "UPDATE outbox SET created_at = now() - interval '90 seconds'
                 WHERE id = (SELECT min(id) FROM outbox);
             UPDATE outbox SET failed_at = now() WHERE id = (SELECT max(id) FROM outbox);",
        )
        .unwrap();
    let samples = scrape(addr);
    assert_eq!(must(&samples, "txoutbox_outbox_backlog", &[]), 2.0);
    assert_eq!(must(&samples, "txoutbox_outbox_failed", &[]), 1.0);
    let age = must(&samples, "txoutbox_outbox_oldest_pending_age_seconds", &[]);
    assert!((90.0..150.0).contains(&age), "age {age}");
    // A scrape is counted once answered: the second one sees the first.
    assert_eq!(
        value(
            &samples,
            requests,
            &[("route", "/metrics"), ("method", "GET"), ("status", "200")]
        ),
        Some(1.0)
    );
    server.stop();
}

#[test]
fn a_scrape_answers_with_an_error_gauge_while_the_outbox_cannot_be_read() {
    let t = TestDb::new();
    let server = http::serve(&http_config(), t.db.clone(), Announce::Notify).unwrap();
    assert_eq!(post_order(server.addr(), &valid_order()).status, 201);
    // Another session holds the outbox locked: the backlog query waits on it.
    let mut locker = t.client();
    let mut tx = locker.transaction().unwrap();
    tx.batch_execute("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
        .unwrap();

    let started = Instant::now();
    let samples = scrape(server.addr());
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "the scrape took {took:?}");
    assert_eq!(must(&samples, "txoutbox_outbox_scrape_error", &[]), 1.0);
    assert_eq!(
        value(&samples, "txoutbox_outbox_backlog", &[]),
        None,
        "no stale backlog"
    );
    // The in-process metrics are all there.
    assert_eq!(must(&samples, "txoutbox_orders_created_total", &[]), 1.0);
    drop(tx);

    let samples = scrape(server.addr());
    assert_eq!(must(&samples, "txoutbox_outbox_scrape_error", &[]), 0.0);
    assert_eq!(must(&samples, "txoutbox_outbox_backlog", &[]), 1.0);
    server.stop();
}

fn fast_relay(workers: usize) -> RelayConfig {
    RelayConfig {
        workers,
        batch_size: 10,
        poll_interval: Duration::from_millis(500),
        retry_delay: Duration::from_millis(100),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        ..RelayConfig::default()
    }
}

#[test]
fn the_server_shows_the_relay_publishing_and_the_backlog_draining() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let relay = relay::start(t.db.clone(), &broker.url, broker.topology.clone(), fast_relay(2)).unwrap();
    let server = http::serve_with_relay(
        &http_config(),
        t.db.clone(),
        Announce::Wake(relay.waker()),
        Some(relay.health()),
    )
    .unwrap();
    for _ in 0..5 {
        assert_eq!(post_order(server.addr(), &valid_order()).status, 201);
    }
    let mut samples = Vec::new();
    wait_until("/metrics shows 5 events published", WAIT, || {
        samples = scrape(server.addr());
        value(&samples, "txoutbox_events_published_total", &[]) == Some(5.0)
    });
    assert_eq!(must(&samples, "txoutbox_outbox_backlog", &[]), 0.0);
    assert_eq!(
        must(&samples, "txoutbox_outbox_oldest_pending_age_seconds", &[]),
        0.0
    );
    assert_eq!(must(&samples, "txoutbox_relay_batch_size_sum", &[]), 5.0);
    let batches = must(&samples, "txoutbox_relay_batch_size_count", &[]);
    assert!((1.0..=5.0).contains(&batches), "{batches} batches");
    assert_eq!(
        must(&samples, "txoutbox_relay_batch_duration_seconds_count", &[]),
        batches
    );
    assert_eq!(must(&samples, "txoutbox_relay_connected_workers", &[]), 2.0);
    for reason in ["nack", "unroutable", "broker_error"] {
        assert_eq!(
            must(&samples, "txoutbox_publish_failures_total", &[("reason", reason)]),
            0.0
        );
    }
    assert_eq!(must(&samples, "txoutbox_events_failed_total", &[]), 0.0);
    assert_eq!(broker.drain(&broker.topology.queue).len(), 5);
    server.stop();
    relay.stop();
}

#[test]
fn an_embedded_relay_exposes_refusals_and_failed_events_in_the_callers_registry() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    // The broker nacks every publish to a queue at its length limit.
    let _policy = Policy::on_queue(
        &broker.topology.queue,
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
    );
    let mut client = t.client();
    let mut tx = client.transaction().unwrap();
    for n in 0..3 {
        let event = NewEvent::new("test", format!("agg-{n}"), "TestHappened", json!({ "n": n }));
        enqueue(&mut tx, &event).unwrap();
    }
    tx.commit().unwrap();
    let config = RelayConfig {
        max_attempts: 2,
        ..fast_relay(1)
    };
    let relay = relay::start(t.db.clone(), &broker.url, broker.topology.clone(), config).unwrap();
    let mut registry = metrics::Registry::default();
    relay.stats().register(&mut registry);
    metrics::register_outbox_gauges(&mut registry, t.db.clone());

    let mut samples = Vec::new();
    wait_until("every event is marked failed", WAIT, || {
        samples = parse(&metrics::encode(&registry));
        value(&samples, "txoutbox_events_failed_total", &[]) == Some(3.0)
    });
    assert_eq!(
        must(&samples, "txoutbox_publish_failures_total", &[("reason", "nack")]),
        6.0,
        "two refused attempts per event"
    );
    assert_eq!(must(&samples, "txoutbox_events_published_total", &[]), 0.0);
    assert_eq!(must(&samples, "txoutbox_outbox_failed", &[]), 3.0);
    assert_eq!(must(&samples, "txoutbox_outbox_backlog", &[]), 0.0);
    relay.stop();
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_consumer_binary_serves_processed_duplicates_and_dead_letters_on_its_metrics_addr() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _consumer = Process(
        Command::new(env!("CARGO_BIN_EXE_txoutbox-consumer"))
            .env("DATABASE_URL", &t.url)
            .env("AMQP_URL", amqp_url())
            .env("AMQP_EXCHANGE", &broker.topology.exchange)
            .env("AMQP_QUEUE", &broker.topology.queue)
            .env("CONSUMER_METRICS_ADDR", addr.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start txoutbox-consumer"),
    );
    let id = Uuid::new_v4().to_string();
    let order = json!({ "order_id": Uuid::new_v4().to_string() }).to_string();
    broker.publish_raw(Some(&id), "OrderCreated", order.as_bytes());
    broker.publish_raw(Some(&id), "OrderCreated", order.as_bytes());
    broker.publish_raw(None, "OrderCreated", order.as_bytes());
    broker.publish_raw(Some(&Uuid::new_v4().to_string()), "OrderCreated", b"{}");

    let mut samples = Vec::new();
    wait_until(
        "the consumer's /metrics shows every delivery settled",
        WAIT,
        || {
            let answered = std::net::TcpStream::connect(addr).is_ok();
            answered && {
                samples = scrape(addr);
                let dead = |reason| {
                    value(
                        &samples,
                        "txoutbox_consumer_dead_lettered_total",
                        &[("reason", reason)],
                    )
                };
                value(&samples, "txoutbox_consumer_duplicates_total", &[]) == Some(1.0)
                    && dead("malformed") == Some(1.0)
                    && dead("permanent") == Some(1.0)
            }
        },
    );
    assert_eq!(must(&samples, "txoutbox_consumer_processed_total", &[]), 1.0);
    assert_eq!(
        must(
            &samples,
            "txoutbox_consumer_dead_lettered_total",
            &[("reason", "retries_exhausted")]
        ),
        0.0
    );
    assert!(must(&samples, "txoutbox_consumer_handler_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(broker.ready(&broker.topology.dead_letter_queue()), 2);
    let (status, _, body) = get(addr, "/healthz");
    assert_eq!((status, body.contains("ok")), (200, true), "{body}");
    assert_eq!(get(addr, "/elsewhere").0, 404);
}

#[test]
fn the_consumer_binary_stops_at_start_when_its_metrics_address_is_taken() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_txoutbox-consumer"))
        .env("DATABASE_URL", &t.url)
        .env("AMQP_URL", amqp_url())
        .env("AMQP_EXCHANGE", &broker.topology.exchange)
        .env("AMQP_QUEUE", &broker.topology.queue)
        .env("CONSUMER_METRICS_ADDR", &addr)
        .env("RUST_LOG", "error")
        .output()
        .expect("cannot run txoutbox-consumer");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on CONSUMER_METRICS_ADDR {addr}")) && stderr.contains("off"),
        "{stderr}"
    );
}
