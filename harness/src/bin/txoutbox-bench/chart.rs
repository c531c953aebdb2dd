//! `chart.svg`, drawn with plotters ([`crate::plot`]): the targets with PASS or MISS, throughput
//! over time for each scenario (with its ceiling or offered rate dashed), the latency
//! percentiles at 25% and 50% of (5) on a log scale with their goals, and the relay drain's
//! time per event by backlog.

use crate::ceilings::{BROKER_PHASE, DB_PHASE};
use crate::drain::{ordering_name, DRAIN_PHASE};
use crate::latency::{JUDGED_LEVEL, LEVELS};
use crate::pipeline::{HTTP_PHASE, SCALE_PHASE};
use crate::plot::{self, Block, Categories, Panel, Series, COLORS};
use crate::report::{count, millis, Results, Status, COMPLETED_P99_GOAL, CONFIRM_P99_GOAL};
use crate::sampler::Line;
use plotters::style::RGBColor;
use txoutbox::RelayOrdering;

/// The chart of a run, as an SVG document.
pub fn chart(results: &Results) -> Result<String, String> {
    let title = format!(
        "txoutbox benchmark, {} | {} cores | concurrency {} | {} run | {}",
        results.timestamp.iso,
        results.cores,
        results.plan.concurrency,
        if results.plan.quick { "quick" } else { "full" },
        if results.verified() {
            "every count verified"
        } else {
            "VERIFICATION FAILED"
        }
    );
    let mut blocks = vec![Block::Text(
        results
            .targets()
            .iter()
            .map(|t| {
                let color = match t.status {
                    Status::Pass => COLORS[1],
                    Status::Miss => COLORS[4],
                    Status::Unverified => RGBColor(107, 114, 128),
                };
                (
                    format!(
                        "{:<10}  {}: {} (goal {})",
                        t.status.label(),
                        t.label,
                        t.shown,
                        t.goal
                    ),
                    color,
                )
            })
            .collect(),
    )];
    for (phase, lines) in results.series() {
        let (title, reference) = describe(results, phase, lines);
        let end = lines
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.0))
            .fold(1.0_f64, f64::max);
        let mut series: Vec<Series> = lines
            .iter()
            .map(|l| Series::line(l.name.clone(), l.points.clone()))
            .collect();
        if let Some((label, value)) = reference {
            series.push(Series::level(label, value, 0.0, end));
        }
        blocks.push(Block::Lines(Panel {
            title,
            x_label: "seconds".into(),
            y_label: "per second".into(),
            series,
        }));
    }
    blocks.push(Block::Categories(latency(results)));
    if let Some(drain) = drain(results) {
        blocks.push(Block::Categories(drain));
    }
    plot::document(&title, &blocks)
}

/// Latency percentiles of (6) at each level, ms, log scale, with the two goals.
fn latency(results: &Results) -> Categories {
    let mut series = Vec::new();
    for level in LEVELS {
        let Some(l) = results.latency_at(level) else {
            continue;
        };
        let pct = level.share * 100.0;
        for (name, q) in [
            ("commit -> confirm", &l.confirm),
            ("commit -> COMPLETED", &l.completed),
            ("HTTP 201", &l.http),
        ] {
            if name == "HTTP 201" && level != JUDGED_LEVEL {
                continue;
            }
            series.push((
                format!("{name}, {pct:.0}% of (5)"),
                q.labelled().iter().map(|(_, d)| Some(millis(*d))).collect(),
            ));
        }
    }
    Categories {
        title: if series.is_empty() {
            "(6) Latency at 25% and 50% of (5): no verified data".into()
        } else {
            "(6) Latency at 25% and 50% of (5), open loop, ms (log scale)".into()
        },
        y_label: "ms".into(),
        categories: ["p50", "p90", "p99", "p99.9", "max"].map(String::from).to_vec(),
        series,
        levels: vec![
            ("goal: confirm p99 at 50%".into(), millis(CONFIRM_P99_GOAL)),
            ("goal: COMPLETED p99 at 50%".into(), millis(COMPLETED_P99_GOAL)),
        ],
        log_y: true,
    }
}

/// (4): µs per event by backlog, one line per ordering.
fn drain(results: &Results) -> Option<Categories> {
    let drains = results
        .drain
        .as_ref()
        .filter(|_| results.checks.phase_ok(DRAIN_PHASE))?;
    let mut sizes: Vec<u64> = drains.runs.iter().map(|d| d.backlog).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let series = [RelayOrdering::Aggregate, RelayOrdering::None]
        .into_iter()
        .map(|ordering| {
            let values = sizes
                .iter()
                .map(|size| {
                    drains
                        .runs
                        .iter()
                        .find(|d| d.ordering == ordering && d.backlog == *size)
                        .map(|d| d.us_per_event())
                })
                .collect();
            (format!("RELAY_ORDERING={}", ordering_name(ordering)), values)
        })
        .collect();
    Some(Categories {
        title: "(4) Relay drain: µs per event by backlog (must not grow)".into(),
        y_label: "µs/event".into(),
        categories: sizes
            .iter()
            .map(|s| format!("{} events", count(*s as f64)))
            .collect(),
        series,
        levels: Vec::new(),
        log_y: false,
    })
}

/// Panel title and dashed reference line (label, value) of a scenario's throughput panel.
fn describe(results: &Results, phase: &str, lines: &[Line]) -> (String, Option<(String, f64)>) {
    let mean = |unit: &str| {
        let points: Vec<f64> = lines
            .first()
            .map(|l| l.points.iter().map(|p| p.1).collect())
            .unwrap_or_default();
        (!points.is_empty()).then(|| {
            let rate = points.iter().sum::<f64>() / points.len() as f64;
            (format!("mean {} {unit}", count(rate)), rate)
        })
    };
    let db = results
        .db_rate()
        .map(|r| (format!("database ceiling {} tx/s", count(r)), r));
    match phase {
        DB_PHASE => ("(1) Database ceiling: commits/s".into(), mean("tx/s")),
        BROKER_PHASE => ("(2) Broker ceiling: confirmed msg/s".into(), mean("msg/s")),
        HTTP_PHASE => ("(3)(5) HTTP and end to end: orders/s".into(), db),
        DRAIN_PHASE => (
            "(4) Relay drain: events published/s".into(),
            results
                .broker_rate()
                .map(|r| (format!("broker ceiling {} msg/s", count(r)), r)),
        ),
        phase if LEVELS.iter().any(|l| l.phase == phase) => (
            format!("(6) {phase}, open loop: orders/s"),
            results.latency.iter().find(|l| l.level.phase == phase).map(|l| {
                (
                    format!("offered {} orders/s", count(l.offered_rate)),
                    l.offered_rate,
                )
            }),
        ),
        SCALE_PHASE => ("(8) Scale-out, 2 servers + 2 consumers: orders/s".into(), db),
        other => (other.to_string(), None),
    }
}
