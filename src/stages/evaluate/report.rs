//! `report.html`: the run's models in one page a person reads at a glance —
//! an accuracy-vs-size chart (SVG, log-scale bytes) with the Pareto
//! frontier drawn through the models no other beats on both, and the table
//! behind it (size, parameters, NDCG/HR, latency, throughput).

use std::fmt::Write;

use super::results::{ModelResult, headline_k};

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

/// The page for the results of one run.
pub fn html(
    job: &str,
    run_date: chrono::NaiveDate,
    run_id: &str,
    results: &[ModelResult],
) -> String {
    let k = results
        .iter()
        .find_map(|r| headline_k(&r.metrics))
        .map_or(10, |(_, k)| k);
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
    page.push_str(&chart(&points, k));
    page.push_str(
        "<table><tr><th>model</th><th>role</th><th>variant</th><th>size</th><th>params</th>",
    );
    let _ = writeln!(
        page,
        "<th>NDCG@{k}</th><th>HR@{k}</th><th>p50 ms</th><th>p99 ms</th><th>users/s</th><th>frontier</th></tr>"
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
        let _ = writeln!(
            page,
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if r.pareto { " class=\"front\"" } else { "" },
            escape(&r.name),
            escape(&r.role),
            escape(&r.variant),
            human_bytes(r.size_bytes),
            r.params,
            at(&r.metrics.ndcg),
            at(&r.metrics.hr),
            speed(|s| s.latency_ms_p50, 3),
            speed(|s| s.latency_ms_p99, 3),
            speed(|s| s.users_per_s, 0),
            if r.pareto { "●" } else { "" },
        );
    }
    page.push_str("</table>\n</body></html>\n");
    page
}

/// The scatter plot: x = log10 bytes, y = NDCG, one dot per model coloured
/// by role, the frontier as a step line, labels on the frontier's points.
fn chart(points: &[(&ModelResult, u64, f64)], k: u32) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 420.0, 70.0, 30.0, 20.0, 50.0);
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
    let y1 = points.iter().map(|p| p.2).fold(0.0, f64::max).max(1e-6) * 1.1;
    let sx = |v: f64| left + (v - x0) / (x1 - x0) * (w - left - right);
    let sy = |v: f64| top + (1.0 - v / y1) * (h - top - bottom);
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"NDCG@{k} against artifact bytes\">\n\
<rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n"
    );
    // Axes, decade ticks on x, five ticks on y.
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{yb}\" x2=\"{xr}\" y2=\"{yb}\" stroke=\"#333\"/><line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{yb}\" stroke=\"#333\"/>",
        yb = h - bottom,
        xr = w - right
    );
    let mut d = x0;
    while d <= x1 + 1e-9 {
        let x = sx(d);
        let _ = writeln!(
            svg,
            "<line x1=\"{x:.1}\" y1=\"{yb}\" x2=\"{x:.1}\" y2=\"{yb5}\" stroke=\"#333\"/><text x=\"{x:.1}\" y=\"{yt}\" font-size=\"12\" text-anchor=\"middle\">{}</text>",
            decade(d as i32),
            yb = h - bottom,
            yb5 = h - bottom + 5.0,
            yt = h - bottom + 18.0
        );
        d += 1.0;
    }
    for i in 0..=5 {
        let v = y1 * i as f64 / 5.0;
        let y = sy(v);
        let _ = writeln!(
            svg,
            "<line x1=\"{l5}\" y1=\"{y:.1}\" x2=\"{left}\" y2=\"{y:.1}\" stroke=\"#333\"/><text x=\"{lt}\" y=\"{y4:.1}\" font-size=\"12\" text-anchor=\"end\">{v:.3}</text>",
            l5 = left - 5.0,
            lt = left - 8.0,
            y4 = y + 4.0
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{cx}\" y=\"{yl}\" font-size=\"13\" text-anchor=\"middle\">artifact size (bytes, log scale)</text>\
<text x=\"16\" y=\"{cy}\" font-size=\"13\" text-anchor=\"middle\" transform=\"rotate(-90 16 {cy})\">NDCG@{k}</text>",
        cx = (left + w - right) / 2.0,
        yl = h - 10.0,
        cy = (top + h - bottom) / 2.0
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
    for ((r, _, ndcg), &x) in points.iter().zip(&lx) {
        let (cx, cy) = (sx(x), sy(*ndcg));
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
        if r.pareto {
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{}</text>",
                cx + 8.0,
                cy - 6.0,
                escape(&r.name)
            );
        }
    }
    // Legend.
    for (i, (role, c)) in COLORS.iter().enumerate() {
        let y = top + 14.0 + i as f64 * 16.0;
        let _ = writeln!(
            svg,
            "<circle cx=\"{lx:.1}\" cy=\"{y:.1}\" r=\"5\" fill=\"{c}\"/><text x=\"{tx:.1}\" y=\"{ty:.1}\" font-size=\"12\">{role}</text>",
            lx = w - right - 110.0,
            tx = w - right - 100.0,
            ty = y + 4.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

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
