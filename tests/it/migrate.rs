//! The schema is the library's, versioned and applied only when asked; connecting checks it
//! and changes nothing; a role with data rights only runs enqueue, relay and consumer.

use std::time::Duration;

use postgres::Transaction;
use postgres::{Client, NoTls};
use serde_json::json;
use txoutbox::migrate::{self, CURRENT_VERSION};
use txoutbox::RelayConfig;
use txoutbox::{
    consumer, enqueue, relay, ConsumerConfig, Database, HandlerError, Message, NewEvent, PoolOptions,
};
use txoutbox_testkit::{wait_until, EmptyDb, TestBroker, TestRole};

const WAIT: Duration = Duration::from_secs(60);

fn tables(client: &mut Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
            &[],
        )
        .unwrap()
        .get(0)
}

fn small_pool(schema: &str) -> PoolOptions {
    PoolOptions {
        max_size: 4,
        schema: schema.into(),
        ..PoolOptions::default()
    }
}

#[test]
fn connecting_to_an_unmigrated_database_fails_with_what_to_run_and_creates_nothing() {
    let empty = EmptyDb::new();
    let error = Database::connect(&empty.url, &small_pool("public"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("txoutbox migrate"), "{error}");
    assert!(error.contains("--print"), "{error}");
    assert_eq!(tables(&mut empty.client()), 0, "connect created tables");
}

#[test]
fn connecting_to_a_missing_database_does_not_create_it() {
    let empty = EmptyDb::new();
    let missing = format!("{}_missing", empty.name);
    let url = empty.url.replace(&empty.name, &missing);
    let error = Database::connect(&url, &small_pool("public"))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("does not exist") || error.contains("create-database"),
        "{error}"
    );
    let exists: bool = empty
        .client()
        .query_one(
            "SELECT exists (SELECT 1 FROM pg_database WHERE datname = $1)",
            &[&missing],
        )
        .unwrap()
        .get(0);
    assert!(!exists, "connect created the database");
}

#[test]
fn migrations_are_recorded_once_and_a_second_run_applies_nothing() {
    let empty = EmptyDb::new();
    let mut client = empty.client();
    assert_eq!(migrate::applied_version(&mut client, "public").unwrap(), None);
    let first = migrate::run(&mut client, "public").unwrap();
    assert_eq!(first, (1..=CURRENT_VERSION).collect::<Vec<_>>());
    assert_eq!(migrate::run(&mut client, "public").unwrap(), Vec::<i32>::new());
    assert_eq!(
        migrate::applied_version(&mut client, "public").unwrap(),
        Some(CURRENT_VERSION)
    );
    let rows: i64 = client
        .query_one("SELECT count(*) FROM txoutbox_migrations", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, i64::from(CURRENT_VERSION));
    Database::connect(&empty.url, &small_pool("public")).expect("a migrated database connects");
}

#[test]
fn the_printed_script_gives_the_same_schema_as_running_the_migrations() {
    let printed = EmptyDb::new();
    printed
        .client()
        .batch_execute(&migrate::script("public"))
        .unwrap();
    Database::connect(&printed.url, &small_pool("public")).expect("the printed script migrates");
    let ran = EmptyDb::new();
    migrate::run(&mut ran.client(), "public").unwrap();
    assert_eq!(catalog(&mut printed.client()), catalog(&mut ran.client()));
}

/// Columns and indexes of every non-system table, as text.
pub fn catalog(client: &mut Client) -> Vec<String> {
    let mut out: Vec<String> = client
        .query(
            "SELECT table_schema || '.' || table_name || '.' || column_name || ' ' || data_type || ' '
                    || is_nullable || ' ' || coalesce(column_default, '')
             FROM information_schema.columns
             WHERE table_schema NOT IN ('pg_catalog', 'information_schema')
             UNION ALL
             SELECT schemaname || '.' || indexdef FROM pg_indexes
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
             ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    out.sort();
    out
}

#[test]
fn tables_can_live_in_a_schema_of_their_own() {
    let empty = EmptyDb::new();
    migrate::run(&mut empty.client(), "billing_outbox").unwrap();
    let outbox: bool = empty
        .client()
        .query_one("SELECT to_regclass('billing_outbox.outbox') IS NOT NULL", &[])
        .unwrap()
        .get(0);
    assert!(outbox);
    Database::connect(&empty.url, &small_pool("billing_outbox")).expect("connects to its schema");
    let error = Database::connect(&empty.url, &small_pool("public"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("schema public"), "{error}");
    let bad = Database::connect(&empty.url, &small_pool("a;drop"))
        .unwrap_err()
        .to_string();
    assert!(bad.contains("PoolOptions::schema"), "{bad}");
}

/// The grants the least-privilege test gives its role: nothing but data rights.
pub const DATA_ONLY_GRANTS: &str = "
    GRANT CONNECT ON DATABASE {db} TO {role};
    GRANT USAGE ON SCHEMA public TO {role};
    GRANT SELECT, INSERT, UPDATE, DELETE ON outbox, outbox_scheduled, processed_messages TO {role};
    GRANT SELECT ON txoutbox_migrations TO {role};
    GRANT USAGE ON SEQUENCE outbox_id_seq, outbox_scheduled_id_seq TO {role};
    GRANT SELECT, INSERT, UPDATE, DELETE ON effects TO {role};";

#[test]
fn a_role_with_data_rights_only_runs_enqueue_relay_and_consumer() {
    let role = TestRole::new();
    let empty = EmptyDb::new();
    {
        let mut admin = empty.client();
        migrate::run(&mut admin, "public").unwrap();
        admin
            .batch_execute("CREATE TABLE effects (message_id uuid PRIMARY KEY, n int NOT NULL)")
            .unwrap();
        admin
            .batch_execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            .unwrap();
        let grants = DATA_ONLY_GRANTS
            .replace("{db}", &empty.name)
            .replace("{role}", &role.name);
        admin.batch_execute(&grants).unwrap();
    }
    let url = role.url_for(&empty.url);
    // The role cannot change the schema: the proof that nothing below needs to.
    let mut as_role = Client::connect(&url, NoTls).expect("the role logs in");
    let refused = as_role.batch_execute("CREATE TABLE sneaky (id int)").unwrap_err();
    assert!(
        format!("{refused:?}").contains("permission denied"),
        "{refused:?}"
    );
    assert!(
        migrate::run(&mut as_role, "public").is_err(),
        "the role could migrate"
    );

    let db = Database::connect(&url, &small_pool("public")).expect("the role connects");
    let broker = TestBroker::new();
    let relay = relay::start(
        db.clone(),
        &broker.url,
        broker.topology.clone(),
        RelayConfig::default(),
    )
    .unwrap();
    let consumer = consumer::start(
        db.clone(),
        &broker.url,
        broker.topology.clone(),
        ConsumerConfig::default(),
        |tx: &mut Transaction<'_>, message: &Message| -> Result<(), HandlerError> {
            let n = message.payload["n"].as_i64().unwrap_or(-1) as i32;
            tx.execute(
                "INSERT INTO effects (message_id, n) VALUES ($1, $2)",
                &[&message.message_id, &n],
            )?;
            Ok(())
        },
    )
    .unwrap();
    for n in 0..20 {
        let mut tx = as_role.transaction().unwrap();
        enqueue(
            &mut tx,
            &NewEvent::new("test", n.to_string(), "TestHappened", json!({ "n": n })),
        )
        .unwrap();
        tx.commit().unwrap();
    }
    wait_until("the role's 20 events are applied", WAIT, || {
        as_role
            .query_one("SELECT count(*) FROM effects", &[])
            .map(|row| row.get::<_, i64>(0) == 20)
            .unwrap_or(false)
    });
    let left: i64 = as_role
        .query_one("SELECT count(*) FROM outbox", &[])
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    consumer.stop();
    relay.stop();
    drop(db);
    drop(as_role);
    drop(empty); // before the role, which owns rights in it
}
