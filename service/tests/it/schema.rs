//! The top-level schema.sql is the example service's complete schema: the library's migrations
//! plus the service's own orders table, nothing more, nothing less.

use txoutbox::{migrate, Database, PoolOptions};
use txoutbox_testkit::EmptyDb;

const SCHEMA_SQL: &str = include_str!("../../../schema.sql");

#[test]
fn schema_sql_is_the_migrations_plus_the_orders_table() {
    let body = SCHEMA_SQL
        .split_once("\n\n")
        .map(|(_header, body)| body)
        .expect("schema.sql starts with a comment block and a blank line");
    let expected = format!(
        "{}\n{}",
        migrate::script(migrate::DEFAULT_SCHEMA),
        txoutbox_service::orders::TABLE
    );
    assert!(
        body == expected,
        "schema.sql is stale: regenerate it from `txoutbox migrate --print` and service/schema/orders.sql \
         (see its header)"
    );
}

#[test]
fn schema_sql_gives_the_tables_the_binaries_prepare() {
    let from_file = EmptyDb::new();
    from_file.client().batch_execute(SCHEMA_SQL).unwrap();
    let options = PoolOptions {
        max_size: 1,
        ..PoolOptions::default()
    };
    Database::connect(&from_file.url, &options).expect("schema.sql is at the library's version");
    let prepared = EmptyDb::new();
    txoutbox_service::orders::prepare_database(&prepared.url).unwrap();
    let tables = |db: &EmptyDb| -> Vec<String> {
        db.client()
            .query(
                "SELECT table_name || '.' || column_name || ' ' || data_type FROM information_schema.columns
                 WHERE table_schema = 'public' ORDER BY 1",
                &[],
            )
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    };
    let columns = tables(&from_file);
    assert!(
        columns.iter().any(|c| c == "orders.amount numeric"),
        "{columns:?}"
    );
    assert_eq!(columns, tables(&prepared));
}
