//! The command line and the plan it makes: how long each scenario runs in a full run (about
//! five minutes in all) and in a `--quick` one (about one minute).

use std::path::PathBuf;
use std::time::Duration;

use txoutbox_harness::support::args;

/// Default `--concurrency`.
pub const DEFAULT_CONCURRENCY: usize = 32;
/// Connections of the memory measurement (the RSS target is stated at 64).
pub const MEMORY_CONNECTIONS: usize = 64;
/// Events in the relay-drain backlog of a full run.
pub const FULL_BACKLOG: u64 = 100_000;
/// Events in the relay-drain backlog of a `--quick` run.
pub const QUICK_BACKLOG: u64 = 20_000;

/// Usage, printed by `--help`.
pub const HELP: &str = "\
txoutbox-bench: measures the ceilings (Postgres commits, RabbitMQ confirmed publishing) and
txoutbox itself in one run on this machine, verifies every order, and reports the ratios.

Usage: txoutbox-bench [--quick] [--concurrency C] [--out DIR] [--backlog N]

Options (--name VALUE or --name=VALUE):
  --quick             a one-minute smoke run: short phases, a 20,000-event backlog
                      default: a full run of about five minutes
  --concurrency C     connections of the database ceiling, the HTTP run and the scale-out run
                      default: 32
  --out DIR           results go to DIR/<UTC timestamp>/ (results.json, summary.md, chart.svg,
                      logs/ of the server and consumer processes)
                      default: target/bench (the target directory of this executable)
  --backlog N         events in the relay-drain backlog
                      default: 100000 (20000 with --quick)

Settings (environment variables):
  DATABASE_URL        Postgres URL naming any database on the server; each scenario creates
                      its own database beside it (txo_bench_*) and drops it afterwards
                      default: postgres://postgres@127.0.0.1:5432/postgres
  AMQP_URL            RabbitMQ URL; each scenario declares and deletes its own exchange and queues
                      default: amqp://guest:guest@127.0.0.1:5672/%2f
  RUST_LOG            log filter of the bench itself
                      default: warn

Exit status: 0 when every scenario completed and verified its counts (whether or not the
targets were met), 1 otherwise. The servers and consumers it runs are the release binaries
next to this executable: build them first (make bench does: cargo build --release --bins).";

/// What the command line asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// `--quick`.
    pub quick: bool,
    /// `--concurrency`.
    pub concurrency: usize,
    /// `--out`, if given.
    pub out: Option<PathBuf>,
    /// `--backlog`, if given.
    pub backlog: Option<u64>,
    /// `--help` or `-h`.
    pub help: bool,
}

impl Options {
    /// Parses the arguments after the program name.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
        let mut concurrency = DEFAULT_CONCURRENCY;
        let mut backlog = None;
        let common = args::parse(args, |arg, args| {
            match arg.name.as_str() {
                "--concurrency" => {
                    let text = args.value(arg, "a number of connections")?;
                    concurrency = text
                        .parse()
                        .ok()
                        .filter(|c| (1..=512).contains(c))
                        .ok_or_else(|| format!("--concurrency must be 1..=512, got {text:?}"))?;
                }
                "--backlog" => {
                    let text = args.value(arg, "a number of events")?;
                    backlog = Some(
                        text.parse()
                            .ok()
                            .filter(|n| (1..=10_000_000).contains(n))
                            .ok_or_else(|| format!("--backlog must be 1..=10000000, got {text:?}"))?,
                    );
                }
                other => return Err(args::unknown(other)),
            }
            Ok(())
        })?;
        Ok(Options {
            quick: common.quick,
            concurrency,
            out: common.out,
            backlog,
            help: common.help,
        })
    }
}

/// How long each scenario runs and with how much.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// A `--quick` run.
    pub quick: bool,
    /// Connections of (1), (3) and (8).
    pub concurrency: usize,
    /// (1) database ceiling.
    pub db_ceiling: Duration,
    /// (2) broker ceiling.
    pub broker_ceiling: Duration,
    /// (2) messages published one at a time first, for the confirm round trip.
    pub lone_confirms: usize,
    /// (3) HTTP at C connections, also (5).
    pub http: Duration,
    /// The closed loop of (3) again, with perf attached to the server and the consumer.
    pub profile: Duration,
    /// (7) the run at 64 connections after which peak RSS is read.
    pub memory: Duration,
    /// (4) events in the backlog.
    pub backlog: u64,
    /// (6) each open-loop run at a share of (5), measured part.
    pub latency: Duration,
    /// (6) the same load before measuring starts.
    pub latency_warm_up: Duration,
    /// (8) two servers and two consumers.
    pub scale_out: Duration,
    /// How often throughput is sampled for the chart.
    pub sample_interval: Duration,
    /// How long orders may take to be all `COMPLETED` after sending stopped.
    pub completion_timeout: Duration,
}

impl Plan {
    /// The plan for `options`.
    pub fn new(options: &Options) -> Plan {
        let secs = Duration::from_secs;
        if options.quick {
            Plan {
                quick: true,
                concurrency: options.concurrency,
                db_ceiling: secs(5),
                broker_ceiling: secs(4),
                lone_confirms: 100,
                http: secs(8),
                profile: secs(3),
                memory: secs(3),
                backlog: options.backlog.unwrap_or(QUICK_BACKLOG),
                latency: secs(5),
                latency_warm_up: secs(1),
                scale_out: secs(5),
                sample_interval: Duration::from_millis(500),
                completion_timeout: secs(60),
            }
        } else {
            Plan {
                quick: false,
                concurrency: options.concurrency,
                db_ceiling: secs(45),
                broker_ceiling: secs(30),
                lone_confirms: 500,
                http: secs(60),
                profile: secs(15),
                memory: secs(15),
                backlog: options.backlog.unwrap_or(FULL_BACKLOG),
                latency: secs(40),
                latency_warm_up: secs(3),
                scale_out: secs(40),
                sample_interval: secs(1),
                completion_timeout: secs(180),
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
    fn options_parse_in_both_forms() {
        let options = parse(&["--quick", "--concurrency=8", "--out", "/tmp/x"]).expect("valid");
        assert!(options.quick);
        assert_eq!(options.concurrency, 8);
        assert_eq!(options.out, Some(PathBuf::from("/tmp/x")));
        assert_eq!(parse(&[]).expect("valid").concurrency, DEFAULT_CONCURRENCY);
        assert_eq!(parse(&["--backlog", "500"]).expect("valid").backlog, Some(500));
        for bad in [
            &["--concurrency"][..],
            &["--concurrency", "0"],
            &["--nope"],
            &["--quick=1"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn quick_plans_are_shorter() {
        let quick = Plan::new(&parse(&["--quick"]).expect("valid"));
        let full = Plan::new(&parse(&[]).expect("valid"));
        assert!(quick.http < full.http && quick.backlog < full.backlog);
        assert_eq!(full.backlog, FULL_BACKLOG);
    }
}
