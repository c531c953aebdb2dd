//! The HTTP API: good input creates an order and its event; each bad input gets its status and
//! writes nothing.

use std::time::{Duration, Instant};

use txoutbox_testkit::{http_raw, post_order, TestDb};

/// POSTs `body` a few bytes at a time with pauses, like a slow client.
fn slow_post(addr: std::net::SocketAddr, body: &[u8]) -> txoutbox_testkit::HttpReply {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "POST /orders HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    for chunk in body.chunks(8) {
        std::thread::sleep(Duration::from_millis(50));
        stream.write_all(chunk).unwrap();
    }
    let mut raw = String::new();
    let _ = stream.read_to_string(&mut raw);
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let json = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    txoutbox_testkit::HttpReply {
        status,
        headers: Vec::new(),
        body: serde_json::from_str(json).unwrap_or_default(),
    }
}
use txoutbox::PoolOptions;
use txoutbox_service::orders::Announce;
use txoutbox_service::{http, HttpConfig};

fn serve(t: &TestDb) -> http::HttpHandle {
    let config = HttpConfig {
        addr: "127.0.0.1:0".into(),
        threads: 4,
        ..HttpConfig::default()
    };
    http::serve(&config, t.db.clone(), Announce::Notify).unwrap()
}

fn assert_nothing_written(t: &TestDb, case: &str) {
    assert_eq!(
        t.count("SELECT count(*) FROM orders"),
        0,
        "{case}: an order was written"
    );
    assert_eq!(
        t.count("SELECT count(*) FROM outbox"),
        0,
        "{case}: an event was written"
    );
}

const USER: &str = "5b0c7b52-8d0c-4d53-9a55-1f5b1d0f4e0a";

#[test]
fn a_valid_order_is_created_with_its_event_and_can_be_read_back() {
    let t = TestDb::new();
    let server = serve(&t);
    let reply = post_order(
        server.addr(),
        &format!(r#"{{"user_id":"{USER}","amount":"100.5"}}"#),
    );
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    assert_eq!(reply.body["amount"], "100.50");
    assert_eq!(reply.body["status"], "PENDING");
    assert_eq!(reply.body["user_id"], USER);
    let id = reply.body["id"].as_str().expect("id").to_string();
    assert!(reply.body["created_at"]
        .as_str()
        .is_some_and(|s| s.ends_with('Z')));

    assert_eq!(t.count("SELECT count(*) FROM orders WHERE amount = 100.50"), 1);
    assert_eq!(
        t.count(&format!(
            "SELECT count(*) FROM outbox WHERE aggregate_id = '{id}' AND event_type = 'OrderCreated' \
             AND payload->>'amount' = '100.50'"
        )),
        1
    );

    let got = http_raw(server.addr(), &format!("GET /orders/{id} HTTP/1.1"), b"");
    assert_eq!(got.status, 200);
    assert_eq!(got.body["id"], id.as_str());
    assert_eq!(got.body["status"], "PENDING");

    let number = post_order(server.addr(), &format!(r#"{{"user_id":"{USER}","amount":0.1}}"#));
    assert_eq!(number.status, 201);
    assert_eq!(number.body["amount"], "0.10", "JSON numbers are taken exactly");
}

#[test]
fn each_bad_input_gets_its_status_and_writes_nothing() {
    let t = TestDb::new();
    let server = serve(&t);
    let amount = |a: &str| format!(r#"{{"user_id":"{USER}","amount":{a}}}"#);
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("invalid JSON", "{".into(), 400, None),
        ("not an object", "[1,2]".into(), 400, None),
        ("empty body", "".into(), 400, None),
        (
            "missing user_id",
            r#"{"amount":"1.00"}"#.into(),
            400,
            Some("user_id"),
        ),
        (
            "missing amount",
            format!(r#"{{"user_id":"{USER}"}}"#),
            400,
            Some("amount"),
        ),
        ("null amount", amount("null"), 400, Some("amount")),
        (
            "user_id not a UUID",
            r#"{"user_id":"bob","amount":"1.00"}"#.into(),
            400,
            Some("user_id"),
        ),
        (
            "user_id a number",
            r#"{"user_id":42,"amount":"1.00"}"#.into(),
            400,
            Some("user_id"),
        ),
        (
            "unknown field",
            format!(r#"{{"user_id":"{USER}","amount":"1","admin":true}}"#),
            400,
            Some("admin"),
        ),
        ("zero", amount("0"), 400, Some("amount")),
        ("zero string", amount(r#""0.00""#), 400, Some("amount")),
        ("negative", amount("-1"), 400, Some("amount")),
        ("negative string", amount(r#""-5.00""#), 400, Some("amount")),
        ("three decimals", amount(r#""1.005""#), 400, Some("amount")),
        ("three decimals number", amount("1.005"), 400, Some("amount")),
        (
            "beyond NUMERIC(12,2)",
            amount(r#""10000000000.00""#),
            400,
            Some("amount"),
        ),
        ("exponent", amount("1e3"), 400, Some("amount")),
        ("huge exponent", amount("1e309"), 400, Some("amount")),
        ("NaN string", amount(r#""NaN""#), 400, Some("amount")),
        ("Infinity string", amount(r#""Infinity""#), 400, Some("amount")),
        ("amount a bool", amount("true"), 400, Some("amount")),
        ("amount an object", amount(r#"{"v":1}"#), 400, Some("amount")),
        ("amount with spaces", amount(r#"" 1.00""#), 400, Some("amount")),
    ];
    for (case, body, status, field) in &cases {
        let reply = post_order(server.addr(), body);
        assert_eq!(reply.status, *status, "{case}: {:?}", reply.body);
        assert!(
            reply.body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{case}: no error message"
        );
        assert_eq!(
            reply.body["field"].as_str(),
            *field,
            "{case}: wrong field in {:?}",
            reply.body
        );
        assert_nothing_written(&t, case);
    }

    let addr = server.addr();
    let valid = format!(r#"{{"user_id":"{USER}","amount":"1.00"}}"#);
    let head = |content_type: &str| {
        format!(
            "POST /orders HTTP/1.1\r\n{content_type}Content-Length: {}",
            valid.len()
        )
    };
    let reply = http_raw(addr, &head("Content-Type: text/plain\r\n"), valid.as_bytes());
    assert_eq!(reply.status, 415, "wrong content type");
    let reply = http_raw(addr, &head(""), valid.as_bytes());
    assert_eq!(reply.status, 415, "missing content type");

    let big = vec![b' '; 100 * 1024];
    let reply = http_raw(
        addr,
        &format!(
            "POST /orders HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}",
            big.len()
        ),
        &big,
    );
    assert_eq!(reply.status, 413, "body over 64 KiB");

    let json_head = |length: usize| {
        format!("POST /orders HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {length}")
    };
    let not_utf8 = b"{\"user_id\":\"\xff\xfe\",\"amount\":\"1.00\"}";
    let reply = http_raw(addr, &json_head(not_utf8.len()), not_utf8);
    assert_eq!(reply.status, 400, "non-UTF-8 bytes");

    let ten_megabytes = vec![b'1'; 10 * 1024 * 1024];
    let reply = http_raw(addr, &json_head(ten_megabytes.len()), &ten_megabytes);
    assert_eq!(reply.status, 413, "10 MB body");

    let flood: String = (0..200)
        .map(|n| format!("X-Flood-{n}: {}\r\n", "y".repeat(50)))
        .collect();
    let reply = http_raw(
        addr,
        &format!("{flood}{}", json_head(valid.len())),
        valid.as_bytes(),
    );
    assert_eq!(reply.status, 400, "garbage before the request line");
    let flood_head = format!("{}\r\n{}", json_head(valid.len()), flood.trim_end());
    let reply = http_raw(addr, &flood_head, valid.as_bytes());
    assert_eq!(reply.status, 431, "header flood");

    let reply = http_raw(
        addr,
        "POST /orders HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked",
        b"10\r\n{\"user_id\":\"x\",\"\r\n0\r\n\r\n",
    );
    assert_eq!(reply.status, 411, "chunked: a Content-Length is required");

    let reply = slow_post(addr, br#"{"user_id":"nope","amount":"1.00"}"#);
    assert_eq!(reply.status, 400, "slow body, invalid once complete");
    assert_eq!(reply.body["field"], "user_id");

    let reply = http_raw(addr, "GET /orders HTTP/1.1", b"");
    assert_eq!((reply.status, reply.header("Allow")), (405, Some("POST")));
    let reply = http_raw(
        addr,
        "DELETE /orders/5b0c7b52-8d0c-4d53-9a55-1f5b1d0f4e0a HTTP/1.1",
        b"",
    );
    assert_eq!((reply.status, reply.header("Allow")), (405, Some("GET")));
    let reply = http_raw(addr, "GET /nowhere HTTP/1.1", b"");
    assert_eq!(reply.status, 404);
    let reply = http_raw(addr, &format!("GET /orders/{USER} HTTP/1.1"), b"");
    assert_eq!(reply.status, 404, "unknown id");
    let reply = http_raw(addr, "GET /orders/not-a-uuid HTTP/1.1", b"");
    assert_eq!(reply.status, 404, "malformed id");
    assert_nothing_written(&t, "after every bad request");
}

#[test]
fn no_database_connection_gives_503_within_a_bounded_time() {
    let t = TestDb::with_pool(PoolOptions {
        max_size: 2,
        checkout_timeout: Duration::from_millis(500),
        ..PoolOptions::default()
    });
    let server = serve(&t);
    // Every pooled connection is busy: the database is unavailable to the API.
    let held: Vec<_> = (0..2).map(|_| t.db.get().unwrap()).collect();
    let started = Instant::now();
    let reply = post_order(
        server.addr(),
        &format!(r#"{{"user_id":"{USER}","amount":"1.00"}}"#),
    );
    let waited = started.elapsed();
    assert_eq!(reply.status, 503, "{:?}", reply.body);
    assert!(reply.body["error"].as_str().is_some());
    assert!(waited < Duration::from_secs(5), "took {waited:?}");
    drop(held);
    let reply = post_order(
        server.addr(),
        &format!(r#"{{"user_id":"{USER}","amount":"1.00"}}"#),
    );
    assert_eq!(reply.status, 201, "recovers once connections are free");
}

#[test]
fn with_an_api_token_a_post_needs_the_bearer_token() {
    let t = TestDb::new();
    let config = HttpConfig {
        addr: "127.0.0.1:0".into(),
        threads: 2,
        api_token: Some(txoutbox_service::config::Secret::new("s3cret-token")),
        ..HttpConfig::default()
    };
    let server = http::serve(&config, t.db.clone(), Announce::Notify).unwrap();
    let body = format!(r#"{{"user_id":"{USER}","amount":"1.00"}}"#);
    let post = |auth: &str| {
        http_raw(
            server.addr(),
            &format!(
                "POST /orders HTTP/1.1\r\nContent-Type: application/json\r\n{auth}Content-Length: {}",
                body.len()
            ),
            body.as_bytes(),
        )
    };
    for (case, auth) in [
        ("no header", ""),
        ("wrong token", "Authorization: Bearer s3cret-tokeX\r\n"),
        ("prefix of the token", "Authorization: Bearer s3cret\r\n"),
        (
            "token with a suffix",
            "Authorization: Bearer s3cret-token-and-more\r\n",
        ),
        ("basic auth", "Authorization: Basic czNjcmV0LXRva2Vu\r\n"),
    ] {
        let reply = post(auth);
        assert_eq!(reply.status, 401, "{case}");
        assert_eq!(reply.header("WWW-Authenticate"), Some("Bearer"), "{case}");
        assert_nothing_written(&t, case);
    }
    let reply = post("Authorization: Bearer s3cret-token\r\n");
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    let id = reply.body["id"].as_str().unwrap().to_string();
    let got = http_raw(server.addr(), &format!("GET /orders/{id} HTTP/1.1"), b"");
    assert_eq!(got.status, 200, "reads need no token");
}

#[test]
fn health_and_readiness() {
    let t = TestDb::with_pool(PoolOptions {
        max_size: 1,
        checkout_timeout: Duration::from_millis(300),
        ..PoolOptions::default()
    });
    let server = serve(&t);
    let reply = http_raw(server.addr(), "GET /healthz HTTP/1.1", b"");
    assert_eq!((reply.status, reply.body["status"].as_str()), (200, Some("ok")));
    let reply = http_raw(server.addr(), "GET /readyz HTTP/1.1", b"");
    assert_eq!(
        (reply.status, reply.body["status"].as_str()),
        (200, Some("ready"))
    );
    // No database connection to be had: not ready, and it says why.
    let held = t.db.get().unwrap();
    let reply = http_raw(server.addr(), "GET /readyz HTTP/1.1", b"");
    assert_eq!(reply.status, 503);
    assert!(
        reply.body["error"]
            .as_str()
            .is_some_and(|e| e.contains("database")),
        "{:?}",
        reply.body
    );
    drop(held);
    let reply = http_raw(server.addr(), "POST /healthz HTTP/1.1", b"");
    assert_eq!(reply.status, 405);
}
