//! The report's plots as inline SVG strings: line/dot charts, horizontal bars, empirical
//! CDFs. Every piece of text that goes into them passes through [`esc`], which is what lets
//! the template take them as safe markup.

use std::fmt::Write as _;

const PALETTE: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f", "#bcbd22",
];

/// Escapes text for HTML/SVG.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A data series for a chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Draw dots instead of a line.
    pub dots: bool,
}

/// "Nice" tick values covering [lo, hi].
fn ticks(lo: f64, hi: f64, want: usize) -> Vec<f64> {
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return vec![lo];
    }
    let raw = (hi - lo) / want.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let start = (lo / step).ceil() * step;
    let mut v = vec![];
    let mut t = start;
    while t <= hi + step * 1e-9 && v.len() < 50 {
        v.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    v
}

fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e5 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 10.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The opening of a plot: the `<svg>` element (`id` becomes `data-plot`), its title and a
/// white background.
fn svg_open(id: &str, title: &str, w: f64, h: f64) -> String {
    format!(
        r#"<svg class="plot" data-plot="{}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img"><title>{}</title><rect x="0" y="0" width="{w}" height="{h}" fill="white"/><text x="{}" y="18" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
        esc(id),
        esc(title),
        w / 2.0,
        esc(title)
    )
}

/// A line chart's plot area and the data range it maps onto it.
struct Frame {
    /// Left and top margins, plot width and height (px).
    ml: f64,
    mt: f64,
    pw: f64,
    ph: f64,
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Frame {
    /// The frame over every finite point of `series`; None when there is none.
    fn fit(series: &[Series], y_from_zero: bool, w: f64, h: f64) -> Option<Frame> {
        let (ml, mr, mt, mb) = (64.0, 16.0, 30.0, 44.0);
        let (mut x0, mut x1, mut y0, mut y1) = (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        );
        for s in series {
            for &(x, y) in finite(&s.points) {
                x0 = x0.min(x);
                x1 = x1.max(x);
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
        if !x0.is_finite() {
            return None;
        }
        if y_from_zero {
            y0 = y0.min(0.0);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        if y1 <= y0 {
            y1 = y0 + 1.0;
        }
        let (pw, ph) = (w - ml - mr, h - mt - mb);
        Some(Frame {
            ml,
            mt,
            pw,
            ph,
            x0,
            x1,
            y0,
            y1,
        })
    }
    fn sx(&self, x: f64) -> f64 {
        self.ml + (x - self.x0) / (self.x1 - self.x0) * self.pw
    }
    fn sy(&self, y: f64) -> f64 {
        self.mt + self.ph - (y - self.y0) / (self.y1 - self.y0) * self.ph
    }
}

fn finite(points: &[(f64, f64)]) -> impl Iterator<Item = &(f64, f64)> {
    points.iter().filter(|p| p.0.is_finite() && p.1.is_finite())
}

/// Grid lines, tick labels, the plot's border and the axis labels.
fn axes(s: &mut String, f: &Frame, h: f64, xlabel: &str, ylabel: &str) {
    let (ml, mt, pw, ph) = (f.ml, f.mt, f.pw, f.ph);
    for t in ticks(f.x0, f.x1, 6) {
        let x = f.sx(t);
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" y1="{mt}" x2="{x:.1}" y2="{:.1}" stroke="#e5e5e5"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"##,
            mt + ph,
            mt + ph + 15.0,
            tick_label(t)
        );
    }
    for t in ticks(f.y0, f.y1, 5) {
        let y = f.sy(t);
        let _ = write!(
            s,
            r##"<line x1="{ml}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"##,
            ml + pw,
            ml - 6.0,
            y + 4.0,
            tick_label(t)
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#444"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">{}</text><text transform="translate(14,{:.1}) rotate(-90)" text-anchor="middle" font-size="12">{}</text>"##,
        ml + pw / 2.0,
        h - 8.0,
        esc(xlabel),
        mt + ph / 2.0,
        esc(ylabel)
    );
}

/// One series: dots, or a polyline (with markers when it has few points).
fn draw_series(s: &mut String, f: &Frame, se: &Series, c: &str) {
    let good: Vec<&(f64, f64)> = finite(&se.points).collect();
    if se.dots {
        let _ = write!(s, r#"<g class="series" fill="{c}" fill-opacity="0.55">"#);
        for p in &good {
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="1.8"/>"#,
                f.sx(p.0),
                f.sy(p.1)
            );
        }
        s.push_str("</g>");
        return;
    }
    let d: Vec<String> = good
        .iter()
        .map(|p| format!("{:.1},{:.1}", f.sx(p.0), f.sy(p.1)))
        .collect();
    let _ = write!(
        s,
        r#"<polyline class="series" fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
        d.join(" ")
    );
    if good.len() <= 12 {
        for p in &good {
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{c}"/>"#,
                f.sx(p.0),
                f.sy(p.1)
            );
        }
    }
}

/// A line/dot chart as an inline SVG element. `id` becomes `data-plot`.
pub fn line_chart(
    id: &str,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
    y_from_zero: bool,
) -> String {
    let (w, h) = (640.0, 340.0);
    let mut s = svg_open(id, title, w, h);
    let Some(f) = Frame::fit(series, y_from_zero, w, h) else {
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="13" fill="gray">no data</text></svg>"#,
            w / 2.0,
            h / 2.0
        );
        return s;
    };
    axes(&mut s, &f, h, xlabel, ylabel);
    for (i, se) in series.iter().enumerate() {
        draw_series(&mut s, &f, se, PALETTE[i % PALETTE.len()]);
    }
    // legend
    for (i, se) in series.iter().enumerate().take(10) {
        let c = PALETTE[i % PALETTE.len()];
        let y = f.mt + 10.0 + i as f64 * 15.0;
        let _ = write!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="10" height="10" fill="{c}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            f.ml + 10.0,
            y - 8.0,
            f.ml + 24.0,
            y + 1.0,
            esc(&se.name)
        );
    }
    s.push_str("</svg>");
    s
}

/// Horizontal bars: one bar per (label, value).
pub fn bar_chart(id: &str, title: &str, unit: &str, bars: &[(String, f64)]) -> String {
    let w = 640.0;
    let row = 24.0;
    let (ml, mt) = (250.0, 30.0);
    let h = mt + row * bars.len() as f64 + 30.0;
    let max = bars
        .iter()
        .map(|b| b.1)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-12);
    let pw = w - ml - 80.0;
    let mut s = svg_open(id, title, w, h);
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = mt + i as f64 * row;
        let bw = if v.is_finite() { v / max * pw } else { 0.0 };
        let short: String = label.chars().take(40).collect();
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{}</text><rect x="{ml}" y="{:.1}" width="{bw:.1}" height="{:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="11">{} {}</text>"#,
            ml - 6.0,
            y + 15.0,
            esc(&short),
            y + 4.0,
            row - 6.0,
            PALETTE[i % PALETTE.len()],
            ml + bw + 4.0,
            y + 15.0,
            tick_label(*v),
            esc(unit)
        );
    }
    s.push_str("</svg>");
    s
}

/// An empirical CDF (x sorted, y = rank/n), thinned to at most `max` points.
pub(super) fn cdf(mut v: Vec<f64>, max: usize) -> Vec<(f64, f64)> {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let step = (n / max.max(1)).max(1);
    let mut out: Vec<(f64, f64)> = v
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || *i == n - 1)
        .map(|(i, x)| (*x, (i + 1) as f64 / n as f64))
        .collect();
    if let Some(first) = out.first().copied() {
        out.insert(0, (first.0, 0.0));
    }
    out
}

/// One point of a Pareto plot: coordinates, SLO verdict (None: no SLO) and a label.
pub struct ParetoPoint {
    pub x: f64,
    pub y: f64,
    pub slo_pass: Option<bool>,
    pub label: String,
}

/// The points no other point beats on both axes (x lower is better; y higher is better when
/// `higher_y_better`, else lower), sorted by x.
pub fn pareto_front(points: &[(f64, f64)], higher_y_better: bool) -> Vec<(f64, f64)> {
    let better_y = |a: f64, b: f64| if higher_y_better { a >= b } else { a <= b };
    let strictly = |a: f64, b: f64| if higher_y_better { a > b } else { a < b };
    let mut front: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .filter(|&(x, y)| {
            !points
                .iter()
                .any(|&(qx, qy)| qx <= x && better_y(qy, y) && (qx < x || strictly(qy, y)))
        })
        .collect();
    front.sort_by(|a, b| a.0.total_cmp(&b.0));
    front.dedup();
    front
}

/// Quality against a cost (x): each column a dot coloured by its SLO verdict (green pass, red
/// fail, grey none), labelled, and the Pareto front drawn through the undominated points.
pub fn pareto_chart(
    id: &str,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    points: &[ParetoPoint],
    higher_y_better: bool,
) -> String {
    let (w, h) = (640.0, 360.0);
    let mut s = svg_open(id, title, w, h);
    let xy: Vec<(f64, f64)> = points.iter().map(|p| (p.x, p.y)).collect();
    let series = [Series {
        name: String::new(),
        points: xy.clone(),
        dots: true,
    }];
    let Some(mut f) = Frame::fit(&series, false, w, h) else {
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="13" fill="gray">no column has both figures</text></svg>"#,
            w / 2.0,
            h / 2.0
        );
        return s;
    };
    // Room around the outermost points for their dots and labels.
    let (dx, dy) = ((f.x1 - f.x0) * 0.08, (f.y1 - f.y0) * 0.12);
    f.x0 -= dx;
    f.x1 += dx;
    f.y0 -= dy;
    f.y1 += dy;
    axes(&mut s, &f, h, xlabel, ylabel);
    let front = pareto_front(&xy, higher_y_better);
    if front.len() >= 2 {
        let d: Vec<String> = front
            .iter()
            .map(|p| format!("{:.1},{:.1}", f.sx(p.0), f.sy(p.1)))
            .collect();
        let _ = write!(
            s,
            r##"<polyline class="pareto-front" fill="none" stroke="#333" stroke-width="1.5" stroke-dasharray="5,3" points="{}"/>"##,
            d.join(" ")
        );
    }
    for p in points.iter().filter(|p| p.x.is_finite() && p.y.is_finite()) {
        let (c, verdict) = match p.slo_pass {
            Some(true) => ("#2ca02c", "slo-pass"),
            Some(false) => ("#d62728", "slo-fail"),
            None => ("#7f7f7f", "slo-none"),
        };
        let on_front = front.contains(&(p.x, p.y));
        let (cx, cy) = (f.sx(p.x), f.sy(p.y));
        let short: String = p.label.chars().take(40).collect();
        // Labels go on the side of the dot with more room.
        let (lx, anchor) = if cx > f.ml + f.pw / 2.0 {
            (cx - 8.0, "end")
        } else {
            (cx + 8.0, "start")
        };
        let _ = write!(
            s,
            r##"<circle class="point {verdict}{}" cx="{cx:.1}" cy="{cy:.1}" r="5" fill="{c}" stroke="#222" stroke-width="{}"/><text x="{lx:.1}" y="{:.1}" text-anchor="{anchor}" font-size="10">{}</text>"##,
            if on_front { " front" } else { "" },
            if on_front { 1.5 } else { 0.5 },
            cy - 7.0,
            esc(&short)
        );
    }
    // Legend in the bottom margin, left of the x-axis label: the verdict colours.
    let y = h - 8.0;
    for (i, (c, t)) in [
        ("#2ca02c", "SLO pass"),
        ("#d62728", "SLO fail"),
        ("#7f7f7f", "no SLO"),
    ]
    .iter()
    .enumerate()
    {
        let x = 8.0 + i as f64 * 62.0;
        let _ = write!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{c}"/><text x="{:.1}" y="{y:.1}" font-size="10">{t}</text>"#,
            x + 4.0,
            y - 3.5,
            x + 11.0,
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod pareto_tests {
    use super::*;

    #[test]
    fn the_front_keeps_only_undominated_points() {
        // (cost, accuracy): (1, 50) and (2, 80) trade off; (3, 60) is beaten by (2, 80).
        let pts = [(3.0, 60.0), (1.0, 50.0), (2.0, 80.0), (2.0, 80.0)];
        assert_eq!(pareto_front(&pts, true), vec![(1.0, 50.0), (2.0, 80.0)]);
        // Perplexity: lower is better, so (1, 50) dominates everything but nothing beats it.
        assert_eq!(pareto_front(&pts, false), vec![(1.0, 50.0)]);
        assert!(pareto_front(&[(f64::NAN, 1.0)], true).is_empty());
    }
}
