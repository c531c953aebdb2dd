//! The real binaries as processes: orders over HTTP, the relay, the consumer, verified the way
//! `make stress` verifies.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use txoutbox_harness::stress::{self, StressOptions};
use txoutbox_testkit::{
    amqp_url, base_database_url, stall_a_body, url_with_database, wait_until, workspace_binary, TestBroker,
    TestDb,
};

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
    spawn_with(binary, t, broker, http_addr, &[])
}

/// Starts the server binary on a free port and waits until it accepts connections.
fn start_server(t: &TestDb, broker: &TestBroker) -> (Process, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let server = spawn(&workspace_binary("txoutbox-server"), t, broker, &addr);
    wait_until("the server answers", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&addr).is_ok()
    });
    (server, addr)
}

/// [`spawn`] with `extra` settings on top (they win over the defaults).
fn spawn_with(
    binary: &str,
    t: &TestDb,
    broker: &TestBroker,
    http_addr: &str,
    extra: &[(&str, &str)],
) -> Process {
    let child = Command::new(binary)
        .env("DATABASE_URL", &t.url)
        .env("AMQP_URL", amqp_url())
        .env("AMQP_EXCHANGE", &broker.topology.exchange)
        .env("AMQP_QUEUE", &broker.topology.queue)
        .env("HTTP_ADDR", http_addr)
        .env("HTTP_THREADS", "8")
        // Tests run side by side: each consumer's metrics listener takes a port of its own.
        .env("CONSUMER_METRICS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .envs(extra.iter().copied())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
    Process(child)
}

#[test]
fn orders_over_http_are_all_completed_exactly_once_by_the_real_binaries() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let (_server, addr) = start_server(&t, &broker);
    let _consumer = spawn(&workspace_binary("txoutbox-consumer"), &t, &broker, "unused");

    let report = stress::run(&StressOptions {
        url: format!("http://{addr}"),
        orders: 1000,
        concurrency: 16,
        timeout: Duration::from_secs(120),
        database_url: t.url.clone(),
        progress: false,
        ..StressOptions::default()
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

/// The server's database refuses connections for 2.5 s and the server's sessions are ended
/// under the load: POSTs get 503 (or lose their connection), `txoutbox-stress` sends them
/// again under their `Idempotency-Key`, and no retry makes a second order.
#[test]
fn stress_retries_through_a_database_cut_without_a_second_order() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let addr = format!("127.0.0.1:{}", free_port());
    // Named, so that only its sessions are ended (stress's own stays to verify).
    let separator = if t.url.contains('?') { '&' } else { '?' };
    let server_url = format!("{}{separator}application_name=e2e-server", t.url);
    let _server = spawn_with(
        &workspace_binary("txoutbox-server"),
        &t,
        &broker,
        &addr,
        &[("DATABASE_URL", &server_url)],
    );
    wait_until("the server answers", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&addr).is_ok()
    });
    let _consumer = spawn(&workspace_binary("txoutbox-consumer"), &t, &broker, "unused");
    let url = format!("http://{addr}");
    let database_url = t.url.clone();
    let load = std::thread::spawn(move || {
        stress::run(&StressOptions {
            url,
            orders: 3000,
            concurrency: 8,
            timeout: Duration::from_secs(90),
            database_url,
            progress: false,
            retries: 6,
        })
    });
    wait_until("orders are flowing", Duration::from_secs(30), || {
        t.count("SELECT count(*) FROM orders") > 200
    });
    let mut admin = postgres::Client::connect(
        &url_with_database(&base_database_url(), "postgres"),
        postgres::NoTls,
    )
    .expect("the maintenance database");
    let allow = |allow: bool| format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {allow}", t.name);
    admin.batch_execute(&allow(false)).expect("refuse connections");
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = 'e2e-server'",
            &[&t.name],
        )
        .expect("terminate the sessions");
    std::thread::sleep(Duration::from_millis(2500));
    admin.batch_execute(&allow(true)).expect("allow connections");

    let report = load.join().expect("the load thread").expect("the stress run");
    println!("{report}");
    assert!(report.verified(), "verification failed:\n{report}");
    assert!(report.retries > 0, "the cut made no POST fail:\n{report}");
    assert_eq!(
        t.count("SELECT count(*) FROM orders") as usize,
        report.accepted,
        "a retry created a second order"
    );
}

#[test]
fn the_consumer_purges_dedupe_rows_older_than_its_retention() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    t.client()
        .batch_execute(
            "INSERT INTO processed_messages (message_id, event_type, aggregate_id, processed_at)
             SELECT gen_random_uuid(), 'OrderCreated', n::text, now() - n * interval '1 day'
             FROM generate_series(1, 5) n",
        )
        .unwrap();
    let _consumer = spawn_with(
        &workspace_binary("txoutbox-consumer"),
        &t,
        &broker,
        "unused",
        &[("PROCESSED_RETENTION", "3d"), ("RETENTION_INTERVAL", "1s")],
    );
    wait_until(
        "rows older than 3 days are purged",
        Duration::from_secs(30),
        || t.count("SELECT count(*) FROM processed_messages") == 2,
    );
    assert_eq!(
        t.count("SELECT count(*) FROM processed_messages WHERE processed_at > now() - interval '3 days'"),
        2
    );

    let refused = Command::new(workspace_binary("txoutbox-consumer"))
        .env("DATABASE_URL", &t.url)
        .env("PROCESSED_RETENTION", "a week")
        .output()
        .expect("the consumer runs");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("PROCESSED_RETENTION"), "{stderr}");
}

#[test]
fn every_binary_documents_its_settings() {
    for (binary, setting) in [
        (workspace_binary("txoutbox-server"), "RELAY_WORKERS"),
        (workspace_binary("txoutbox-consumer"), "CONSUMER_PREFETCH"),
        (workspace_binary("txoutbox-consumer"), "CONSUMER_METRICS_ADDR"),
        (env!("CARGO_BIN_EXE_txoutbox-stress").to_string(), "--concurrency"),
    ] {
        let output = Command::new(&binary).arg("--help").output().expect("runs");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{binary} --help failed");
        assert!(
            text.contains(setting) && text.contains("default"),
            "{binary} --help: {text}"
        );
    }
}

#[test]
fn passwords_never_reach_the_logs_or_error_messages() {
    let t = TestDb::new();
    let secret_db = "DbPassw0rdNeverLogged";
    let secret_amqp = "AmqpPassw0rdNeverLogged";
    let unreachable_db = format!("postgres://postgres:{secret_db}@127.0.0.1:1/nowhere");
    let output = Command::new(workspace_binary("txoutbox-server"))
        .env("DATABASE_URL", &unreachable_db)
        .env("RUST_LOG", "debug")
        .output()
        .expect("runs");
    assert!(
        !output.status.success(),
        "an unreachable database must fail the start"
    );
    let text = String::from_utf8_lossy(&output.stderr).to_string() + &String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("127.0.0.1:1"),
        "the error should say where it tried: {text}"
    );
    assert!(!text.contains(secret_db), "password in the output: {text}");

    // A reachable database (trust auth ignores the password) and an unreachable broker: the
    // relay logs its reconnect attempts.
    let db_url = t.url.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{secret_db}@"),
        1,
    );
    let http_addr = format!("127.0.0.1:{}", free_port());
    let mut server = Command::new(workspace_binary("txoutbox-server"))
        .env("DATABASE_URL", &db_url)
        // An unresolvable host: amiquip's error then prints the whole URL it was given.
        .env(
            "AMQP_URL",
            format!("amqp://guest:{secret_amqp}@no-such-host.invalid:5672/%2f"),
        )
        .env("HTTP_ADDR", &http_addr)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    let stderr = server.stderr.take().expect("piped");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let collected = seen.clone();
    let reader = std::thread::spawn(move || {
        use std::io::{BufRead, BufReader};
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut all = collected.lock().unwrap();
            all.push_str(&line);
            all.push('\n');
        }
    });
    wait_until(
        "the relay reports the broker failure",
        Duration::from_secs(30),
        || seen.lock().unwrap().contains("relay[4]"),
    );
    // With the broker away the server is alive but not ready, and says why.
    wait_until("the API answers", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&http_addr).is_ok()
    });
    let ready = txoutbox_testkit::http_raw(http_addr.parse().unwrap(), "GET /readyz HTTP/1.1", b"");
    assert_eq!(ready.status, 503, "{:?}", ready.body);
    assert!(
        ready.body["error"]
            .as_str()
            .is_some_and(|e| e.contains("RabbitMQ")),
        "{:?}",
        ready.body
    );
    let _ = server.kill();
    let _ = server.wait();
    let _ = reader.join();
    let text = seen.lock().unwrap().clone();
    assert!(
        text.contains("RabbitMQ"),
        "the relay should report the broker failure: {text}"
    );
    assert!(
        !text.contains(secret_amqp) && !text.contains(secret_db),
        "password in the logs: {text}"
    );
}

#[test]
fn the_server_accepts_again_after_running_out_of_file_descriptors() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new("prlimit")
        .arg("--nofile=200")
        .arg(workspace_binary("txoutbox-server"))
        .env("DATABASE_URL", &t.url)
        .env("AMQP_URL", amqp_url())
        .env("AMQP_EXCHANGE", &broker.topology.exchange)
        .env("AMQP_QUEUE", &broker.topology.queue)
        .env("HTTP_ADDR", &addr)
        .env("HTTP_THREADS", "2")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prlimit runs the server");
    let _server = Process(child);
    let answers = |addr: &str| {
        use std::io::{Read, Write};
        let Ok(addr) = addr.parse() else { return false };
        let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let request =
            "GET /orders/00000000-0000-0000-0000-000000000000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let mut reply = String::new();
        stream.write_all(request.as_bytes()).is_ok()
            && stream.read_to_string(&mut reply).is_ok()
            && reply.starts_with("HTTP/1.1 404")
    };
    wait_until("the server answers", Duration::from_secs(30), || answers(&addr));

    // Idle connections until the server has no descriptor left to accept with.
    let target: std::net::SocketAddr = addr.parse().unwrap();
    let hoard: Vec<_> = (0..300)
        .map_while(|_| std::net::TcpStream::connect_timeout(&target, Duration::from_millis(500)).ok())
        .collect();
    assert!(
        !answers(&addr),
        "with every descriptor taken the server should not answer"
    );
    drop(hoard);
    wait_until("the server answers again", Duration::from_secs(30), || {
        answers(&addr)
    });
}

#[test]
fn a_request_stalled_mid_body_does_not_hold_up_a_sigterm() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let (mut server, addr) = start_server(&t, &broker);
    let _stalled = stall_a_body(&addr);
    let (took, clean) = signal_and_wait(&mut server, "-TERM");
    assert!(
        clean && took < Duration::from_secs(10),
        "exit 0 within 10 s despite the stalled request, took {took:?}"
    );
}

#[test]
fn a_second_signal_exits_at_once() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let (mut server, addr) = start_server(&t, &broker);
    // A request in hand keeps the first shutdown waiting (up to its grace of 8 s): an order
    // whose insert waits on a lock this test holds. (A stalled body no longer does: it never
    // reaches a handler.)
    let mut locker = t.client();
    let mut lock = locker.transaction().unwrap();
    lock.batch_execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let poster = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let _ = txoutbox_testkit::post_order(
                addr.parse().unwrap(),
                r#"{"user_id":"5b0c7b52-8d0c-4d53-9a55-1f5b1d0f4e0a","amount":"1.00"}"#,
            );
        })
    };
    wait_until("the order waits on the lock", Duration::from_secs(10), || {
        t.count("SELECT count(*) FROM pg_locks WHERE NOT granted") > 0
    });
    let pid = server.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        server.0.try_wait().expect("wait").is_none(),
        "the first signal should wait for the request in hand"
    );
    let (took, clean) = signal_and_wait(&mut server, "-INT");
    assert!(
        !clean && took < Duration::from_secs(2),
        "the second signal should end the process at once with a failure status, took {took:?}"
    );
    drop(lock);
    let _ = poster.join();
}

/// Sends `signal` to the child and returns how long it took to exit, and whether it exited 0.
fn signal_and_wait(process: &mut Process, signal: &str) -> (Duration, bool) {
    let started = std::time::Instant::now();
    let pid = process.0.id().to_string();
    let sent = Command::new("kill")
        .args([signal, &pid])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    loop {
        if let Some(status) = process.0.try_wait().expect("wait") {
            return (started.elapsed(), status.success());
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no exit 30 s after {signal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_under_load_stops_both_binaries_cleanly_and_loses_nothing() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let (mut server, addr) = start_server(&t, &broker);
    let mut consumer = spawn(&workspace_binary("txoutbox-consumer"), &t, &broker, "unused");

    let url = format!("http://{addr}");
    let database_url = t.url.clone();
    let load = std::thread::spawn(move || {
        stress::run(&StressOptions {
            url,
            orders: 3000,
            concurrency: 8,
            timeout: Duration::from_secs(5),
            database_url,
            progress: false,
            ..StressOptions::default()
        })
    });
    wait_until("orders are flowing", Duration::from_secs(30), || {
        t.count("SELECT count(*) FROM orders WHERE status = 'COMPLETED'") > 100
    });
    let (took, clean) = signal_and_wait(&mut consumer, "-TERM");
    assert!(
        clean && took < Duration::from_secs(10),
        "consumer: exit 0 within 10 s, took {took:?}"
    );
    let (took, clean) = signal_and_wait(&mut server, "-TERM");
    assert!(
        clean && took < Duration::from_secs(10),
        "server: exit 0 within 10 s, took {took:?}"
    );
    let _ = load.join();

    // Everything answered 201 before the stop is still delivered once the binaries are back.
    let accepted = t.count("SELECT count(*) FROM orders");
    assert!(accepted > 100);
    let _server = spawn(&workspace_binary("txoutbox-server"), &t, &broker, &addr);
    let _consumer = spawn(&workspace_binary("txoutbox-consumer"), &t, &broker, "unused");
    wait_until("every order is completed", Duration::from_secs(60), || {
        t.count("SELECT count(*) FROM orders WHERE status = 'COMPLETED'") == accepted
    });
    assert_eq!(
        t.count("SELECT count(*) FROM processed_messages"),
        accepted,
        "one processed row per order"
    );
    wait_until("the outbox is empty", Duration::from_secs(60), || {
        t.count("SELECT count(*) FROM outbox") == 0
    });
}

/// A SIGTERM that arrives while the server is still starting is a clean shutdown, not the
/// default action's kill: the handlers are installed before anything else.
#[test]
fn a_sigterm_during_startup_is_a_clean_shutdown() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut server = spawn(&workspace_binary("txoutbox-server"), &t, &broker, &addr);
    std::thread::sleep(Duration::from_millis(20));
    let (took, clean) = signal_and_wait(&mut server, "-TERM");
    assert!(
        clean && took < Duration::from_secs(15),
        "exit 0 after an early SIGTERM, took {took:?}"
    );
}
