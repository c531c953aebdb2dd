//! `txoutbox-stress`: sends many orders to a running `txoutbox-server`, waits until the consumer
//! has completed each one, and verifies in Postgres that every event was delivered exactly once.

// Shared with the other binaries; not every helper is used here.
#[allow(dead_code)]
use txoutbox_service::settings as common;

use std::time::Duration;

use common::{env_or, Setting};
use txoutbox_harness::stress::{
    self, StressOptions, DEFAULT_CONCURRENCY, DEFAULT_ORDERS, DEFAULT_RETRIES, DEFAULT_TIMEOUT, DEFAULT_URL,
};
use txoutbox_service::config::DEFAULT_DATABASE_URL;

const SETTINGS: &[Setting] = &[
    Setting {
        name: "DATABASE_URL",
        default: DEFAULT_DATABASE_URL,
        help: "Postgres URL of the server's database, read to verify the orders",
    },
    Setting {
        name: "RUST_LOG",
        default: "info",
        help: "log filter (error, warn, info, debug, trace)",
    },
];

/// One command-line option: its name, value placeholder, default and meaning.
struct Flag {
    name: &'static str,
    value: &'static str,
    help: &'static str,
}

const FLAGS: &[Flag] = &[
    Flag {
        name: "--url",
        value: "URL",
        help: "base URL of txoutbox-server (plain http)",
    },
    Flag {
        name: "--orders",
        value: "N",
        help: "orders to create",
    },
    Flag {
        name: "--concurrency",
        value: "C",
        help: "threads sending at once, each on its own keep-alive connection",
    },
    Flag {
        name: "--timeout",
        value: "SECONDS",
        help: "deadline for every order to be COMPLETED, from the start",
    },
    Flag {
        name: "--retries",
        value: "N",
        help: "resends of an order (same Idempotency-Key) after a 5xx or no answer; 0: none",
    },
];

fn flag_default(name: &str) -> String {
    match name {
        "--url" => DEFAULT_URL.to_string(),
        "--orders" => DEFAULT_ORDERS.to_string(),
        "--concurrency" => DEFAULT_CONCURRENCY.to_string(),
        "--timeout" => DEFAULT_TIMEOUT.as_secs().to_string(),
        "--retries" => DEFAULT_RETRIES.to_string(),
        _ => String::new(),
    }
}

fn print_help() {
    let mut usage = String::from(
        "txoutbox-stress [--url URL] [--orders N] [--concurrency C] [--timeout SECONDS] [--retries N]",
    );
    usage.push_str("\n\nOptions (--name VALUE or --name=VALUE):");
    for flag in FLAGS {
        let name = format!("{} {}", flag.name, flag.value);
        usage.push_str(&format!(
            "\n  {name:<22} {}\n  {:<22} default: {}",
            flag.help,
            "",
            flag_default(flag.name)
        ));
    }
    usage.push_str(&format!("\n  {:<22} {}", "--help", "print this help"));
    common::print_help(
        "txoutbox-stress",
        "load test: POSTs orders (each with an Idempotency-Key of its own, resent under the \
         same key after a 5xx or no answer), waits until each is COMPLETED, and verifies \
         accepted = COMPLETED = processed with an empty outbox (exit 1 otherwise)",
        &usage,
        SETTINGS,
    );
}

fn main() {
    if common::wants_help() {
        print_help();
        return;
    }
    common::init_logging();
    common::run(try_main);
}

fn try_main() -> Result<(), String> {
    let mut options = parse_args(std::env::args().skip(1))?;
    options.database_url = env_or("DATABASE_URL", DEFAULT_DATABASE_URL);
    options.progress = true;
    let report = stress::run(&options).map_err(|e| e.to_string())?;
    println!("{report}");
    let problems = report.problems();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Parses `--name VALUE` and `--name=VALUE`; anything else is an error listing the options.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<StressOptions, String> {
    let valid = || {
        let names: Vec<&str> = FLAGS.iter().map(|f| f.name).collect();
        format!("valid options: {}, --help", names.join(", "))
    };
    let mut options = StressOptions::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name.to_string(), Some(value.to_string())),
            None => (arg.clone(), None),
        };
        if !FLAGS.iter().any(|f| f.name == name) {
            return Err(format!("unknown argument {arg:?}; {}", valid()));
        }
        let value = match inline {
            Some(value) => value,
            None => args
                .next()
                .ok_or_else(|| format!("{name} needs a value; {}", valid()))?,
        };
        let number = |what: &str| {
            value
                .trim()
                .parse::<usize>()
                .map_err(|_| format!("{name} must be {what}, got {value:?}"))
        };
        match name.as_str() {
            "--url" => options.url = value.trim().to_string(),
            "--orders" => options.orders = number("a whole number of orders")?,
            "--concurrency" => options.concurrency = number("a whole number of connections")?,
            "--retries" => options.retries = number("a whole number of retries")?,
            "--timeout" => {
                let seconds = value
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
                    .ok_or_else(|| {
                        format!("--timeout must be a positive number of seconds, got {value:?}")
                    })?;
                options.timeout = Duration::from_secs_f64(seconds);
            }
            _ => return Err(format!("unknown argument {arg:?}; {}", valid())),
        }
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<StressOptions, String> {
        parse_args(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn both_option_forms_parse() {
        let options = parse(&[
            "--orders",
            "100",
            "--concurrency=4",
            "--timeout=2.5",
            "--url",
            "http://h:1",
            "--retries=0",
        ])
        .expect("valid arguments");
        assert_eq!(options.orders, 100);
        assert_eq!(options.concurrency, 4);
        assert_eq!(options.timeout, Duration::from_millis(2500));
        assert_eq!(options.url, "http://h:1");
        assert_eq!(options.retries, 0);
        assert_eq!(parse(&[]).expect("defaults").retries, DEFAULT_RETRIES);
        assert_eq!(parse(&[]).expect("defaults").orders, DEFAULT_ORDERS);
    }

    #[test]
    fn bad_arguments_say_what_is_valid() {
        let error = parse(&["--order", "1"]).expect_err("unknown");
        assert!(
            error.contains("--orders") && error.contains("--concurrency"),
            "{error}"
        );
        assert!(parse(&["--orders"]).is_err());
        assert!(parse(&["--orders", "x"]).is_err());
        assert!(parse(&["--timeout", "-1"]).is_err());
    }
}
