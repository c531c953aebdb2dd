//! The library's schema: numbered migrations, recorded in a version table, applied only when
//! asked ([`run`], or `txoutbox migrate`), printable for teams that apply SQL with their own
//! tool ([`script`], or `txoutbox migrate --print`). [`Database::connect`](crate::Database::connect)
//! never changes the schema: it calls [`check`] and fails with what to run when it is behind.

use postgres::GenericClient;

use crate::db::quote_identifier;
use crate::{Error, Result};

/// One numbered step of the library's schema. `sql` names the target schema `{schema}`.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// Position in the sequence, from 1, without gaps.
    pub version: i32,
    /// Short name, recorded beside the version.
    pub name: &'static str,
    /// The statements, with `{schema}` where the schema name goes.
    pub sql: &'static str,
}

/// Every migration, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "outbox",
        sql: include_str!("../migrations/0001_outbox.sql"),
    },
    Migration {
        version: 2,
        name: "destinations",
        sql: include_str!("../migrations/0002_destinations.sql"),
    },
    Migration {
        version: 3,
        name: "consumer_names",
        sql: include_str!("../migrations/0003_consumer_names.sql"),
    },
    Migration {
        version: 4,
        name: "aggregate_sequence",
        sql: include_str!("../migrations/0004_aggregate_sequence.sql"),
    },
    Migration {
        version: 5,
        name: "held_back",
        sql: include_str!("../migrations/0005_held_back.sql"),
    },
    Migration {
        version: 6,
        name: "trace_context",
        sql: include_str!("../migrations/0006_trace_context.sql"),
    },
    Migration {
        version: 7,
        name: "scheduled",
        sql: include_str!("../migrations/0007_scheduled.sql"),
    },
];

/// The version this library needs (the last of [`MIGRATIONS`]).
pub const CURRENT_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Schema the library's tables live in unless told otherwise.
pub const DEFAULT_SCHEMA: &str = "public";

/// Advisory lock key held while migrating, so that two migrations do not race.
const MIGRATION_LOCK_KEY: i64 = 0x7478_6f75_7462_6f78; // "txoutbox"

/// The version table, in the target schema.
fn version_table(schema: &str) -> String {
    format!("{}.txoutbox_migrations", quote_identifier(schema))
}

fn render(migration: &Migration, schema: &str) -> String {
    migration.sql.replace("{schema}", &quote_identifier(schema))
}

fn record(migration: &Migration, schema: &str) -> String {
    // Versions and names are constants of this crate, never user input.
    format!(
        "INSERT INTO {} (version, name) VALUES ({}, '{}') ON CONFLICT (version) DO NOTHING;\n",
        version_table(schema),
        migration.version,
        migration.name
    )
}

fn prelude(schema: &str) -> String {
    // CREATE SCHEMA needs the CREATE right on the database even when the schema exists.
    let create_schema = if schema == DEFAULT_SCHEMA {
        String::new()
    } else {
        format!("CREATE SCHEMA IF NOT EXISTS {};\n", quote_identifier(schema))
    };
    format!(
        "{create_schema}CREATE TABLE IF NOT EXISTS {} (\n    \
             version     integer     PRIMARY KEY,\n    \
             name        text        NOT NULL,\n    \
             applied_at  timestamptz NOT NULL DEFAULT now()\n);\n",
        version_table(schema)
    )
}

/// Every migration as one plain SQL script for `schema`, recording each version as it goes:
/// what `txoutbox migrate --print` prints. Safe to apply more than once.
pub fn script(schema: &str) -> String {
    let mut out = format!("-- txoutbox schema version {CURRENT_VERSION}, for schema {schema}\nBEGIN;\n");
    out.push_str(&prelude(schema));
    for migration in MIGRATIONS {
        out.push_str(&format!(
            "\n-- migration {}: {}\n",
            migration.version, migration.name
        ));
        out.push_str(&render(migration, schema));
        out.push_str(&record(migration, schema));
    }
    out.push_str("COMMIT;\n");
    out
}

/// The highest version recorded in `schema`, or `None` when it has no version table.
pub fn applied_version(client: &mut impl GenericClient, schema: &str) -> Result<Option<i32>> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass(format('%I.txoutbox_migrations', $1::text)) IS NOT NULL",
            &[&schema],
        )
        .map_err(|e| Error::db("cannot read the txoutbox schema version", e))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let sql = format!("SELECT max(version) FROM {}", version_table(schema));
    let row = client
        .query_one(sql.as_str(), &[])
        .map_err(|e| Error::db("cannot read the txoutbox schema version", e))?;
    Ok(row.get(0))
}

/// Applies the migrations `schema` lacks, each in its own transaction under an advisory lock.
/// Returns the versions applied (empty when it was current). Needs the right to create tables
/// in `schema` (and the schema itself when it does not exist).
pub fn run(client: &mut postgres::Client, schema: &str) -> Result<Vec<i32>> {
    let mut applied = Vec::new();
    let mut tx = client
        .transaction()
        .map_err(|e| Error::db("cannot begin the migration", e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .map_err(|e| Error::db("cannot lock the schema for migration", e))?;
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .map_err(|e| Error::db("cannot migrate", e))?;
    tx.batch_execute(&prelude(schema))
        .map_err(|e| Error::db(format!("cannot create the version table in schema {schema}"), e))?;
    let current = applied_version(&mut tx, schema)?.unwrap_or(0);
    for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
        tx.batch_execute(&render(migration, schema)).map_err(|e| {
            Error::db(
                format!(
                    "cannot apply migration {} ({})",
                    migration.version, migration.name
                ),
                e,
            )
        })?;
        tx.batch_execute(&record(migration, schema))
            .map_err(|e| Error::db("cannot record the migration", e))?;
        applied.push(migration.version);
    }
    tx.commit()
        .map_err(|e| Error::db("cannot commit the migration", e))?;
    for version in &applied {
        log::info!("migrate: applied version {version} in schema {schema}");
    }
    Ok(applied)
}

/// Ok when `schema` holds this library's tables at [`CURRENT_VERSION`]; otherwise an error
/// that says what to run. Changes nothing.
pub fn check(client: &mut impl GenericClient, schema: &str) -> Result<()> {
    let how = "run `txoutbox migrate` (or txoutbox::migrate::run), or apply the SQL of \
               `txoutbox migrate --print` with your migration tool";
    match applied_version(client, schema)? {
        Some(v) if v == CURRENT_VERSION => Ok(()),
        Some(v) if v > CURRENT_VERSION => Err(Error::Config(format!(
            "the txoutbox tables in schema {schema} are at version {v}, newer than this library \
             knows ({CURRENT_VERSION}): upgrade txoutbox"
        ))),
        Some(v) => Err(Error::Config(format!(
            "the txoutbox tables in schema {schema} are at version {v}, this library needs \
             {CURRENT_VERSION}: {how}"
        ))),
        None => Err(Error::Config(format!(
            "schema {schema} has no txoutbox tables (no txoutbox_migrations table): {how}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_count_from_one_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.name);
        }
    }

    #[test]
    fn the_script_names_the_schema_everywhere_and_records_each_version() {
        let sql = script("billing");
        assert!(!sql.contains("{schema}"));
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"billing\".outbox"));
        assert!(
            sql.contains("INSERT INTO \"billing\".txoutbox_migrations (version, name) VALUES (1, 'outbox')")
        );
    }
}
