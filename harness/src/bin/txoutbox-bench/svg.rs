//! `chart.svg`, written by hand: the five targets at the top, throughput over time for each
//! scenario (with its ceiling or offered rate as a dashed line), and the latency percentiles at
//! half load as bars on a log scale.

use std::fmt::Write as _;
use std::time::Duration;

use crate::ceilings::{BROKER_PHASE, DB_PHASE};
use crate::drain::DRAIN_PHASE;
use crate::latency::{JUDGED_LEVEL, LEVELS};
use crate::pipeline::{HTTP_PHASE, SCALE_PHASE};
use crate::quantiles::Quantiles;
use crate::report::{count, millis, Results, Status, CONFIRM_P99_GOAL};
use crate::sampler::Line;

const WIDTH: f64 = 1000.0;
const MARGIN: f64 = 20.0;
const PANEL_HEIGHT: f64 = 210.0;
const GAP: f64 = 20.0;
const LATENCY_HEIGHT: f64 = 300.0;
const FONT: &str = "font-family=\"Helvetica, Arial, sans-serif\"";
const LINE_COLORS: [&str; 2] = ["#2563eb", "#16a34a"];
const BAR_COLORS: [&str; 3] = ["#2563eb", "#16a34a", "#d97706"];
const GRID: &str = "#e5e7eb";
const INK: &str = "#111827";
const MUTED: &str = "#6b7280";

/// The chart of a run.
pub fn chart(results: &Results) -> String {
    let mut svg = Svg::default();
    let top = header(&mut svg, results);
    let panel_width = (WIDTH - 2.0 * MARGIN - GAP) / 2.0;
    let series = results.series();
    let mut bottom = top;
    for (index, (phase, lines)) in series.iter().enumerate() {
        let x = MARGIN + (index % 2) as f64 * (panel_width + GAP);
        let y = top + (index / 2) as f64 * (PANEL_HEIGHT + GAP);
        let (title, reference) = describe(results, phase, lines);
        line_panel(
            &mut svg,
            Frame::new(x, y, panel_width, PANEL_HEIGHT),
            &title,
            lines,
            reference,
        );
        bottom = bottom.max(y + PANEL_HEIGHT + GAP);
    }
    latency_panel(
        &mut svg,
        Frame::new(MARGIN, bottom, WIDTH - 2.0 * MARGIN, LATENCY_HEIGHT),
        results,
    );
    svg.finish(bottom + LATENCY_HEIGHT + MARGIN)
}

/// Title and targets; returns where the panels start.
fn header(svg: &mut Svg, results: &Results) -> f64 {
    svg.text(MARGIN, 32.0, 20.0, "start", "bold", INK, "txoutbox benchmark");
    let subtitle = format!(
        "{} | {} cores | concurrency {} | {} run | {}",
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
    svg.text(MARGIN, 54.0, 13.0, "start", "normal", MUTED, &subtitle);
    let targets = results.targets();
    let gaps = targets.len().saturating_sub(1) as f64 * 10.0;
    let box_width = (WIDTH - 2.0 * MARGIN - gaps) / targets.len().max(1) as f64;
    for (i, target) in targets.iter().enumerate() {
        let x = MARGIN + i as f64 * (box_width + 10.0);
        let (fill, stroke) = match target.status {
            Status::Pass => ("#ecfdf5", "#16a34a"),
            Status::Miss => ("#fef2f2", "#dc2626"),
            Status::Unverified => ("#f3f4f6", "#9ca3af"),
        };
        svg.rect(x, 70.0, box_width, 66.0, fill, stroke);
        svg.text(x + 8.0, 86.0, 10.5, "start", "normal", MUTED, target.label);
        svg.text(x + 8.0, 110.0, 18.0, "start", "bold", INK, &target.shown);
        let verdict = format!("{}  goal {}", target.status.label(), target.goal);
        svg.text(x + 8.0, 128.0, 11.0, "start", "bold", stroke, &verdict);
    }
    156.0
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

/// A rectangle on the canvas.
#[derive(Clone, Copy)]
struct Frame {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
}

impl Frame {
    fn new(x: f64, y: f64, w: f64, h: f64) -> Frame {
        Frame { x, y, w, h }
    }
}

/// Rates over time, one polyline per counter, with a dashed reference line.
fn line_panel(svg: &mut Svg, frame: Frame, title: &str, lines: &[Line], reference: Option<(String, f64)>) {
    svg.rect(frame.x, frame.y, frame.w, frame.h, "#ffffff", GRID);
    svg.text(frame.x + 10.0, frame.y + 18.0, 13.0, "start", "bold", INK, title);
    let plot = Frame::new(frame.x + 58.0, frame.y + 46.0, frame.w - 72.0, frame.h - 74.0);
    let max_t = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(0.0_f64, f64::max)
        .max(1.0);
    let max_v = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .chain(reference.iter().map(|r| r.1))
        .fold(0.0_f64, f64::max);
    let y_ticks = axis(max_v * 1.1);
    let x_ticks = axis(max_t);
    let y_top = y_ticks.last().copied().unwrap_or(1.0);
    let x_top = x_ticks.last().copied().unwrap_or(1.0);
    let sx = |t: f64| plot.x + t / x_top * plot.w;
    let sy = |v: f64| plot.y + plot.h - v / y_top * plot.h;
    for &tick in &y_ticks {
        let y = sy(tick);
        svg.line(plot.x, y, plot.x + plot.w, y, GRID, 1.0, None);
        svg.text(plot.x - 6.0, y + 4.0, 10.0, "end", "normal", MUTED, &short(tick));
    }
    for &tick in &x_ticks {
        let x = sx(tick);
        svg.line(x, plot.y + plot.h, x, plot.y + plot.h + 4.0, MUTED, 1.0, None);
        svg.text(
            x,
            plot.y + plot.h + 16.0,
            10.0,
            "middle",
            "normal",
            MUTED,
            &short(tick),
        );
    }
    svg.text(
        plot.x + plot.w,
        plot.y + plot.h + 16.0 + 10.0,
        9.0,
        "end",
        "normal",
        MUTED,
        "seconds",
    );
    svg.line(
        plot.x,
        plot.y + plot.h,
        plot.x + plot.w,
        plot.y + plot.h,
        MUTED,
        1.0,
        None,
    );
    if let Some((label, value)) = &reference {
        let y = sy(*value);
        svg.line(plot.x, y, plot.x + plot.w, y, MUTED, 1.2, Some("6 4"));
        svg.text(
            plot.x + plot.w - 4.0,
            y - 5.0,
            10.0,
            "end",
            "normal",
            MUTED,
            label,
        );
    }
    let mut legend_x = frame.x + 10.0;
    for (i, line) in lines.iter().enumerate() {
        let color = LINE_COLORS[i % LINE_COLORS.len()];
        let points: Vec<(f64, f64)> = line.points.iter().map(|&(t, v)| (sx(t), sy(v))).collect();
        svg.polyline(&points, color);
        svg.line(
            legend_x,
            frame.y + 32.0,
            legend_x + 16.0,
            frame.y + 32.0,
            color,
            2.5,
            None,
        );
        svg.text(
            legend_x + 20.0,
            frame.y + 36.0,
            11.0,
            "start",
            "normal",
            INK,
            &format!("{}/s", line.name),
        );
        legend_x += 30.0 + 7.0 * line.name.len() as f64 + 20.0;
    }
    if lines.iter().all(|l| l.points.is_empty()) {
        svg.text(
            plot.x + plot.w / 2.0,
            plot.y + plot.h / 2.0,
            12.0,
            "middle",
            "normal",
            MUTED,
            "no samples",
        );
    }
}

/// Latency percentiles at half load as grouped bars, log scale, with the 10 ms goal.
fn latency_panel(svg: &mut Svg, frame: Frame, results: &Results) {
    svg.rect(frame.x, frame.y, frame.w, frame.h, "#ffffff", GRID);
    let title = match results.latency.iter().find(|l| l.level == JUDGED_LEVEL) {
        Some(l) => format!(
            "(6) Latency at 50% of (5) ({} orders/s offered, open loop), ms, log scale",
            count(l.offered_rate)
        ),
        None => "(6) Latency at 50% of (5)".to_string(),
    };
    svg.text(frame.x + 10.0, frame.y + 18.0, 13.0, "start", "bold", INK, &title);
    let Some(latency) = results.latency_at(JUDGED_LEVEL) else {
        svg.text(
            frame.x + frame.w / 2.0,
            frame.y + frame.h / 2.0,
            12.0,
            "middle",
            "normal",
            MUTED,
            "no verified latency data",
        );
        return;
    };
    let groups: [(&str, &Quantiles); 3] = [
        ("commit -> broker confirm", &latency.confirm),
        ("commit -> COMPLETED", &latency.completed),
        ("HTTP 201, from schedule", &latency.http),
    ];
    let mut legend_x = frame.x + 10.0;
    for (i, (name, _)) in groups.iter().enumerate() {
        svg.rect(legend_x, frame.y + 27.0, 12.0, 10.0, BAR_COLORS[i], BAR_COLORS[i]);
        svg.text(
            legend_x + 16.0,
            frame.y + 36.0,
            11.0,
            "start",
            "normal",
            INK,
            name,
        );
        legend_x += 200.0;
    }
    let plot = Frame::new(frame.x + 58.0, frame.y + 50.0, frame.w - 72.0, frame.h - 80.0);
    let largest = groups
        .iter()
        .flat_map(|(_, q)| q.labelled().map(|(_, d)| millis(d)))
        .fold(millis(CONFIRM_P99_GOAL), f64::max);
    let low = 0.1_f64;
    let high = 10f64.powf(largest.log10().ceil()).max(10.0);
    let span = high.log10() - low.log10();
    let sy = |ms: f64| plot.y + plot.h - (ms.max(low).log10() - low.log10()) / span * plot.h;
    let mut tick = low;
    while tick <= high * 1.001 {
        let y = sy(tick);
        svg.line(plot.x, y, plot.x + plot.w, y, GRID, 1.0, None);
        svg.text(plot.x - 6.0, y + 4.0, 10.0, "end", "normal", MUTED, &short(tick));
        tick *= 10.0;
    }
    let goal = sy(millis(CONFIRM_P99_GOAL));
    svg.line(plot.x, goal, plot.x + plot.w, goal, "#dc2626", 1.2, Some("6 4"));
    svg.line(
        legend_x,
        frame.y + 32.0,
        legend_x + 18.0,
        frame.y + 32.0,
        "#dc2626",
        1.2,
        Some("6 4"),
    );
    let goal_label = "goal: commit -> confirm p99 <= 10 ms";
    svg.text(
        legend_x + 22.0,
        frame.y + 36.0,
        11.0,
        "start",
        "normal",
        "#dc2626",
        goal_label,
    );
    let labels = latency.confirm.labelled().map(|(label, _)| label);
    let group_width = plot.w / labels.len() as f64;
    let bar_width = (group_width - 30.0) / groups.len() as f64;
    for (g, label) in labels.iter().enumerate() {
        let gx = plot.x + g as f64 * group_width + 15.0;
        for (s, (_, quantiles)) in groups.iter().enumerate() {
            let value: Duration = quantiles.labelled()[g].1;
            let ms = millis(value);
            let x = gx + s as f64 * bar_width;
            let y = sy(ms);
            svg.rect(
                x + 2.0,
                y,
                bar_width - 4.0,
                plot.y + plot.h - y,
                BAR_COLORS[s],
                BAR_COLORS[s],
            );
            svg.text(
                x + bar_width / 2.0,
                y - 4.0,
                9.5,
                "middle",
                "normal",
                INK,
                &decimal(ms),
            );
        }
        svg.text(
            gx + group_width / 2.0 - 15.0,
            plot.y + plot.h + 16.0,
            11.0,
            "middle",
            "bold",
            INK,
            label,
        );
    }
    svg.line(
        plot.x,
        plot.y + plot.h,
        plot.x + plot.w,
        plot.y + plot.h,
        MUTED,
        1.0,
        None,
    );
}

/// Ticks from 0 to the first multiple of a round step (1, 2, 2.5 or 5 times a power of ten)
/// at or above `max`, about five of them.
fn axis(max: f64) -> Vec<f64> {
    let max = if max.is_finite() && max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&step| step >= raw * 0.999_999)
        .unwrap_or(10.0 * magnitude);
    let n = (max / step - 1e-9).ceil().max(1.0) as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

/// `0`, `2.5`, `500`, `12k`, `1.5M`.
fn short(value: f64) -> String {
    let trim = |text: String| {
        if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            text
        }
    };
    if value >= 1e6 {
        format!("{}M", trim(format!("{:.1}", value / 1e6)))
    } else if value >= 1e3 {
        format!("{}k", trim(format!("{:.1}", value / 1e3)))
    } else {
        trim(format!("{value:.2}"))
    }
}

/// A latency in ms with two significant decimals below 10.
fn decimal(ms: f64) -> String {
    if ms >= 10.0 {
        format!("{ms:.0}")
    } else if ms >= 1.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.2}")
    }
}

/// Escapes text for XML.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// SVG elements as text.
#[derive(Default)]
struct Svg {
    body: String,
}

impl Svg {
    #[allow(clippy::too_many_arguments)]
    fn text(&mut self, x: f64, y: f64, size: f64, anchor: &str, weight: &str, fill: &str, text: &str) {
        let _ = writeln!(
            self.body,
            "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"{size}\" text-anchor=\"{anchor}\" \
             font-weight=\"{weight}\" fill=\"{fill}\" {FONT}>{}</text>",
            escape(text)
        );
    }

    fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, stroke: &str) {
        let _ = writeln!(
            self.body,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" rx=\"4\" fill=\"{fill}\" \
             stroke=\"{stroke}\"/>",
            w.max(0.0),
            h.max(0.0)
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str, width: f64, dash: Option<&str>) {
        let dash = dash.map_or(String::new(), |d| format!(" stroke-dasharray=\"{d}\""));
        let _ = writeln!(
            self.body,
            "<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"{stroke}\" \
             stroke-width=\"{width}\"{dash}/>"
        );
    }

    fn polyline(&mut self, points: &[(f64, f64)], stroke: &str) {
        if points.is_empty() {
            return;
        }
        let coordinates: Vec<String> = points.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(
            self.body,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{stroke}\" stroke-width=\"2\" \
             stroke-linejoin=\"round\"/>",
            coordinates.join(" ")
        );
    }

    fn finish(self, height: f64) -> String {
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height:.0}\" \
             viewBox=\"0 0 {WIDTH} {height:.0}\">\n<rect width=\"100%\" height=\"100%\" fill=\"#f9fafb\"/>\n{}</svg>\n",
            self.body
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_are_round() {
        assert_eq!(axis(2_851.0), vec![0.0, 1_000.0, 2_000.0, 3_000.0]);
        assert_eq!(axis(2_000.0), vec![0.0, 500.0, 1_000.0, 1_500.0, 2_000.0]);
        assert_eq!(axis(5.5), vec![0.0, 2.0, 4.0, 6.0]);
        assert_eq!(axis(40.0), vec![0.0, 10.0, 20.0, 30.0, 40.0]);
        assert_eq!(short(12_000.0), "12k");
        assert_eq!(short(2_500.0), "2.5k");
        assert_eq!(short(0.1), "0.1");
        assert_eq!(escape("a<b & c"), "a&lt;b &amp; c");
    }
}
