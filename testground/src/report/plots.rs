//! The report's SVG plots, one per metric, drawn from its tables with plotters' SVG backend.
//!
//! Every plot has a title and axes labelled with units, and draws its empty axes when there
//! is no data.

use std::collections::BTreeMap;
use std::error::Error;
use std::ops::Range;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::ReportError;
use super::tables::{Event, Latency, NodeBandwidth, Placement, SuccessWindow, Tables, WINDOW_S};

/// Success rate per window over time, partitions shaded.
pub(super) const SUCCESS_RATE_SVG: &str = "success_rate.svg";
/// Messages and probes per placement over time.
pub(super) const PLACEMENT_SVG: &str = "placement.svg";
/// CDFs of execution and end-to-end latency.
pub(super) const LATENCY_SVG: &str = "latency.svg";
/// KiB/s received and sent per node.
pub(super) const BANDWIDTH_SVG: &str = "bandwidth.svg";
/// CPU per node over time.
pub(super) const CPU_SVG: &str = "cpu.svg";
/// Resident memory per node over time.
pub(super) const MEMORY_SVG: &str = "memory.svg";

/// The size of every plot, in pixels.
const SIZE: (u32, u32) = (900, 540);
/// The smallest latency the log-scale CDF shows, in ms (smaller ones are drawn there).
const MIN_LATENCY_MS: f64 = 0.01;
/// Up to this many nodes the per-node line plots get a legend.
const MAX_LEGEND_NODES: usize = 12;

/// The canvas of one plot.
type Area<'p> = DrawingArea<SVGBackend<'p>, Shift>;
/// What drawing on a canvas can fail with.
type DrawResult = Result<(), Box<dyn Error>>;
/// One node: instance and generation.
type Node = (u32, u32);
/// One of the counts of a placement.
type PlacementCount = fn(&Placement) -> u32;

/// Draws every plot into `out_dir`.
pub(super) fn draw_all(tables: &Tables, out_dir: &Path) -> Result<(), ReportError> {
    let end_s = end_of_time(tables);
    draw(&out_dir.join(SUCCESS_RATE_SVG), |root| {
        success_rate(root, &tables.windows, &tables.events, end_s)
    })?;
    draw(&out_dir.join(PLACEMENT_SVG), |root| {
        placement(root, &tables.placements, end_s)
    })?;
    draw(&out_dir.join(LATENCY_SVG), |root| {
        latency(root, &tables.latencies)
    })?;
    draw(&out_dir.join(BANDWIDTH_SVG), |root| {
        bandwidth(root, &tables.bandwidth)
    })?;
    let cpu = per_node(
        tables
            .cpu
            .iter()
            .map(|s| ((s.instance, s.generation), (s.t_s, s.cpu_percent))),
    );
    draw(&out_dir.join(CPU_SVG), |root| {
        node_lines(root, "CPU per node", "CPU (% of one core)", &cpu, end_s)
    })?;
    let memory = per_node(
        tables
            .memory
            .iter()
            .map(|s| ((s.instance, s.generation), (s.t_s, s.rss_mib))),
    );
    draw(&out_dir.join(MEMORY_SVG), |root| {
        node_lines(
            root,
            "Resident memory per node",
            "RSS (MiB)",
            &memory,
            end_s,
        )
    })
}

/// Creates the SVG at `path`, lets `body` draw on it, and writes it out.
fn draw(path: &Path, body: impl FnOnce(&Area<'_>) -> DrawResult) -> Result<(), ReportError> {
    let drawn = || -> DrawResult {
        let root = SVGBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        body(&root)?;
        root.present()?;
        Ok(())
    };
    drawn().map_err(|e| ReportError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A chart builder with `title` and room for the axis labels.
fn builder<'a, 'p>(root: &'a Area<'p>, title: &str) -> ChartBuilder<'a, 'static, SVGBackend<'p>> {
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(60);
    builder
}

/// The last time on any table's time axis, in seconds (at least 1, so the axis has a span).
fn end_of_time(tables: &Tables) -> f64 {
    let windows = tables
        .windows
        .iter()
        .map(|w| w.window_start_s + WINDOW_S as f64);
    let placements = tables.placements.iter().map(|p| p.t_s);
    let samples = tables.cpu.iter().map(|s| s.t_s);
    let events = tables.events.iter().map(|e| e.t_s);
    windows
        .chain(placements)
        .chain(samples)
        .chain(events)
        .fold(1.0, f64::max)
}

/// From 0 to a fifth above the largest value, room for the legend (to 1 when there are none or all are 0).
fn up_to_max(values: impl Iterator<Item = f64>) -> Range<f64> {
    let max = values.fold(0.0, f64::max);
    0.0..if max > 0.0 { max * 1.2 } else { 1.0 }
}

/// The spans of time the network was partitioned: from a `split` to the next `heal`, or to
/// `end_s` when it never healed. Splits while partitioned and heals while whole (other
/// instances recording the same partition) are ignored.
pub(super) fn partitions(events: &[Event], end_s: f64) -> Vec<(f64, f64)> {
    let mut spans = Vec::new();
    let mut since = None;
    for event in events {
        match (event.event.as_str(), since) {
            ("split", None) => since = Some(event.t_s),
            ("heal", Some(start)) => {
                spans.push((start, event.t_s));
                since = None;
            }
            _ => {}
        }
    }
    spans.extend(since.map(|start| (start, end_s)));
    spans
}

/// Success rate (%) per window, at the window's middle, over shaded partitions.
fn success_rate(
    root: &Area<'_>,
    windows: &[SuccessWindow],
    events: &[Event],
    end_s: f64,
) -> DrawResult {
    let mut chart = builder(root, "Invocation success rate per 10 s window")
        .build_cartesian_2d(0.0..end_s, 0.0..105.0)?;
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .y_desc("success rate (%)")
        .draw()?;
    let spans = partitions(events, end_s);
    if !spans.is_empty() {
        let shade = RED.mix(0.15).filled();
        chart
            .draw_series(
                spans
                    .iter()
                    .map(|&(from, to)| Rectangle::new([(from, 0.0), (to, 105.0)], shade)),
            )?
            .label("partitioned (split to heal)")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], shade));
    }
    let half = WINDOW_S as f64 / 2.0;
    let points = windows
        .iter()
        .map(|w| (w.window_start_s + half, w.success_rate * 100.0));
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(2)).point_size(3))?
        .label("success rate")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE.stroke_width(2)));
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

/// Messages and probes of each placement, over time.
fn placement(root: &Area<'_>, placements: &[Placement], end_s: f64) -> DrawResult {
    let counts = placements.iter().flat_map(|p| [p.messages, p.probes]);
    let y = up_to_max(counts.map(f64::from));
    let mut chart =
        builder(root, "Deployment cost per placement").build_cartesian_2d(0.0..end_s, y)?;
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .y_desc("per placement (count)")
        .draw()?;
    let series: [(&str, RGBColor, PlacementCount); 2] = [
        ("messages", BLUE, |p| p.messages),
        ("probes", RED, |p| p.probes),
    ];
    for (label, color, count) in series {
        let points = placements.iter().map(|p| (p.t_s, f64::from(count(p))));
        chart
            .draw_series(points.map(|point| Circle::new(point, 2, color.filled())))?
            .label(label)
            .legend(move |(x, y)| Circle::new((x + 9, y), 3, color.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

/// The empirical CDF of `values` (ms), floored at [`MIN_LATENCY_MS`] for the log axis.
fn cdf(values: impl Iterator<Item = f64>) -> Vec<(f64, f64)> {
    let mut values: Vec<f64> = values.map(|v| v.max(MIN_LATENCY_MS)).collect();
    values.sort_by(f64::total_cmp);
    let n = values.len() as f64;
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| (v, (i + 1) as f64 / n))
        .collect()
}

/// The latency range the CDF plot spans: around the data, or 0.1 ms to 1 s without any.
fn latency_range(curves: &[&[(f64, f64)]]) -> Range<f64> {
    let values = || curves.iter().flat_map(|c| c.iter().map(|p| p.0));
    let min = values().fold(f64::INFINITY, f64::min);
    let max = values().fold(0.0, f64::max);
    if min.is_finite() && max > 0.0 {
        min / 1.5..max * 1.5
    } else {
        0.1..1000.0
    }
}

/// CDFs of execution and end-to-end latency of the successful invocations, log time axis.
fn latency(root: &Area<'_>, latencies: &[Latency]) -> DrawResult {
    let execute = cdf(latencies.iter().map(|l| l.execute_ms));
    let end_to_end = cdf(latencies.iter().map(|l| l.end_to_end_ms));
    let x = latency_range(&[&execute, &end_to_end]);
    let mut chart = builder(root, "Latency of successful invocations (CDF)")
        .build_cartesian_2d(x.log_scale(), 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("latency (ms, log scale)")
        .y_desc("fraction of invocations at or below")
        .draw()?;
    for (label, color, points) in [("execute", BLUE, execute), ("end to end", RED, end_to_end)] {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

/// KiB/s received and sent per node, stacked bars, nodes by instance then generation.
fn bandwidth(root: &Area<'_>, nodes: &[NodeBandwidth]) -> DrawResult {
    let y = up_to_max(nodes.iter().map(|n| n.kib_per_s_in + n.kib_per_s_out));
    let last = (nodes.len() as u32).saturating_sub(1);
    let mut chart = builder(root, "Bandwidth per node (first to last sample)")
        .build_cartesian_2d((0..last).into_segmented(), y)?;
    let node_label = |v: &SegmentValue<u32>| match v {
        SegmentValue::CenterOf(i) => nodes
            .get(*i as usize)
            .map(|n| format!("{}/{}", n.instance, n.generation))
            .unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("node (instance/generation)")
        .y_desc("traffic (KiB/s)")
        .x_label_formatter(&node_label)
        .draw()?;
    let bar = |i: usize, from: f64, to: f64, color: RGBColor| {
        let (left, right) = (
            SegmentValue::Exact(i as u32),
            SegmentValue::Exact(i as u32 + 1),
        );
        let mut bar = Rectangle::new([(left, from), (right, to)], color.filled());
        bar.set_margin(0, 0, 1, 1);
        bar
    };
    let inbound = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| bar(i, 0.0, n.kib_per_s_in, BLUE));
    chart
        .draw_series(inbound)?
        .label("received")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], BLUE.filled()));
    let outbound = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| bar(i, n.kib_per_s_in, n.kib_per_s_in + n.kib_per_s_out, RED));
    chart
        .draw_series(outbound)?
        .label("sent")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], RED.filled()));
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

/// Groups (node, point) pairs into one time-ordered line per node.
fn per_node(samples: impl Iterator<Item = (Node, (f64, f64))>) -> BTreeMap<Node, Vec<(f64, f64)>> {
    let mut lines: BTreeMap<Node, Vec<(f64, f64)>> = BTreeMap::new();
    for (node, point) in samples {
        lines.entry(node).or_default().push(point);
    }
    lines
}

/// One line per node over time; a legend when there are few nodes.
fn node_lines(
    root: &Area<'_>,
    title: &str,
    y_desc: &str,
    lines: &BTreeMap<Node, Vec<(f64, f64)>>,
    end_s: f64,
) -> DrawResult {
    let y = up_to_max(lines.values().flatten().map(|p| p.1));
    let mut chart = builder(root, &format!("{title} ({} nodes)", lines.len()))
        .build_cartesian_2d(0.0..end_s, y)?;
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .y_desc(y_desc)
        .draw()?;
    for (i, ((instance, generation), points)) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let series = chart.draw_series(LineSeries::new(
            points.iter().copied(),
            color.stroke_width(1),
        ))?;
        if lines.len() <= MAX_LEGEND_NODES {
            series
                .label(format!("node {instance}/{generation}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
    }
    if !lines.is_empty() && lines.len() <= MAX_LEGEND_NODES {
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    }
    Ok(())
}

/// Draws the legend of the labelled series in the chart's `corner`.
fn legend<'a, 'p: 'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, SVGBackend<'p>, Cartesian2d<X, Y>>,
    corner: SeriesLabelPosition,
) -> DrawResult {
    chart
        .configure_series_labels()
        .position(corner)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
