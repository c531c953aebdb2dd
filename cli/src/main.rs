//! `txoutbox`: the operator's command line (status, failed events, dead letters, retention,
//! schema).

#[allow(dead_code)] // shared with the other binaries; not every helper is used here
use txoutbox_service::settings as common;

use std::time::Duration;

use common::{env_or, Setting};
use txoutbox::{admin, Database, PoolOptions};
use txoutbox_service::config::{DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL};

const USAGE: &str = "txoutbox <command>

Commands:
  status                          backlog, oldest pending age, failed and scheduled counts, queue and DLQ depth
  failed list [--limit N]         events the relay gave up on (default limit 50)
  failed retry <id> | --all       put failed events back in line for the relay
  dlq replay                      move dead-lettered messages back onto the main queue, once each
  purge-processed --older-than A  delete dedupe rows older than A (e.g. 7d, 12h), in small batches
  migrate [--create-database]     apply the library's migrations (and the example's orders
          [--schema S]            table with --create-database); S defaults to public
  migrate --print [--schema S]    print the migrations as plain SQL for your own migration tool";

/// Everything it needs is in [`common::SERVICE_SETTINGS`].
const SETTINGS: &[Setting] = &[];

fn main() {
    if common::wants_help() || std::env::args().len() < 2 {
        common::print_help(
            "txoutbox",
            "operate a txoutbox deployment",
            USAGE,
            &[common::SERVICE_SETTINGS, SETTINGS].concat(),
        );
        return;
    }
    common::init_logging();
    common::run(try_main);
}

/// `txoutbox migrate [--print] [--create-database] [--schema S]`.
fn migrate(database_url: &str, flags: &[&str]) -> Result<(), String> {
    let mut print = false;
    let mut create_database = false;
    let mut schema = txoutbox::migrate::DEFAULT_SCHEMA.to_string();
    let mut rest = flags.iter();
    while let Some(flag) = rest.next() {
        match *flag {
            "--print" => print = true,
            "--create-database" => create_database = true,
            "--schema" => schema = rest.next().ok_or("--schema needs a schema name")?.to_string(),
            other => return Err(format!("migrate: unknown option {other:?}\n\n{USAGE}")),
        }
    }
    if !txoutbox::db::is_plain_identifier(&schema) {
        return Err(format!("--schema must be letters, digits and _, got {schema:?}"));
    }
    if print {
        print!("{}", txoutbox::migrate::script(&schema));
        return Ok(());
    }
    if create_database {
        // The example deployment: database, library tables and the service's orders table.
        txoutbox_service::orders::prepare_database(database_url).map_err(|e| e.to_string())?;
        println!(
            "database ready: txoutbox schema version {}",
            txoutbox::migrate::CURRENT_VERSION
        );
        return Ok(());
    }
    let mut client =
        txoutbox::db::connect_url(database_url, Duration::from_secs(300)).map_err(|e| e.to_string())?;
    let applied = txoutbox::migrate::run(&mut client, &schema).map_err(|e| e.to_string())?;
    if applied.is_empty() {
        println!(
            "schema {schema} already at version {}",
            txoutbox::migrate::CURRENT_VERSION
        );
    } else {
        println!("schema {schema}: applied migration(s) {applied:?}");
    }
    Ok(())
}

fn try_main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let database_url = env_or("DATABASE_URL", DEFAULT_DATABASE_URL);
    let amqp_url = env_or("AMQP_URL", DEFAULT_AMQP_URL);
    let topology = common::topology_from_env()?;
    let connect = || {
        Database::connect(
            &database_url,
            &PoolOptions {
                max_size: 1,
                ..PoolOptions::default()
            },
        )
        .map_err(|e| e.to_string())
    };
    let text = |e: txoutbox::Error| e.to_string();
    match words.as_slice() {
        ["status"] => {
            let db = connect()?;
            let s = admin::status(&mut *db.get().map_err(text)?, db.schema(), &amqp_url, &topology)
                .map_err(text)?;
            let depth =
                |d: Option<u32>| d.map_or("unknown (broker unreachable)".to_string(), |d| d.to_string());
            println!("outbox backlog:      {}", s.backlog);
            println!("oldest pending age:  {:.1} s", s.oldest_age_secs);
            println!("failed events:       {}", s.failed);
            match s.next_due_secs {
                Some(secs) => println!("scheduled events:    {} (next due in {secs:.1} s)", s.scheduled),
                None => println!("scheduled events:    {}", s.scheduled),
            }
            println!("queue {}: {}", topology.queue, depth(s.queue_depth));
            println!("queue {}: {}", topology.dead_letter_queue(), depth(s.dlq_depth));
        }
        ["failed", "list", rest @ ..] => {
            let limit = match rest {
                [] => 50,
                ["--limit", n] => n
                    .parse()
                    .map_err(|_| format!("--limit needs a number, got {n:?}"))?,
                _ => return Err(format!("unexpected arguments {rest:?}\n\n{USAGE}")),
            };
            let db = connect()?;
            let failed = db
                .outbox()
                .failed_events(&mut *db.get().map_err(text)?, limit)
                .map_err(text)?;
            println!(
                "{:>10}  {:<36}  {:<20}  {:>8}  last error",
                "id", "message_id", "event_type", "attempts"
            );
            for f in &failed {
                println!(
                    "{:>10}  {:<36}  {:<20}  {:>8}  {}",
                    f.id,
                    f.message_id,
                    f.event_type,
                    f.attempts,
                    f.last_error.as_deref().unwrap_or("")
                );
            }
            println!("{} failed event(s)", failed.len());
        }
        ["failed", "retry", which] => {
            let id = match *which {
                "--all" => None,
                id => Some(
                    id.parse::<i64>()
                        .map_err(|_| format!("expected an outbox id or --all, got {id:?}"))?,
                ),
            };
            let db = connect()?;
            let count = db
                .outbox()
                .requeue_failed(&mut *db.get().map_err(text)?, id)
                .map_err(text)?;
            println!("re-queued {count} failed event(s)");
        }
        ["dlq", "replay"] => {
            let moved = admin::replay_dead_letters(&amqp_url, &topology).map_err(text)?;
            println!(
                "moved {moved} message(s) from {} back to {}",
                topology.dead_letter_queue(),
                topology.queue
            );
        }
        ["purge-processed", "--older-than", age] => {
            let age: Duration = admin::parse_age(age).map_err(text)?;
            let db = connect()?;
            let deleted = admin::purge_processed(&mut *db.get().map_err(text)?, db.schema(), age, 1000)
                .map_err(text)?;
            println!("deleted {deleted} processed_messages row(s) older than {age:?}");
        }
        ["migrate", flags @ ..] => migrate(&database_url, flags)?,
        _ => return Err(format!("unknown command {words:?}\n\n{USAGE}")),
    }
    Ok(())
}
