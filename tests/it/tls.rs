//! TLS for real: the local Postgres (ssl on, its own self-signed certificate for localhost)
//! and a RabbitMQ TLS listener the testkit starts with a CA of its own.

use std::time::{Duration, Instant};

use postgres::GenericClient;
use serde_json::json;
use txoutbox::{enqueue, relay, Database, NewEvent, PoolOptions, RelayConfig};
use txoutbox_testkit::tls::{amqps_port, amqps_url, ca_file, other_ca_file, rabbitmq_tls_url};
use txoutbox_testkit::{wait_until, TestBroker, TestDb};

const WAIT: Duration = Duration::from_secs(60);

/// `url` with `host` and the query parameters `params` added.
fn with(url: &str, host: Option<&str>, params: &[(&str, &str)]) -> String {
    let mut url = url::Url::parse(url).expect("the test database URL is a URL");
    if let Some(host) = host {
        url.set_host(Some(host)).unwrap();
    }
    for (key, value) in params {
        url.query_pairs_mut().append_pair(key, value);
    }
    url.to_string()
}

/// The file of the server's certificate (self-signed: it is its own CA).
fn server_certificate(t: &TestDb) -> String {
    let path: String = t.client().query_one("SHOW ssl_cert_file", &[]).unwrap().get(0);
    assert!(
        path.starts_with('/'),
        "ssl_cert_file {path} is relative to the data directory"
    );
    path
}

fn small_pool() -> PoolOptions {
    PoolOptions {
        max_size: 1,
        ..PoolOptions::default()
    }
}

fn encrypted(client: &mut impl GenericClient) -> bool {
    client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .unwrap()
        .get(0)
}

fn connect_error(url: &str) -> String {
    match Database::connect(url, &small_pool()) {
        Ok(_) => panic!("{url} connected"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sslmode_require_encrypts_pooled_and_dedicated_connections() {
    let t = TestDb::new();
    for mode in ["require", "prefer"] {
        let db = Database::connect(&with(&t.url, None, &[("sslmode", mode)]), &small_pool()).unwrap();
        assert!(encrypted(&mut *db.get().unwrap()), "pooled, sslmode={mode}");
        assert!(
            encrypted(&mut db.dedicated().unwrap()),
            "dedicated, sslmode={mode}"
        );
    }
}

#[test]
fn without_sslmode_connections_are_not_encrypted() {
    let t = TestDb::new();
    assert!(!encrypted(&mut *t.db.get().unwrap()));
    assert!(!encrypted(&mut t.db.dedicated().unwrap()));
    let db = Database::connect(&with(&t.url, None, &[("sslmode", "disable")]), &small_pool()).unwrap();
    assert!(!encrypted(&mut *db.get().unwrap()));
}

#[test]
fn verify_full_connects_by_the_name_on_the_certificate() {
    let t = TestDb::new();
    let cert = server_certificate(&t);
    let url = with(
        &t.url,
        Some("localhost"),
        &[("sslmode", "verify-full"), ("sslrootcert", &cert)],
    );
    let db = Database::connect(&url, &small_pool()).unwrap();
    assert!(encrypted(&mut *db.get().unwrap()));
    assert!(encrypted(&mut db.dedicated().unwrap()));
    assert!(encrypted(
        &mut txoutbox::db::connect_url(&url, Duration::from_secs(5)).unwrap()
    ));
}

#[test]
fn verify_full_by_address_fails_naming_the_host() {
    let t = TestDb::new();
    let cert = server_certificate(&t);
    let url = with(
        &t.url,
        Some("127.0.0.1"),
        &[("sslmode", "verify-full"), ("sslrootcert", &cert)],
    );
    let error = connect_error(&url);
    assert!(
        error.contains("the server's certificate is not for host 127.0.0.1")
            && error.contains("sslmode=verify-ca"),
        "{error}"
    );
}

#[test]
fn verify_ca_by_address_connects() {
    let t = TestDb::new();
    let cert = server_certificate(&t);
    let url = with(
        &t.url,
        Some("127.0.0.1"),
        &[("sslmode", "verify-ca"), ("sslrootcert", &cert)],
    );
    let db = Database::connect(&url, &small_pool()).unwrap();
    assert!(encrypted(&mut *db.get().unwrap()));
}

#[test]
fn verify_ca_with_another_ca_fails_naming_the_file() {
    let t = TestDb::new();
    let other = other_ca_file();
    let other = other.to_str().unwrap();
    for mode in ["verify-ca", "verify-full", "require"] {
        let url = with(
            &t.url,
            Some("localhost"),
            &[("sslmode", mode), ("sslrootcert", other)],
        );
        let error = connect_error(&url);
        assert!(
            error.contains(&format!("not signed by the CA in sslrootcert {other}")),
            "sslmode={mode}: {error}"
        );
    }
}

fn event(n: usize) -> NewEvent {
    NewEvent::new("test", n.to_string(), "TestHappened", json!({ "n": n }))
}

#[test]
fn the_relay_publishes_over_amqps() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let url = rabbitmq_tls_url();
    let sent = event(1);
    let mut client = t.client();
    let mut tx = client.transaction().unwrap();
    enqueue(&mut tx, &sent).unwrap();
    tx.commit().unwrap();

    let relay = relay::start(
        t.db.clone(),
        &url,
        broker.topology.clone(),
        RelayConfig {
            workers: 1,
            poll_interval: Duration::from_millis(200),
            ..RelayConfig::default()
        },
    )
    .unwrap();
    wait_until("the event is published over TLS", WAIT, || {
        relay.stats().published() == 1
    });
    relay.stop();
    let got = broker.drain(&broker.topology.queue);
    let ids: Vec<_> = got.iter().filter_map(|m| m.message_id.clone()).collect();
    assert_eq!(ids, vec![sent.message_id.to_string()]);
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 0);
}

#[test]
fn amqps_with_another_ca_fails_naming_the_file() {
    rabbitmq_tls_url(); // the listener is up
    let other = other_ca_file();
    let url = amqps_url(amqps_port(), &other);
    let error = txoutbox::broker::connect(&url)
        .err()
        .expect("connects with the wrong CA")
        .to_string();
    assert!(
        error.contains(&format!("not signed by the CA in cacertfile {}", other.display())),
        "{error}"
    );
    // verify=verify_none (development only) accepts it.
    let (connection, _channel) = txoutbox::broker::connect(&format!("{url}&verify=verify_none")).unwrap();
    connection.close().unwrap();
}

#[test]
fn amqps_to_the_plain_port_fails_quickly() {
    let plain = url::Url::parse(&txoutbox_testkit::amqp_url()).unwrap();
    let port = plain.port().unwrap_or(5672);
    let url = amqps_url(port, &ca_file());
    let started = Instant::now();
    let error = txoutbox::broker::connect(&url)
        .err()
        .expect("TLS to the plain port connects")
        .to_string();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(error.contains("does not speak TLS"), "{error}");
}
