//! `Idempotency-Key` on POST /orders (issue 10): a retry after an unknown outcome gets the first
//! order back instead of a second one; another order under the same key gets 422.

use std::net::SocketAddr;

use txoutbox::{Database, PoolOptions};
use txoutbox_service::orders::{self, Amount, Announce, Creation, NewOrder};
use txoutbox_service::{http, HttpConfig};
use txoutbox_testkit::{http_raw, HttpReply, RoundTripProxy, TestDb};
use uuid::Uuid;

const USER: &str = "5b0c7b52-8d0c-4d53-9a55-1f5b1d0f4e0a";

fn serve(t: &TestDb) -> http::HttpHandle {
    let config = HttpConfig {
        addr: "127.0.0.1:0".into(),
        threads: 4,
        ..HttpConfig::default()
    };
    http::serve(&config, t.db.clone(), Announce::Notify).unwrap()
}

fn post_with_key(addr: SocketAddr, key: &str, amount: &str) -> HttpReply {
    let body = format!(r#"{{"user_id":"{USER}","amount":"{amount}"}}"#);
    http_raw(
        addr,
        &format!(
            "POST /orders HTTP/1.1\r\nContent-Type: application/json\r\nIdempotency-Key: {key}\r\nContent-Length: {}",
            body.len()
        ),
        body.as_bytes(),
    )
}

#[test]
fn the_same_key_and_order_give_the_first_order_back_even_after_a_restart() {
    let t = TestDb::new();
    let server = serve(&t);
    let first = post_with_key(server.addr(), "key-1", "12.50");
    assert_eq!(first.status, 201, "{:?}", first.body);
    let again = post_with_key(server.addr(), "key-1", "12.50");
    assert_eq!(again.status, 201);
    assert_eq!(again.body["id"], first.body["id"]);
    assert_eq!(again.header("Idempotent-Replayed"), Some("true"));
    server.stop();

    let restarted = serve(&t);
    let after = post_with_key(restarted.addr(), "key-1", "12.50");
    assert_eq!((after.status, &after.body["id"]), (201, &first.body["id"]));
    let other = post_with_key(restarted.addr(), "key-2", "12.50");
    assert_eq!(other.status, 201);
    assert_ne!(other.body["id"], first.body["id"], "another key is another order");
    restarted.stop();
    assert_eq!(t.count("SELECT count(*) FROM orders"), 2);
    assert_eq!(
        t.count("SELECT count(*) FROM outbox WHERE event_type = 'OrderCreated'"),
        2
    );
}

#[test]
fn the_same_key_with_another_order_gets_422_and_writes_nothing() {
    let t = TestDb::new();
    let server = serve(&t);
    assert_eq!(post_with_key(server.addr(), "key-1", "12.50").status, 201);
    let reused = post_with_key(server.addr(), "key-1", "99.00");
    assert_eq!(reused.status, 422, "{:?}", reused.body);
    assert!(reused.body["error"]
        .as_str()
        .unwrap_or("")
        .contains("Idempotency-Key"));
    for bad in ["", "a b", &"k".repeat(256)] {
        let reply = post_with_key(server.addr(), bad, "12.50");
        assert_eq!(reply.status, 400, "key {bad:?}: {:?}", reply.body);
    }
    server.stop();
    assert_eq!(t.count("SELECT count(*) FROM orders"), 1);
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 1);
}

#[test]
fn concurrent_requests_with_one_key_make_one_order() {
    let t = TestDb::new();
    let server = serve(&t);
    let addr = server.addr();
    let replies: Vec<HttpReply> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(move || post_with_key(addr, "racing-key", "5.00")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    server.stop();
    assert!(
        replies.iter().all(|r| r.status == 201),
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(replies.iter().all(|r| r.body["id"] == replies[0].body["id"]));
    assert_eq!(t.count("SELECT count(*) FROM orders"), 1);
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 1);
}

#[test]
fn a_key_older_than_the_window_makes_a_new_order_and_is_purged() {
    let t = TestDb::new();
    let server = serve(&t);
    let first = post_with_key(server.addr(), "old-key", "12.50");
    t.client()
        .batch_execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'")
        .unwrap();
    let second = post_with_key(server.addr(), "old-key", "99.00");
    assert_eq!(second.status, 201, "{:?}", second.body);
    assert_ne!(second.body["id"], first.body["id"]);
    server.stop();
    t.client()
        .batch_execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'")
        .unwrap();
    let purged = txoutbox_service::orders::purge_idempotency_keys(&mut t.client()).unwrap();
    assert_eq!(purged, 1);
    assert_eq!(t.count("SELECT count(*) FROM idempotency_keys"), 0);
}

/// A new order under a key costs one round trip to Postgres, as one without a key does: the
/// key is recorded in the order's own statement and read back only when it was live. (It was
/// three: a lookup, prepared anew each time, before the insert.)
#[test]
fn a_new_order_costs_one_round_trip_with_a_key_or_without() {
    let t = TestDb::new();
    let proxy = RoundTripProxy::new(&t.url);
    // No validation round trip however slow the machine is between the orders.
    let options = PoolOptions {
        max_size: 1,
        validate_after_idle: std::time::Duration::from_secs(3600),
        ..PoolOptions::default()
    };
    let db = Database::connect(&proxy.url, &options).unwrap();
    let mut conn = db.get().unwrap();
    let (outbox, announce) = (db.outbox(), Announce::Notify);
    let new_order = || NewOrder {
        user_id: Uuid::new_v4(),
        amount: Amount::parse("10.00").unwrap(),
    };
    let replayed = new_order();
    // The first of each kind prepares its statements on the connection.
    orders::create(&mut conn, outbox, &new_order(), None, &announce).unwrap();
    orders::create_idempotent(&mut conn, outbox, &replayed, "warm", None, &announce).unwrap();
    orders::create_idempotent(&mut conn, outbox, &replayed, "warm", None, &announce).unwrap();

    let before = proxy.round_trips();
    orders::create(&mut conn, outbox, &new_order(), None, &announce).unwrap();
    assert_eq!(proxy.round_trips() - before, 1, "an order without a key");

    let before = proxy.round_trips();
    let created = orders::create_idempotent(&mut conn, outbox, &new_order(), "new", None, &announce);
    assert!(matches!(created, Ok(Creation::Created(_))), "{created:?}");
    assert_eq!(proxy.round_trips() - before, 1, "a new order under a key");

    let before = proxy.round_trips();
    let again = orders::create_idempotent(&mut conn, outbox, &replayed, "warm", None, &announce);
    assert!(matches!(again, Ok(Creation::Replayed(_))), "{again:?}");
    assert_eq!(
        proxy.round_trips() - before,
        2,
        "a replay: the keyed insert, then the read"
    );
    assert_eq!(
        t.count("SELECT count(*) FROM orders"),
        4,
        "the replays wrote no order"
    );
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 4);
}
