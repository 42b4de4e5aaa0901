//! The latency-distribution chart: cumulative distributions of round-trip samples on a
//! logarithmic time axis, one panel per CPU placement, written as plain SVG.

use std::fmt::Write as _;

use crate::common::Samples;

/// One curve.
pub struct Series<'a> {
    /// Legend entry (the same label has the same colour in every panel).
    pub label: String,
    /// The samples, in microseconds.
    pub samples: &'a Samples,
}

/// One panel: a title and its curves.
pub struct Panel<'a> {
    /// Title above the plot.
    pub title: String,
    /// Curves.
    pub series: Vec<Series<'a>>,
}

const PANEL_W: f64 = 460.0;
const PANEL_H: f64 = 344.0;
const LEFT: f64 = 58.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 66.0;
const BOTTOM: f64 = 46.0;
const COLOURS: [&str; 8] = [
    "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666",
];
/// Points per curve at most (quantiles picked evenly).
const POINTS: usize = 400;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Decade bounds covering every sample of every panel: (10^a, 10^b).
fn x_range(panels: &[Panel<'_>]) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi = 0f64;
    for s in panels.iter().flat_map(|p| &p.series) {
        if let (Some(&a), Some(&b)) = (s.samples.sorted().first(), s.samples.sorted().last()) {
            lo = lo.min(a.max(0.01));
            hi = hi.max(b);
        }
    }
    if !lo.is_finite() || hi <= 0.0 {
        return (1.0, 1000.0);
    }
    let a = lo.log10().floor();
    let b = hi.log10().ceil().max(a + 1.0);
    (10f64.powf(a), 10f64.powf(b))
}

/// A chart of `panels` side by side with a shared legend, titled `title`.
pub fn cdf_chart(title: &str, subtitle: &str, panels: &[Panel<'_>]) -> String {
    let mut labels: Vec<&str> = Vec::new();
    for s in panels.iter().flat_map(|p| &p.series) {
        if !labels.contains(&s.label.as_str()) {
            labels.push(&s.label);
        }
    }
    let colour = |label: &str| {
        let i = labels.iter().position(|l| *l == label).unwrap_or(0);
        COLOURS[i % COLOURS.len()]
    };
    let (x0, x1) = x_range(panels);
    let (l0, l1) = (x0.log10(), x1.log10());
    let legend_h = 20.0 * labels.len() as f64 + 16.0;
    let width = PANEL_W * panels.len().max(1) as f64;
    let height = PANEL_H + legend_h;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(o, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        o,
        r##"<text x="{}" y="18" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"##,
        width / 2.0,
        esc(title)
    );
    let _ = writeln!(
        o,
        r##"<text x="{}" y="34" text-anchor="middle" fill="#444">{}</text>"##,
        width / 2.0,
        esc(subtitle)
    );
    for (pi, panel) in panels.iter().enumerate() {
        let ox = PANEL_W * pi as f64;
        let (px0, px1) = (ox + LEFT, ox + PANEL_W - RIGHT);
        let (py0, py1) = (TOP, PANEL_H - BOTTOM);
        let sx = |us: f64| px0 + (us.max(x0).log10() - l0) / (l1 - l0) * (px1 - px0);
        let sy = |frac: f64| py1 - frac * (py1 - py0);
        let _ = writeln!(
            o,
            r##"<text x="{}" y="{}" text-anchor="middle" font-weight="bold">{}</text>"##,
            (px0 + px1) / 2.0,
            py0 - 8.0,
            esc(&panel.title)
        );
        // Grid and axes: 1, 2, 5 of every decade on x; every 10 % on y.
        let mut decade = x0;
        while decade < x1 * 1.0001 {
            for m in [1.0, 2.0, 5.0] {
                let v = decade * m;
                if v > x1 * 1.0001 {
                    break;
                }
                let x = sx(v);
                let major = m == 1.0;
                let _ = writeln!(
                    o,
                    r##"<line x1="{x:.1}" y1="{py0}" x2="{x:.1}" y2="{py1}" stroke="{}" stroke-width="1"/>"##,
                    if major { "#ccc" } else { "#eee" }
                );
                let _ = writeln!(
                    o,
                    r##"<text x="{x:.1}" y="{}" text-anchor="middle" fill="#333">{}</text>"##,
                    py1 + 15.0,
                    fmt_us(v)
                );
            }
            decade *= 10.0;
        }
        for k in 0..=10 {
            let frac = k as f64 / 10.0;
            let y = sy(frac);
            let _ = writeln!(
                o,
                r##"<line x1="{px0}" y1="{y:.1}" x2="{px1}" y2="{y:.1}" stroke="#eee"/>"##
            );
            if k % 2 == 0 {
                let _ = writeln!(
                    o,
                    r##"<text x="{}" y="{:.1}" text-anchor="end" fill="#333">{}%</text>"##,
                    px0 - 5.0,
                    y + 4.0,
                    k * 10
                );
            }
        }
        for (frac, name) in [(0.5, "p50"), (0.99, "p99")] {
            let y = sy(frac);
            let _ = writeln!(
                o,
                r##"<line x1="{px0}" y1="{y:.1}" x2="{px1}" y2="{y:.1}" stroke="#999" stroke-dasharray="4 3"/><text x="{}" y="{:.1}" text-anchor="end" fill="#777" font-size="10">{name}</text>"##,
                px1 - 2.0,
                y - 3.0
            );
        }
        let _ = writeln!(
            o,
            r##"<rect x="{px0}" y="{py0}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
            px1 - px0,
            py1 - py0
        );
        let _ = writeln!(
            o,
            r##"<text x="{}" y="{}" text-anchor="middle">round trip (us, log scale)</text>"##,
            (px0 + px1) / 2.0,
            py1 + 32.0
        );
        let _ = writeln!(
            o,
            r##"<text transform="translate({},{}) rotate(-90)" text-anchor="middle">share of round trips at most this long</text>"##,
            ox + 14.0,
            (py0 + py1) / 2.0
        );
        for s in &panel.series {
            let v = s.samples.sorted();
            if v.is_empty() {
                continue;
            }
            let n = v.len();
            let mut pts = String::new();
            let steps = POINTS.min(n);
            for k in 0..=steps {
                let i = ((k as f64 / steps as f64) * (n - 1) as f64).round() as usize;
                let _ = write!(pts, "{:.1},{:.1} ", sx(v[i]), sy((i + 1) as f64 / n as f64));
            }
            let _ = writeln!(
                o,
                r##"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"##,
                colour(&s.label),
                pts.trim_end()
            );
        }
    }
    for (i, label) in labels.iter().enumerate() {
        let y = PANEL_H + 8.0 + 20.0 * i as f64;
        let _ = writeln!(
            o,
            r##"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"##,
            LEFT + 28.0,
            colour(label),
            LEFT + 36.0,
            y + 4.0,
            esc(label)
        );
    }
    o.push_str("</svg>\n");
    o
}

/// A tick label: 0.5, 2, 50, 1k, 20k ...
fn fmt_us(v: f64) -> String {
    if v >= 1000.0 {
        format!("{}k", trim(v / 1000.0))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_a_curve_per_series_and_a_legend() {
        let a = Samples::from_us((1..=1000).map(|i| i as f64 / 10.0).collect());
        let b = Samples::from_us(vec![30.0; 10]);
        let panels = [
            Panel {
                title: "same core".into(),
                series: vec![
                    Series {
                        label: "direct".into(),
                        samples: &a,
                    },
                    Series {
                        label: "relayed <event>".into(),
                        samples: &b,
                    },
                ],
            },
            Panel {
                title: "across cores".into(),
                series: vec![Series {
                    label: "direct".into(),
                    samples: &b,
                }],
            },
        ];
        let svg = cdf_chart("t", "s", &panels);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("relayed &lt;event&gt;"));
        assert_eq!(x_range(&panels), (0.1, 100.0));
        assert_eq!(fmt_us(2000.0), "2k");
        assert_eq!(fmt_us(0.5), "0.5");
    }
}
