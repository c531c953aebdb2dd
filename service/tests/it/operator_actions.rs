//! Operator actions: retry failed events (one, all) and replay dead letters, over HTTP and from
//! the status page's buttons in headless Chromium (driven through chromedriver's WebDriver
//! API), with and without the API token.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use txoutbox::{relay, RelayConfig};
use txoutbox_service::http::{self, BrokerAccess, HttpHandle};
use txoutbox_service::orders::Announce;
use txoutbox_service::{HttpConfig, Secret};
use txoutbox_testkit::{http_raw, wait_until, HttpReply, TestBroker, TestDb};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "operator-secret-7f3a";

fn serve(t: &TestDb, broker: Option<&TestBroker>, relay: Option<&relay::RelayHandle>) -> HttpHandle {
    let config = HttpConfig {
        addr: "127.0.0.1:0".into(),
        threads: 4,
        api_token: Some(Secret::new(TOKEN.to_string())),
        ..HttpConfig::default()
    };
    let access = broker.map(|b| BrokerAccess {
        amqp_url: b.url.clone(),
        topology: b.topology.clone(),
    });
    let announce = match relay {
        Some(relay) => Announce::Wake(relay.waker()),
        None => Announce::Notify,
    };
    http::serve_with(&config, t.db.clone(), announce, relay.map(|r| r.health()), access).unwrap()
}

/// Writes an event the relay gave up on (failed after 10 attempts); returns its outbox id.
fn failed_event(t: &TestDb, aggregate: &str) -> i64 {
    t.client()
        .query_one(
            "INSERT INTO outbox (message_id, aggregate_type, aggregate_id, event_type, payload,
                                 attempts, last_error, failed_at)
             VALUES (gen_random_uuid(), 'order', $1, 'OrderCreated', '{\"n\": 1}', 10,
                     'unroutable: <b>no queue</b>', now())
             RETURNING id",
            &[&aggregate],
        )
        .unwrap()
        .get(0)
}

fn is_failed(t: &TestDb, id: i64) -> bool {
    t.count(&format!(
        "SELECT count(*) FROM outbox WHERE id = {id} AND failed_at IS NOT NULL"
    )) == 1
}

fn post(addr: SocketAddr, path: &str, token: Option<&str>) -> HttpReply {
    let auth = token.map_or(String::new(), |t| format!("\r\nAuthorization: Bearer {t}"));
    http_raw(
        addr,
        &format!("POST {path} HTTP/1.1\r\nContent-Length: 0{auth}"),
        b"",
    )
}

fn status_json(addr: SocketAddr) -> Value {
    http_raw(addr, "GET /status.json HTTP/1.1", b"").body
}

/// Puts one message straight into the dead-letter queue, as the consumer would.
fn dead_letter(broker: &TestBroker, message_id: &str) {
    let (connection, channel) = txoutbox::broker::connect(&broker.url).unwrap();
    let properties = amiquip::AmqpProperties::default()
        .with_message_id(message_id.to_string())
        .with_type_("OrderCreated".to_string());
    channel
        .basic_publish(
            "",
            amiquip::Publish::with_properties(b"{}", broker.topology.dead_letter_queue(), properties),
        )
        .unwrap();
    let _ = channel.close();
    let _ = connection.close();
}

#[test]
fn operator_actions_need_the_token_and_call_the_library() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let server = serve(&t, Some(&broker), None);
    let addr = server.addr();
    let (one, other) = (failed_event(&t, "a"), failed_event(&t, "b"));

    for path in [
        "/failed-events/retry",
        &format!("/failed-events/{one}/retry"),
        "/dead-letters/replay",
    ] {
        let reply = post(addr, path, None);
        assert_eq!(reply.status, 401, "{path}: {:?}", reply.body);
        assert_eq!(reply.header("WWW-Authenticate"), Some("Bearer"));
        assert_eq!(
            post(addr, path, Some("wrong")).status,
            401,
            "{path} with a wrong token"
        );
    }
    assert!(
        is_failed(&t, one) && is_failed(&t, other),
        "a refused action changes nothing"
    );

    // The page lists both, with their reason, attempts and age, and says the token is needed.
    let status = status_json(addr);
    assert_eq!(status["auth_required"], true);
    let listed: Vec<i64> = status["failed_events"]
        .as_array()
        .expect("failed_events")
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(listed, vec![one, other]);
    assert_eq!(status["failed_events"][0]["attempts"], 10);
    assert_eq!(
        status["failed_events"][0]["last_error"],
        "unroutable: <b>no queue</b>"
    );
    assert!(status["failed_events"][0]["age_secs"].as_f64().is_some());

    let reply = post(addr, &format!("/failed-events/{one}/retry"), Some(TOKEN));
    assert_eq!((reply.status, &reply.body), (200, &json!({ "requeued": 1 })));
    assert!(
        !is_failed(&t, one) && is_failed(&t, other),
        "only the one asked for"
    );
    let reply = post(addr, &format!("/failed-events/{one}/retry"), Some(TOKEN));
    assert_eq!(reply.status, 404, "no longer failed: {:?}", reply.body);
    assert_eq!(post(addr, "/failed-events/x1/retry", Some(TOKEN)).status, 400);
    let reply = post(addr, "/failed-events/retry", Some(TOKEN));
    assert_eq!((reply.status, &reply.body), (200, &json!({ "requeued": 1 })));
    assert_eq!(
        t.count("SELECT count(*) FROM outbox WHERE failed_at IS NOT NULL"),
        0
    );
    let listed = status_json(addr)["failed_events"].as_array().map(Vec::len);
    assert_eq!(
        listed,
        Some(0),
        "the page's figures are read again after an action"
    );

    let message_id = Uuid::new_v4().to_string();
    dead_letter(&broker, &message_id);
    wait_until("the page shows one dead letter", WAIT, || {
        status_json(addr)["dead_letters"]["depth"] == 1
    });
    let reply = post(addr, "/dead-letters/replay", Some(TOKEN));
    assert_eq!(
        (reply.status, &reply.body),
        (200, &json!({ "replayed": 1, "limit": 1000 }))
    );
    assert_eq!(status_json(addr)["dead_letters"]["depth"], 0);
    let back = broker.drain(&broker.topology.queue);
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].message_id.as_deref(), Some(message_id.as_str()));
}

#[test]
fn replay_says_why_when_the_server_has_no_broker_access() {
    let t = TestDb::new();
    let server = serve(&t, None, None);
    let reply = post(server.addr(), "/dead-letters/replay", Some(TOKEN));
    assert_eq!(reply.status, 503, "{:?}", reply.body);
    assert!(reply.body["error"]
        .as_str()
        .unwrap_or("")
        .contains("without access to RabbitMQ"));
    assert_eq!(status_json(server.addr())["dead_letters"], Value::Null);
}

/// A chromedriver process on a free port, killed when dropped.
struct ChromeDriver {
    child: Child,
    addr: SocketAddr,
}

impl ChromeDriver {
    fn start() -> ChromeDriver {
        let binary = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "this test drives Chromium through `{binary}`, which does not run ({e}): install \
                     it with `apt-get install -y chromium chromium-driver` (Debian; CI's .ci/run \
                     does), or point CHROMEDRIVER at a binary"
                )
            });
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let driver = ChromeDriver { child, addr };
        wait_until("chromedriver answers", WAIT, || {
            std::net::TcpStream::connect(addr).is_ok()
        });
        driver
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let request = ureq::request(method, &format!("http://{}{path}", self.addr)).timeout(WAIT);
        let reply = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        match reply {
            Ok(reply) => reply.into_json::<Value>().expect("WebDriver answers JSON")["value"].clone(),
            Err(ureq::Error::Status(code, reply)) => {
                panic!(
                    "WebDriver {method} {path}: {code} {}",
                    reply.into_string().unwrap_or_default()
                )
            }
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        }
    }

    /// A headless Chromium session.
    fn session(&self) -> Session<'_> {
        let profile = std::env::temp_dir().join(format!("txo-webdriver-{}", Uuid::new_v4().simple()));
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--no-first-run", format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let created = self.call("POST", "/session", Some(capabilities));
        let id = created["sessionId"].as_str().expect("a session id").to_string();
        Session {
            driver: self,
            id,
            profile,
        }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser, closed when dropped.
struct Session<'a> {
    driver: &'a ChromeDriver,
    id: String,
    profile: std::path::PathBuf,
}

impl Session<'_> {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.driver
            .call(method, &format!("/session/{}{path}", self.id), body)
    }

    fn open(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs `script` in the page and returns what it returns.
    fn eval(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    fn element(&self, css: &str) -> String {
        let found = self.call(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        );
        found["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_string()
    }

    fn click(&self, css: &str) {
        let element = self.element(css);
        self.call("POST", &format!("/element/{element}/click"), Some(json!({})));
    }

    fn type_into(&self, css: &str, text: &str) {
        let element = self.element(css);
        self.call(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        );
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let url = format!("http://{}/session/{}", self.driver.addr, self.id);
        let _ = ureq::delete(&url).timeout(WAIT).call();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

#[test]
fn a_click_on_the_status_page_retries_a_failed_event_once_the_token_is_given() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        RelayConfig {
            workers: 1,
            poll_interval: Duration::from_millis(200),
            ..RelayConfig::default()
        },
    )
    .unwrap();
    let server = serve(&t, Some(&broker), Some(&relay));
    let id = failed_event(&t, "clicked");
    let driver = ChromeDriver::start();
    let browser = driver.session();
    browser.open(&format!("http://{}/", server.addr()));
    let row = format!("document.querySelector('#failed-events tr[data-id=\"{id}\"]') !== null");
    wait_until("the page lists the failed event", WAIT, || {
        browser.eval(&format!("return {row};")) == true
    });
    let reason = browser.eval(&format!(
        "return document.querySelector('#failed-events tr[data-id=\"{id}\"] td.reason').textContent;"
    ));
    assert_eq!(reason, "unroutable: <b>no queue</b>", "shown as text, not markup");
    let token_box = browser.eval("return getComputedStyle(document.getElementById('token-box')).display;");
    assert_ne!(
        token_box, "none",
        "the page asks for the token, which the server needs"
    );

    // Without the token: refused, and the page says what to do.
    browser.click(&format!("#retry-{id}"));
    let result = "return document.getElementById('action-result').getAttribute('data-status');";
    wait_until("the page shows the refusal", WAIT, || {
        browser.eval(result) == "401"
    });
    let said = browser.eval("return document.getElementById('action-result').textContent;");
    assert!(said.as_str().unwrap_or("").contains("API token"), "{said}");
    assert!(is_failed(&t, id), "a refused click changes nothing");

    browser.type_into("#api-token", TOKEN);
    browser.click(&format!("#retry-{id}"));
    wait_until("the retried event is published", WAIT, || {
        t.count(&format!("SELECT count(*) FROM outbox WHERE id = {id}")) == 0
    });
    wait_until("the page no longer lists it", WAIT, || {
        browser.eval(&format!("return {row};")) == false
    });
    assert_eq!(browser.eval(result), "200");
    wait_until("the event is in the queue", WAIT, || broker.ready_main() == 1);
    drop(browser);
    server.stop();
    relay.stop();
}
