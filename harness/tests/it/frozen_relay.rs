//! A relay frozen in the middle of a round (SIGSTOP) must not hold its rows for good (issue 10):
//! Postgres ends its session after `idle_in_transaction_session_timeout`, and another relay
//! publishes the rows it had claimed.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use txoutbox::{enqueue_many, relay, NewEvent};
use txoutbox_testkit::{quick_relay, wait_until};

use crate::hostile::Server;

/// Outbox rows some transaction holds locked (claimed by a relay round).
const LOCKED_ROWS: &str = "\
    SELECT (SELECT count(*) FROM outbox)
         - (SELECT count(*) FROM (SELECT 1 FROM outbox FOR UPDATE SKIP LOCKED) AS unlocked)";

fn signal(pid: u32, signal: &str) {
    assert!(Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

#[test]
fn a_relay_frozen_mid_round_releases_its_rows_to_another_relay() {
    // Confirms waited for at most 1 s: the session may idle in its transaction 2 x 1 + 5 s.
    let server = Server::start(&[("RELAY_CONFIRM_TIMEOUT", "1"), ("RELAY_BATCH", "500")]);
    let events: Vec<NewEvent> = (0..30_000)
        .map(|n| NewEvent::new("thing", format!("t-{n}"), "ThingDone", json!({ "n": n })))
        .collect();
    let mut client = server.t.client();
    enqueue_many(&mut client, &events).unwrap();

    // Freeze the server at varying moments until it is caught holding claimed rows.
    let mut caught = None;
    for attempt in 0..500u64 {
        signal(server.pid(), "-STOP");
        let locked: i64 = client.query_one(LOCKED_ROWS, &[]).unwrap().get(0);
        if locked > 0 {
            caught = Some(locked);
            break;
        }
        signal(server.pid(), "-CONT");
        std::thread::sleep(Duration::from_millis(1 + attempt % 7));
    }
    let locked = caught.expect("the relay was caught in the middle of a round");
    let frozen_at = Instant::now();

    // Another relay on the same outbox, while the first stays frozen.
    let other = relay::start(
        server.t.db.clone(),
        &txoutbox_testkit::amqp_url(),
        server.broker.topology.clone(),
        quick_relay(2),
    )
    .unwrap();
    wait_until(
        "the other relay empties the outbox, the frozen one's rows included",
        Duration::from_secs(40),
        || server.t.count("SELECT count(*) FROM outbox") == 0,
    );
    let took = frozen_at.elapsed();
    other.stop();
    eprintln!(
        "frozen relay held {locked} rows; the outbox was empty {:.1} s after the freeze",
        took.as_secs_f64()
    );
    assert!(
        took >= Duration::from_secs(5),
        "the rows were released by the session's end, not before"
    );
    signal(server.pid(), "-CONT");
}
