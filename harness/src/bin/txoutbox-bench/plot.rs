//! The run's SVG charts, drawn with plotters' SVG backend: blocks stacked one under the other,
//! each a panel of named lines against time, a panel of values per category (percentiles,
//! backlog sizes), or lines of text. Text is left to the viewer's fonts (plotters is built
//! without `ttf`), so nothing here needs a system library.

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

/// Values per category (x) for several named series, with dashed levels (goals).
pub struct Categories {
    /// Above the plot.
    pub title: String,
    /// Beside the y axis.
    pub y_label: String,
    /// The x positions' names, in order.
    pub categories: Vec<String>,
    /// (name, one value per category, `None` where there is none).
    pub series: Vec<(String, Vec<Option<f64>>)>,
    /// (name, value): dashed horizontal lines.
    pub levels: Vec<(String, f64)>,
    /// A logarithmic y axis (latencies spanning orders of magnitude).
    pub log_y: bool,
}

/// One block of a chart.
pub enum Block {
    /// Lines against x.
    Lines(Panel),
    /// Values per category.
    Categories(Categories),
    /// Lines of text, each in its colour.
    Text(Vec<(String, RGBColor)>),
}

impl Block {
    fn height(&self) -> u32 {
        match self {
            Block::Text(lines) => 16 + 20 * lines.len() as u32,
            _ => PANEL_HEIGHT,
        }
    }
}

/// Panels stacked into one SVG document, under `title`.
pub fn stacked(title: &str, panels: &[Panel]) -> Result<String, String> {
    let blocks: Vec<Block> = panels
        .iter()
        .map(|p| {
            Block::Lines(Panel {
                title: p.title.clone(),
                x_label: p.x_label.clone(),
                y_label: p.y_label.clone(),
                series: p
                    .series
                    .iter()
                    .map(|s| Series {
                        name: s.name.clone(),
                        points: s.points.clone(),
                        dashed: s.dashed,
                    })
                    .collect(),
            })
        })
        .collect();
    document(title, &blocks)
}

/// Blocks stacked into one SVG document, under `title`.
pub fn document(title: &str, blocks: &[Block]) -> Result<String, String> {
    let height = 50 + blocks.iter().map(Block::height).sum::<u32>().max(PANEL_HEIGHT);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let mut rest = root
            .titled(title, ("sans-serif", 22).into_font().color(&BLACK))
            .map_err(draw_error)?;
        for block in blocks {
            let (area, below) = rest.split_vertically(block.height());
            match block {
                Block::Lines(panel) => draw_panel(&area, panel)?,
                Block::Categories(panel) => draw_categories(&area, panel)?,
                Block::Text(lines) => {
                    for (i, (line, color)) in lines.iter().enumerate() {
                        area.draw_text(
                            line,
                            &("sans-serif", 15).into_font().color(color),
                            (24, 8 + 20 * i as i32),
                        )
                        .map_err(draw_error)?;
                    }
                }
            }
            rest = below;
        }
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

fn draw_categories(area: &DrawingArea<SVGBackend<'_>, Shift>, panel: &Categories) -> Result<(), String> {
    let values = panel
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .chain(panel.levels.iter().map(|(_, v)| *v))
        .filter(|v| v.is_finite() && *v > 0.0);
    let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        (lo, hi) = (1.0, 10.0);
    }
    let n = panel.categories.len().max(1);
    let x_range = -0.5..(n as f64 - 0.5);
    let names = panel.categories.clone();
    let label = move |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 0.01 && i >= 0.0 {
            names.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(&panel.title, ("sans-serif", 16).into_font())
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70);
    let style = |i: usize| ShapeStyle {
        color: COLORS[i % COLORS.len()].to_rgba(),
        filled: false,
        stroke_width: 2,
    };
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_labels(n)
                .x_label_formatter(&label)
                .y_desc(panel.y_label.as_str())
                .light_line_style(RGBColor(238, 238, 238))
                .draw()
                .map_err(draw_error)?;
            for (i, (name, values)) in panel.series.iter().enumerate() {
                let points: Vec<(f64, f64)> = values
                    .iter()
                    .enumerate()
                    .filter_map(|(x, v)| v.filter(|v| v.is_finite() && *v > 0.0).map(|v| (x as f64, v)))
                    .collect();
                let st = style(i);
                chart
                    .draw_series(LineSeries::new(points.iter().copied(), st))
                    .map_err(draw_error)?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], st));
                chart
                    .draw_series(points.iter().map(|p| Circle::new(*p, 4, st.filled())))
                    .map_err(draw_error)?;
            }
            for (j, (name, value)) in panel.levels.iter().enumerate() {
                let st = style(panel.series.len() + j);
                chart
                    .draw_series(DashedLineSeries::new(
                        vec![(-0.5, *value), (n as f64 - 0.5, *value)],
                        6,
                        4,
                        st,
                    ))
                    .map_err(draw_error)?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], st));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(200, 200, 200))
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(draw_error)?;
        }};
    }
    if panel.log_y {
        draw!(builder
            .build_cartesian_2d(x_range, ((lo / 2.0)..(hi * 2.0)).log_scale())
            .map_err(draw_error)?);
    } else {
        draw!(builder
            .build_cartesian_2d(x_range, 0.0..(hi * 1.15))
            .map_err(draw_error)?);
    }
    Ok(())
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

    #[test]
    fn text_and_categories_draw_too() {
        let svg = document(
            "bench",
            &[
                Block::Text(vec![("PASS relay drain".into(), COLORS[1])]),
                Block::Categories(Categories {
                    title: "latency".into(),
                    y_label: "ms".into(),
                    categories: vec!["p50".into(), "p99".into()],
                    series: vec![("confirm".into(), vec![Some(1.5), Some(40.0)])],
                    levels: vec![("goal".into(), 10.0)],
                    log_y: true,
                }),
                Block::Categories(Categories {
                    title: "no data".into(),
                    y_label: "µs".into(),
                    categories: Vec::new(),
                    series: Vec::new(),
                    levels: Vec::new(),
                    log_y: false,
                }),
            ],
        )
        .expect("drawn");
        assert!(svg.contains("PASS relay drain") && svg.contains("p99") && svg.contains("goal"));
    }
}
