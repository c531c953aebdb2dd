//! Per-run databases beside the one `DATABASE_URL` names: `<prefix><unix seconds>_...`, dropped
//! when done, and those an interrupted run left behind swept at the next start.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postgres::Client;
use txoutbox::db::quote_identifier;
use txoutbox::{Error, Result};

/// Databases of a harness older than this are leftovers of an interrupted run and are dropped.
pub const STALE_AFTER: Duration = Duration::from_secs(3600);

/// `url` with its database name replaced by `name` (query parameters kept).
pub fn url_with_database(url: &str, name: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((head, query)) => (head, format!("?{query}")),
        None => (url, String::new()),
    };
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let host_end = head[scheme_end..]
        .find('/')
        .map_or(head.len(), |i| scheme_end + i);
    format!("{}/{name}{query}", &head[..host_end])
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Drops database `name` (ending its connections) through `admin`.
pub fn drop_database(admin: &mut Client, name: &str) -> Result<()> {
    admin
        .batch_execute(&drop_statement(name))
        .map_err(|e| Error::db(format!("cannot drop database {name}"), e))
}

fn drop_statement(name: &str) -> String {
    format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_identifier(name))
}

/// Drops the `<prefix><unix>_...` databases created more than [`STALE_AFTER`] before `now`;
/// `who` ("bench", "chaos") prefixes the log lines and names them in errors.
pub fn sweep_stale_databases(admin: &mut Client, prefix: &str, who: &str, now: u64) -> Result<()> {
    let pattern = format!("{}%", prefix.replace('_', "\\_"));
    let rows = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE $1",
            &[&pattern],
        )
        .map_err(|e| Error::db(format!("cannot list old {who} databases"), e))?;
    let cutoff = now.saturating_sub(STALE_AFTER.as_secs());
    for row in rows {
        let name: String = row.get(0);
        if created_at(&name, prefix).is_some_and(|t| t < cutoff) {
            match admin.batch_execute(&drop_statement(&name)) {
                Ok(()) => log::info!("{who}: dropped stale database {name}"),
                Err(e) => log::warn!("{who}: cannot drop stale database {name}: {e:?}"),
            }
        }
    }
    Ok(())
}

/// The unix seconds in `<prefix><unix>_...`, the name of a harness database.
fn created_at(name: &str, prefix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?.split('_').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            url_with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(url_with_database("postgres://h", "x"), "postgres://h/x");
        assert_eq!(
            url_with_database("postgres://h/db?sslmode=disable", "x"),
            "postgres://h/x?sslmode=disable"
        );
    }

    #[test]
    fn the_creation_time_is_read_from_the_name() {
        assert_eq!(
            created_at("txo_bench_1700000000_3_http", "txo_bench_"),
            Some(1_700_000_000)
        );
        assert_eq!(
            created_at("txo_chaos_1700000000_kill_server", "txo_chaos_"),
            Some(1_700_000_000)
        );
        assert_eq!(created_at("txo_chaos_1700000000_x", "txo_bench_"), None);
        assert_eq!(created_at("txo_bench_latest", "txo_bench_"), None);
    }

    #[test]
    fn only_stale_databases_of_the_prefix_are_swept() {
        let base =
            txoutbox_service::settings::env_or("DATABASE_URL", super::super::startup::DEFAULT_DATABASE_URL);
        let url = url_with_database(&base, "postgres");
        let mut admin = txoutbox::db::parse_url(&url, Duration::from_secs(30))
            .and_then(|config| {
                config
                    .connect(postgres::NoTls)
                    .map_err(|e| Error::db("cannot connect to Postgres (is it running?)", e))
            })
            .expect("Postgres at DATABASE_URL");
        // Own prefix per test process, so that nothing else is swept.
        let prefix = format!("txo_sweeptest{}_", std::process::id());
        let now = unix_now();
        let stale = format!("{prefix}{}_old", now - STALE_AFTER.as_secs() - 10);
        let fresh = format!("{prefix}{now}_new");
        for name in [&stale, &fresh] {
            admin
                .batch_execute(&format!("CREATE DATABASE {}", quote_identifier(name)))
                .expect("create database");
        }
        let swept = sweep_stale_databases(&mut admin, &prefix, "test", now);
        let left: Vec<String> = admin
            .query(
                "SELECT datname FROM pg_database WHERE datname LIKE $1 ORDER BY 1",
                &[&format!("{prefix}%")],
            )
            .expect("list databases")
            .iter()
            .map(|row| row.get(0))
            .collect();
        for name in &left {
            drop_database(&mut admin, name).expect("drop test database");
        }
        swept.expect("sweep");
        assert_eq!(left, vec![fresh]);
    }
}
