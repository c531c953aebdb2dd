//! Line charts for the run's SVG files, drawn with plotters' SVG backend: panels of named lines
//! against time, stacked one under the other. Text is left to the viewer's fonts (plotters is
//! built without `ttf`), so nothing here needs a system library.

use plotters::coord::Shift;
use plotters::prelude::*;

/// Width of every chart, pixels.
pub const WIDTH: u32 = 1100;
/// Height of one panel, pixels.
pub const PANEL_HEIGHT: u32 = 300;

/// Line colours, in order.
pub const COLORS: [RGBColor; 6] = [
    RGBColor(37, 99, 235),
    RGBColor(22, 163, 74),
    RGBColor(234, 88, 12),
    RGBColor(147, 51, 234),
    RGBColor(220, 38, 38),
    RGBColor(8, 145, 178),
];

/// One line: its name and its points (x, y).
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points in x order.
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed (a goal or a ceiling rather than a measurement).
    pub dashed: bool,
}

impl Series {
    /// A measured line.
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            points,
            dashed: false,
        }
    }

    /// A level (a goal, a ceiling, the offered rate) across `x0..x1`, dashed.
    pub fn level(name: impl Into<String>, value: f64, x0: f64, x1: f64) -> Series {
        Series {
            name: name.into(),
            points: vec![(x0, value), (x1, value)],
            dashed: true,
        }
    }
}

/// One panel: a title, axis labels and its lines.
pub struct Panel {
    /// Above the plot.
    pub title: String,
    /// Under the x axis.
    pub x_label: String,
    /// Beside the y axis.
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
}

/// Panels stacked into one SVG document, under `title`.
pub fn stacked(title: &str, panels: &[Panel]) -> Result<String, String> {
    let height = 50 + PANEL_HEIGHT * panels.len().max(1) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let root = root
            .titled(title, ("sans-serif", 22).into_font().color(&BLACK))
            .map_err(draw_error)?;
        let areas = root.split_evenly((panels.len().max(1), 1));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            draw_panel(area, panel)?;
        }
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

fn draw_panel(area: &DrawingArea<SVGBackend<'_>, Shift>, panel: &Panel) -> Result<(), String> {
    let points = panel.series.iter().flat_map(|s| s.points.iter());
    let (mut x_max, mut y_max) = (0.0f64, 0.0f64);
    let mut x_min = f64::INFINITY;
    for (x, y) in points {
        x_min = x_min.min(*x);
        x_max = x_max.max(*x);
        y_max = y_max.max(*y);
    }
    if !x_min.is_finite() {
        x_min = 0.0;
    }
    let x_max = if x_max > x_min { x_max } else { x_min + 1.0 };
    let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 16).into_font())
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min.min(0.0)..x_max, 0.0..y_max)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc(panel.x_label.as_str())
        .y_desc(panel.y_label.as_str())
        .light_line_style(RGBColor(238, 238, 238))
        .draw()
        .map_err(draw_error)?;
    if panel.series.iter().all(|s| s.points.is_empty()) {
        return Ok(());
    }
    for (i, series) in panel.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let style = ShapeStyle {
            color: color.to_rgba(),
            filled: false,
            stroke_width: 2,
        };
        let drawn = if series.dashed {
            chart.draw_series(DashedLineSeries::new(series.points.iter().copied(), 6, 4, style))
        } else {
            chart.draw_series(LineSeries::new(series.points.iter().copied(), style))
        };
        drawn
            .map_err(draw_error)?
            .label(series.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(draw_error)?;
    Ok(())
}

fn draw_error<E: std::fmt::Debug>(e: E) -> String {
    format!("cannot draw the chart: {e:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_become_one_svg_document() {
        let svg = stacked(
            "soak",
            &[
                Panel {
                    title: "throughput".into(),
                    x_label: "minutes".into(),
                    y_label: "orders/s".into(),
                    series: vec![
                        Series::line("completed", vec![(0.0, 10.0), (1.0, 12.0), (2.0, 11.0)]),
                        Series::level("offered", 11.0, 0.0, 2.0),
                    ],
                },
                Panel {
                    title: "empty".into(),
                    x_label: "minutes".into(),
                    y_label: "MiB".into(),
                    series: Vec::new(),
                },
            ],
        )
        .expect("drawn");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("completed") && svg.contains("offered") && svg.contains("throughput"));
    }
}
