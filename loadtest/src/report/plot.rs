//! Charts, each written as PNG and SVG: latency against request rate per policy (average and
//! p99, like the paper's Figure 3), latency CDFs, and per-GPU load over time.
//!
//! Text is drawn with DejaVu Sans, embedded, so charts render the same on a machine without
//! fonts.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{RunResult, Summary};

/// Why a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("plotting {path}: {message}")]
pub struct PlotError {
    /// The file.
    pub path: String,
    /// What failed.
    pub message: String,
}

static FONT: Once = Once::new();
const FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

fn register_font() {
    FONT.call_once(|| {
        // The embedded font is a valid TrueType file; a failure would only lose text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT_BYTES);
    });
}

/// A stable colour per policy name.
fn colour(name: &str, index: usize) -> RGBColor {
    match name {
        "e2" => RGBColor(214, 39, 40),
        "e2-paper" => RGBColor(140, 86, 75),
        "round-robin" => RGBColor(31, 119, 180),
        "least-load" => RGBColor(44, 160, 44),
        "cache-aware" => RGBColor(255, 127, 14),
        "kv-cost" => RGBColor(148, 103, 189),
        "dynamo" => RGBColor(118, 185, 0),
        "sglang" => RGBColor(23, 190, 207),
        _ => {
            let p = Palette99::pick(index).to_rgba();
            RGBColor(p.0, p.1, p.2)
        }
    }
}

type Drawn = Result<(), String>;

/// Draws with `draw` into `<stem>.png` and `<stem>.svg`; returns both paths.
fn both(
    stem: &Path,
    size: (u32, u32),
    draw_png: impl FnOnce(DrawingArea<BitMapBackend<'_>, Shift>) -> Drawn,
    draw_svg: impl FnOnce(DrawingArea<SVGBackend<'_>, Shift>) -> Drawn,
) -> Result<Vec<PathBuf>, PlotError> {
    register_font();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    let fail = |path: &Path, message: String| PlotError {
        path: path.display().to_string(),
        message,
    };
    draw_png(BitMapBackend::new(&png, size).into_drawing_area()).map_err(|m| fail(&png, m))?;
    draw_svg(SVGBackend::new(&svg, size).into_drawing_area()).map_err(|m| fail(&svg, m))?;
    Ok(vec![png, svg])
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A log-scale axis range covering `values` (positive), with some room.
fn log_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| *v > 0.0 && v.is_finite())
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if hi <= 0.0 {
        return 0.01..1.0;
    }
    (lo / 1.5)..(hi * 1.5)
}

/// One panel: seconds against rate, one line per policy.
fn latency_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    summaries: &[Summary],
    value: fn(&Summary) -> f64,
) -> Drawn {
    let policies = policy_order(summaries.iter().map(|s| s.policy.as_str()));
    let rates = summaries.iter().map(|s| s.rate);
    let (rmin, rmax) = rates.fold((f64::INFINITY, 0.0f64), |(a, b), r| (a.min(r), b.max(r)));
    let pad = ((rmax - rmin) * 0.05).max(0.1);
    let y = log_range(summaries.iter().map(|s| value(s) / 1e3));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((rmin - pad)..(rmax + pad), y.log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("request rate (req/s)")
        .y_desc("latency (s)")
        .draw()
        .map_err(err)?;
    for (i, policy) in policies.iter().enumerate() {
        let c = colour(policy, i);
        let mut points: Vec<(f64, f64)> = summaries
            .iter()
            .filter(|s| &s.policy == policy && s.completed > 0)
            .map(|s| (s.rate, value(s) / 1e3))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
            .map_err(err)?
            .label(policy.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(points.into_iter().map(|p| Circle::new(p, 3, c.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    Ok(())
}

fn policy_order<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in names {
        if !out.iter().any(|o| o == n) {
            out.push(n.to_string());
        }
    }
    out
}

fn latency_vs_rate<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    workload: &str,
    summaries: &[Summary],
) -> Drawn {
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(root.dim_in_pixel().0 / 2);
    latency_panel(
        &left,
        &format!("{workload}: average latency"),
        summaries,
        |s| s.latency_ms.mean,
    )?;
    latency_panel(
        &right,
        &format!("{workload}: p99 latency"),
        summaries,
        |s| s.latency_ms.p99,
    )?;
    root.present().map_err(err)
}

/// Average and p99 latency against rate, one line per policy; writes `<stem>.png/.svg`.
pub fn plot_latency_vs_rate(
    stem: &Path,
    workload: &str,
    summaries: &[Summary],
) -> Result<Vec<PathBuf>, PlotError> {
    both(
        stem,
        (1200, 500),
        |a| latency_vs_rate(a, workload, summaries),
        |a| latency_vs_rate(a, workload, summaries),
    )
}

fn cdf<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    runs: &[(String, Vec<f64>)],
) -> Drawn {
    root.fill(&WHITE).map_err(err)?;
    let x = log_range(runs.iter().flat_map(|(_, v)| v.iter().map(|ms| ms / 1e3)));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(x.clone().log_scale(), 0.0..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("end-to-end latency (s)")
        .y_desc("fraction of requests")
        .draw()
        .map_err(err)?;
    for (i, (policy, values)) in runs.iter().enumerate() {
        let mut sorted: Vec<f64> = values.iter().map(|ms| (ms / 1e3).max(x.start)).collect();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len().max(1) as f64;
        // At most ~500 points per line.
        let stride = (sorted.len() / 500).max(1);
        let points: Vec<(f64, f64)> = sorted
            .iter()
            .enumerate()
            .filter(|(j, _)| j % stride == 0 || *j + 1 == sorted.len())
            .map(|(j, v)| (*v, (j + 1) as f64 / n))
            .collect();
        let c = colour(policy, i);
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))
            .map_err(err)?
            .label(policy.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// Latency CDFs, one line per (policy, latencies in ms); writes `<stem>.png/.svg`.
pub fn plot_latency_cdf(
    stem: &Path,
    title: &str,
    runs: &[(String, Vec<f64>)],
) -> Result<Vec<PathBuf>, PlotError> {
    both(
        stem,
        (900, 550),
        |a| cdf(a, title, runs),
        |a| cdf(a, title, runs),
    )
}

fn load_over_time<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, run: &RunResult) -> Drawn {
    root.fill(&WHITE).map_err(err)?;
    let t_max = run.load.iter().map(|s| s.t_ms / 1e3).fold(1.0, f64::max);
    let y_max = run
        .load
        .iter()
        .map(|s| f64::from(s.running + s.waiting))
        .fold(1.0, f64::max);
    let title = format!(
        "{} / {} at {:.1} req/s: requests on each GPU",
        run.workload, run.policy, run.rate
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max * 1.05)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("running + waiting")
        .draw()
        .map_err(err)?;
    for (i, name) in run.workers.iter().enumerate() {
        let points: Vec<(f64, f64)> = run
            .load
            .iter()
            .filter(|s| s.worker as usize == i)
            .map(|s| (s.t_ms / 1e3, f64::from(s.running + s.waiting)))
            .collect();
        let p = Palette99::pick(i).to_rgba();
        let c = RGBColor(p.0, p.1, p.2);
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(1)))
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// Each GPU's running plus waiting requests over the run; writes `<stem>.png/.svg`.
pub fn plot_load_over_time(stem: &Path, run: &RunResult) -> Result<Vec<PathBuf>, PlotError> {
    both(
        stem,
        (1100, 450),
        |a| load_over_time(a, run),
        |a| load_over_time(a, run),
    )
}

/// Bars of average and p99 latency per step, in order, like the paper's Figure 5.
fn step_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    steps: &[(String, f64, f64)],
) -> Drawn {
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(root.dim_in_pixel().0 / 2);
    step_panel(&left, &format!("{title}: average latency"), steps, |s| s.1)?;
    step_panel(&right, &format!("{title}: p99 latency"), steps, |s| s.2)?;
    root.present().map_err(err)
}

fn step_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    steps: &[(String, f64, f64)],
    value: fn(&(String, f64, f64)) -> f64,
) -> Drawn {
    let top = steps.iter().map(value).fold(0.0, f64::max).max(1e-3) * 1.6;
    let n = steps.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..(n as f64 - 0.5), 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let step = x.round();
            if (x - step).abs() < 1e-6 && step >= 0.0 {
                format!("step {}", step as usize + 1)
            } else {
                String::new()
            }
        })
        .y_desc("latency (s)")
        .draw()
        .map_err(err)?;
    for (i, s) in steps.iter().enumerate() {
        let p = Palette99::pick(i).to_rgba();
        let c = RGBColor(p.0, p.1, p.2);
        let x = i as f64;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x - 0.4, 0.0), (x + 0.4, value(s))],
                c.filled(),
            )))
            .map_err(err)?
            .label(format!("{}: {}", i + 1, s.0))
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// Average and p99 latency (seconds) of each `(step, average, p99)` as bars, in order;
/// writes `<stem>.png/.svg`.
pub fn plot_steps(
    stem: &Path,
    title: &str,
    steps: &[(String, f64, f64)],
) -> Result<Vec<PathBuf>, PlotError> {
    both(
        stem,
        (1200, 560),
        |a| step_bars(a, title, steps),
        |a| step_bars(a, title, steps),
    )
}
