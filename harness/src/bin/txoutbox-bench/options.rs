//! The command line and the plan it makes: how long each scenario runs in a full run (about
//! five minutes in all) and in a `--quick` one (about one minute).

use std::path::PathBuf;
use std::time::Duration;

/// Default `--concurrency`.
pub const DEFAULT_CONCURRENCY: usize = 32;
/// Connections of the memory measurement (the RSS target is stated at 64).
pub const MEMORY_CONNECTIONS: usize = 64;
/// Relay-drain backlogs of a full run, in events.
pub const FULL_BACKLOGS: [u64; 3] = [10_000, 100_000, 1_000_000];
/// Relay-drain backlogs of a `--quick` run, in events.
pub const QUICK_BACKLOGS: [u64; 3] = [5_000, 20_000, 50_000];

/// Usage, printed by `--help`.
pub const HELP: &str = "\
txoutbox-bench: measures the ceilings (Postgres commits, RabbitMQ confirmed publishing) and
txoutbox itself in one run on this machine, verifies every order, and reports the ratios.

Usage: txoutbox-bench [--quick] [--concurrency C] [--out DIR] [--backlogs N,N,...]
       txoutbox-bench --soak [--quick] [--concurrency C] [--out DIR]

Options (--name VALUE or --name=VALUE):
  -h, --help          this text
  --quick             a smoke run of about a minute and a half: short phases, small backlogs
                      default: a full run of about ten minutes
  --soak              instead of the scenarios, the soak: 30 minutes (3 with --quick) at half
                      the end-to-end capacity measured at its start, judged for throughput,
                      p99, table sizes and server memory staying level (soak.json, soak.md,
                      soak.svg)
  --concurrency C     connections of the database ceiling, the HTTP run and the scale-out run
                      default: 32
  --out DIR           results go to DIR/<UTC timestamp>/ (results.json, summary.md, chart.svg,
                      logs/ of the server and consumer processes)
                      default: target/bench (the target directory of this executable)
  --backlogs N,N,...  relay-drain backlogs in events, each drained with RELAY_ORDERING=aggregate,
                      all but the largest also with none; time per event is compared between
                      the smallest and the largest
                      default: 10000,100000,1000000 (5000,20000,50000 with --quick)

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
    /// `--backlogs`, if given.
    pub backlogs: Option<Vec<u64>>,
    /// `--soak`: the soak instead of the scenarios.
    pub soak: bool,
    /// `--help` or `-h`.
    pub help: bool,
}

impl Options {
    /// Parses the arguments after the program name (lexopt: `--name VALUE` or `--name=VALUE`).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
        use lexopt::prelude::*;
        let mut options = Options {
            quick: false,
            concurrency: DEFAULT_CONCURRENCY,
            out: None,
            backlogs: None,
            soak: false,
            help: false,
        };
        let mut parser = lexopt::Parser::from_args(args);
        let text = |value: std::ffi::OsString, name: &str| {
            value
                .into_string()
                .map_err(|v| format!("{name} must be text, got {v:?}"))
        };
        while let Some(arg) = parser.next().map_err(|e| format!("{e}; see --help"))? {
            match arg {
                Short('h') | Long("help") => options.help = true,
                Long("quick") => options.quick = true,
                Long("soak") => options.soak = true,
                Long("out") => {
                    options.out = Some(PathBuf::from(
                        parser.value().map_err(|e| format!("{e} (a directory)"))?,
                    ))
                }
                Long("concurrency") => {
                    let value = text(
                        parser
                            .value()
                            .map_err(|e| format!("{e} (a number of connections)"))?,
                        "--concurrency",
                    )?;
                    options.concurrency = value
                        .parse()
                        .ok()
                        .filter(|c| (1..=512).contains(c))
                        .ok_or_else(|| format!("--concurrency must be 1..=512, got {value:?}"))?;
                }
                Long("backlogs") => {
                    let value = text(
                        parser
                            .value()
                            .map_err(|e| format!("{e} (backlog sizes, e.g. 10000,100000)"))?,
                        "--backlogs",
                    )?;
                    let sizes: Option<Vec<u64>> = value
                        .split(',')
                        .map(|n| n.trim().parse().ok().filter(|n| (1..=10_000_000).contains(n)))
                        .collect();
                    options.backlogs = Some(sizes.filter(|s| !s.is_empty()).ok_or_else(|| {
                        format!("--backlogs must be sizes of 1..=10000000 separated by commas, got {value:?}")
                    })?);
                }
                other => return Err(format!("{}; see --help", other.unexpected())),
            }
        }
        Ok(options)
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
    /// (4) backlogs drained with `RELAY_ORDERING=aggregate`, smallest first.
    pub backlogs: Vec<u64>,
    /// (4) backlogs drained with `RELAY_ORDERING=none` too: all but the largest.
    pub unordered_backlogs: Vec<u64>,
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
        let mut backlogs = options.backlogs.clone().unwrap_or_else(|| {
            if options.quick {
                QUICK_BACKLOGS.to_vec()
            } else {
                FULL_BACKLOGS.to_vec()
            }
        });
        backlogs.sort_unstable();
        backlogs.dedup();
        let unordered_backlogs = backlogs[..backlogs.len().saturating_sub(1)].to_vec();
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
                backlogs,
                unordered_backlogs,
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
                backlogs,
                unordered_backlogs,
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
        assert_eq!(
            parse(&["--backlogs", "500,20"]).expect("valid").backlogs,
            Some(vec![500, 20])
        );
        for bad in [
            &["--concurrency"][..],
            &["--concurrency", "0"],
            &["--nope"],
            &["--quick=1"],
            &["--backlogs", "10,x"],
            &["--backlogs", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn quick_plans_are_shorter() {
        let quick = Plan::new(&parse(&["--quick"]).expect("valid"));
        let full = Plan::new(&parse(&[]).expect("valid"));
        assert!(quick.http < full.http && quick.backlogs < full.backlogs);
        assert_eq!(full.backlogs, FULL_BACKLOGS);
        assert_eq!(full.unordered_backlogs, [10_000, 100_000]);
        let given = Plan::new(&parse(&["--backlogs", "300,100,300"]).expect("valid"));
        assert_eq!(
            (given.backlogs, given.unordered_backlogs),
            (vec![100, 300], vec![100])
        );
    }
}
