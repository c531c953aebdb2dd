//! openapi.yaml against the real server: every response a real request gets has its status
//! documented for that path and method, and its JSON body validates against the documented
//! schema; every route the router has is documented, and every documented operation is routed.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use txoutbox::{relay, PoolOptions, RelayConfig};
use txoutbox_service::config::Secret;
use txoutbox_service::orders::Announce;
use txoutbox_service::{http, HttpConfig};
use txoutbox_testkit::{wait_until, TestBroker, TestDb};
use uuid::Uuid;

const DOCUMENT: &str = include_str!("../../openapi.yaml");
const ROUTER_SOURCE: &str = include_str!("../../src/http.rs");
const TOKEN: &str = "openapi-test-token";
const USER: &str = "5b0c7b52-8d0c-4d53-9a55-1f5b1d0f4e0a";

/// Keywords the validator below understands; a schema using any other fails the test rather
/// than being half-checked.
const KEYWORDS: &[&str] = &[
    "$ref",
    "type",
    "required",
    "properties",
    "additionalProperties",
    "enum",
    "format",
    "pattern",
    "items",
    "minimum",
    "description",
    "example",
];

/// A response as read off the wire, body kept as bytes.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// True for the router's answer to a path it has no route for.
    fn is_no_route(&self) -> bool {
        self.status == 404
            && self.json()["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("no route for"))
    }
}

/// Sends one request on a fresh connection and reads the whole response.
fn exchange(addr: SocketAddr, method: &str, path: &str, headers: &str, body: &[u8]) -> Raw {
    exchange_declaring(addr, method, path, headers, body, body.len())
}

/// Like [`exchange`], declaring a `Content-Length` of `declared` whatever the body's length:
/// more than it sends makes a body that stalls.
fn exchange_declaring(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
    declared: usize,
) -> Raw {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the test server");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}Content-Length: {declared}\r\n\r\n"
    )
    .into_bytes();
    request.extend_from_slice(body);
    let _ = stream.write_all(&request);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| {
        panic!(
            "{method} {path}: no complete response: {:?}",
            String::from_utf8_lossy(&raw)
        )
    });
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Raw {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// The parsed document and what it takes to check responses against it.
struct Spec {
    doc: Value,
}

impl Spec {
    fn load() -> Spec {
        let doc: Value = serde_norway::from_str(DOCUMENT).expect("openapi.yaml is valid YAML");
        assert!(
            doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
            "openapi.yaml must be OpenAPI 3.x"
        );
        Spec { doc }
    }

    /// Follows `$ref`s to the value they name.
    fn resolve<'a>(&'a self, mut value: &'a Value) -> &'a Value {
        for _ in 0..16 {
            let Some(reference) = value.get("$ref").and_then(Value::as_str) else {
                return value;
            };
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("only local $refs are supported, got {reference}"));
            value = self
                .doc
                .pointer(pointer)
                .unwrap_or_else(|| panic!("$ref {reference} names nothing in openapi.yaml"));
        }
        panic!("$ref chain too long at {value}")
    }

    /// The documented path template (with `{}` for parameters) matching a concrete path.
    fn template_of(&self, path: &str) -> Option<(String, &Value)> {
        let concrete: Vec<&str> = path.split('?').next().unwrap_or("").split('/').collect();
        let paths = self.doc["paths"].as_object().expect("paths");
        let matches = |template: &str| {
            let parts: Vec<&str> = template.split('/').collect();
            parts.len() == concrete.len()
                && parts
                    .iter()
                    .zip(&concrete)
                    .all(|(t, c)| t == c || (t.starts_with('{') && t.ends_with('}') && !c.is_empty()))
        };
        // A literal path wins over a template.
        paths
            .iter()
            .filter(|(t, _)| matches(t))
            .min_by_key(|(t, _)| t.matches('{').count())
            .map(|(t, item)| (normalize(t), item))
    }

    /// Checks one response against the document; the error says what does not match.
    fn check(&self, method: &str, path: &str, reply: &Raw) -> Result<(), String> {
        let what = format!("{method} {path} -> {}", reply.status);
        let (_, item) = self
            .template_of(path)
            .ok_or_else(|| format!("{what}: path not in openapi.yaml"))?;
        // A method the path does not document may only get that path's documented 405.
        let operation = match item.get(method.to_ascii_lowercase()) {
            Some(_) if reply.status == 405 => return Err(format!("{what}: 405 for a documented method")),
            Some(operation) => operation,
            None if reply.status == 405 => item
                .as_object()
                .and_then(|ops| ops.values().find(|v| v.get("responses").is_some()))
                .ok_or_else(|| format!("{what}: no operation documented"))?,
            None => return Err(format!("{what}: method not documented for this path")),
        };
        let response = operation["responses"]
            .get(reply.status.to_string())
            .map(|r| self.resolve(r))
            .ok_or_else(|| {
                format!(
                    "{what}: status not documented; body {:?}",
                    String::from_utf8_lossy(&reply.body)
                )
            })?;
        if let Some(headers) = response.get("headers").and_then(Value::as_object) {
            for (name, header) in headers {
                let header = self.resolve(header);
                match reply.header(name) {
                    None if header["required"] == json!(true) => {
                        return Err(format!("{what}: required header {name} missing"));
                    }
                    None => {}
                    Some(value) => self
                        .validate(&header["schema"], &json!(value), &format!("header {name}"))
                        .map_err(|e| format!("{what}: {e}"))?,
                }
            }
        }
        let content_type = reply.header("Content-Type").unwrap_or("");
        let media = content_type.split(';').next().unwrap_or("").trim();
        let content = response["content"]
            .as_object()
            .ok_or_else(|| format!("{what}: the document gives no content for a response with a body"))?;
        let documented = content
            .get(media)
            .ok_or_else(|| format!("{what}: content type {content_type:?} not documented"))?;
        if media == "application/json" {
            let body: Value =
                serde_json::from_slice(&reply.body).map_err(|e| format!("{what}: body is not JSON: {e}"))?;
            self.validate(&documented["schema"], &body, "body")
                .map_err(|e| format!("{what}: {e} in {body}"))?;
        }
        Ok(())
    }

    /// Validates `value` against `schema`, for the subset of JSON Schema in [`KEYWORDS`].
    fn validate(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema);
        let keywords = schema
            .as_object()
            .ok_or_else(|| format!("{at}: schema is not an object"))?;
        if let Some(unknown) = keywords.keys().find(|k| !KEYWORDS.contains(&k.as_str())) {
            return Err(format!(
                "{at}: schema keyword {unknown:?} is not supported by this test"
            ));
        }
        if let Some(types) = schema.get("type") {
            let allowed: Vec<&str> = match types {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                other => return Err(format!("{at}: bad type {other}")),
            };
            let actual = type_of(value);
            let ok = allowed
                .iter()
                .any(|t| *t == actual || (*t == "number" && actual == "integer"));
            if !ok {
                return Err(format!("{at}: {actual} where the document says {allowed:?}"));
            }
        }
        if value.is_null() {
            return Ok(());
        }
        if let Some(choices) = schema.get("enum").and_then(Value::as_array) {
            if !choices.contains(value) {
                return Err(format!("{at}: {value} is not one of {choices:?}"));
            }
        }
        if let (Some(text), Some(format)) = (value.as_str(), schema.get("format").and_then(Value::as_str)) {
            let ok = match format {
                "uuid" => Uuid::parse_str(text).is_ok(),
                "date-time" => {
                    regex::Regex::new(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
                        .unwrap()
                        .is_match(text)
                }
                other => return Err(format!("{at}: format {other:?} is not supported by this test")),
            };
            if !ok {
                return Err(format!("{at}: {text:?} is not a {format}"));
            }
        }
        if let (Some(text), Some(pattern)) = (value.as_str(), schema.get("pattern").and_then(Value::as_str)) {
            let re = regex::Regex::new(pattern).map_err(|e| format!("{at}: bad pattern: {e}"))?;
            if !re.is_match(text) {
                return Err(format!("{at}: {text:?} does not match {pattern}"));
            }
        }
        if let (Some(number), Some(minimum)) = (value.as_f64(), schema.get("minimum").and_then(Value::as_f64))
        {
            if number < minimum {
                return Err(format!("{at}: {number} is below the minimum {minimum}"));
            }
        }
        if let Some(object) = value.as_object() {
            let properties = schema.get("properties").and_then(Value::as_object);
            for name in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let name = name.as_str().unwrap_or_default();
                if !object.contains_key(name) {
                    return Err(format!("{at}: required property {name:?} missing"));
                }
            }
            for (name, field) in object {
                match properties.and_then(|p| p.get(name)) {
                    Some(property) => self.validate(property, field, &format!("{at}.{name}"))?,
                    None if schema.get("additionalProperties") == Some(&json!(false)) => {
                        return Err(format!("{at}: property {name:?} is not in the document"));
                    }
                    None => {}
                }
            }
        }
        if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
            for (index, item) in array.iter().enumerate() {
                self.validate(items, item, &format!("{at}[{index}]"))?;
            }
        }
        Ok(())
    }

    /// Every documented (path template, METHOD).
    fn operations(&self) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (path, item) in self.doc["paths"].as_object().expect("paths") {
            for method in ["get", "post", "put", "delete", "patch"] {
                if item.get(method).is_some() {
                    out.insert((normalize(path), method.to_ascii_uppercase()));
                }
            }
        }
        out
    }
}

fn type_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `/orders/{id}` -> `/orders/{}`.
fn normalize(template: &str) -> String {
    template
        .split('/')
        .map(|s| if s.starts_with('{') { "{}" } else { s })
        .collect::<Vec<_>>()
        .join("/")
}

/// The (path, METHOD) pairs the router in src/http.rs matches, e.g. `(["orders", id],
/// Method::Get)` -> `("/orders/{}", "GET")`.
fn router_routes() -> BTreeSet<(String, String)> {
    let arm = regex::Regex::new(r#"\(\[([^\]]*)\],\s*Method::(\w+)\)"#).unwrap();
    arm.captures_iter(ROUTER_SOURCE)
        .map(|c| {
            let segments: Vec<String> = c[1]
                .split(',')
                .map(|s| s.trim())
                .map(|s| match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                    Some(literal) => literal.to_string(),
                    None => "{}".to_string(),
                })
                .collect();
            let path = format!("/{}", segments.join("/"));
            (path, c[2].to_ascii_uppercase())
        })
        .collect()
}

/// Checks each response, remembering failures and what was covered.
struct Checker {
    spec: Spec,
    addr: SocketAddr,
    failures: Vec<String>,
    covered: BTreeSet<String>,
}

impl Checker {
    fn send(&mut self, method: &str, path: &str, headers: &str, body: &[u8]) -> Raw {
        let reply = exchange(self.addr, method, path, headers, body);
        self.record(method, path, reply)
    }

    /// Sends the headers and the start of a body that then stalls, and checks the answer.
    fn send_stalled(&mut self, method: &str, path: &str, headers: &str) -> Raw {
        let reply = exchange_declaring(self.addr, method, path, headers, b"{", 20_000);
        self.record(method, path, reply)
    }

    fn record(&mut self, method: &str, path: &str, reply: Raw) -> Raw {
        match self.spec.check(method, path, &reply) {
            Ok(()) => {
                let template = self.spec.template_of(path).map(|(t, _)| t).unwrap_or_default();
                self.covered
                    .insert(format!("{method} {template} {}", reply.status));
            }
            Err(e) => self.failures.push(e),
        }
        reply
    }

    /// Like [`send`](Self::send), and also that the status is `expected`.
    fn expect(&mut self, expected: u16, method: &str, path: &str, headers: &str, body: &[u8]) -> Raw {
        let reply = self.send(method, path, headers, body);
        if reply.status != expected {
            self.failures.push(format!(
                "{method} {path}: expected {expected}, got {} {:?}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            ));
        }
        reply
    }
}

const JSON: &str = "Content-Type: application/json\r\n";

fn auth_json() -> String {
    format!("{JSON}Authorization: Bearer {TOKEN}\r\n")
}

#[test]
fn real_responses_match_the_document() {
    let t = TestDb::with_pool(PoolOptions {
        max_size: 3,
        checkout_timeout: Duration::from_millis(300),
        ..PoolOptions::default()
    });
    let broker = TestBroker::new();
    let relay = relay::start(
        t.db.clone(),
        &broker.url,
        broker.topology.clone(),
        RelayConfig {
            workers: 1,
            ..RelayConfig::default()
        },
    )
    .unwrap();
    let config = HttpConfig {
        addr: "127.0.0.1:0".into(),
        threads: 4,
        api_token: Some(Secret::new(TOKEN)),
        idle_timeout: Duration::from_millis(500),
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
    wait_until("the relay is connected", Duration::from_secs(20), || {
        relay.health().check().is_ok()
    });
    let mut c = Checker {
        spec: Spec::load(),
        addr,
        failures: Vec::new(),
        covered: BTreeSet::new(),
    };
    let auth = auth_json();
    let order = |amount: &str| format!(r#"{{"user_id":"{USER}","amount":"{amount}"}}"#);

    // Pages and health.
    let page = c.expect(200, "GET", "/", "", b"");
    assert!(
        String::from_utf8_lossy(&page.body).contains("<html"),
        "GET / is the HTML page"
    );
    c.expect(405, "POST", "/", "", b"");
    let served = c.expect(200, "GET", "/openapi.yaml", "", b"");
    assert_eq!(
        served.body,
        DOCUMENT.as_bytes(),
        "GET /openapi.yaml serves this very file"
    );
    assert_eq!(served.header("Content-Type"), Some("application/yaml"));
    c.expect(405, "PUT", "/openapi.yaml", "", b"");
    c.expect(200, "GET", "/status.json", "", b"");
    c.expect(405, "POST", "/status.json", "", b"");
    c.expect(200, "GET", "/healthz", "", b"");
    c.expect(405, "POST", "/healthz", "", b"");
    c.expect(200, "GET", "/readyz", "", b"");
    c.expect(405, "DELETE", "/readyz", "", b"");

    // Orders.
    let created = c.expect(201, "POST", "/orders", &auth, order("12.50").as_bytes());
    let id = created.json()["id"].as_str().unwrap_or_default().to_string();
    c.expect(401, "POST", "/orders", JSON, order("1.00").as_bytes());
    c.expect(400, "POST", "/orders", &auth, b"{");
    let field = c.expect(400, "POST", "/orders", &auth, br#"{"amount":"1.00"}"#);
    assert_eq!(field.json()["field"], "user_id", "a field error names the field");
    c.expect(
        415,
        "POST",
        "/orders",
        &format!("Content-Type: text/plain\r\nAuthorization: Bearer {TOKEN}\r\n"),
        order("1.00").as_bytes(),
    );
    c.expect(413, "POST", "/orders", &auth, &vec![b' '; 100 * 1024]);
    let stalled = c.send_stalled("POST", "/orders", &auth);
    assert_eq!(stalled.status, 408, "a body that stalls past the idle timeout");
    let flood: String = (0..120).map(|n| format!("X-Flood-{n}: y\r\n")).collect();
    c.expect(
        431,
        "POST",
        "/orders",
        &format!("{auth}{flood}"),
        order("1.00").as_bytes(),
    );
    c.expect(405, "GET", "/orders", "", b"");
    c.expect(200, "GET", &format!("/orders/{id}"), "", b"");
    c.expect(404, "GET", &format!("/orders/{}", Uuid::new_v4()), "", b"");
    c.expect(404, "GET", "/orders/not-a-uuid", "", b"");
    c.expect(405, "DELETE", &format!("/orders/{id}"), "", b"");

    // Cancel.
    let to_cancel = c.expect(201, "POST", "/orders", &auth, order("3.00").as_bytes());
    let to_cancel = to_cancel.json()["id"].as_str().unwrap_or_default().to_string();
    let cancel = |id: &str| format!("/orders/{id}/cancel");
    let cancelled = c.expect(200, "POST", &cancel(&to_cancel), &auth, b"");
    assert_eq!(cancelled.json()["status"], "CANCELLED");
    c.expect(409, "POST", &cancel(&to_cancel), &auth, b"");
    c.expect(401, "POST", &cancel(&id), "", b"");
    c.expect(404, "POST", &cancel(&Uuid::new_v4().to_string()), &auth, b"");
    c.expect(400, "POST", &cancel("not-a-uuid"), &auth, b"");
    c.expect(405, "GET", &cancel(&id), "", b"");

    // Metrics.
    let metrics = c.expect(200, "GET", "/metrics", "", b"");
    assert!(
        String::from_utf8_lossy(&metrics.body).contains("txoutbox_orders_created_total"),
        "GET /metrics is the Prometheus text"
    );
    c.expect(405, "POST", "/metrics", "", b"");

    // The database out of reach: every connection of the pool is taken.
    let held: Vec<_> = (0..3).map(|_| t.db.get().unwrap()).collect();
    c.expect(503, "POST", "/orders", &auth, order("1.00").as_bytes());
    c.expect(503, "GET", &format!("/orders/{id}"), "", b"");
    c.expect(503, "GET", "/readyz", "", b"");
    let addr = c.addr;
    wait_until(
        "status.json reports the database error",
        Duration::from_secs(10),
        || {
            let reply = exchange(addr, "GET", "/status.json", "", b"");
            reply.json()["database_error"].is_string()
        },
    );
    c.expect(200, "GET", "/status.json", "", b"");
    drop(held);

    eprintln!("covered: {:#?}", c.covered);
    assert!(
        c.failures.is_empty(),
        "responses that do not match openapi.yaml:\n{}",
        c.failures.join("\n")
    );
    server.stop();
    relay.stop();
}

#[test]
fn the_document_and_the_router_agree() {
    let spec = Spec::load();
    let documented = spec.operations();
    let routed = router_routes();
    assert!(routed.len() >= 6, "the route scan found too little: {routed:?}");
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "routes in src/http.rs missing from openapi.yaml: {undocumented:?}"
    );

    // Each documented operation is answered by a route (not 404 "no route", not 405), and
    // another method on its path gets 405 with the documented method in Allow.
    let t = TestDb::new();
    let config = HttpConfig {
        addr: "127.0.0.1:0".into(),
        threads: 2,
        ..HttpConfig::default()
    };
    let server = http::serve(&config, t.db.clone(), Announce::Notify).unwrap();
    let mut failures = Vec::new();
    let mut allowed: HashMap<String, Vec<String>> = HashMap::new();
    for (template, method) in &documented {
        allowed.entry(template.clone()).or_default().push(method.clone());
    }
    for (template, methods) in &allowed {
        let path = template.replace("{}", &Uuid::new_v4().to_string());
        for method in methods {
            let reply = exchange(server.addr(), method, &path, JSON, b"{}");
            if reply.is_no_route() || reply.status == 405 {
                failures.push(format!(
                    "{method} {path}: documented but answered {}",
                    reply.status
                ));
            }
            failures.extend(spec.check(method, &path, &reply).err());
        }
        let reply = exchange(server.addr(), "PATCH", &path, "", b"");
        let allow = reply.header("Allow").unwrap_or_default().to_string();
        if reply.status != 405 || !methods.contains(&allow) {
            failures.push(format!(
                "PATCH {path}: expected 405 with Allow one of {methods:?}, got {} Allow {allow:?}",
                reply.status
            ));
        }
        failures.extend(spec.check("PATCH", &path, &reply).err());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_validator_refuses_what_the_document_forbids() {
    let spec = Spec::load();
    let order = json!({"$ref": "#/components/schemas/Order"});
    let good = json!({
        "id": "0190f5a0-1a2b-7c3d-8e4f-0123456789ab",
        "user_id": USER,
        "amount": "12.50",
        "status": "PENDING",
        "created_at": "2024-07-01T12:00:00.123456Z",
        "updated_at": "2024-07-01T12:00:00.123456Z",
    });
    spec.validate(&order, &good, "body").unwrap();
    let mut cases = Vec::new();
    for (name, key, value) in [
        ("unknown status", "status", json!("SHIPPED")),
        ("id not a uuid", "id", json!("42")),
        ("amount with three decimals", "amount", json!("1.005")),
        ("amount a number", "amount", json!(1.5)),
        ("created_at not UTC", "created_at", json!("yesterday")),
        ("extra property", "extra", json!(1)),
    ] {
        let mut bad = good.clone();
        bad[key] = value;
        cases.push((name, bad));
    }
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("updated_at");
    cases.push(("missing property", missing));
    for (name, bad) in cases {
        assert!(spec.validate(&order, &bad, "body").is_err(), "{name} passed");
    }
    let status = json!({"$ref": "#/components/schemas/Status"});
    assert!(spec.validate(&status, &json!({"orders": null}), "body").is_err());
}
