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
