//! The real binaries as processes: orders over HTTP, the relay, the consumer, verified the way
//! `make stress` verifies.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{amqp_url, wait_until, TestBroker, TestDb};
use txoutbox::stress::{self, StressOptions};

/// A child process killed when the test ends, whatever happens.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn spawn(binary: &str, t: &TestDb, broker: &TestBroker, http_addr: &str) -> Process {
    let child = Command::new(binary)
        .env("DATABASE_URL", &t.url)
        .env("AMQP_URL", amqp_url())
        .env("AMQP_EXCHANGE", &broker.topology.exchange)
        .env("AMQP_QUEUE", &broker.topology.queue)
        .env("HTTP_ADDR", http_addr)
        .env("HTTP_THREADS", "8")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
    Process(child)
}

#[test]
fn orders_over_http_are_all_completed_exactly_once_by_the_real_binaries() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let addr = format!("127.0.0.1:{}", free_port());
    let _server = spawn(env!("CARGO_BIN_EXE_txoutbox-server"), &t, &broker, &addr);
    let _consumer = spawn(env!("CARGO_BIN_EXE_txoutbox-consumer"), &t, &broker, "unused");
    wait_until("the server answers", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&addr).is_ok()
    });

    let report = stress::run(&StressOptions {
        url: format!("http://{addr}"),
        orders: 1000,
        concurrency: 16,
        timeout: Duration::from_secs(120),
        database_url: t.url.clone(),
        progress: false,
    })
    .expect("the stress run completes");
    println!("{report}");
    assert!(report.verified(), "verification failed:\n{report}");
    assert_eq!(
        t.count("SELECT count(*) FROM orders WHERE status = 'COMPLETED'"),
        1000
    );
    assert_eq!(t.count("SELECT count(*) FROM processed_messages"), 1000);
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 0);
}

#[test]
fn every_binary_documents_its_settings() {
    for (binary, setting) in [
        (env!("CARGO_BIN_EXE_txoutbox-server"), "RELAY_WORKERS"),
        (env!("CARGO_BIN_EXE_txoutbox-consumer"), "CONSUMER_PREFETCH"),
        (env!("CARGO_BIN_EXE_txoutbox-stress"), "--concurrency"),
    ] {
        let output = Command::new(binary).arg("--help").output().expect("runs");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{binary} --help failed");
        assert!(
            text.contains(setting) && text.contains("default"),
            "{binary} --help: {text}"
        );
    }
}
