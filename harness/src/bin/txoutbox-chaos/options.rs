//! The command line, and the plan it makes: which cases, how much load, how long an outage.

use std::path::PathBuf;
use std::time::Duration;

use txoutbox_harness::support::args;

/// Usage, printed by `--help`.
pub const HELP: &str = "\
txoutbox-chaos: runs the release txoutbox-server and txoutbox-consumer under load and injects
one failure after another into them and into the local Postgres and RabbitMQ; after each it
waits until the outbox is empty and verifies that every order answered 201 is COMPLETED exactly
once (nothing lost, nothing doubled). Prints a table and writes it to DIR/<timestamp>/results.md.

Usage: txoutbox-chaos [--quick] [--only CASE[,CASE...]] [--out DIR]

Cases, in this order:
  broker-outage   RabbitMQ stopped (rabbitmqctl stop_app) for the outage, then start_app: POSTs
                  keep answering 201, the outbox grows, relay and consumer reconnect and log
                  once per state change, the backlog drains
  db-restart      Postgres stopped (pg_ctlcluster stop -m fast) for the outage, then started:
                  POSTs answer 503 JSON within ~2 s (no hang), relay and consumer recover
                  without a restart
  kill-server     kill -9 of txoutbox-server mid-load while its relay holds claimed outbox rows
                  (found by freezing it with SIGSTOP at varying moments), a new one on the same
                  port: the rows the dead relay held are published by the new one
  kill-consumer   kill -9 of txoutbox-consumer inside a batch's transaction (found the same
                  way), a new one started: the redelivered batch is applied once
  hostile-clients for the outage, attackers beside the load: HTTP/2 prefaces, lying
                  Content-Lengths, slow uploads, oversized heads, idle connections up to the
                  cap: POSTs keep answering 201 quickly, the server's threads and descriptors
                  stay bounded and come back
  poison-header   deliveries the consumer can never record, published straight to the queue
                  beside the load (NUL in type, NUL in aggregate_id, a 5,000-character
                  aggregate_id, a body that is not UTF-8): each is dead-lettered with its
                  reason, the queue keeps its consumer, later orders complete within 5 s
  consumer-database-failure
                  orders created and cancelled 300 ms later beside the load; the consumer's
                  database refuses connections for the outage (ALTER DATABASE ...
                  ALLOW_CONNECTIONS false, its sessions terminated inside a batch; Postgres
                  keeps running):
                  the consumer recovers by itself, cancelled orders end CANCELLED and never
                  COMPLETED after the cancel, every event is applied once, its threads and
                  descriptors come back

Options (--name VALUE or --name=VALUE):
  --quick         a short run (about 2 minutes): 3 s outages, 200 orders/s, short phases
                  default: 10 s outages, 300 orders/s (about 3 minutes)
  --only CASES    run only these cases (comma separated names from the list above)
  --out DIR       logs and results go to DIR/<UTC timestamp>/
                  default: target/chaos
  -h, --help      this text

Settings (environment variables):
  DATABASE_URL    Postgres URL naming any database of the local server; each case creates
                  its own database beside it (txo_chaos_*) and drops it afterwards
                  default: postgres://postgres@127.0.0.1:5432/postgres
  AMQP_URL        RabbitMQ URL; each case declares and deletes its own exchange and queues
                  default: amqp://guest:guest@127.0.0.1:5672/%2f
  PG_CLUSTER      the Postgres cluster pg_ctlcluster stops and starts, as \"VERSION NAME\"
                  default: the one version under /etc/postgresql, cluster main
  RUST_LOG        log filter of txoutbox-chaos itself (the binaries it runs log at warn)
                  default: warn

Needs: rabbitmqctl (broker-outage) and pg_ctlcluster (db-restart) on PATH, run by a user
allowed to stop and start both; the release binaries next to this executable (make chaos
builds them). Every service it stops is started again when it ends, also on an error, a
panic, Ctrl-C or SIGTERM.

Exit status: 0 when every case kept every accepted order (COMPLETED exactly once) and passed
its checks, 1 otherwise, 2 for a bad command line.";

/// One failure to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// RabbitMQ stopped for the outage.
    BrokerOutage,
    /// Postgres stopped for the outage, then started.
    DbRestart,
    /// `kill -9` of the server, then a new one.
    KillServer,
    /// `kill -9` of the consumer, then a new one.
    KillConsumer,
    /// Hostile HTTP clients beside the load.
    HostileClients,
    /// Deliveries the consumer cannot record, published beside the load.
    PoisonHeader,
    /// The consumer's database refuses connections for the outage, cancellations in flight.
    ConsumerDatabaseFailure,
}

impl Case {
    /// Every case, in the order they run.
    pub const ALL: [Case; 7] = [
        Case::BrokerOutage,
        Case::DbRestart,
        Case::KillServer,
        Case::KillConsumer,
        Case::HostileClients,
        Case::PoisonHeader,
        Case::ConsumerDatabaseFailure,
    ];

    /// The name used on the command line, in file and database names.
    pub fn slug(self) -> &'static str {
        match self {
            Case::BrokerOutage => "broker-outage",
            Case::DbRestart => "db-restart",
            Case::KillServer => "kill-server",
            Case::KillConsumer => "kill-consumer",
            Case::HostileClients => "hostile-clients",
            Case::PoisonHeader => "poison-header",
            Case::ConsumerDatabaseFailure => "consumer-database-failure",
        }
    }

    /// The row title of the results table.
    pub fn title(self, plan: &Plan) -> String {
        let outage = plan.outage.as_secs();
        match self {
            Case::BrokerOutage => format!("RabbitMQ stopped {outage} s (stop_app/start_app)"),
            Case::DbRestart => format!("Postgres restart, down {outage} s (pg_ctlcluster)"),
            Case::KillServer => "kill -9 server mid-load, restart".into(),
            Case::KillConsumer => "kill -9 consumer mid-batch, restart".into(),
            Case::HostileClients => format!("hostile HTTP clients for {outage} s beside the load"),
            Case::PoisonHeader => "poison deliveries beside the load (NUL, oversize, not UTF-8)".into(),
            Case::ConsumerDatabaseFailure => {
                format!("consumer's database refused {outage} s mid-batch, cancels in flight")
            }
        }
    }

    fn parse(name: &str) -> Option<Case> {
        Case::ALL.into_iter().find(|c| c.slug() == name)
    }
}

/// What the command line asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// `--quick`.
    pub quick: bool,
    /// `--only`, if given.
    pub only: Option<Vec<Case>>,
    /// `--out`, if given.
    pub out: Option<PathBuf>,
    /// `--help` or `-h`.
    pub help: bool,
}

impl Options {
    /// Parses the arguments after the program name.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
        let mut only = None;
        let common = args::parse(args, |arg, args| {
            match arg.name.as_str() {
                "--only" => {
                    let text = args.value(arg, "case names")?;
                    let mut cases = Vec::new();
                    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                        let case = Case::parse(part).ok_or_else(|| {
                            let names: Vec<&str> = Case::ALL.iter().map(|c| c.slug()).collect();
                            format!("unknown case {part:?}; the cases are {}", names.join(", "))
                        })?;
                        if !cases.contains(&case) {
                            cases.push(case);
                        }
                    }
                    if cases.is_empty() {
                        return Err("--only needs at least one case name".into());
                    }
                    only = Some(cases);
                }
                other => return Err(args::unknown(other)),
            }
            Ok(())
        })?;
        Ok(Options {
            quick: common.quick,
            only,
            out: common.out,
            help: common.help,
        })
    }
}

/// How each case runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// A `--quick` run.
    pub quick: bool,
    /// The cases, in the order they run.
    pub cases: Vec<Case>,
    /// Orders per second the load offers (open loop: spread over the connections).
    pub rate: u32,
    /// Connections (threads) of the load; at most the server's HTTP threads, so that a slow
    /// answer during an outage is the server's time and not queueing.
    pub connections: usize,
    /// Load before the failure.
    pub warmup: Duration,
    /// How long RabbitMQ or Postgres stays down.
    pub outage: Duration,
    /// How long a killed process stays dead before its replacement starts.
    pub dead_for: Duration,
    /// Load after the failure was repaired.
    pub after: Duration,
    /// Deadline, from the end of the load, for every order to be COMPLETED and the outbox
    /// empty. Passing it counts as a hang.
    pub drain_deadline: Duration,
}

/// A non-2xx answer slower than this counts as a hang (the pool gives up after 2 s).
pub const SLOW_ANSWER: Duration = Duration::from_millis(3000);

/// Most reconnect warnings one relay worker or consumer may log per outage ("once per state
/// change": one when it starts failing; two leaves room for a second failure on the way back).
pub const MAX_WARNINGS_PER_WORKER: usize = 2;

impl Plan {
    /// The plan for `options`.
    pub fn new(options: &Options) -> Plan {
        let cases = options.only.clone().unwrap_or_else(|| Case::ALL.to_vec());
        if options.quick {
            Plan {
                quick: true,
                cases,
                rate: 200,
                connections: 8,
                warmup: Duration::from_secs(3),
                outage: Duration::from_secs(3),
                dead_for: Duration::from_secs(1),
                after: Duration::from_secs(3),
                drain_deadline: Duration::from_secs(60),
            }
        } else {
            Plan {
                quick: false,
                cases,
                rate: 300,
                connections: 8,
                warmup: Duration::from_secs(5),
                outage: Duration::from_secs(10),
                dead_for: Duration::from_secs(3),
                after: Duration::from_secs(5),
                drain_deadline: Duration::from_secs(120),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, String> {
        Options::parse(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn arguments_parse_and_bad_ones_are_named() {
        let o = parse(&[]).expect("no arguments");
        assert!(!o.quick && o.only.is_none() && !o.help);
        assert_eq!(Plan::new(&o).cases, Case::ALL.to_vec());
        let o = parse(&["--quick", "--only=kill-server,broker-outage", "--out", "x"]).expect("parses");
        assert!(o.quick);
        assert_eq!(o.only, Some(vec![Case::KillServer, Case::BrokerOutage]));
        assert_eq!(o.out, Some(PathBuf::from("x")));
        assert!(Plan::new(&o).outage < Plan::new(&parse(&[]).expect("default")).outage);
        assert!(parse(&["--only", "nope"]).unwrap_err().contains("kill-consumer"));
        let o = parse(&["--only", "poison-header,consumer-database-failure"]).expect("new cases");
        assert_eq!(
            o.only,
            Some(vec![Case::PoisonHeader, Case::ConsumerDatabaseFailure])
        );
        assert!(parse(&["--only"]).unwrap_err().contains("needs a value"));
        assert!(parse(&["--fast"]).unwrap_err().contains("--fast"));
        assert!(parse(&["-h"]).expect("help").help);
    }
}
