//! Bring your own pool: a `Database` over the caller's r2d2 pool; a relay worker that dies
//! shows in health and metrics.

use std::time::Duration;

use postgres::NoTls;
use r2d2_postgres::PostgresConnectionManager;
use serde_json::json;
use txoutbox::{
    consumer, enqueue, relay, ConsumerConfig, Database, HandlerError, Message, NewEvent, PoolOptions, Schema,
};
use txoutbox_testkit::{quick_relay, wait_until, EmptyDb, TestBroker, TestDb};

const WAIT: Duration = Duration::from_secs(30);

fn callers_pool(url: &str, size: u32) -> r2d2::Pool<PostgresConnectionManager<NoTls>> {
    let manager = PostgresConnectionManager::new(url.parse().unwrap(), NoTls);
    r2d2::Pool::builder()
        .max_size(size)
        .connection_timeout(Duration::from_millis(500))
        .build(manager)
        .unwrap()
}

#[test]
fn a_database_over_the_callers_pool_runs_the_relay_and_the_consumer() {
    let t = TestDb::new();
    t.client()
        .batch_execute("CREATE TABLE seen (message_id uuid PRIMARY KEY)")
        .unwrap();
    let pool = callers_pool(&t.url, 3);
    let db = Database::from_pool(&t.url, pool.clone(), Schema::default()).unwrap();
    let broker = TestBroker::new();

    let mut client = pool.get().unwrap();
    let mut tx = client.transaction().unwrap();
    for n in 0..10 {
        enqueue(
            &mut tx,
            &NewEvent::new("thing", n.to_string(), "ThingDone", json!({ "n": n })),
        )
        .unwrap();
    }
    tx.commit().unwrap();
    drop(client);

    let relay = relay::start(db.clone(), &broker.url, broker.topology.clone(), quick_relay(1)).unwrap();
    let handler = |tx: &mut postgres::Transaction<'_>, m: &Message| -> Result<(), HandlerError> {
        tx.execute("INSERT INTO seen (message_id) VALUES ($1)", &[&m.message_id])?;
        Ok(())
    };
    let consumer = consumer::start(
        db.clone(),
        &broker.url,
        broker.topology.clone(),
        ConsumerConfig::default(),
        handler,
    )
    .unwrap();
    wait_until("all ten are applied", WAIT, || consumer.stats().applied() == 10);
    consumer.stop();
    relay.stop();
    assert_eq!(t.count("SELECT count(*) FROM seen"), 10);
    assert!(
        pool.state().connections >= 1,
        "the consumer's transactions came from the caller's pool"
    );

    // An exhausted pool of the caller's gives an error that says whose pool it was.
    let held: Vec<_> = (0..3).map(|_| pool.get().unwrap()).collect();
    let error = db.get().err().expect("no connection left");
    assert!(error.to_string().contains("caller's pool"), "{error}");
    drop(held);
}

#[test]
fn a_database_over_the_callers_pool_checks_the_schema_first() {
    let empty = EmptyDb::new();
    let pool = callers_pool(&empty.url, 1);
    let error = Database::from_pool(&empty.url, pool, Schema::default()).unwrap_err();
    assert!(error.to_string().contains("txoutbox migrate"), "{error}");
}

/// A worker that panics (here: the outbox's `exchange` column changed type under it, so reading
/// a claimed row fails a type check) is reported dead by health and metrics, not counted as
/// connected.
#[test]
fn a_relay_worker_that_panics_shows_in_health_and_metrics() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    t.client()
        .batch_execute("ALTER TABLE outbox ALTER COLUMN exchange TYPE integer USING NULL")
        .unwrap();
    t.client()
        .execute(
            "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, payload)
             VALUES (gen_random_uuid(), 'thing', '1', 'ThingDone', '{}')",
            &[],
        )
        .unwrap();
    let relay = relay::start(t.db.clone(), &broker.url, broker.topology.clone(), quick_relay(2)).unwrap();
    wait_until("both workers died", WAIT, || relay.stats().dead_workers() == 2);
    let health = relay.health();
    let why = health
        .check()
        .expect_err("a relay with dead workers is not healthy");
    assert!(why.contains("2 of its 2 workers ended with a panic"), "{why}");
    assert_eq!(
        relay.stats().connected_workers(),
        0,
        "a dead worker is not counted as connected"
    );
    let mut registry = txoutbox::metrics::Registry::default();
    relay.stats().register(&mut registry);
    let text = txoutbox::metrics::encode(&registry);
    assert!(text.contains("txoutbox_relay_dead_workers 2"), "{text}");
    assert!(text.contains("txoutbox_relay_connected_workers 0"), "{text}");
    relay.stop();
    assert_eq!(
        t.count("SELECT count(*) FROM outbox"),
        1,
        "the row stays for a fixed relay"
    );
}

/// The last statement Postgres saw on the backend `pid` (pg_stat_activity.query).
fn last_statement(t: &TestDb, pid: i32) -> String {
    t.client()
        .query_one("SELECT query FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .unwrap()
        .get(0)
}

#[test]
fn a_connection_used_moments_ago_is_checked_out_without_a_round_trip() {
    let t = TestDb::with_pool(PoolOptions {
        max_size: 1,
        ..PoolOptions::default()
    });
    let marker = "SELECT pg_backend_pid() /* checkout marker */";
    let pid: i32 = t.db.get().unwrap().query_one(marker, &[]).unwrap().get(0);

    // The same (only) connection again at once: Postgres must not have been asked anything.
    let again = t.db.get().unwrap();
    assert_eq!(
        last_statement(&t, pid),
        marker,
        "the checkout sent a validation query on a connection used moments ago"
    );
    drop(again);
}

#[test]
fn a_connection_idle_past_the_check_is_validated_and_replaced_when_dead() {
    let t = TestDb::with_pool(PoolOptions {
        max_size: 1,
        validate_after_idle: Duration::from_millis(200),
        ..PoolOptions::default()
    });
    let pid: i32 =
        t.db.get()
            .unwrap()
            .query_one("SELECT pg_backend_pid()", &[])
            .unwrap()
            .get(0);
    t.client()
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    wait_until("the backend is gone", WAIT, || {
        t.count(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
        )) == 0
    });
    // Idle past the check (a deterministic pause, not a wait for something to happen).
    std::thread::sleep(Duration::from_millis(300));
    let mut client = t.db.get().expect("a checkout after the backend died");
    let fresh: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .expect("the dead connection was replaced before use")
        .get(0);
    assert_ne!(fresh, pid);
}
