//! `txoutbox-bench`: measures the ceilings txoutbox works under (Postgres commits, confirmed
//! RabbitMQ publishing) and txoutbox itself, in one run on one machine, verifies that every order
//! was done exactly once, and reports same-run ratios against the targets.
//!
//! Scenarios, in order: (1) database ceiling, (2) broker ceiling, (3)(5)(7) HTTP, end to end and
//! peak RSS on the release binaries, (4) relay drain of a backlog, (6) latency at 25% and 50%
//! of the end-to-end rate (5) (open loop), (8) two servers and two consumers. Results go to
//! `target/bench/<timestamp>/{results.json,summary.md,chart.svg}`.

mod ceilings;
mod chart;
#[allow(dead_code)]
use txoutbox_service::settings as common;
mod cpu;
mod drain;
mod infra;
mod latency;
mod load;
mod options;
mod pipeline;
mod plot;
mod process;
mod profile;
mod quantiles;
mod report;
mod sampler;
mod server;
mod slow;
mod soak;
mod statements;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use txoutbox::{Error, Result};

use crate::infra::Infra;
use crate::options::{Options, Plan, HELP, MEMORY_CONNECTIONS};
use crate::process::Launcher;
use crate::report::{count, Results};
use crate::verify::Checks;
use txoutbox_harness::support::startup;
use txoutbox_harness::support::timestamp::Timestamp;

fn main() {
    let parsed = Options::parse(std::env::args().skip(1));
    let Some(options) = startup::start(parsed, HELP, |o: &Options| o.help) else {
        return;
    };
    common::run(|| try_main(&options).map_err(|e| e.to_string()));
}

fn try_main(options: &Options) -> Result<()> {
    let plan = Plan::new(options);
    let stop = stop_on_signal()?;
    let timestamp = Timestamp::of(SystemTime::now());
    let out = match &options.out {
        Some(dir) => dir.clone(),
        None => default_out_dir()?,
    };
    let out_dir = startup::run_dir(out, &timestamp)?;
    let (database_url, amqp_url) = startup::service_urls();
    let infra = Infra::connect(&database_url, &amqp_url)?;
    let launcher = Launcher::new(&out_dir.join("logs"), &amqp_url)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if options.soak {
        let soak_plan = soak::SoakPlan::new(&plan);
        println!(
            "txoutbox-bench --soak: {} run on {cores} cores, {} s, PostgreSQL {}, RabbitMQ {}; results in {}",
            if plan.quick { "quick" } else { "full" },
            soak_plan.duration.as_secs(),
            infra.servers.postgres_version,
            infra.servers.rabbitmq_version,
            out_dir.display()
        );
        let heading = format!(
            "{}, {cores} cores, load average {} before",
            timestamp.iso,
            load_average().map_or("?".to_string(), |l| format!("{l:.2}"))
        );
        let verified = soak::main(
            &infra,
            &launcher,
            &soak_plan,
            &stop,
            &Progress::new(),
            &out_dir,
            &heading,
        )?;
        return if verified {
            Ok(())
        } else {
            Err(Error::Other(
                "the soak did not complete or did not verify (see above)".into(),
            ))
        };
    }
    println!(
        "txoutbox-bench: {} run on {cores} cores, concurrency {}, PostgreSQL {} (synchronous_commit={}), \
         RabbitMQ {}; results in {}",
        if plan.quick { "quick" } else { "full" },
        plan.concurrency,
        infra.servers.postgres_version,
        infra.servers.synchronous_commit,
        infra.servers.rabbitmq_version,
        out_dir.display()
    );
    let mut results = Results::new(
        timestamp,
        plan.clone(),
        cores,
        infra.servers.clone(),
        source_version(),
    );
    let progress = Progress::new();
    results.load_average = load_average();
    run_scenarios(&infra, &launcher, &plan, &stop, &progress, &mut results);
    results.elapsed = progress.start.elapsed();

    print!("{}", results.console());
    write(&out_dir.join("results.json"), &pretty_json(&results)?)?;
    write(&out_dir.join("summary.md"), &results.markdown())?;
    write(
        &out_dir.join("chart.svg"),
        &chart::chart(&results).map_err(Error::Other)?,
    )?;
    println!(
        "wrote {0}/results.json, {0}/summary.md, {0}/chart.svg",
        out_dir.display()
    );
    if results.verified() {
        Ok(())
    } else {
        Err(Error::Other(
            "the benchmark did not complete or did not verify its counts (see above)".into(),
        ))
    }
}

/// Runs every scenario in order; one that fails is recorded as a failed check and the rest
/// still run, unless the run is interrupted.
fn run_scenarios(
    infra: &Infra,
    launcher: &Launcher,
    plan: &Plan,
    stop: &AtomicBool,
    progress: &Progress,
    results: &mut Results,
) {
    let checks = &mut results.checks;
    let c = plan.concurrency;

    let db = scenario(
        progress,
        checks,
        ceilings::DB_PHASE,
        &format!("{c} connections for {} s", plan.db_ceiling.as_secs()),
        |checks| ceilings::database(infra, plan, stop, checks),
        |(t, _)| format!("{} tx/s", count(t.rate)),
    );
    let (db_ceiling, sample) = match db {
        Some((throughput, sample)) => (Some(throughput), Some(sample)),
        None => (None, None),
    };
    results.db_ceiling = db_ceiling;

    if let Some(sample) = sample.filter(|_| !interrupted(stop)) {
        results.body_bytes = sample.body.len();
        results.broker_ceiling = scenario(
            progress,
            checks,
            ceilings::BROKER_PHASE,
            &format!(
                "{} publishers for {} s, {}-byte bodies",
                txoutbox::RelayConfig::default().workers,
                plan.broker_ceiling.as_secs(),
                sample.body.len()
            ),
            |checks| ceilings::broker(infra, plan, &sample, stop, checks),
            |b| {
                format!(
                    "{} msg/s; a lone message confirmed in p50 {}, p99 {}",
                    count(b.throughput.rate),
                    report::fmt_ms(b.lone_confirm.p50),
                    report::fmt_ms(b.lone_confirm.p99)
                )
            },
        );
    }

    if !interrupted(stop) {
        results.pipeline = scenario(
            progress,
            checks,
            pipeline::HTTP_PHASE,
            &format!(
                "server + consumer processes, {c} connections for {} s, then {MEMORY_CONNECTIONS}",
                plan.http.as_secs()
            ),
            |checks| pipeline::single(infra, launcher, plan, stop, checks, progress),
            |p| {
                format!(
                    "HTTP {} orders/s, end to end {} orders/s, server peak RSS {:.1} MiB",
                    count(p.http.rate),
                    count(p.e2e.rate),
                    report::mib(p.memory.server_peak_rss)
                )
            },
        );
    }

    if !interrupted(stop) {
        results.drain = scenario(
            progress,
            checks,
            drain::DRAIN_PHASE,
            &format!(
                "backlogs of {} events with RELAY_ORDERING=aggregate, {} with none, relay only",
                list(&plan.backlogs),
                list(&plan.unordered_backlogs)
            ),
            |checks| drain::run(infra, plan, stop, checks, progress),
            |d| match d.growth(txoutbox::RelayOrdering::Aggregate) {
                Some(g) => format!(
                    "time per event x{:.2} from {} to {} events",
                    g.ratio,
                    count(g.smallest as f64),
                    count(g.largest as f64)
                ),
                None => format!("{} drains", d.runs.len()),
            },
        );
    }

    // (6) at shares of (5), the rate the whole pipeline sustained in this run.
    let e2e_rate = results
        .pipeline
        .as_ref()
        .filter(|_| checks.phase_ok(pipeline::HTTP_PHASE))
        .map(|p| p.e2e.rate);
    for level in latency::LEVELS {
        if interrupted(stop) {
            break;
        }
        let Some(e2e) = e2e_rate else {
            checks.add(
                level.phase,
                "scenario ran",
                false,
                "skipped: it offers a share of the end-to-end rate (5), which was not measured".into(),
            );
            continue;
        };
        let offered = e2e * level.share;
        let measured = scenario(
            progress,
            checks,
            level.phase,
            &format!(
                "{} orders/s ({:.0}% of (5)) open loop for {} s, API and relay in process",
                count(offered),
                level.share * 100.0,
                plan.latency.as_secs()
            ),
            |checks| latency::run(infra, launcher, plan, level, offered, stop, checks),
            |l| {
                format!(
                    "commit -> confirm p99 {}, commit -> COMPLETED p99 {}",
                    report::fmt_ms(l.confirm.p99),
                    report::fmt_ms(l.completed.p99)
                )
            },
        );
        results.latency.extend(measured);
    }

    if !interrupted(stop) {
        results.scale_out = scenario(
            progress,
            checks,
            pipeline::SCALE_PHASE,
            &format!(
                "2 servers + 2 consumers, {c} connections for {} s",
                plan.scale_out.as_secs()
            ),
            |checks| pipeline::scale_out(infra, launcher, plan, stop, checks),
            |s| {
                format!(
                    "HTTP {} orders/s, end to end {} orders/s",
                    count(s.http.rate),
                    count(s.e2e.rate)
                )
            },
        );
    }
    if interrupted(stop) {
        checks.add("run", "not interrupted", false, "stopped by a signal".into());
    }
}

/// `10,000, 100,000`.
fn list(sizes: &[u64]) -> String {
    let shown: Vec<String> = sizes.iter().map(|n| count(*n as f64)).collect();
    if shown.is_empty() {
        "no".into()
    } else {
        shown.join(", ")
    }
}

/// Runs one scenario between two progress lines. A failure becomes a failed check.
fn scenario<T>(
    progress: &Progress,
    checks: &mut Checks,
    phase: &str,
    what: &str,
    run: impl FnOnce(&mut Checks) -> Result<T>,
    describe: impl FnOnce(&T) -> String,
) -> Option<T> {
    progress.step(&format!("{phase}: {what} ..."));
    match run(checks) {
        Ok(value) => {
            let verdict = if checks.phase_ok(phase) {
                "counts verified".to_string()
            } else {
                "VERIFICATION FAILED".to_string()
            };
            progress.step(&format!("{phase}: {}; {verdict}", describe(&value)));
            Some(value)
        }
        Err(e) => {
            progress.step(&format!("{phase}: FAILED: {e}"));
            checks.add(phase, "scenario completed", false, e.to_string());
            None
        }
    }
}

/// One line per step, stamped with the time since the run started.
pub struct Progress {
    start: Instant,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            start: Instant::now(),
        }
    }

    /// Prints `[  12.3 s] message`.
    pub fn step(&self, message: &str) {
        println!("[{:>6.1} s] {message}", self.start.elapsed().as_secs_f64());
    }
}

/// A flag set by the first SIGINT or SIGTERM (the run then stops and cleans up); a second one
/// ends the process at once.
fn stop_on_signal() -> Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 1, stop.clone())
            .and_then(|_| signal_hook::flag::register(signal, stop.clone()))
            .map_err(|e| Error::Other(format!("cannot install the signal handler: {e}")))?;
    }
    Ok(stop)
}

fn interrupted(stop: &AtomicBool) -> bool {
    stop.load(std::sync::atomic::Ordering::Relaxed)
}

/// `<target dir>/bench`: the bench executable lives in `<target dir>/release`.
fn default_out_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Other(format!("cannot locate the bench executable: {e}")))?;
    exe.parent()
        .and_then(Path::parent)
        .map(|target| target.join("bench"))
        .ok_or_else(|| Error::Other(format!("cannot find the target directory of {}", exe.display())))
}

/// `git describe --always --dirty` of the working directory, when it is a checkout.
fn source_version() -> Option<String> {
    let output = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

/// The 1-minute load average, from /proc/loadavg.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn pretty_json(results: &Results) -> Result<String> {
    serde_json::to_string_pretty(&results.json())
        .map_err(|e| Error::Other(format!("cannot encode results.json: {e}")))
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|e| Error::Other(format!("cannot write {}: {e}", path.display())))
}
