//! The HTML report of `kiln simulate serving`: one self-contained page (inline CSS and SVG, no scripts, fonts or
//! images) with a table of every policy's run and plots of its time series and of the keep-alive trade-off.
//!
//! The output is deterministic: the same runs give a byte-identical page (floats are printed with fixed
//! precision, nothing depends on time or hashing). Non-finite numbers are drawn as 0 and shown as `n/a`, so no
//! `NaN` or `inf` reaches the page.

use std::fmt::{self, Write};

use kiln_sim::serving::{Outcome, Series};

/// One policy's run, for the report.
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    /// The keep-alive policy's name, as the report shows it.
    pub policy: &'a str,
    /// What the simulation produced.
    pub outcome: &'a Outcome,
}

/// A self-contained HTML page (no external scripts, styles, fonts or images): a header with `title` and the
/// `settings` lines (each shown as-is, escaped), a table of every run (policy, requests, cold starts, cold-start
/// rate %, p50/p95/p99 latency ms, GPU-seconds busy/idle-warm/loading, cost USD: GPU, wait, total), and inline SVG plots:
/// (1) replicas over time, (2) cold starts per sample interval over time, (3) GPU memory holding weights (GB) over
/// time — one coloured line per policy with a legend, x axis in hours, y axis with a few labelled ticks —
/// and (4) a scatter of the trade-off: x = idle-warm GPU-hours, y = cold starts, one labelled point per policy.
///
/// Series longer than [`MAX_POINTS`] samples are downsampled to the maximum of each bucket of samples.
pub fn html(title: &str, settings: &[String], runs: &[Run<'_>]) -> String {
    let mut out = String::new();
    write_page(&mut out, title, settings, runs).expect("formatting into a String cannot fail");
    out
}

/// The most points one line of a plot has; longer series keep the maximum of each bucket.
pub const MAX_POINTS: usize = 600;

/// Line colours, by run; after the last one they repeat with a dash pattern.
const PALETTE: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// Dash patterns for the palette's second and third rounds.
const DASHES: [&str; 3] = ["", "6 3", "2 2"];

const STYLE: &str = "\
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:24px auto;\
max-width:1000px;padding:0 16px;color:#222;background:#fff}\
h1{font-size:1.5em;margin-bottom:.3em}h2{font-size:1.15em;margin-top:1.6em}\
ul.settings{margin:0;padding-left:1.2em;color:#444;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;\
font-size:.9em}\
table{border-collapse:collapse;font-size:.9em;margin-top:.5em}\
th,td{border:1px solid #ccc;padding:4px 8px}th{background:#f3f3f3}\
td.n{text-align:right;font-variant-numeric:tabular-nums}\
span.sw{display:inline-block;width:10px;height:10px;margin-right:6px;border-radius:2px}\
figure{margin:1em 0}figcaption{color:#555;font-size:.85em}\
svg{background:#fff;max-width:100%;height:auto}\
svg text{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;font-size:11px;fill:#333}\
svg .grid{stroke:#e5e5e5;stroke-width:1}svg .axis{stroke:#555;stroke-width:1}\
p.empty{color:#777}";

// Plot geometry, pixels.
const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 300.0;
const LEFT: f64 = 70.0;
const RIGHT_LINES: f64 = 200.0;
const RIGHT_SCATTER: f64 = 30.0;
const TOP: f64 = 20.0;
const BOTTOM: f64 = 45.0;
const LEGEND_ROW: f64 = 18.0;
/// Least tick intervals on the x and y axes.
const X_TICKS: u32 = 8;
const Y_TICKS: u32 = 4;

fn write_page(out: &mut String, title: &str, settings: &[String], runs: &[Run<'_>]) -> fmt::Result {
    let title = escape(title);
    writeln!(out, "<!DOCTYPE html>")?;
    writeln!(out, "<html lang=\"en\">")?;
    writeln!(out, "<head>")?;
    writeln!(out, "<meta charset=\"utf-8\">")?;
    writeln!(out, "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")?;
    writeln!(out, "<title>{title}</title>")?;
    writeln!(out, "<style>{STYLE}</style>")?;
    writeln!(out, "</head>")?;
    writeln!(out, "<body>")?;
    writeln!(out, "<header>")?;
    writeln!(out, "<h1>{title}</h1>")?;
    if !settings.is_empty() {
        writeln!(out, "<ul class=\"settings\">")?;
        for line in settings {
            writeln!(out, "<li>{}</li>", escape(line))?;
        }
        writeln!(out, "</ul>")?;
    }
    writeln!(out, "</header>")?;

    writeln!(out, "<h2>Runs</h2>")?;
    write_table(out, runs)?;

    let plots: [(&str, &str, bool, SeriesValues); 3] = [
        ("Replicas", "replicas", true, |s| s.replicas.iter().map(|&v| f64::from(v)).collect()),
        ("Cold starts per sample interval", "cold starts", true, |s| s.cold_starts.iter().map(|&v| v as f64).collect()),
        ("GPU memory holding weights", "GB", false, |s| s.gpu_memory_gb.clone()),
    ];
    for (heading, y_label, counts, values) in plots {
        let lines: Vec<Line<'_>> = runs
            .iter()
            .map(|run| {
                let series = &run.outcome.series;
                let points: Vec<(f64, f64)> = series
                    .t_s
                    .iter()
                    .zip(values(series))
                    .map(|(&t, v)| (t / 3600.0, v))
                    .filter(|(t, v)| t.is_finite() && v.is_finite())
                    .collect();
                Line { policy: run.policy, points }
            })
            .collect();
        writeln!(out, "<h2>{}</h2>", escape(heading))?;
        write_line_plot(out, heading, y_label, counts, &lines)?;
    }

    writeln!(out, "<h2>Trade-off: idle-warm GPU-hours vs cold starts</h2>")?;
    write_scatter(out, runs)?;

    writeln!(out, "</body>")?;
    writeln!(out, "</html>")
}

fn write_table(out: &mut String, runs: &[Run<'_>]) -> fmt::Result {
    if runs.is_empty() {
        return writeln!(out, "<p class=\"empty\">No runs.</p>");
    }
    writeln!(out, "<table>")?;
    writeln!(out, "<thead>")?;
    writeln!(
        out,
        "<tr><th rowspan=\"2\">policy</th><th rowspan=\"2\">requests</th><th rowspan=\"2\">warm hits</th><th rowspan=\"2\">cold starts</th>\
         <th rowspan=\"2\">cold-start rate %</th><th colspan=\"3\">latency ms</th><th colspan=\"3\">GPU-seconds</th>\
         <th colspan=\"3\">cost USD</th></tr>"
    )?;
    writeln!(
        out,
        "<tr><th>p50</th><th>p95</th><th>p99</th><th>busy</th><th>idle-warm</th><th>loading</th><th>GPU</th><th>wait</th><th>total</th></tr>"
    )?;
    writeln!(out, "</thead>")?;
    writeln!(out, "<tbody>")?;
    for (i, run) in runs.iter().enumerate() {
        let o = run.outcome;
        let [p50, p95, p99] = o.latency_ms;
        writeln!(
            out,
            "<tr><td><span class=\"sw\" style=\"background:{colour}\"></span>{policy}</td>\
             <td class=\"n\">{requests}</td><td class=\"n\">{warm}</td><td class=\"n\">{cold}</td><td class=\"n\">{rate}</td>\
             <td class=\"n\">{p50}</td><td class=\"n\">{p95}</td><td class=\"n\">{p99}</td>\
             <td class=\"n\">{busy}</td><td class=\"n\">{idle}</td><td class=\"n\">{loading}</td>\
             <td class=\"n\">{gpu_cost}</td><td class=\"n\">{wait_cost}</td><td class=\"n\">{total_cost}</td></tr>",
            colour = colour(i),
            policy = escape(run.policy),
            requests = o.requests,
            warm = o.warm_hits,
            cold = o.cold_starts,
            rate = cell(o.cold_start_rate() * 100.0, 2),
            p50 = cell(p50, 1),
            p95 = cell(p95, 1),
            p99 = cell(p99, 1),
            busy = cell(o.gpu_seconds.busy, 0),
            idle = cell(o.gpu_seconds.idle_warm, 0),
            loading = cell(o.gpu_seconds.loading, 0),
            gpu_cost = cell(o.gpu_cost_usd, 2),
            wait_cost = cell(o.wait_cost_usd, 2),
            total_cost = cell(o.total_cost_usd, 2),
        )?;
    }
    writeln!(out, "</tbody>")?;
    writeln!(out, "</table>")
}

/// Picks one metric of a [`Series`], as numbers.
type SeriesValues = fn(&Series) -> Vec<f64>;

/// One policy's line in a plot: (hours, value) points, finite.
struct Line<'a> {
    policy: &'a str,
    points: Vec<(f64, f64)>,
}

/// A line per policy; `counts`: the values are whole numbers, so the y ticks are too.
fn write_line_plot(out: &mut String, title: &str, y_label: &str, counts: bool, lines: &[Line<'_>]) -> fmt::Result {
    let all = || lines.iter().flat_map(|l| l.points.iter());
    let x_axis = Axis::new(
        all().map(|p| p.0).fold(f64::INFINITY, f64::min),
        all().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max),
        X_TICKS,
    );
    let y_axis = Axis::new(all().map(|p| p.1).fold(0.0, f64::min), all().map(|p| p.1).fold(0.0, f64::max), Y_TICKS);
    let y_axis = if counts { y_axis.whole() } else { y_axis };
    let height = HEIGHT.max(TOP + LEGEND_ROW * lines.len() as f64 + 10.0);
    let frame = Frame { left: LEFT, right: WIDTH - RIGHT_LINES, top: TOP, bottom: height - BOTTOM };

    open_svg(out, title, height)?;
    write_axes(out, &frame, &x_axis, &y_axis, "time (h)", y_label)?;
    let mut downsampled = false;
    for (i, line) in lines.iter().enumerate() {
        let points = downsample(&line.points);
        downsampled |= points.len() < line.points.len();
        let stroke = format!("stroke=\"{}\"{}", colour(i), dash(i));
        match points.as_slice() {
            [] => {}
            [(x, y)] => writeln!(
                out,
                "<circle cx=\"{}\" cy=\"{}\" r=\"2.5\" fill=\"{}\"/>",
                px(frame.x(&x_axis, *x)),
                px(frame.y(&y_axis, *y)),
                colour(i)
            )?,
            _ => {
                write!(
                    out,
                    "<polyline fill=\"none\" {stroke} stroke-width=\"1.5\" stroke-linejoin=\"round\" points=\""
                )?;
                for (j, (x, y)) in points.iter().enumerate() {
                    let sep = if j == 0 { "" } else { " " };
                    write!(out, "{sep}{},{}", px(frame.x(&x_axis, *x)), px(frame.y(&y_axis, *y)))?;
                }
                writeln!(out, "\"/>")?;
            }
        }
        // Legend entry.
        let ly = frame.top + 8.0 + LEGEND_ROW * i as f64;
        let lx = frame.right + 16.0;
        writeln!(
            out,
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" {stroke} stroke-width=\"2\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            px(lx),
            px(ly),
            px(lx + 22.0),
            px(ly),
            px(lx + 28.0),
            px(ly + 4.0),
            escape(line.policy)
        )?;
    }
    if lines.iter().all(|l| l.points.is_empty()) {
        write_no_data(out, &frame)?;
    }
    writeln!(out, "</svg>")?;
    if downsampled {
        writeln!(
            out,
            "<figcaption>Series longer than {MAX_POINTS} samples show the maximum of each bucket of samples.\
             </figcaption>"
        )?;
    }
    writeln!(out, "</figure>")
}

fn write_scatter(out: &mut String, runs: &[Run<'_>]) -> fmt::Result {
    let points: Vec<(f64, f64)> =
        runs.iter().map(|r| (finite(r.outcome.gpu_seconds.idle_warm / 3600.0), r.outcome.cold_starts as f64)).collect();
    let x_axis = Axis::new(0.0, points.iter().map(|p| p.0).fold(0.0, f64::max), X_TICKS);
    let y_axis = Axis::new(0.0, points.iter().map(|p| p.1).fold(0.0, f64::max), Y_TICKS).whole();
    let frame = Frame { left: LEFT, right: WIDTH - RIGHT_SCATTER, top: TOP, bottom: HEIGHT - BOTTOM };

    open_svg(out, "Trade-off: idle-warm GPU-hours vs cold starts", HEIGHT)?;
    write_axes(out, &frame, &x_axis, &y_axis, "idle-warm GPU-hours", "cold starts")?;
    let middle = (frame.left + frame.right) / 2.0;
    for (i, (run, &(x, y))) in runs.iter().zip(&points).enumerate() {
        let cx = frame.x(&x_axis, x);
        let cy = frame.y(&y_axis, y);
        // Labels of points in the right half go to their left, so they stay inside the plot.
        let (tx, anchor) = if cx > middle { (cx - 8.0, "end") } else { (cx + 8.0, "start") };
        writeln!(
            out,
            "<circle cx=\"{}\" cy=\"{}\" r=\"5\" fill=\"{}\" fill-opacity=\"0.85\" stroke=\"#fff\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"{anchor}\">{}</text>",
            px(cx),
            px(cy),
            colour(i),
            px(tx),
            px(cy - 6.0),
            escape(run.policy)
        )?;
    }
    if runs.is_empty() {
        write_no_data(out, &frame)?;
    }
    writeln!(out, "</svg>")?;
    writeln!(out, "</figure>")
}

fn open_svg(out: &mut String, title: &str, height: f64) -> fmt::Result {
    writeln!(out, "<figure>")?;
    writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         role=\"img\" aria-label=\"{t}\">",
        w = px(WIDTH),
        h = px(height),
        t = escape(title)
    )
}

fn write_no_data(out: &mut String, frame: &Frame) -> fmt::Result {
    writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no data</text>",
        px((frame.left + frame.right) / 2.0),
        px((frame.top + frame.bottom) / 2.0)
    )
}

/// Grid lines, ticks with labels, the frame and the axis titles.
fn write_axes(out: &mut String, frame: &Frame, x: &Axis, y: &Axis, x_label: &str, y_label: &str) -> fmt::Result {
    for v in y.ticks() {
        let py = px(frame.y(y, v));
        writeln!(
            out,
            "<line class=\"grid\" x1=\"{}\" y1=\"{py}\" x2=\"{}\" y2=\"{py}\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            px(frame.left),
            px(frame.right),
            px(frame.left - 6.0),
            px(frame.y(y, v) + 4.0),
            fixed(v, y.decimals())
        )?;
    }
    for v in x.ticks() {
        let pxv = px(frame.x(x, v));
        writeln!(
            out,
            "<line class=\"grid\" x1=\"{pxv}\" y1=\"{}\" x2=\"{pxv}\" y2=\"{}\"/>\
             <text x=\"{pxv}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            px(frame.top),
            px(frame.bottom),
            px(frame.bottom + 16.0),
            fixed(v, x.decimals())
        )?;
    }
    writeln!(
        out,
        "<polyline class=\"axis\" fill=\"none\" points=\"{l},{t} {l},{b} {r},{b}\"/>",
        l = px(frame.left),
        t = px(frame.top),
        b = px(frame.bottom),
        r = px(frame.right)
    )?;
    writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        px((frame.left + frame.right) / 2.0),
        px(frame.bottom + 36.0),
        escape(x_label)
    )?;
    let (ty_x, ty_y) = (16.0, (frame.top + frame.bottom) / 2.0);
    writeln!(
        out,
        "<text x=\"{x}\" y=\"{y}\" text-anchor=\"middle\" transform=\"rotate(-90 {x} {y})\">{}</text>",
        escape(y_label),
        x = px(ty_x),
        y = px(ty_y)
    )
}

/// The plotting area, pixels.
struct Frame {
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
}

impl Frame {
    fn x(&self, axis: &Axis, v: f64) -> f64 {
        self.left + axis.fraction(v) * (self.right - self.left)
    }

    fn y(&self, axis: &Axis, v: f64) -> f64 {
        self.bottom - axis.fraction(v) * (self.bottom - self.top)
    }
}

/// A linear axis from `min` to `max` (`max > min`, both multiples of `step`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Axis {
    min: f64,
    max: f64,
    step: f64,
}

impl Axis {
    /// An axis covering `lo..=hi` with at least `ticks` intervals' worth of resolution: the step is the smallest
    /// 1, 2 or 5 times a power of ten at least `(hi - lo) / ticks`. Non-finite or empty ranges fall back to a unit
    /// range.
    fn new(lo: f64, hi: f64, ticks: u32) -> Self {
        let lo = if lo.is_finite() { lo } else { 0.0 };
        let hi = if hi.is_finite() { hi.max(lo) } else { lo };
        let span = hi - lo;
        let span = if span.is_finite() && span > 0.0 { span } else { 1.0 };
        let step = nice_step(span / f64::from(ticks.max(1)));
        let min = (lo / step).floor() * step;
        let max = (hi / step).ceil() * step;
        let max = if max > min { max } else { min + step };
        if [min, max, step].iter().all(|v| v.is_finite()) && max > min {
            Self { min, max, step }
        } else {
            Self { min: 0.0, max: 1.0, step: 0.25 }
        }
    }

    /// The axis with a step of at least 1, for whole numbers.
    fn whole(self) -> Self {
        if self.step >= 1.0 {
            return self;
        }
        let min = self.min.floor();
        let max = self.max.ceil();
        Self { min, max: if max > min { max } else { min + 1.0 }, step: 1.0 }
    }

    /// Where `v` lies on the axis, 0..=1 (non-finite values at 0).
    fn fraction(&self, v: f64) -> f64 {
        let f = (v - self.min) / (self.max - self.min);
        if f.is_finite() { f.clamp(0.0, 1.0) } else { 0.0 }
    }

    /// Tick values, `min` to `max` by `step` (at most 50).
    fn ticks(&self) -> Vec<f64> {
        let n = ((self.max - self.min) / self.step).round();
        let n = if n.is_finite() { n.clamp(1.0, 50.0) as usize } else { 1 };
        (0..=n).map(|i| self.min + self.step * i as f64).collect()
    }

    /// Decimals that tell the ticks apart.
    fn decimals(&self) -> usize {
        if self.step >= 1.0 { 0 } else { (-self.step.log10()).ceil().clamp(0.0, 6.0) as usize }
    }
}

/// The smallest 1, 2 or 5 times a power of ten at least `raw` (1 for non-positive or non-finite input).
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let norm = raw / magnitude;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    let step = nice * magnitude;
    if step.is_finite() && step > 0.0 { step } else { 1.0 }
}

/// At most [`MAX_POINTS`] points: longer lines keep, per bucket of consecutive points, the first x and the largest
/// y.
fn downsample(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    if points.len() <= MAX_POINTS {
        return points.to_vec();
    }
    let bucket = points.len().div_ceil(MAX_POINTS);
    points
        .chunks(bucket)
        .filter_map(|chunk| {
            let x = chunk.first()?.0;
            let y = chunk.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
            Some((x, y))
        })
        .collect()
}

fn colour(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// The dash attribute of run `i`'s line (empty for the first round of colours).
fn dash(i: usize) -> String {
    let pattern = DASHES[(i / PALETTE.len()) % DASHES.len()];
    if pattern.is_empty() { String::new() } else { format!(" stroke-dasharray=\"{pattern}\"") }
}

fn finite(v: f64) -> f64 {
    if v.is_finite() { v } else { 0.0 }
}

/// `v` with `decimals` decimals; non-finite values as 0, never `-0`.
fn fixed(v: f64, decimals: usize) -> String {
    let s = format!("{:.*}", decimals, finite(v));
    match s.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_owned(),
        _ => s,
    }
}

/// A pixel coordinate.
fn px(v: f64) -> String {
    fixed(v, 1)
}

/// A table cell: `v` with `decimals` decimals, `n/a` when not finite.
fn cell(v: f64, decimals: usize) -> String {
    if v.is_finite() { fixed(v, decimals) } else { "n/a".to_owned() }
}

/// `s` safe in HTML text and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use kiln_sim::serving::GpuSeconds;

    use super::*;

    fn outcome(requests: u64, cold_starts: u64, idle_warm: f64, series: Series) -> Outcome {
        Outcome {
            requests,
            cold_starts,
            warm_hits: 1,
            demand_loads: [0, 1, 2, cold_starts.saturating_sub(3)],
            prewarms: 0,
            unschedulable: 0,
            latency_ms: [120.0, 950.5, 20_000.25],
            gpu_seconds: GpuSeconds { busy: 3600.0, idle_warm, loading: 42.0 },
            wait_s: 10.0,
            gpu_cost_usd: 12.345,
            wait_cost_usd: 5.0,
            total_cost_usd: 17.345,
            series,
            idle_gaps: Vec::new(),
            per_deployment: Vec::new(),
            events: requests * 2,
            copy_lifetime_s: 0.0,
            rentals: None,
        }
    }

    fn series(samples: usize, phase: usize) -> Series {
        Series {
            t_s: (0..samples).map(|i| 600.0 * (i + 1) as f64).collect(),
            replicas: (0..samples).map(|i| ((i + phase) % 5) as u32).collect(),
            cold_starts: (0..samples).map(|i| ((i * 7 + phase) % 3) as u64).collect(),
            gpu_memory_gb: (0..samples).map(|i| 16.0 * ((i + phase) % 4) as f64).collect(),
        }
    }

    fn assert_clean(page: &str) {
        assert!(!page.contains("NaN"), "NaN in page");
        assert!(!page.contains("inf"), "inf in page");
        assert!(!page.contains("\"-0."), "negative zero coordinate in page");
    }

    #[test]
    fn lists_every_policy_in_table_legends_and_scatter() {
        let a = outcome(10_000, 250, 7200.0, series(288, 0));
        let b = outcome(10_000, 40, 36_000.0, series(288, 2));
        let runs = [Run { policy: "fixed-10m", outcome: &a }, Run { policy: "adaptive", outcome: &b }];
        let page = html("serving", &["fleet h100-80gb:8x16".to_owned()], &runs);

        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.contains("<title>serving</title>"));
        assert!(page.contains("<li>fleet h100-80gb:8x16</li>"));
        assert_eq!(page.matches("<svg").count(), 4);
        assert_eq!(page.matches("</svg>").count(), 4);
        for name in ["fixed-10m", "adaptive"] {
            assert!(page.contains(&format!("</span>{name}</td>")), "{name} not in the table");
            // Three legends and one scatter label.
            assert_eq!(page.matches(&format!(">{name}</text>")).count(), 4, "{name} legends and label");
        }
        // Table values: rate %, latency, GPU-seconds, cost.
        assert!(page.contains("<td class=\"n\">2.50</td>"));
        assert!(page.contains("<td class=\"n\">0.40</td>"));
        assert!(page.contains("<td class=\"n\">950.5</td>"));
        assert!(page.contains("<td class=\"n\">36000</td>"));
        assert!(page.contains("<td class=\"n\">12.35</td>") || page.contains("<td class=\"n\">12.34</td>"));
        assert!(page.contains("<td class=\"n\">5.00</td>") && page.contains("<th>wait</th><th>total</th>"));
        // One line per policy in each of the three line plots, coloured from the palette.
        assert_eq!(page.matches("<polyline fill=\"none\" stroke=\"#1f77b4\"").count(), 3);
        assert_eq!(page.matches("<polyline fill=\"none\" stroke=\"#d62728\"").count(), 3);
        // No external resources.
        assert!(!page.contains("<script"));
        assert!(!page.contains("<link"));
        assert!(!page.contains("src="));
        assert_clean(&page);
    }

    #[test]
    fn escapes_text() {
        let a = outcome(10, 1, 60.0, series(3, 0));
        let runs = [Run { policy: "a<b", outcome: &a }, Run { policy: "\"q\" & r>", outcome: &a }];
        let page = html("<T&T>", &["x < y & \"z\"".to_owned()], &runs);
        assert!(page.contains("a&lt;b"));
        assert!(!page.contains("a<b"));
        assert!(page.contains("&quot;q&quot; &amp; r&gt;"));
        assert!(page.contains("<title>&lt;T&amp;T&gt;</title>"));
        assert!(page.contains("<li>x &lt; y &amp; &quot;z&quot;</li>"));
    }

    #[test]
    fn handles_no_runs() {
        let page = html("empty", &[], &[]);
        assert_eq!(page.matches("<svg").count(), 4);
        assert!(page.contains("No runs."));
        assert_eq!(page.matches(">no data</text>").count(), 4);
        assert_clean(&page);
    }

    #[test]
    fn handles_zero_and_empty_series() {
        let empty = Outcome::default();
        let with = |series: Series| Outcome { series, ..Outcome::default() };
        let flat = with(Series {
            t_s: vec![0.0; 5],
            replicas: vec![0; 5],
            cold_starts: vec![0; 5],
            gpu_memory_gb: vec![0.0; 5],
        });
        let single =
            with(Series { t_s: vec![600.0], replicas: vec![1], cold_starts: vec![0], gpu_memory_gb: vec![8.0] });
        // Mismatched lengths take the common prefix.
        let ragged = with(Series {
            t_s: vec![0.0, 600.0, 1200.0],
            replicas: vec![1],
            cold_starts: vec![],
            gpu_memory_gb: vec![1.0; 9],
        });
        let runs = [
            Run { policy: "empty", outcome: &empty },
            Run { policy: "flat", outcome: &flat },
            Run { policy: "single", outcome: &single },
            Run { policy: "ragged", outcome: &ragged },
        ];
        let page = html("zeros", &[], &runs);
        assert_eq!(page.matches("<svg").count(), 4);
        assert!(page.contains("</span>empty</td>"));
        assert!(page.contains("<td class=\"n\">0.00</td>"));
        assert_clean(&page);

        let alone = html("zeros", &[], &[Run { policy: "empty", outcome: &empty }]);
        assert_eq!(alone.matches(">no data</text>").count(), 3);
        assert_clean(&alone);
    }

    #[test]
    fn non_finite_values_never_reach_the_page() {
        let mut bad = outcome(5, 2, f64::INFINITY, series(4, 1));
        bad.latency_ms = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
        bad.gpu_cost_usd = f64::NAN;
        bad.total_cost_usd = f64::INFINITY;
        bad.gpu_seconds.busy = f64::NAN;
        bad.series.gpu_memory_gb = vec![f64::NAN, f64::INFINITY, 1.0, -0.0];
        bad.series.t_s[0] = f64::NAN;
        let page = html("bad", &[], &[Run { policy: "bad", outcome: &bad }]);
        assert!(page.contains("n/a"));
        assert_clean(&page);
    }

    #[test]
    fn is_deterministic() {
        let a = outcome(10_000, 250, 7200.0, series(5_000, 0));
        let b = outcome(8_000, 10, 1800.5, series(3, 1));
        let runs = [Run { policy: "one", outcome: &a }, Run { policy: "two", outcome: &b }];
        let settings = ["days 2".to_owned(), "seed 42".to_owned()];
        assert_eq!(html("t", &settings, &runs), html("t", &settings, &runs));
    }

    #[test]
    fn downsamples_long_series() {
        let points: Vec<(f64, f64)> = (0..5_000).map(|i| (i as f64, (i % 97) as f64)).collect();
        let down = downsample(&points);
        assert!(down.len() <= MAX_POINTS);
        // Buckets of 9: the first keeps x 0 and the largest of 0..=8.
        assert_eq!(down.first(), Some(&(0.0, 8.0)));
        assert_eq!(downsample(&points[..10]), points[..10].to_vec());

        let a = outcome(1, 0, 0.0, series(20_000, 0));
        let page = html("long", &[], &[Run { policy: "long", outcome: &a }]);
        for line in page.lines().filter(|l| l.starts_with("<polyline fill=\"none\" stroke=")) {
            let points = line.split("points=\"").nth(1).map_or(0, |p| p.split(' ').count());
            assert!(points <= MAX_POINTS, "{points} points");
        }
        assert!(page.contains("show the maximum of each bucket"));
    }

    #[test]
    fn axes_are_nice_and_finite() {
        let axis = Axis::new(0.0, 0.0, 4);
        assert!(axis.max > axis.min);
        let axis = Axis::new(0.0, 37.0, 4);
        assert_eq!(axis, Axis { min: 0.0, max: 40.0, step: 10.0 });
        assert_eq!(axis.ticks(), vec![0.0, 10.0, 20.0, 30.0, 40.0]);
        let axis = Axis::new(0.0, 0.3, 4);
        assert_eq!(axis.decimals(), 1);
        assert_eq!(axis.whole(), Axis { min: 0.0, max: 1.0, step: 1.0 });
        assert_eq!(Axis::new(0.0, 2.0, 4).whole(), Axis { min: 0.0, max: 2.0, step: 1.0 });
        let axis = Axis::new(f64::NAN, f64::INFINITY, 4);
        assert!(axis.min.is_finite() && axis.max.is_finite() && axis.max > axis.min);
        assert_eq!(fixed(-0.0001, 1), "0.0");
        assert_eq!(fixed(f64::NAN, 2), "0.00");
    }
}
