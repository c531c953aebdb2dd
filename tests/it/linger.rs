//! `RelayConfig::linger`: events committed while a woken worker lingers go out in its round.

use std::time::{Duration, Instant};

use serde_json::json;
use txoutbox::{relay, NewEvent, RelayConfig};
use txoutbox_testkit::{wait_until, TestBroker, TestDb};

const WAIT: Duration = Duration::from_secs(60);

fn event(n: i32) -> NewEvent {
    NewEvent::new("ticket", format!("t-{n}"), "TicketOpened", json!({ "n": n }))
}

#[test]
fn events_committed_while_a_woken_worker_lingers_go_out_in_its_round() {
    let t = TestDb::new();
    let broker = TestBroker::new();
    let linger = Duration::from_secs(1);
    let config = RelayConfig {
        workers: 2,
        linger,
        // Only the waker brings events out.
        poll_interval: Duration::from_secs(3600),
        ..RelayConfig::default()
    };
    let relay = relay::start(t.db.clone(), &broker.url, broker.topology.clone(), config).unwrap();
    let waker = relay.waker();
    let outbox = t.db.outbox().clone().without_notify();
    let mut client = t.client();
    let mut commit_and_wake = |n: i32| {
        let mut tx = client.transaction().unwrap();
        outbox.enqueue(&mut tx, &event(n)).unwrap();
        tx.commit().unwrap();
        waker.wake();
    };
    // Both workers connected, then a first event, so that both are past their first round
    // and idle.
    wait_until("both workers are connected", WAIT, || {
        relay.stats().connected_workers() == 2
    });
    commit_and_wake(0);
    wait_until("the first event is published", WAIT, || {
        relay.stats().published() == 1
    });
    let rounds_before = relay.stats().batches();

    let first_wake = Instant::now();
    for n in 1..=10 {
        commit_and_wake(n);
    }
    if first_wake.elapsed() < linger * 8 / 10 {
        assert_eq!(
            relay.stats().published(),
            1,
            "nothing goes out before the linger ends"
        );
    }
    wait_until("the ten events are published", WAIT, || {
        relay.stats().published() == 11
    });
    assert!(
        first_wake.elapsed() >= linger,
        "published before the linger ended"
    );
    assert_eq!(
        relay.stats().batches() - rounds_before,
        1,
        "the ten events went out in one round"
    );
    relay.stop();
}

#[test]
fn a_linger_longer_than_a_second_is_refused() {
    let config = RelayConfig {
        linger: Duration::from_millis(1001),
        ..RelayConfig::default()
    };
    let error = config.validate().unwrap_err().to_string();
    assert!(
        error.contains("RELAY_LINGER_MS") && error.contains("1000 ms"),
        "{error}"
    );
    let ok = RelayConfig {
        linger: Duration::from_secs(1),
        ..RelayConfig::default()
    };
    assert!(ok.validate().is_ok());
}
