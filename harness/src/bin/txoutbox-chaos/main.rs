//! `txoutbox-chaos`: injects failures into the real binaries under load, one after the other,
//! and verifies after each that every order answered 201 is `COMPLETED` (or `CANCELLED`, when
//! the case cancelled it) exactly once: nothing lost, nothing doubled.
//!
//! Cases, in order: RabbitMQ stopped (`rabbitmqctl stop_app` ... `start_app`), Postgres stopped
//! and started again (`pg_ctlcluster`), `kill -9` of the server then a new one, `kill -9` of the
//! consumer then a new one, hostile HTTP clients, poison deliveries published beside the load,
//! the consumer's database refusing connections mid-batch (`ALTER DATABASE ... ALLOW_CONNECTIONS
//! false`) with orders cancelled in flight. Each case gets its own database, exchange, queue, port and logs
//! (`target/chaos/<timestamp>/<case>-*.log`); the table goes to stdout and to
//! `target/chaos/<timestamp>/results.md`. Every service it stops is started again on every
//! way out: normal end, error, panic, Ctrl-C or SIGTERM.

#[allow(dead_code)]
mod attack;
mod cases;
mod delivery;
mod load;
mod options;
mod poison;
mod procs;
mod report;
mod services;
mod verify;
mod world;

use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use txoutbox::{Error, Result};

use crate::options::{Options, Plan, HELP};
use crate::services::Services;
use crate::world::World;
use txoutbox_harness::support::startup;
use txoutbox_harness::support::timestamp::Timestamp;

fn main() {
    let parsed = Options::parse(std::env::args().skip(1));
    let Some(options) = startup::start(parsed, HELP, |o: &Options| o.help) else {
        return;
    };
    let code = match try_main(&options) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    };
    // Everything is restored by now (the guard in try_main dropped); exit skips nothing else.
    services::finish(code);
}

/// Runs the cases; `Ok(false)` when one of them failed.
fn try_main(options: &Options) -> Result<bool> {
    let plan = Plan::new(options);
    let started = Instant::now();
    let timestamp = Timestamp::of(SystemTime::now());
    let out = options
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/chaos"));
    let out_dir = startup::run_dir(out, &timestamp)?;

    let (database_url, amqp_url) = startup::service_urls();
    // From here on, a stopped service is started again however this function ends; the
    // signal thread does the same on Ctrl-C / SIGTERM.
    let services = Services::install(&database_url, &amqp_url)?;
    services.check_tools(&plan.cases)?;
    let world = World::connect(&database_url, &amqp_url, &timestamp.compact, &out_dir)?;
    println!(
        "txoutbox-chaos: {} run, {} case(s), load {} orders/s on {} connections, outage {} s; \
         logs and results in {}",
        if plan.quick { "quick" } else { "full" },
        plan.cases.len(),
        plan.rate,
        plan.connections,
        plan.outage.as_secs(),
        out_dir.display()
    );

    let mut results = Vec::new();
    for case in &plan.cases {
        if services::interrupted() {
            break;
        }
        println!("\n== {} ==", case.title(&plan));
        let result = cases::run(*case, &plan, &world, &services);
        println!("{}", result.summary_line());
        results.push(result);
    }
    drop(world);
    services.restore_all();

    let table = report::render(&results, &plan, &timestamp, started.elapsed());
    println!("\n{}", report::table(&results));
    let path = out_dir.join("results.md");
    std::fs::write(&path, &table)
        .map_err(|e| Error::Other(format!("cannot write {}: {e}", path.display())))?;
    let ok = results.iter().all(|r| r.passed());
    println!(
        "{} in {:.0} s; results in {}",
        if ok { "all cases passed" } else { "FAILED" },
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(ok)
}
