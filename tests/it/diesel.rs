//! Feature `diesel`: `Outbox::enqueue_diesel` inside `PgConnection::transaction` writes the
//! same rows as `enqueue`, commits and rolls back with the caller's transaction, and says
//! what failed. `make test` runs this module with `--features diesel`.

use diesel::{Connection, PgConnection, RunQueryDsl};
use serde_json::json;
use txoutbox::{NewEvent, Outbox, PoolOptions, Schema};
use txoutbox_testkit::TestDb;

fn connect(t: &TestDb) -> PgConnection {
    PgConnection::establish(&t.url).expect("diesel connects to the test database")
}

#[test]
fn enqueue_diesel_commits_and_rolls_back_with_the_callers_transaction() {
    let t = TestDb::new();
    let mut conn = connect(&t);
    diesel::sql_query("CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL)")
        .execute(&mut conn)
        .expect("create notes");
    let outbox = t.db.outbox();

    let kept = NewEvent::new("note", "1", "NoteWritten", json!({ "id": 1, "body": "kept" }))
        .to_exchange("notes.events")
        .with_routing_key("note.written");
    conn.transaction(|conn| {
        diesel::sql_query("INSERT INTO notes VALUES (1, 'kept')").execute(conn)?;
        outbox.enqueue_diesel(conn, &kept)?;
        Ok::<_, txoutbox::Error>(())
    })
    .expect("the transaction commits");

    let dropped = NewEvent::new("note", "2", "NoteWritten", json!({ "id": 2 }));
    let err = conn
        .transaction(|conn| {
            diesel::sql_query("INSERT INTO notes VALUES (2, 'dropped')").execute(conn)?;
            outbox.enqueue_ordered_diesel(conn, &dropped)?;
            Err::<(), _>(txoutbox::Error::Other("changed my mind".into()))
        })
        .expect_err("the closure's error rolls back");
    assert_eq!(err.to_string(), "changed my mind");

    assert_eq!(t.count("SELECT count(*) FROM notes"), 1);
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 1);
    let row = t
        .client()
        .query_one(
            "SELECT message_id, aggregate_type, aggregate_id, event_type, payload, exchange, routing_key \
             FROM outbox",
            &[],
        )
        .expect("the committed event");
    assert_eq!(row.get::<_, uuid::Uuid>(0), kept.message_id);
    assert_eq!(row.get::<_, String>(1), "note");
    assert_eq!(row.get::<_, String>(2), "1");
    assert_eq!(row.get::<_, String>(3), "NoteWritten");
    assert_eq!(row.get::<_, serde_json::Value>(4), kept.payload);
    assert_eq!(row.get::<_, Option<String>>(5).as_deref(), Some("notes.events"));
    assert_eq!(row.get::<_, Option<String>>(6).as_deref(), Some("note.written"));
}

#[test]
fn ordered_and_unnotified_diesel_enqueues_record_in_call_order_with_default_routing() {
    let t = TestDb::new();
    let mut conn = connect(&t);
    let events: Vec<NewEvent> = (1..=3)
        .map(|n| NewEvent::new("ticket", "7", format!("Step{n}"), json!({ "n": n })))
        .collect();
    let (notifying, quiet) = (t.db.outbox(), t.db.outbox().clone().without_notify());
    conn.transaction(|conn| {
        notifying.enqueue_ordered_diesel(conn, &events[0])?;
        quiet.enqueue_diesel(conn, &events[1])?;
        quiet.enqueue_ordered_diesel(conn, &events[2])?;
        Ok::<_, txoutbox::Error>(())
    })
    .expect("the transaction commits");
    let types: Vec<String> = t
        .client()
        .query(
            "SELECT event_type FROM outbox WHERE exchange IS NULL AND routing_key IS NULL ORDER BY id",
            &[],
        )
        .expect("the events")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(types, ["Step1", "Step2", "Step3"]);
}

#[test]
fn enqueue_diesel_writes_to_the_outbox_of_its_schema() {
    let t = TestDb::with_pool(PoolOptions {
        max_size: 2,
        schema: "billing".into(),
        ..PoolOptions::default()
    });
    let mut conn = connect(&t);
    let outbox = Outbox::new(Schema::new("billing").expect("a valid schema name"));
    let event = NewEvent::new("invoice", "9", "InvoiceIssued", json!({}));
    conn.transaction(|conn| outbox.enqueue_diesel(conn, &event))
        .expect("the transaction commits");
    assert_eq!(t.count("SELECT count(*) FROM billing.outbox"), 1);
}

#[test]
fn a_failed_enqueue_says_which_event_and_aborts_the_transaction() {
    let t = TestDb::new();
    let mut conn = connect(&t);
    let outbox = Outbox::default();
    let event = NewEvent::new("ticket", "1", "TicketOpened", json!({}));
    conn.transaction(|conn| outbox.enqueue_diesel(conn, &event))
        .expect("the first one commits");

    // The same message id again: the outbox's unique index refuses it.
    let err = conn
        .transaction(|conn| outbox.enqueue_diesel(conn, &event))
        .expect_err("a duplicate message id is refused");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "cannot enqueue TicketOpened event {}: ",
            event.message_id
        )),
        "{text}"
    );
    assert!(matches!(err, txoutbox::Error::Diesel { .. }), "{err:?}");
    assert!(!err.is_unavailable(), "{err:?}");
    assert_eq!(t.count("SELECT count(*) FROM outbox"), 1);
}
