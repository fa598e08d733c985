//! `report.html`: the run's models in one page a person reads at a glance —
//! an accuracy-vs-size chart (SVG, log-scale bytes) with the Pareto
//! frontier drawn through the models no other beats on both, and the table
//! behind it (size, parameters, NDCG/HR, latency, throughput), then the
//! job's history: NDCG@10 of the teacher, the published model and
//! popularity over run dates.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::results::{ModelResult, headline_k};
use crate::artifacts::evaluation::ScoresAt10;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn human_bytes(b: u64) -> String {
    match b {
        0..=9_999 => format!("{b} B"),
        10_000..=9_999_999 => format!("{:.1} KB", b as f64 / 1e3),
        _ => format!("{:.1} MB", b as f64 / 1e6),
    }
}

/// A power of ten of bytes as a tick label: `100 B`, `1 KB`, `10 MB`.
fn decade(exponent: i32) -> String {
    let (unit, e) = match exponent {
        i32::MIN..=2 => ("B", exponent),
        3..=5 => ("KB", exponent - 3),
        6..=8 => ("MB", exponent - 6),
        _ => ("GB", exponent - 9),
    };
    if e < 0 {
        format!("{} {unit}", 10f64.powi(e))
    } else {
        format!("{} {unit}", 10u64.pow(e as u32))
    }
}

const COLORS: [(&str, &str); 4] = [
    ("baseline", "#888888"),
    ("teacher", "#c0392b"),
    ("assistant", "#e67e22"),
    ("student", "#2471a3"),
];

fn color(role: &str) -> &'static str {
    COLORS
        .iter()
        .find(|(r, _)| *r == role)
        .map_or("#555555", |(_, c)| c)
}

/// The job's earlier runs, for the history chart.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Committed runs before this one, oldest first: run date and each
    /// model's metrics at 10.
    pub runs: Vec<(chrono::NaiveDate, ScoresAt10)>,
    /// `publish.model` (empty: the job publishes nothing).
    pub published_model: String,
    /// The run date whose model serves now, if any.
    pub published_date: Option<String>,
}

/// A chart's canvas: `w × h` SVG pixels, the plot inside the margins, y
/// from 0 at the bottom to `y_max` at the top.
struct Frame {
    w: f64,
    h: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    y_max: f64,
}

impl Frame {
    /// The SVG y of value `v`.
    fn sy(&self, v: f64) -> f64 {
        self.top + (1.0 - v / self.y_max) * (self.h - self.top - self.bottom)
    }

    /// The opening of the SVG (`aria` its accessible name): a white
    /// background and the two axes.
    fn open(&self, aria: &str) -> String {
        let Frame {
            w,
            h,
            left,
            right,
            top,
            bottom,
            ..
        } = *self;
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{aria}\">\n\
<rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
<line x1=\"{left}\" y1=\"{yb}\" x2=\"{xr}\" y2=\"{yb}\" stroke=\"#333\"/><line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{yb}\" stroke=\"#333\"/>\n",
            yb = h - bottom,
            xr = w - right
        )
    }

    /// `ticks` + 1 evenly spaced ticks on the y axis, 0 to `y_max`.
    fn y_ticks(&self, svg: &mut String, ticks: usize) {
        for i in 0..=ticks {
            let v = self.y_max * i as f64 / ticks as f64;
            let y = self.sy(v);
            let _ = writeln!(
                svg,
                "<line x1=\"{l5}\" y1=\"{y:.1}\" x2=\"{left}\" y2=\"{y:.1}\" stroke=\"#333\"/><text x=\"{lt}\" y=\"{y4:.1}\" font-size=\"12\" text-anchor=\"end\">{v:.3}</text>",
                left = self.left,
                l5 = self.left - 5.0,
                lt = self.left - 8.0,
                y4 = y + 4.0
            );
        }
    }

    /// A tick on the x axis at SVG x `x`, labelled `label` in `font_px`.
    fn x_tick(&self, svg: &mut String, x: f64, label: &str, font_px: u32) {
        let yb = self.h - self.bottom;
        let _ = writeln!(
            svg,
            "<line x1=\"{x:.1}\" y1=\"{yb}\" x2=\"{x:.1}\" y2=\"{yb5}\" stroke=\"#333\"/><text x=\"{x:.1}\" y=\"{yt}\" font-size=\"{font_px}\" text-anchor=\"middle\">{label}</text>",
            yb5 = yb + 5.0,
            yt = yb + 18.0
        );
    }

    /// The axis titles; the x title's baseline `x_title_up` px above the
    /// bottom edge.
    fn titles(&self, svg: &mut String, x_title: &str, y_title: &str, x_title_up: f64) {
        let _ = writeln!(
            svg,
            "<text x=\"{cx}\" y=\"{yl}\" font-size=\"13\" text-anchor=\"middle\">{x_title}</text>\
<text x=\"16\" y=\"{cy}\" font-size=\"13\" text-anchor=\"middle\" transform=\"rotate(-90 16 {cy})\">{y_title}</text>",
            cx = (self.left + self.w - self.right) / 2.0,
            yl = self.h - x_title_up,
            cy = (self.top + self.h - self.bottom) / 2.0
        );
    }
}

/// One line of the history chart.
struct Series {
    model: String,
    label: String,
    colour: &'static str,
    /// The `publish.model` line, whose published run is ringed.
    published: bool,
}

/// The lines of the history chart: the teacher, `publish.model` (when set)
/// and popularity.
fn history_series(published_model: &str) -> Vec<Series> {
    let line = |model: &str, label: String, colour, published| Series {
        model: model.to_string(),
        label,
        colour,
        published,
    };
    let mut series = vec![line("teacher", "teacher".into(), "#c0392b", false)];
    if !published_model.is_empty() {
        series.push(line(
            published_model,
            format!("{published_model} (publish.model)"),
            "#2471a3",
            true,
        ));
    }
    series.push(line("popularity", "popularity".into(), "#888888", false));
    series
}

/// NDCG@10 over run dates: the teacher, `publish.model` and popularity in
/// every earlier committed run and this one; a ring marks the run whose
/// model serves now. Each point names its run and value on hover.
fn history_chart(
    history: &History,
    run_date: chrono::NaiveDate,
    results: &[ModelResult],
) -> String {
    let mut runs: Vec<(String, BTreeMap<String, f64>)> = history
        .runs
        .iter()
        .map(|(date, scores)| {
            let ndcg = scores
                .iter()
                .filter_map(|(m, v)| v.get("ndcg@10").map(|x| (m.clone(), *x)))
                .collect();
            (date.to_string(), ndcg)
        })
        .collect();
    let own: BTreeMap<String, f64> = results
        .iter()
        .filter_map(|r| Some((r.name.clone(), r.metrics.ndcg_at(10)?)))
        .collect();
    runs.push((run_date.to_string(), own));
    if runs.len() < 2 {
        return "<h2>History</h2>\n<p>This is the job's first committed run: NDCG@10 over run dates appears from the second.</p>\n".into();
    }
    let series = history_series(&history.published_model);
    let frame = Frame {
        w: 760.0,
        h: 320.0,
        left: 70.0,
        right: 30.0,
        top: 36.0,
        bottom: 56.0,
        y_max: runs
            .iter()
            .flat_map(|(_, v)| series.iter().filter_map(|s| v.get(&s.model).copied()))
            .fold(0.0, f64::max)
            .max(1e-6)
            * 1.1,
    };
    let (left, top) = (frame.left, frame.top);
    let n = runs.len();
    let sx = |i: usize| left + (i as f64 + 0.5) / n as f64 * (frame.w - left - frame.right);
    let sy = |v: f64| frame.sy(v);
    let mut svg = String::from(
        "<h2>History</h2>\n<p>NDCG@10 on each committed run's own test split, by run date. A ring marks the run whose model was published when this report was written (this run's own model is offered to the publish gate after its commit).</p>\n",
    );
    svg.push_str(&frame.open("NDCG@10 over run dates"));
    frame.y_ticks(&mut svg, 4);
    // Date labels: at most about twelve, always the first and the last.
    let every = n.div_ceil(12).max(1);
    for (i, (date, _)) in runs.iter().enumerate() {
        if i % every == 0 || i + 1 == n {
            frame.x_tick(&mut svg, sx(i), date, 11);
        }
    }
    frame.titles(&mut svg, "run date", "NDCG@10", 12.0);
    for (j, line) in series.iter().enumerate() {
        let (model, colour) = (&line.model, line.colour);
        let points: Vec<(usize, f64)> = runs
            .iter()
            .enumerate()
            .filter_map(|(i, (_, v))| v.get(model).map(|x| (i, *x)))
            .collect();
        if points.len() > 1 {
            let path: Vec<String> = points
                .iter()
                .enumerate()
                .map(|(p, &(i, v))| {
                    format!(
                        "{}{:.1},{:.1}",
                        if p == 0 { "M" } else { "L" },
                        sx(i),
                        sy(v)
                    )
                })
                .collect();
            let _ = writeln!(
                svg,
                "<path class=\"series\" d=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>",
                path.join(" ")
            );
        }
        for &(i, v) in &points {
            let serving =
                line.published && history.published_date.as_deref() == Some(runs[i].0.as_str());
            let _ = writeln!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"{}\" fill=\"{colour}\" stroke=\"{}\" stroke-width=\"2\"><title>{}: {}, NDCG@10 {v:.4}{}</title></circle>",
                sx(i),
                sy(v),
                if serving { 7 } else { 4 },
                if serving { "#2e7d32" } else { "white" },
                escape(&runs[i].0),
                escape(model),
                if serving { " (published)" } else { "" }
            );
        }
        // Legend entries side by side, each as wide as its label.
        let x = left
            + 10.0
            + series[..j]
                .iter()
                .map(|s| 10.0 + label_width(&s.label) * 12.0 / LABEL_PX + 24.0)
                .sum::<f64>();
        let y = top / 2.0;
        let _ = writeln!(
            svg,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"5\" fill=\"{colour}\"/><text x=\"{tx:.1}\" y=\"{ty:.1}\" font-size=\"12\">{}</text>",
            escape(&line.label),
            tx = x + 10.0,
            ty = y + 4.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The page for the results of one run, with the job's history.
pub fn html(
    job: &str,
    run_date: chrono::NaiveDate,
    run_id: &str,
    results: &[ModelResult],
    ceiling: Option<&[Option<[f64; 3]>]>,
    history: &History,
) -> String {
    let headline = results.iter().find_map(|r| headline_k(&r.metrics));
    let k = headline.map_or(10, |(_, k)| k);
    // The log's Bayes ceiling at the headline cut-off: (HR, NDCG, MRR).
    let bound = headline.and_then(|(i, _)| ceiling?.get(i).copied().flatten());
    let points: Vec<(&ModelResult, u64, f64)> = results
        .iter()
        .filter_map(|r| {
            headline_k(&r.metrics).map(|(i, _)| (r, r.size_bytes.max(1), r.metrics.ndcg[i]))
        })
        .collect();
    let mut page = String::new();
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<title>recdistill · {job} · {run_date}</title>\
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}\
table{{border-collapse:collapse;font-size:14px}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}}\
td:first-child,th:first-child,td:nth-child(2),th:nth-child(2),td:nth-child(3),th:nth-child(3){{text-align:left}}\
tr.front td{{font-weight:600}}</style></head><body>\n\
<h1>{job} — run {run_date}</h1>\n<p>Run <code>{run_id}</code>. Accuracy is NDCG@{k} on the test split (full ranking); \
size is the bytes of each model's artifact as stored. Bold rows and the line mark the Pareto frontier: no other model is both smaller and more accurate.</p>\n",
        job = escape(job),
        run_id = escape(run_id),
    );
    if let Some([hr, ndcg, _]) = bound {
        let _ = writeln!(
            page,
            "<p>The log's Bayes ceiling on the same test targets (the generator's own next-item probabilities, ranked as the evaluation ranks): \
NDCG@{k} {ndcg:.4}, HR@{k} {hr:.4}. <em>of ceiling</em> is each model's NDCG@{k} as a fraction of it.</p>"
        );
    }
    page.push_str(&chart(&points, k));
    page.push_str(
        "<table><tr><th>model</th><th>role</th><th>variant</th><th>size</th><th>params</th>",
    );
    let _ = writeln!(
        page,
        "<th>NDCG@{k}</th>{}<th>HR@{k}</th><th>p50 ms</th><th>p99 ms</th><th>users/s</th><th>frontier</th></tr>",
        if bound.is_some() {
            "<th>of ceiling</th>"
        } else {
            ""
        }
    );
    let mut rows: Vec<&ModelResult> = results.iter().collect();
    rows.sort_by_key(|r| r.size_bytes);
    for r in rows {
        let at = |v: &[f64]| {
            headline_k(&r.metrics).map_or("–".to_string(), |(i, _)| format!("{:.4}", v[i]))
        };
        let speed = |f: fn(&crate::model::score::Speed) -> f64, digits: usize| {
            r.speed
                .as_ref()
                .map_or("–".to_string(), |s| format!("{:.*}", digits, f(s)))
        };
        let fraction = match (bound, headline_k(&r.metrics)) {
            (Some([_, ndcg, _]), Some((i, _))) if ndcg > 0.0 => {
                format!("<td>{:.3}</td>", r.metrics.ndcg[i] / ndcg)
            }
            (Some(_), _) => "<td>–</td>".to_string(),
            (None, _) => String::new(),
        };
        let _ = writeln!(
            page,
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>{}<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if r.pareto { " class=\"front\"" } else { "" },
            escape(&r.name),
            escape(&r.role),
            escape(&r.variant),
            human_bytes(r.size_bytes),
            r.params,
            at(&r.metrics.ndcg),
            fraction,
            at(&r.metrics.hr),
            speed(|s| s.latency_ms_p50, 3),
            speed(|s| s.latency_ms_p99, 3),
            speed(|s| s.users_per_s, 0),
            if r.pareto { "●" } else { "" },
        );
    }
    page.push_str("</table>\n");
    page.push_str(&history_chart(history, run_date, results));
    page.push_str("</body></html>\n");
    page
}

/// A rectangle on the chart: left, top, right, bottom (SVG pixels).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rect {
    x0: f64,
    y0: f64,
    x1: f64,
    y1: f64,
}

impl Rect {
    fn overlaps(&self, other: &Rect) -> bool {
        self.x0 < other.x1 && other.x0 < self.x1 && self.y0 < other.y1 && other.y0 < self.y1
    }

    fn inside(&self, area: &Rect) -> bool {
        self.x0 >= area.x0 && self.x1 <= area.x1 && self.y0 >= area.y0 && self.y1 <= area.y1
    }
}

/// Label font size (px).
const LABEL_PX: f64 = 11.0;

/// A generous width for `text` at [`LABEL_PX`] in a sans-serif face: 0.62 em
/// per character (most faces average 0.5–0.6).
fn label_width(text: &str) -> f64 {
    text.chars().count() as f64 * LABEL_PX * 0.62
}

/// Where a label sits: its anchor point (SVG `x`, baseline `y`), whether it
/// is anchored at its end (placed left of its dot), and the box it covers.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Placed {
    x: f64,
    y: f64,
    end: bool,
    rect: Rect,
}

/// Places the label of each `(cx, cy, text)` next to its dot without
/// covering another label or any dot, inside `area`. Tries beside the dot
/// (right, then left; above, level, below), then one and two lines further
/// out. A label with no free place is left
/// off (`None`): its model's name still shows on hover, and in the table.
fn place_labels(
    labels: &[(f64, f64, &str)],
    dots: &[(f64, f64)],
    area: Rect,
) -> Vec<Option<Placed>> {
    let (ascent, descent, gap, line) = (LABEL_PX * 0.8, LABEL_PX * 0.25, 8.0, LABEL_PX + 3.0);
    let dot_rects: Vec<Rect> = dots
        .iter()
        .map(|&(x, y)| Rect {
            x0: x - 6.0,
            y0: y - 6.0,
            x1: x + 6.0,
            y1: y + 6.0,
        })
        .collect();
    let mut taken: Vec<Rect> = Vec::new();
    labels
        .iter()
        .map(|&(cx, cy, text)| {
            let width = label_width(text);
            let mut baselines = vec![cy - 6.0, cy + ascent / 2.0, cy + 6.0 + ascent];
            for far in [1.0, 2.0] {
                baselines.push(cy - 6.0 - far * line);
                baselines.push(cy + 6.0 + ascent + far * line);
            }
            let found = baselines.iter().find_map(|&y| {
                [false, true].into_iter().find_map(|end| {
                    let x = if end { cx - gap } else { cx + gap };
                    let x0 = if end { x - width } else { x };
                    let rect = Rect {
                        x0,
                        y0: y - ascent,
                        x1: x0 + width,
                        y1: y + descent,
                    };
                    let free = rect.inside(&area)
                        && !taken.iter().chain(&dot_rects).any(|r| r.overlaps(&rect));
                    free.then_some(Placed { x, y, end, rect })
                })
            });
            if let Some(placed) = &found {
                taken.push(placed.rect);
            }
            found
        })
        .collect()
}

/// The scatter plot: x = log10 bytes, y = NDCG, one dot per model coloured
/// by role, the frontier as a step line, labels on the frontier's points
/// where they fit without overlapping (every dot names its model on hover).
fn chart(points: &[(&ModelResult, u64, f64)], k: u32) -> String {
    // The legend runs along the top margin, outside the plot, so no model's
    // dot or label ever sits under it.
    let (w, h, left, right, top, bottom) = (760.0, 436.0, 70.0, 30.0, 36.0, 50.0);
    if points.is_empty() {
        return "<p>No model has an NDCG to plot.</p>\n".into();
    }
    let lx: Vec<f64> = points.iter().map(|p| (p.1 as f64).log10()).collect();
    let (mut x0, mut x1) = (
        lx.iter().copied().fold(f64::INFINITY, f64::min).floor(),
        lx.iter().copied().fold(f64::NEG_INFINITY, f64::max).ceil(),
    );
    if x1 <= x0 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    let frame = Frame {
        w,
        h,
        left,
        right,
        top,
        bottom,
        y_max: points.iter().map(|p| p.2).fold(0.0, f64::max).max(1e-6) * 1.1,
    };
    let sx = |v: f64| left + (v - x0) / (x1 - x0) * (w - left - right);
    let sy = |v: f64| frame.sy(v);
    // Axes, decade ticks on x, five ticks on y.
    let mut svg = frame.open(&format!("NDCG@{k} against artifact bytes"));
    let mut d = x0;
    while d <= x1 + 1e-9 {
        frame.x_tick(&mut svg, sx(d), &decade(d as i32), 12);
        d += 1.0;
    }
    frame.y_ticks(&mut svg, 5);
    frame.titles(
        &mut svg,
        "artifact size (bytes, log scale)",
        &format!("NDCG@{k}"),
        10.0,
    );
    // The frontier, smallest first.
    let mut front: Vec<(f64, f64, &str)> = points
        .iter()
        .zip(&lx)
        .filter(|(p, _)| p.0.pareto)
        .map(|(p, &x)| (x, p.2, p.0.name.as_str()))
        .collect();
    front.sort_by(|a, b| a.0.total_cmp(&b.0));
    if front.len() > 1 {
        // A step line: along at the last accuracy, then up to the next point.
        let mut path = format!("M{:.1},{:.1}", sx(front[0].0), sy(front[0].1));
        for (x, y, _) in &front[1..] {
            let _ = write!(path, " H{:.1} V{:.1}", sx(*x), sy(*y));
        }
        let _ = writeln!(
            svg,
            "<path d=\"{path}\" fill=\"none\" stroke=\"#2e7d32\" stroke-width=\"2\" stroke-dasharray=\"6 3\"/>"
        );
    }
    let dots: Vec<(f64, f64)> = points
        .iter()
        .zip(&lx)
        .map(|((_, _, ndcg), &x)| (sx(x), sy(*ndcg)))
        .collect();
    for ((r, _, ndcg), &(cx, cy)) in points.iter().zip(&dots) {
        let _ = writeln!(
            svg,
            "<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"{}\" fill=\"{}\" stroke=\"{}\" stroke-width=\"2\"><title>{} ({}): {}, NDCG@{k} {ndcg:.4}</title></circle>",
            if r.pareto { 6 } else { 4 },
            color(&r.role),
            if r.pareto { "#2e7d32" } else { "white" },
            escape(&r.name),
            escape(&r.variant),
            human_bytes(r.size_bytes),
        );
    }
    // Labels on the frontier, smallest model first.
    let frontier: Vec<(f64, f64, &str)> = front
        .iter()
        .map(|&(x, ndcg, name)| (sx(x), sy(ndcg), name))
        .collect();
    let area = Rect {
        x0: left,
        y0: top,
        x1: w - right,
        y1: h - bottom,
    };
    let placed = place_labels(&frontier, &dots, area);
    for ((_, _, name), spot) in frontier.iter().zip(placed) {
        if let Some(spot) = spot {
            let _ = writeln!(
                svg,
                "<text class=\"label\" x=\"{:.1}\" y=\"{:.1}\" font-size=\"{LABEL_PX}\"{}>{}</text>",
                spot.x,
                spot.y,
                if spot.end { " text-anchor=\"end\"" } else { "" },
                escape(name)
            );
        }
    }
    // Legend, in a row above the plot.
    for (i, (role, c)) in COLORS.iter().enumerate() {
        let x = left + 10.0 + i as f64 * 100.0;
        let y = top / 2.0;
        let _ = writeln!(
            svg,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"5\" fill=\"{c}\"/><text x=\"{tx:.1}\" y=\"{ty:.1}\" font-size=\"12\">{role}</text>",
            tx = x + 10.0,
            ty = y + 4.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::score::Metrics;

    fn result(name: &str, role: &str, size_bytes: u64, ndcg: f64, pareto: bool) -> ModelResult {
        ModelResult {
            name: name.into(),
            role: role.into(),
            variant: "fp32".into(),
            training: "supervised".into(),
            warm_started_from: None,
            loss: None,
            params: 1,
            size_bytes,
            metrics: Metrics {
                ks: vec![10],
                hr: vec![ndcg * 2.0],
                ndcg: vec![ndcg],
                mrr: vec![ndcg / 2.0],
                users: 100,
            },
            teacher_overlap_10: None,
            speed: None,
            pareto,
        }
    }

    /// The boxes of the chart's labels, from their `x`, `y`, anchor and text.
    fn label_boxes(svg: &str) -> Vec<(String, Rect)> {
        svg.lines()
            .filter(|l| l.starts_with("<text class=\"label\""))
            .map(|l| {
                let attr = |name: &str| -> f64 {
                    let start = l.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
                    l[start..start + l[start..].find('"').unwrap()]
                        .parse()
                        .unwrap()
                };
                let text = &l[l.find('>').unwrap() + 1..l.rfind("</text>").unwrap()];
                let width = label_width(text);
                let (x, y) = (attr("x"), attr("y"));
                let x0 = if l.contains("text-anchor=\"end\"") {
                    x - width
                } else {
                    x
                };
                let rect = Rect {
                    x0,
                    y0: y - LABEL_PX * 0.8,
                    x1: x0 + width,
                    y1: y + LABEL_PX * 0.25,
                };
                (text.to_string(), rect)
            })
            .collect()
    }

    #[test]
    fn the_history_chart_draws_each_series_over_run_dates_and_rings_the_published_run() {
        let day = |d: u32| chrono::NaiveDate::from_ymd_opt(2025, 3, d).unwrap();
        let scores = |teacher: f64, student: f64| -> ScoresAt10 {
            [
                ("teacher", teacher),
                ("s@int8", student),
                ("popularity", 0.05),
            ]
            .into_iter()
            .map(|(m, v)| (m.to_string(), BTreeMap::from([("ndcg@10".to_string(), v)])))
            .collect()
        };
        let today = vec![
            result("teacher", "teacher", 10_000, 0.31, false),
            result("s@int8", "student", 100, 0.25, true),
            result("popularity", "baseline", 10, 0.05, false),
        ];
        let first = history_chart(&History::default(), day(3), &today);
        assert!(first.contains("first committed run") && !first.contains("<svg"));
        let history = History {
            runs: vec![(day(1), scores(0.30, 0.24)), (day(2), scores(0.32, 0.26))],
            published_model: "s@int8".into(),
            published_date: Some("2025-03-02".into()),
        };
        let svg = history_chart(&history, day(3), &today);
        // Three series of three runs each, every date on the axis.
        assert_eq!(svg.matches("<path class=\"series\"").count(), 3);
        for date in ["2025-03-01", "2025-03-02", "2025-03-03"] {
            assert!(svg.contains(&format!(">{date}</text>")), "{date}");
        }
        assert!(svg.contains("2025-03-03: s@int8, NDCG@10 0.2500<"));
        // One ring: the published run's point of the published model.
        assert_eq!(svg.matches("(published)").count(), 1);
        assert!(svg.contains("2025-03-02: s@int8, NDCG@10 0.2600 (published)"));
        assert!(svg.contains("s@int8 (publish.model)"));
        // Without publish.model: teacher and popularity only.
        let plain = History {
            published_model: String::new(),
            ..history
        };
        let svg = history_chart(&plain, day(3), &today);
        assert_eq!(svg.matches("<path class=\"series\"").count(), 2);
        assert!(!svg.contains("(published)"));
    }

    #[test]
    fn frontier_labels_do_not_collide_where_models_cluster() {
        // Twelve students on the frontier within a few percent of size and
        // accuracy (their dots nearly touch), a teacher far off, and models
        // off the frontier.
        let mut results: Vec<ModelResult> = (0..12)
            .map(|i| {
                result(
                    &format!("student-kd-teacher-{i}@int8"),
                    "student",
                    20_000 + i * 400,
                    0.20 + i as f64 * 0.0008,
                    true,
                )
            })
            .collect();
        results.push(result("teacher", "teacher", 2_000_000, 0.35, true));
        results.push(result("popularity", "baseline", 10, 0.02, true));
        for i in 0..5 {
            results.push(result(
                &format!("off-{i}"),
                "student",
                30_000 + i * 100,
                0.1,
                false,
            ));
        }
        let points: Vec<(&ModelResult, u64, f64)> = results
            .iter()
            .map(|r| (r, r.size_bytes, r.metrics.ndcg[0]))
            .collect();
        let svg = chart(&points, 10);
        let boxes = label_boxes(&svg);
        // The isolated models are labelled, and so are several clustered ones.
        let names: Vec<&str> = boxes.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            names.contains(&"teacher") && names.contains(&"popularity"),
            "{names:?}"
        );
        assert!(names.len() >= 6, "{names:?}");
        assert!(names.iter().all(|n| !n.starts_with("off-")), "{names:?}");
        for (i, (a, ra)) in boxes.iter().enumerate() {
            for (b, rb) in &boxes[i + 1..] {
                assert!(!ra.overlaps(rb), "{a} {ra:?} overlaps {b} {rb:?}");
            }
            assert!(
                ra.x0 >= 70.0 && ra.x1 <= 730.0 && ra.y0 >= 36.0 && ra.y1 <= 386.0,
                "{a} {ra:?}"
            );
        }
        // Every model, labelled or not, names itself on hover.
        for r in &results {
            assert!(svg.contains(&format!("<title>{} (", r.name)), "{}", r.name);
        }
    }

    #[test]
    fn a_label_goes_left_when_the_right_is_taken_or_off_the_chart() {
        let area = Rect {
            x0: 0.0,
            y0: 0.0,
            x1: 300.0,
            y1: 200.0,
        };
        // At the right edge: the label goes to the left of its dot.
        let placed = place_labels(&[(290.0, 100.0, "teacher")], &[(290.0, 100.0)], area);
        let spot = placed[0].unwrap();
        assert!(spot.end && spot.rect.x1 <= 282.0, "{spot:?}");
        // Two labels on one dot's spot: the second moves elsewhere.
        let placed = place_labels(
            &[
                (100.0, 100.0, "a-long-name"),
                (100.0, 100.0, "another-name"),
            ],
            &[(100.0, 100.0)],
            area,
        );
        let (a, b) = (placed[0].unwrap(), placed[1].unwrap());
        assert!(!a.rect.overlaps(&b.rect), "{a:?} {b:?}");
        // No room at all: the label is left off.
        let tiny = Rect {
            x0: 0.0,
            y0: 0.0,
            x1: 20.0,
            y1: 20.0,
        };
        assert_eq!(
            place_labels(&[(10.0, 10.0, "teacher")], &[(10.0, 10.0)], tiny),
            vec![None]
        );
    }

    #[test]
    fn decades_read_as_bytes_kilobytes_and_megabytes() {
        let labels: Vec<String> = (0..=7).map(decade).collect();
        assert_eq!(
            labels,
            [
                "1 B", "10 B", "100 B", "1 KB", "10 KB", "100 KB", "1 MB", "10 MB"
            ]
        );
    }
}
