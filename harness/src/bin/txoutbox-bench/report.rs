//! Everything a run measured, the targets (same-run ratios and limits), and the three ways the
//! results are told: the console table, `summary.md` and `results.json`. A number is shown only
//! when its scenario verified its counts.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};
use txoutbox::RelayConfig;

use crate::ceilings::{BrokerCeiling, Throughput, BROKER_PHASE, DB_PHASE};
use crate::cpu::{CpuUsage, GROUPS};
use crate::drain::{ordering_name, Drains, DRAIN_PHASE, GROWTH_GOAL};
use crate::infra::Servers;
use crate::latency::{Latency, Level, JUDGED_LEVEL, LEVELS, OPEN_LOOP_SENDERS};
use crate::options::Plan;
use crate::pipeline::{Pipeline, ScaleOut, HTTP_PHASE, SCALE_PHASE};
use crate::quantiles::Quantiles;
use crate::sampler::Line;
use crate::verify::Checks;
use txoutbox::RelayOrdering;
use txoutbox_harness::support::timestamp::Timestamp;

/// HTTP POST throughput must reach this share of the database ceiling.
pub const HTTP_GOAL: f64 = 0.8;
/// End-to-end throughput must reach this share of the database ceiling.
pub const E2E_GOAL: f64 = 0.6;
/// The relay's drain must reach this share of the broker ceiling.
pub const DRAIN_GOAL: f64 = 0.8;
/// Commit -> confirm p99 at 50% of the end-to-end rate, at most.
pub const CONFIRM_P99_GOAL: Duration = Duration::from_millis(10);
/// Commit -> `COMPLETED` p99 at 50% of the end-to-end rate, at most.
pub const COMPLETED_P99_GOAL: Duration = Duration::from_millis(25);
/// Server peak RSS at 64 connections, at most (bytes).
pub const SERVER_RSS_GOAL: u64 = 64 * 1024 * 1024;
/// Postgres CPU per order in (3), at most this many times its CPU per transaction in (1).
pub const POSTGRES_CPU_GOAL: f64 = 1.25;
/// Server CPU (HTTP and relay) per order in (3), at most (milliseconds).
pub const SERVER_CPU_GOAL_MS: f64 = 0.15;

/// Cores other processes may use during a scenario before the run is flagged as shared.
pub const OTHER_CPU_WARNING: f64 = 0.2;

/// Whether a target was met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Met.
    Pass,
    /// Not met.
    Miss,
    /// A scenario it depends on did not complete or verify: no number to judge.
    Unverified,
}

impl Status {
    /// `PASS`, `MISS` or `UNVERIFIED`.
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Miss => "MISS",
            Status::Unverified => "UNVERIFIED",
        }
    }
}

/// One target and how the run did.
#[derive(Clone, Debug)]
pub struct Target {
    /// Stable key for results.json.
    pub key: &'static str,
    /// What is compared.
    pub name: &'static str,
    /// A shorter name, for the chart.
    pub label: &'static str,
    /// The measured value (a ratio, milliseconds or MiB), when verified.
    pub value: Option<f64>,
    /// The value as shown.
    pub shown: String,
    /// The goal as shown, e.g. `>= 0.80`.
    pub goal: String,
    /// Met or not.
    pub status: Status,
}

/// A row of the measurement table.
struct Row {
    label: &'static str,
    value: String,
    detail: String,
}

/// Everything one run measured and checked.
#[derive(Clone, Debug)]
pub struct Results {
    /// When the run started.
    pub timestamp: Timestamp,
    /// What it ran.
    pub plan: Plan,
    /// `std::thread::available_parallelism`.
    pub cores: usize,
    /// Postgres and RabbitMQ versions and settings.
    pub servers: Servers,
    /// `git describe` of the source, when known.
    pub source: Option<String>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// 1-minute load average before the run (/proc/loadavg): other work on the machine moves
    /// absolute numbers, and ratios less.
    pub load_average: Option<f64>,
    /// (1).
    pub db_ceiling: Option<Throughput>,
    /// Size of the events of (2) and of a real `OrderCreated` body.
    pub body_bytes: usize,
    /// (2).
    pub broker_ceiling: Option<BrokerCeiling>,
    /// (3), (5), (7).
    pub pipeline: Option<Pipeline>,
    /// (4).
    pub drain: Option<Drains>,
    /// (6), one per level of [`LEVELS`] that ran, in order.
    pub latency: Vec<Latency>,
    /// (8).
    pub scale_out: Option<ScaleOut>,
    /// Every verification made.
    pub checks: Checks,
}

impl Results {
    /// An empty record of a run starting now.
    pub fn new(
        timestamp: Timestamp,
        plan: Plan,
        cores: usize,
        servers: Servers,
        source: Option<String>,
    ) -> Self {
        Results {
            timestamp,
            plan,
            cores,
            servers,
            source,
            elapsed: Duration::ZERO,
            load_average: None,
            db_ceiling: None,
            body_bytes: 0,
            broker_ceiling: None,
            pipeline: None,
            drain: None,
            latency: Vec::new(),
            scale_out: None,
            checks: Checks::default(),
        }
    }

    /// True when every scenario completed and every check held.
    pub fn verified(&self) -> bool {
        self.checks.failed().is_empty()
            && [DB_PHASE, BROKER_PHASE, HTTP_PHASE, DRAIN_PHASE, SCALE_PHASE]
                .into_iter()
                .chain(LEVELS.iter().map(|level| level.phase))
                .all(|phase| self.checks.phase_ok(phase))
    }

    fn ok<'a, T>(&self, phase: &str, value: &'a Option<T>) -> Option<&'a T> {
        value.as_ref().filter(|_| self.checks.phase_ok(phase))
    }

    /// (6) at `level`, when it ran and verified.
    pub fn latency_at(&self, level: Level) -> Option<&Latency> {
        self.latency
            .iter()
            .find(|l| l.level == level)
            .filter(|_| self.checks.phase_ok(level.phase))
    }

    /// (1) in tx/s, when verified.
    pub fn db_rate(&self) -> Option<f64> {
        self.ok(DB_PHASE, &self.db_ceiling).map(|t| t.rate)
    }

    /// (2) in msg/s, when verified.
    pub fn broker_rate(&self) -> Option<f64> {
        self.ok(BROKER_PHASE, &self.broker_ceiling)
            .map(|b| b.throughput.rate)
    }

    /// CPU of `group` per unit of `throughput` (cores per event per second: seconds per event).
    fn cpu_per_event(throughput: &Throughput, group: &str) -> Option<f64> {
        let at = GROUPS.iter().position(|g| *g == group)?;
        let cores = throughput.cpu.groups.get(at)?;
        (throughput.rate > 0.0 && throughput.cpu.seconds > 0.0).then(|| cores / throughput.rate)
    }

    /// The targets, in the order they are shown.
    pub fn targets(&self) -> Vec<Target> {
        let pipeline = self.ok(HTTP_PHASE, &self.pipeline);
        let ratio = |value: Option<f64>, of: Option<f64>| match (value, of) {
            (Some(v), Some(of)) if of > 0.0 => Some(v / of),
            _ => None,
        };
        let at_least =
            |key, name, label, value, goal| bounded(key, name, label, value, Bound::AtLeast(goal), "");
        let at_most =
            |key, name, label, value, goal, unit| bounded(key, name, label, value, Bound::AtMost(goal), unit);
        let db = self.ok(DB_PHASE, &self.db_ceiling);
        let postgres_per_order = ratio(
            pipeline.and_then(|p| Self::cpu_per_event(&p.http, "postgres")),
            db.and_then(|t| Self::cpu_per_event(t, "postgres")),
        );
        let server_ms_per_order =
            pipeline.and_then(|p| Self::cpu_per_event(&p.http, "server").map(|s| s * 1000.0));
        let judged = self.latency_at(JUDGED_LEVEL);
        let growth = self
            .ok(DRAIN_PHASE, &self.drain)
            .and_then(|d| d.growth(RelayOrdering::Aggregate))
            .map(|g| g.ratio);
        let confirm_p99 = judged.map(|l| millis(l.confirm.p99));
        let completed_p99 = judged.map(|l| millis(l.completed.p99));
        let rss = pipeline.map(|p| mib(p.memory.server_peak_rss));
        let goal_ms = millis(CONFIRM_P99_GOAL);
        let completed_goal_ms = millis(COMPLETED_P99_GOAL);
        let goal_mib = mib(SERVER_RSS_GOAL);
        vec![
            at_least(
                "http_over_db_ceiling",
                "HTTP POST throughput / database ceiling",
                "HTTP / database ceiling",
                ratio(pipeline.map(|p| p.http.rate), self.db_rate()),
                HTTP_GOAL,
            ),
            at_least(
                "e2e_over_db_ceiling",
                "end-to-end throughput / database ceiling",
                "end to end / database ceiling",
                ratio(pipeline.map(|p| p.e2e.rate), self.db_rate()),
                E2E_GOAL,
            ),
            at_least(
                "drain_over_broker_ceiling",
                "relay drain / broker ceiling",
                "relay drain / broker ceiling",
                ratio(
                    self.ok(DRAIN_PHASE, &self.drain)
                        .and_then(Drains::reference)
                        .map(|d| d.throughput.rate),
                    self.broker_rate(),
                ),
                DRAIN_GOAL,
            ),
            Target {
                key: "drain_time_per_event_growth",
                name: "relay drain µs/event, largest / smallest backlog",
                label: "drain µs/event growth",
                value: growth,
                shown: growth.map_or("-".into(), |v| format!("{v:.2} x")),
                goal: format!("<= {GROWTH_GOAL:.1} x"),
                status: judge(growth, |v| v <= GROWTH_GOAL),
            },
            Target {
                key: "commit_to_confirm_p99_ms",
                name: "commit -> confirm p99 at 50% of (5)",
                label: "confirm p99, 50% of (5)",
                value: confirm_p99,
                shown: confirm_p99.map_or("-".into(), |v| format!("{v:.1} ms")),
                goal: format!("<= {goal_ms:.0} ms"),
                status: judge(confirm_p99, |v| v <= goal_ms),
            },
            Target {
                key: "commit_to_completed_p99_ms",
                name: "commit -> COMPLETED p99 at 50% of (5)",
                label: "COMPLETED p99, 50% of (5)",
                value: completed_p99,
                shown: completed_p99.map_or("-".into(), |v| format!("{v:.1} ms")),
                goal: format!("<= {completed_goal_ms:.0} ms"),
                status: judge(completed_p99, |v| v <= completed_goal_ms),
            },
            at_most(
                "postgres_cpu_per_order_over_ceiling",
                "Postgres CPU per order, (3) / (1)",
                "Postgres CPU/order, (3) / (1)",
                postgres_per_order,
                POSTGRES_CPU_GOAL,
                " x",
            ),
            at_most(
                "server_cpu_ms_per_order",
                "server CPU per order in (3), HTTP + relay",
                "server CPU/order in (3)",
                server_ms_per_order,
                SERVER_CPU_GOAL_MS,
                " ms",
            ),
            Target {
                key: "server_peak_rss_mib",
                name: "server peak RSS at 64 connections",
                label: "server RSS, 64 connections",
                value: rss,
                shown: rss.map_or("-".into(), |v| format!("{v:.1} MiB")),
                goal: format!("<= {goal_mib:.0} MiB"),
                status: judge(rss, |v| v <= goal_mib),
            },
        ]
    }

    /// The measurement table; unverified scenarios show why instead of a number.
    fn rows(&self) -> Vec<Row> {
        let relay = RelayConfig::default();
        let unverified = |phase: &str| {
            let failed = self
                .checks
                .0
                .iter()
                .find(|c| c.phase == phase && !c.ok)
                .map_or("did not run".to_string(), |c| format!("{}: {}", c.what, c.detail));
            format!("not reported: {failed}")
        };
        let mut rows = Vec::new();
        let mut row = |label, value: Option<String>, detail: String, phase: &str| {
            let (value, detail) = match value {
                Some(value) => (value, detail),
                None => ("-".to_string(), unverified(phase)),
            };
            rows.push(Row { label, value, detail });
        };
        let db = self.ok(DB_PHASE, &self.db_ceiling);
        row(
            "(1) database ceiling",
            db.map(|t| format!("{} tx/s", count(t.rate))),
            db.map_or(String::new(), |t| {
                format!(
                    "orders::create (order + outbox insert + commit) on {} connections: {} commits in {:.1} s",
                    self.plan.concurrency,
                    count(t.count as f64),
                    t.elapsed.as_secs_f64()
                )
            }),
            DB_PHASE,
        );
        let broker = self.ok(BROKER_PHASE, &self.broker_ceiling);
        row(
            "(2) broker ceiling",
            broker.map(|b| format!("{} msg/s", count(b.throughput.rate))),
            broker.map(|b| &b.throughput).map_or(String::new(), |t| {
                format!(
                    "Publisher::publish_batch on {} threads, batches of {}, {}-byte bodies: {} confirmed in {:.1} s",
                    relay.workers,
                    relay.batch_size,
                    self.body_bytes,
                    count(t.count as f64),
                    t.elapsed.as_secs_f64()
                )
            }),
            BROKER_PHASE,
        );
        row(
            "(2) confirm, lone message",
            broker.map(|b| brief(&b.lone_confirm)),
            broker.map_or(String::new(), |_| {
                format!(
                    "publish -> confirm of one message at a time, {} times: the floor under commit -> confirm",
                    self.plan.lone_confirms
                )
            }),
            BROKER_PHASE,
        );
        let pipeline = self.ok(HTTP_PHASE, &self.pipeline);
        row(
            "(3) HTTP POST /orders",
            pipeline.map(|p| format!("{} orders/s", count(p.http.rate))),
            pipeline.map_or(String::new(), |p| {
                format!(
                    "{} keep-alive connections to txoutbox-server (relay inside) with txoutbox-consumer: {} orders in {:.1} s",
                    self.plan.concurrency,
                    count(p.http.count as f64),
                    p.http.elapsed.as_secs_f64()
                )
            }),
            HTTP_PHASE,
        );
        match self.ok(DRAIN_PHASE, &self.drain) {
            Some(drains) => {
                for d in &drains.runs {
                    row(
                        if d.ordering == RelayOrdering::Aggregate {
                            "(4) relay drain, aggregate"
                        } else {
                            "(4) relay drain, none"
                        },
                        Some(format!(
                            "{} events/s, {:.1} µs/event",
                            count(d.throughput.rate),
                            d.us_per_event()
                        )),
                        format!(
                            "backlog of {} events, RELAY_ORDERING={}, no consumer: published, confirmed and deleted; \
                             rate from the first confirm, {:.1} s",
                            count(d.backlog as f64),
                            ordering_name(d.ordering),
                            d.throughput.elapsed.as_secs_f64()
                        ),
                        DRAIN_PHASE,
                    );
                }
                for ordering in [RelayOrdering::Aggregate, RelayOrdering::None] {
                    if let Some(g) = drains.growth(ordering) {
                        row(
                            "(4) cost as the backlog grows",
                            Some(format!("x{:.2} µs/event", g.ratio)),
                            format!(
                                "RELAY_ORDERING={}: time per event at {} events / at {} events",
                                ordering_name(ordering),
                                count(g.largest as f64),
                                count(g.smallest as f64)
                            ),
                            DRAIN_PHASE,
                        );
                    }
                }
            }
            None => row("(4) relay drain", None, String::new(), DRAIN_PHASE),
        }
        row(
            "(5) end to end",
            pipeline.map(|p| format!("{} orders/s", count(p.e2e.rate))),
            pipeline.map_or(String::new(), |p| {
                format!(
                    "first POST to last COMPLETED of the orders of (3): {:.1} s",
                    p.e2e.elapsed.as_secs_f64()
                )
            }),
            HTTP_PHASE,
        );
        for level in LEVELS {
            let latency = self.latency_at(level);
            let pct = level.share * 100.0;
            row(
                if level == JUDGED_LEVEL {
                    "(6) commit -> confirm, 50%"
                } else {
                    "(6) commit -> confirm, 25%"
                },
                latency.map(|l| brief(&l.confirm)),
                latency.map_or(String::new(), |l| {
                    format!(
                        "open loop at {} orders/s ({pct:.0}% of (5)), {} s measured after {} s of warm-up; \
                         achieved {} orders/s, {} of {} sent > 1 ms late",
                        count(l.offered_rate),
                        self.plan.latency.as_secs(),
                        self.plan.latency_warm_up.as_secs(),
                        count(l.achieved_rate),
                        l.late,
                        l.scheduled
                    )
                }),
                level.phase,
            );
            row(
                if level == JUDGED_LEVEL {
                    "(6) commit -> COMPLETED, 50%"
                } else {
                    "(6) commit -> COMPLETED, 25%"
                },
                latency.map(|l| brief(&l.completed)),
                latency.map_or(String::new(), |_| {
                    "orders.updated_at - created_at, the same orders".to_string()
                }),
                level.phase,
            );
            row(
                if level == JUDGED_LEVEL {
                    "(6) HTTP 201, 50%"
                } else {
                    "(6) HTTP 201, 25%"
                },
                latency.map(|l| brief(&l.http)),
                latency.map_or(String::new(), |_| {
                    format!("client side, from each order's due instant; {OPEN_LOOP_SENDERS} sender threads")
                }),
                level.phase,
            );
        }
        row(
            "(7) peak RSS",
            pipeline.map(|p| {
                format!(
                    "server {:.1} MiB, consumer {:.1} MiB",
                    mib(p.memory.server_peak_rss),
                    mib(p.memory.consumer_peak_rss)
                )
            }),
            pipeline.map_or(String::new(), |p| {
                format!(
                    "VmHWM after {} connections (and the run of (3))",
                    p.memory.connections
                )
            }),
            HTTP_PHASE,
        );
        let scale = self.ok(SCALE_PHASE, &self.scale_out);
        row(
            "(8) scale-out 2+2",
            scale.map(|s| {
                format!(
                    "{} orders/s HTTP, {} end to end",
                    count(s.http.rate),
                    count(s.e2e.rate)
                )
            }),
            scale.map_or(String::new(), |s| {
                format!(
                    "2 servers + 2 consumers, one database and queue; orders per server {:?}; each processed exactly once",
                    s.per_server
                )
            }),
            SCALE_PHASE,
        );
        rows
    }

    fn headline(&self) -> String {
        format!(
            "{} cores, concurrency {}, {} run of {:.0} s, {}, load average {} before",
            self.cores,
            self.plan.concurrency,
            if self.plan.quick { "quick" } else { "full" },
            self.elapsed.as_secs_f64(),
            self.timestamp.iso,
            self.load_average.map_or("?".to_string(), |l| format!("{l:.2}"))
        )
    }

    fn verification_line(&self) -> String {
        let failed = self.checks.failed();
        if self.verified() {
            format!("verification: all {} checks held", self.checks.0.len())
        } else if failed.is_empty() {
            "verification: FAILED (a scenario did not run)".to_string()
        } else {
            let list: Vec<String> = failed
                .iter()
                .map(|c| format!("{}: {}: {}", c.phase, c.what, c.detail))
                .collect();
            format!(
                "verification: FAILED, {} of {} checks: {}",
                failed.len(),
                self.checks.0.len(),
                list.join("; ")
            )
        }
    }

    /// The console summary.
    pub fn console(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "\ntxoutbox-bench: {}", self.headline());
        let _ = writeln!(out, "\nMeasurements");
        for row in self.rows() {
            let _ = writeln!(out, "  {:<28} {:<40} {}", row.label, row.value, row.detail);
        }
        let _ = writeln!(out, "\nTargets (same-run ratios, {} cores)", self.cores);
        for target in self.targets() {
            let _ = writeln!(
                out,
                "  {:<48} {:>10}  {:<10} {}",
                target.name,
                target.shown,
                target.goal,
                target.status.label()
            );
        }
        if let Some(p) = self.ok(HTTP_PHASE, &self.pipeline) {
            let _ = writeln!(
                out,
                "\nStatements per order in (3), counted by Postgres (pg_stat_statements)"
            );
            for line in p.statements.console(100) {
                let _ = writeln!(out, "{line}");
            }
            let _ = writeln!(out, "\nCPU profiles under the load of (3)");
            for line in p.profiles.console(100) {
                let _ = writeln!(out, "{line}");
            }
        }
        let _ = writeln!(
            out,
            "\nWhere the CPU went, in cores of {} (busy = not idle; iowait = idle waiting for the disk)",
            self.cores
        );
        for (label, cpu) in self.cpu() {
            let _ = writeln!(out, "  {label:<28} {}", cpu.brief());
        }
        if let Some(warning) = self.contention_warning() {
            let _ = writeln!(out, "  warning: {warning}");
        }
        let _ = writeln!(out, "\n{}", self.verification_line());
        out
    }

    /// A warning when processes other than Postgres, RabbitMQ, txoutbox and the bench took a
    /// noticeable share of the processors during some scenario.
    pub fn contention_warning(&self) -> Option<String> {
        let other = GROUPS.iter().position(|g| *g == "other")?;
        let (label, cores) = self
            .cpu()
            .into_iter()
            .filter_map(|(label, cpu)| cpu.groups.get(other).map(|c| (label, *c)))
            .max_by(|a, b| a.1.total_cmp(&b.1))?;
        (cores >= OTHER_CPU_WARNING).then(|| {
            format!(
                "other processes used up to {cores:.2} cores (during {label}); this run shared the machine, \
                 so its numbers, ratios included, are skewed: rerun when it is quiet"
            )
        })
    }

    /// CPU used during each scenario's measured window, in run order.
    pub fn cpu(&self) -> Vec<(&'static str, &CpuUsage)> {
        let mut cpu = Vec::new();
        if let Some(t) = &self.db_ceiling {
            cpu.push(("(1) database ceiling", &t.cpu));
        }
        if let Some(b) = &self.broker_ceiling {
            cpu.push(("(2) broker ceiling", &b.throughput.cpu));
        }
        if let Some(p) = &self.pipeline {
            cpu.push(("(3) HTTP POST /orders", &p.http.cpu));
        }
        if let Some(d) = self.drain.as_ref().and_then(Drains::reference) {
            cpu.push(("(4) relay drain", &d.throughput.cpu));
        }
        for l in &self.latency {
            cpu.push((
                if l.level == JUDGED_LEVEL {
                    "(6) 50% of (5)"
                } else {
                    "(6) 25% of (5)"
                },
                &l.cpu,
            ));
        }
        if let Some(s) = &self.scale_out {
            cpu.push(("(8) scale-out", &s.http.cpu));
        }
        cpu
    }

    /// `summary.md`.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# txoutbox benchmark, {}\n", self.timestamp.iso);
        let _ = writeln!(out, "{}.  ", self.headline());
        let _ = writeln!(
            out,
            "PostgreSQL {} (synchronous_commit={}, fsync={}, autovacuum={}), RabbitMQ {}{}.\n",
            self.servers.postgres_version,
            self.servers.synchronous_commit,
            self.servers.fsync,
            self.servers.autovacuum,
            self.servers.rabbitmq_version,
            self.source
                .as_ref()
                .map_or(String::new(), |s| format!(", source {s}"))
        );
        let _ = writeln!(out, "## Targets (same-run ratios)\n");
        let _ = writeln!(out, "| Target | Measured | Goal | |\n|---|---:|---|---|");
        for t in self.targets() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | **{}** |",
                t.name,
                t.shown,
                t.goal,
                t.status.label()
            );
        }
        let _ = writeln!(out, "\n## Measurements\n");
        let _ = writeln!(out, "| Scenario | Result | How |\n|---|---|---|");
        for row in self.rows() {
            let _ = writeln!(out, "| {} | {} | {} |", row.label, row.value, row.detail);
        }
        let verified_latency: Vec<&Latency> = LEVELS.iter().filter_map(|l| self.latency_at(*l)).collect();
        if !verified_latency.is_empty() {
            let _ = writeln!(out, "\n## Latency below saturation (open loop, shares of (5))\n");
            let _ = writeln!(
                out,
                "| Load | | p50 | p90 | p99 | p99.9 | max |\n|---|---|---:|---:|---:|---:|---:|"
            );
            for latency in verified_latency {
                let load = format!(
                    "{:.0}% = {} orders/s",
                    latency.level.share * 100.0,
                    count(latency.offered_rate)
                );
                for (name, q) in [
                    ("commit -> broker confirm", &latency.confirm),
                    ("commit -> COMPLETED", &latency.completed),
                    ("HTTP 201, from schedule", &latency.http),
                ] {
                    let cells: Vec<String> = q.labelled().iter().map(|(_, d)| fmt_ms(*d)).collect();
                    let _ = writeln!(out, "| {load} | {name} | {} |", cells.join(" | "));
                }
            }
        }
        if let Some(p) = self.ok(HTTP_PHASE, &self.pipeline) {
            let _ = writeln!(out, "\n## Statements and round trips per order in (3)\n");
            let _ = write!(out, "{}", p.statements.markdown());
            let _ = writeln!(out, "\n## CPU profiles under the load of (3)\n");
            let _ = write!(out, "{}", p.profiles.markdown());
        }
        let _ = writeln!(
            out,
            "\n## Where the CPU went\n\nCores used during each measured window ({} in all; busy = not \
             idle, iowait = idle while waiting for the disk):\n",
            self.cores
        );
        let _ = writeln!(
            out,
            "| Scenario | busy | iowait | {} |\n|---|---:|---:|{}",
            GROUPS.join(" | "),
            "---:|".repeat(GROUPS.len())
        );
        for (label, cpu) in self.cpu() {
            let groups: Vec<String> = cpu.groups.iter().map(|c| format!("{c:.2}")).collect();
            let _ = writeln!(
                out,
                "| {label} | {:.2} | {:.2} | {} |",
                cpu.busy,
                cpu.iowait,
                groups.join(" | ")
            );
        }
        if let Some(warning) = self.contention_warning() {
            let _ = writeln!(out, "\n**Warning:** {warning}.");
        }
        let _ = writeln!(
            out,
            "\n![throughput over time and latency percentiles](chart.svg)\n"
        );
        let _ = writeln!(out, "## Verification\n\n{}\n", self.verification_line());
        let _ = writeln!(out, "| Scenario | Check | Found | |\n|---|---|---|---|");
        for c in &self.checks.0 {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                c.phase,
                c.what,
                c.detail.replace('|', "/"),
                if c.ok { "ok" } else { "**FAILED**" }
            );
        }
        out
    }

    /// `results.json`: every raw number.
    pub fn json(&self) -> Value {
        let relay = RelayConfig::default();
        let throughput = |phase: &str, t: &Option<Throughput>, unit: &str| {
            t.as_ref().map(|t| {
                json!({
                    "verified": self.checks.phase_ok(phase),
                    "count": t.count,
                    "seconds": t.elapsed.as_secs_f64(),
                    unit: t.rate,
                })
            })
        };
        let quantiles = |q: &Quantiles| {
            let mut map = serde_json::Map::new();
            for (label, d) in q.labelled() {
                map.insert(label.replace('.', "_"), json!(millis(d)));
            }
            Value::Object(map)
        };
        let series = |phase: &str, lines: &[Line]| {
            json!({
                "phase": phase,
                "lines": lines.iter().map(|l| json!({
                    "name": l.name,
                    "points": l.points.iter().map(|(t, v)| json!([t, v])).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        };
        let mut all_series = Vec::new();
        for (phase, lines) in self.series() {
            all_series.push(series(phase, lines));
        }
        json!({
            "timestamp": self.timestamp.iso,
            "mode": if self.plan.quick { "quick" } else { "full" },
            "cores": self.cores,
            "concurrency": self.plan.concurrency,
            "elapsed_seconds": self.elapsed.as_secs_f64(),
            "load_average_before": self.load_average,
            "contention_warning": self.contention_warning(),
            "verified": self.verified(),
            "source": self.source,
            "servers": {
                "postgres_version": self.servers.postgres_version,
                "synchronous_commit": self.servers.synchronous_commit,
                "fsync": self.servers.fsync,
                "autovacuum": self.servers.autovacuum,
                "rabbitmq_version": self.servers.rabbitmq_version,
            },
            "plan": {
                "db_ceiling_seconds": self.plan.db_ceiling.as_secs_f64(),
                "broker_ceiling_seconds": self.plan.broker_ceiling.as_secs_f64(),
                "http_seconds": self.plan.http.as_secs_f64(),
                "memory_seconds": self.plan.memory.as_secs_f64(),
                "backlogs": self.plan.backlogs,
                "unordered_backlogs": self.plan.unordered_backlogs,
                "latency_seconds": self.plan.latency.as_secs_f64(),
                "latency_warm_up_seconds": self.plan.latency_warm_up.as_secs_f64(),
                "lone_confirms": self.plan.lone_confirms,
                "scale_out_seconds": self.plan.scale_out.as_secs_f64(),
                "relay_workers": relay.workers,
                "relay_batch": relay.batch_size,
            },
            "db_ceiling": throughput(DB_PHASE, &self.db_ceiling, "tx_per_second"),
            "broker_ceiling": self.broker_ceiling.as_ref().map(|b| json!({
                "verified": self.checks.phase_ok(BROKER_PHASE),
                "count": b.throughput.count,
                "seconds": b.throughput.elapsed.as_secs_f64(),
                "messages_per_second": b.throughput.rate,
                "body_bytes": self.body_bytes,
                "publishers": relay.workers,
                "batch": relay.batch_size,
                "lone_confirm_ms": quantiles(&b.lone_confirm),
            })),
            "http": self.pipeline.as_ref().map(|p| json!({
                "verified": self.checks.phase_ok(HTTP_PHASE),
                "connections": self.plan.concurrency,
                "orders": p.http.count,
                "seconds": p.http.elapsed.as_secs_f64(),
                "orders_per_second": p.http.rate,
                "statements": p.statements.json(),
                "profiles": p.profiles.json(),
            })),
            "relay_drain": self.drain.as_ref().map(|drains| json!({
                "verified": self.checks.phase_ok(DRAIN_PHASE),
                "runs": drains.runs.iter().map(|d| json!({
                    "ordering": ordering_name(d.ordering),
                    "backlog": d.backlog,
                    "events_timed": d.throughput.count,
                    "seconds": d.throughput.elapsed.as_secs_f64(),
                    "events_per_second": d.throughput.rate,
                    "us_per_event": d.us_per_event(),
                    "fill_seconds": d.fill.as_secs_f64(),
                })).collect::<Vec<_>>(),
                "growth": drain_growth(drains),
            })),
            "end_to_end": self.pipeline.as_ref().map(|p| json!({
                "verified": self.checks.phase_ok(HTTP_PHASE),
                "orders": p.e2e.count,
                "seconds": p.e2e.elapsed.as_secs_f64(),
                "orders_per_second": p.e2e.rate,
            })),
            "latency": self.latency.iter().map(|l| json!({
                "verified": self.checks.phase_ok(l.level.phase),
                "share_of_end_to_end": l.level.share,
                "offered_per_second": l.offered_rate,
                "achieved_per_second": l.achieved_rate,
                "scheduled": l.scheduled,
                "accepted": l.accepted,
                "sent_late": l.late,
                "sender_threads": OPEN_LOOP_SENDERS,
                "commit_to_confirm_ms": quantiles(&l.confirm),
                "commit_to_completed_ms": quantiles(&l.completed),
                "http_from_schedule_ms": quantiles(&l.http),
            })).collect::<Vec<_>>(),
            "memory": self.pipeline.as_ref().map(|p| json!({
                "verified": self.checks.phase_ok(HTTP_PHASE),
                "connections": p.memory.connections,
                "server_peak_rss_bytes": p.memory.server_peak_rss,
                "consumer_peak_rss_bytes": p.memory.consumer_peak_rss,
            })),
            "scale_out": self.scale_out.as_ref().map(|s| json!({
                "verified": self.checks.phase_ok(SCALE_PHASE),
                "servers": 2,
                "consumers": 2,
                "orders": s.http.count,
                "orders_per_server": s.per_server,
                "http_orders_per_second": s.http.rate,
                "e2e_orders_per_second": s.e2e.rate,
                "e2e_seconds": s.e2e.elapsed.as_secs_f64(),
            })),
            "targets": self.targets().iter().map(|t| json!({
                "key": t.key,
                "name": t.name,
                "value": t.value,
                "goal": t.goal,
                "status": t.status.label(),
            })).collect::<Vec<_>>(),
            "checks": self.checks.0.iter().map(|c| json!({
                "phase": c.phase, "what": c.what, "detail": c.detail, "ok": c.ok,
            })).collect::<Vec<_>>(),
            "series": all_series,
            "cpu_cores": self.cpu().iter().map(|(label, cpu)| {
                let mut groups = serde_json::Map::new();
                for (name, cores) in GROUPS.iter().zip(&cpu.groups) {
                    groups.insert(name.to_string(), json!(cores));
                }
                json!({
                    "scenario": label,
                    "seconds": cpu.seconds,
                    "busy": cpu.busy,
                    "iowait": cpu.iowait,
                    "by_process": groups,
                })
            }).collect::<Vec<_>>(),
        })
    }

    /// Every sampled throughput, by scenario, in run order.
    pub fn series(&self) -> Vec<(&'static str, &[Line])> {
        let mut series: Vec<(&'static str, &[Line])> = Vec::new();
        if let Some(t) = &self.db_ceiling {
            series.push((DB_PHASE, &t.lines));
        }
        if let Some(b) = &self.broker_ceiling {
            series.push((BROKER_PHASE, &b.throughput.lines));
        }
        if let Some(p) = &self.pipeline {
            series.push((HTTP_PHASE, &p.http.lines));
        }
        if let Some(d) = self.drain.as_ref().and_then(Drains::reference) {
            series.push((DRAIN_PHASE, &d.throughput.lines));
        }
        for l in &self.latency {
            series.push((l.level.phase, &l.lines));
        }
        if let Some(s) = &self.scale_out {
            series.push((SCALE_PHASE, &s.http.lines));
        }
        series
    }
}

/// How time per event grew with the backlog, per ordering, for results.json.
fn drain_growth(drains: &Drains) -> Value {
    let growth: Vec<Value> = [RelayOrdering::Aggregate, RelayOrdering::None]
        .iter()
        .filter_map(|o| {
            drains.growth(*o).map(|g| {
                json!({
                    "ordering": ordering_name(*o),
                    "smallest": g.smallest,
                    "largest": g.largest,
                    "us_per_event_ratio": g.ratio,
                })
            })
        })
        .collect();
    Value::Array(growth)
}

/// `text` cut to `width` characters, with an ellipsis when cut.
pub fn shorten(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let cut: String = text.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// `p50 1.2 ms  p99 4.0 ms  max 9.1 ms`.
fn brief(q: &Quantiles) -> String {
    format!(
        "p50 {}  p99 {}  max {}",
        fmt_ms(q.p50),
        fmt_ms(q.p99),
        fmt_ms(q.max)
    )
}

/// Which side of its goal a target's value must stay on.
#[derive(Clone, Copy, Debug)]
enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

/// A target whose `value` (shown with two decimals and `unit`) must stay within `bound`.
fn bounded(
    key: &'static str,
    name: &'static str,
    label: &'static str,
    value: Option<f64>,
    bound: Bound,
    unit: &str,
) -> Target {
    let (sign, goal) = match bound {
        Bound::AtLeast(goal) => (">=", goal),
        Bound::AtMost(goal) => ("<=", goal),
    };
    Target {
        key,
        name,
        label,
        value,
        shown: value.map_or("-".into(), |v| format!("{v:.2}{unit}")),
        goal: format!("{sign} {goal:.2}{unit}"),
        status: judge(value, |v| match bound {
            Bound::AtLeast(goal) => v >= goal,
            Bound::AtMost(goal) => v <= goal,
        }),
    }
}

fn judge(value: Option<f64>, met: impl Fn(f64) -> bool) -> Status {
    match value {
        None => Status::Unverified,
        Some(v) if met(v) => Status::Pass,
        Some(_) => Status::Miss,
    }
}

/// Milliseconds as a float.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Bytes in MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// `4.2 ms`, `0.35 ms`, `1204 ms`.
pub fn fmt_ms(d: Duration) -> String {
    let ms = millis(d);
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 1.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

/// A count or rate rounded, with thousands separated: `12,345`.
pub fn count(value: f64) -> String {
    let rounded = value.round().max(0.0) as u64;
    let digits = rounded.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(count(1234567.4), "1,234,567");
        assert_eq!(count(999.6), "1,000");
        assert_eq!(count(12.0), "12");
        assert_eq!(fmt_ms(Duration::from_micros(350)), "0.35 ms");
        assert_eq!(fmt_ms(Duration::from_micros(4_240)), "4.2 ms");
        assert_eq!(judge(Some(0.9), |v| v >= 0.8), Status::Pass);
        assert_eq!(judge(Some(0.7), |v| v >= 0.8), Status::Miss);
        assert_eq!(judge(None, |v| v >= 0.8), Status::Unverified);
    }

    #[test]
    fn cpu_per_order_is_a_groups_cores_over_the_rate() {
        let throughput = |rate: f64, postgres: f64, server: f64| Throughput {
            count: 0,
            elapsed: Duration::from_secs(5),
            rate,
            lines: Vec::new(),
            cpu: CpuUsage {
                seconds: 5.0,
                busy: 2.0,
                iowait: 0.0,
                groups: vec![postgres, 0.2, server, 0.0, 0.0, 0.0],
            },
        };
        let http = throughput(4000.0, 1.0, 0.6);
        let per = |group| Results::cpu_per_event(&http, group).unwrap();
        assert!(
            (per("postgres") * 1e6 - 250.0).abs() < 1e-6,
            "µs of Postgres per order"
        );
        assert!(
            (per("server") * 1e3 - 0.15).abs() < 1e-9,
            "ms of server per order"
        );
        assert_eq!(
            Results::cpu_per_event(&throughput(0.0, 1.0, 0.6), "postgres"),
            None
        );
        assert_eq!(Results::cpu_per_event(&http, "no such group"), None);
    }
}
