//! The status page at `GET /`, rendered by headless Chromium: after its script ran, the page
//! shows the orders by status, the outbox backlog and failures, and a chart of events/s; with
//! the database out of reach it still answers and says why. Screenshots go to
//! target/screenshots/.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use txoutbox::{relay, PoolOptions, RelayConfig};
use txoutbox_service::orders::Announce;
use txoutbox_service::{http, HttpConfig};
use txoutbox_testkit::{http_raw, post_order, wait_until, TestBroker, TestDb};
use uuid::Uuid;

const USER: &str = "5b0c7b52-8d0c-4d53-9a55-1f5b1d0f4e0a";

/// The Chromium binary: `CHROMIUM` if set, else `chromium` on the PATH. Fails the test when
/// there is none: the page must be checked in a browser, not skipped.
fn chromium() -> String {
    let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let found = Command::new(&binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "headless Chromium is needed for this test and `{binary}` does not run: install it with \
         `apt-get install -y chromium` (Debian; CI's .ci/run does), or point CHROMIUM at a binary"
    );
    binary
}

/// Runs headless Chromium on `url` with `args`, killing it if it takes longer than a minute;
/// returns its standard output.
fn run_chromium(url: &str, args: &[&str]) -> String {
    let profile = std::env::temp_dir().join(format!("txo-chromium-{}", Uuid::new_v4().simple()));
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1200,900",
            // Lets the page's script fetch and render before the DOM or the picture is taken.
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut { stdout }, &mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 60 s on {url}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap_or_default();
    let _ = std::fs::remove_dir_all(&profile);
    assert!(status.success(), "chromium failed on {url}: {status}");
    out
}

/// The DOM after the page's script ran.
fn rendered_dom(url: &str) -> String {
    run_chromium(url, &["--dump-dom"])
}

/// Takes a screenshot into target/screenshots/<name>.png and prints where it is.
fn screenshot(url: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&dir).expect("create target/screenshots");
    let path = dir.join(format!("{name}.png"));
    let _ = std::fs::remove_file(&path);
    run_chromium(url, &[&format!("--screenshot={}", path.display())]);
    let png = std::fs::read(&path).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", path.display()));
    assert!(png.starts_with(b"\x89PNG"), "{} is not a PNG", path.display());
    println!("screenshot of the status page: {}", path.display());
    path
}

/// The text inside the element with this id (up to its first child tag).
fn text_of(dom: &str, id: &str) -> String {
    let marker = format!("id=\"{id}\"");
    let at = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no element #{id} in the rendered page"));
    let rest = &dom[at..];
    let start = rest.find('>').map_or(rest.len(), |i| i + 1);
    let end = rest[start..].find('<').map_or(rest.len(), |i| start + i);
    rest[start..end].trim().to_string()
}

/// The value of `attribute` on the element with this id.
fn attribute_of(dom: &str, id: &str, attribute: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the rendered page"));
    let tag_start = dom[..at].rfind('<').unwrap_or(0);
    let tag_end = at + dom[at..].find('>').unwrap_or(0);
    let tag = &dom[tag_start..tag_end];
    let key = format!("{attribute}=\"");
    let value_at = tag
        .find(&key)
        .unwrap_or_else(|| panic!("#{id} has no {attribute} in {tag}"))
        + key.len();
    tag[value_at..].split('"').next().unwrap_or_default().to_string()
}

#[test]
fn the_status_page_shows_orders_outbox_and_a_rate_chart_in_a_browser() {
    chromium();
    let t = TestDb::new();
    let broker = TestBroker::new();
    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        RelayConfig {
            workers: 2,
            ..RelayConfig::default()
        },
    )
    .unwrap();
    let config = HttpConfig {
        addr: "127.0.0.1:0".into(),
        threads: 4,
        ..HttpConfig::default()
    };
    let server = http::serve_with_relay(
        &config,
        t.db.clone(),
        Announce::Wake(relay.waker()),
        Some(relay.health()),
    )
    .unwrap();
    let addr = server.addr();

    // Six orders: three stay PENDING, two COMPLETED, one CANCELLED.
    let mut ids = Vec::new();
    for n in 1..=6 {
        let reply = post_order(addr, &format!(r#"{{"user_id":"{USER}","amount":"{n}.00"}}"#));
        assert_eq!(reply.status, 201, "{:?}", reply.body);
        ids.push(Uuid::parse_str(reply.body["id"].as_str().unwrap()).unwrap());
    }
    let mut client = t.client();
    client
        .execute(
            "UPDATE orders SET status = 'COMPLETED' WHERE id = ANY($1)",
            &[&ids[..2].to_vec()],
        )
        .unwrap();
    client
        .execute("UPDATE orders SET status = 'CANCELLED' WHERE id = $1", &[&ids[2]])
        .unwrap();
    wait_until(
        "the relay published the six events",
        Duration::from_secs(20),
        || relay.stats().published() >= 6,
    );
    wait_until(
        "both relay workers are connected",
        Duration::from_secs(20),
        || relay.health().connected_workers() == 2,
    );
    // A backlog the relay leaves alone: one event waiting for a retry, 90 s old, and one failed.
    client
        .batch_execute(
            "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, payload,
                                 created_at, available_at)
             VALUES (gen_random_uuid(), 'order', 'a', 'OrderCreated', '{}',
                     now() - interval '90 seconds', now() + interval '1 hour');
             INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, payload,
                                 attempts, failed_at)
             VALUES (gen_random_uuid(), 'order', 'b', 'OrderCreated', '{}', 10, now());",
        )
        .unwrap();
    // The sampler needs a sample after the publishing to show a rate above zero, and a line
    // needs two points.
    wait_until(
        "status.json has two rates, one above zero",
        Duration::from_secs(10),
        || {
            let reply = http_raw(addr, "GET /status.json HTTP/1.1", b"");
            reply.body["events_per_sec"]["rates"]
                .as_array()
                .is_some_and(|rates| {
                    rates.len() >= 2 && rates.iter().any(|r| r.as_f64().unwrap_or(0.0) > 0.0)
                })
                && reply.body["outbox"]["backlog"] == 1
        },
    );

    let url = format!("http://{addr}/");
    let dom = rendered_dom(&url);
    assert_eq!(
        attribute_of(&dom, "page", "data-loaded"),
        "true",
        "the script rendered the figures"
    );
    assert_eq!(text_of(&dom, "orders-pending"), "3");
    assert_eq!(text_of(&dom, "orders-completed"), "2");
    assert_eq!(text_of(&dom, "orders-cancelled"), "1");
    assert_eq!(text_of(&dom, "backlog"), "1");
    assert_eq!(text_of(&dom, "failed"), "1");
    let oldest = text_of(&dom, "oldest-age");
    let seconds: u64 = oldest.trim_end_matches(" s").parse().unwrap_or(0);
    assert!((90..120).contains(&seconds), "oldest waiting shows {oldest:?}");
    assert_eq!(text_of(&dom, "published-total"), "6");
    assert_eq!(text_of(&dom, "relay-workers"), "2 / 2");
    let points: usize = attribute_of(&dom, "rate-line", "data-points")
        .parse()
        .unwrap_or(0);
    assert!(points >= 2, "the chart has {points} data points");
    let drawn = attribute_of(&dom, "rate-line", "points");
    assert_eq!(
        drawn.split(' ').count(),
        points,
        "one vertex per data point: {drawn:?}"
    );
    assert_eq!(text_of(&dom, "error"), "", "no error shown");

    screenshot(&url, "status-page");
    server.stop();
    relay.stop();
}

#[test]
fn the_status_page_answers_and_says_why_when_the_database_is_out_of_reach() {
    chromium();
    let t = TestDb::with_pool(PoolOptions {
        max_size: 2,
        checkout_timeout: Duration::from_millis(300),
        ..PoolOptions::default()
    });
    let config = HttpConfig {
        addr: "127.0.0.1:0".into(),
        threads: 4,
        ..HttpConfig::default()
    };
    let server = http::serve(&config, t.db.clone(), Announce::Notify).unwrap();
    let held: Vec<_> = (0..2).map(|_| t.db.get().unwrap()).collect();

    let url = format!("http://{}/", server.addr());
    let dom = rendered_dom(&url);
    assert_eq!(attribute_of(&dom, "page", "data-loaded"), "true");
    let error = text_of(&dom, "error");
    assert!(error.starts_with("Database: "), "error banner shows {error:?}");
    assert_eq!(text_of(&dom, "orders-pending"), "?");
    assert_eq!(text_of(&dom, "backlog"), "?");
    assert_eq!(text_of(&dom, "published-total"), "n/a", "no relay in this server");
    assert!(text_of(&dom, "chart-note").contains("No relay"));

    screenshot(&url, "status-page-database-down");
    drop(held);
    server.stop();
}
