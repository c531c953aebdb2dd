//! The examples under examples/ run as their docs say, against the real services.

use std::process::Command;

use txoutbox_testkit::{amqp_url, TestBroker, TestDb};

/// The embedding guide's program (docs/embedding.md) runs as documented.
#[test]
fn the_embedding_example_runs_its_invoices_through_to_sent() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let output = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--example", "embedded"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DATABASE_URL", &t.url)
        .env("AMQP_URL", amqp_url())
        .env("AMQP_EXCHANGE", &broker.topology.exchange)
        .env("AMQP_QUEUE", &broker.topology.queue)
        .env("RUST_LOG", "warn")
        .output()
        .expect("cargo runs the example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the example failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all 100 invoices SENT"), "{stdout}");
    assert_eq!(t.count("SELECT count(*) FROM invoices WHERE state = 'SENT'"), 100);
    assert_eq!(t.count("SELECT count(*) FROM processed_messages"), 100);
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 0);
}

fn run_example(name: &str, env: &[(&str, &str)]) -> String {
    let output = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .expect("cargo runs the example");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "example {name} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

/// The publish-only service (plain postgres client, relay declaring only its exchange) feeds
/// the consume-only service (its own r2d2 pool, its own consumer name) through one exchange.
#[test]
fn the_publish_only_example_feeds_the_consume_only_example() {
    let t = TestDb::new();
    // The consumer's queue, bound to the exchange, exists before anything is published.
    let broker = TestBroker::new();
    let url = amqp_url();
    let (exchange, queue) = (broker.topology.exchange.as_str(), broker.topology.queue.as_str());
    let published = run_example(
        "publish_only",
        &[
            ("DATABASE_URL", &t.url),
            ("AMQP_URL", &url),
            ("AMQP_EXCHANGE", exchange),
            ("COUNT", "10"),
        ],
    );
    assert!(published.contains("published 10 events"), "{published}");
    assert_eq!(
        t.count("SELECT count(*) FROM shipments"),
        10,
        "the rolled-back one is not there"
    );
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 0);
    assert_eq!(broker.ready_main(), 10);

    let applied = run_example(
        "consume_only",
        &[
            ("DATABASE_URL", &t.url),
            ("AMQP_URL", &url),
            ("AMQP_EXCHANGE", exchange),
            ("AMQP_QUEUE", queue),
            ("EXPECT", "10"),
        ],
    );
    assert!(applied.contains("applied 10 events"), "{applied}");
    assert_eq!(t.count("SELECT count(*) FROM shipment_log"), 10);
    assert_eq!(
        t.count("SELECT count(*) FROM processed_messages WHERE consumer = 'shipment-log'"),
        10
    );
    assert_eq!(broker.ready_main(), 0);
}

/// The diesel example (docs/embedding.md, "With diesel") commits a ticket with its event and
/// leaves neither behind for the transaction it rolls back. It builds with `--features diesel`,
/// so this test also keeps the feature compiling in a plain `make test`.
#[test]
fn the_diesel_example_commits_a_ticket_with_its_event_and_rolls_back_both() {
    let t = TestDb::new();
    let output = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--example", "diesel", "--features", "diesel"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DATABASE_URL", &t.url)
        .output()
        .expect("cargo runs the example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the example failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("rolled back: ticket"), "{stdout}");
    assert!(
        stdout.contains("and its event committed together; the rolled-back ticket left no row and no event"),
        "{stdout}"
    );
    // One ticket, committed with its one event; the rolled-back ticket and event are absent.
    assert_eq!(t.count("SELECT count(*) FROM tickets"), 1);
    assert_eq!(
        t.count("SELECT count(*) FROM tickets WHERE title = 'printer on fire'"),
        1
    );
    assert_eq!(
        t.count("SELECT count(*) FROM tickets WHERE title = 'false alarm'"),
        0
    );
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 1);
    assert_eq!(
        t.count(
            "SELECT count(*) FROM outbox o JOIN tickets t ON o.aggregate_id = t.id::text \
             WHERE o.aggregate_type = 'ticket' AND o.event_type = 'TicketOpened' \
               AND o.payload->>'ticket_id' = t.id::text AND o.exchange IS NULL"
        ),
        1
    );
}

/// Without the migrations the example stops at once and says what to run.
#[test]
fn the_diesel_example_refuses_an_unmigrated_database_with_what_to_run() {
    let empty = txoutbox_testkit::EmptyDb::new();
    let output = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--example", "diesel", "--features", "diesel"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DATABASE_URL", &empty.url)
        .output()
        .expect("cargo runs the example");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the example ran on an empty database");
    assert!(stderr.contains("txoutbox migrate"), "{stderr}");
    assert_eq!(
        empty
            .client()
            .query_one("SELECT count(*) FROM pg_tables WHERE tablename = 'tickets'", &[])
            .expect("count")
            .get::<_, i64>(0),
        0,
        "the example created its table before checking the migrations"
    );
}
