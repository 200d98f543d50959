//! SVG line charts written by hand (no plotting or font library): a log₂ x axis, a linear y
//! axis from 0, a legend; used by `hat profile` and `hat audit`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One series of a chart: a line (the model) or markers (measurements).
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub markers: bool,
}

const COLOURS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// A chart with a log₂ x axis and a linear y axis from 0 to a round number above the data.
pub fn chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    chart_to(title, x_label, y_label, series, None)
}

/// [`chart`] with the y axis from 0 to `y_max` where given (e.g. 100 for percentages).
pub fn chart_to(title: &str, x_label: &str, y_label: &str, series: &[Series], y_max: Option<f64>) -> String {
    // The legend's width follows its longest name (about 6.5 px a character at 11 px).
    let legend = series.iter().map(|s| s.name.chars().count()).max().unwrap_or(0) as f64 * 6.5 + 34.0;
    let (left, right, top, bottom, plot_w) = (70.0, legend.max(170.0).ceil(), 40.0, 50.0, 400.0);
    let (w, h) = (left + plot_w + right, 400.0);
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|p| p.0 > 0.0 && p.1.is_finite());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
    for &(x, y) in pts {
        x0 = x0.min(x.log2());
        x1 = x1.max(x.log2());
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let y1 = match y_max {
        Some(m) if m > 0.0 => m,
        _ if y1 > 0.0 => nice(y1 * 1.05),
        _ => 1.0,
    };
    let px = |x: f64| left + (x.log2() - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| h - bottom - y / y1 * (h - top - bottom);
    let mut s = String::new();
    let _ = write!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#);
    let _ = write!(s, r#"<rect width="{w}" height="{h}" fill="white"/><text x="{}" y="22" font-size="14" text-anchor="middle">{}</text>"#, (w - right + left) / 2.0, esc(title));
    for i in 0..=5 {
        let y = y1 * i as f64 / 5.0;
        let _ = write!(s, r##"<line x1="{left}" x2="{0}" y1="{1:.1}" y2="{1:.1}" stroke="#ddd"/><text x="{2}" y="{3:.1}" text-anchor="end">{4}</text>"##, w - right, py(y), left - 5.0, py(y) + 4.0, short(y));
    }
    let mut e = x0.floor() as i32;
    while (e as f64) <= x1.ceil() {
        let x = 2f64.powi(e);
        if (e as f64) >= x0 - 1e-9 && (e as f64) <= x1 + 1e-9 {
            let _ = write!(s, r##"<line x1="{0:.1}" x2="{0:.1}" y1="{top}" y2="{1}" stroke="#eee"/><text x="{0:.1}" y="{2}" text-anchor="middle">{3}</text>"##, px(x), h - bottom, h - bottom + 15.0, short(x));
        }
        e += 1;
    }
    let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, (w - right + left) / 2.0, h - 12.0, esc(x_label));
    let _ = write!(s, r#"<text transform="translate(16,{}) rotate(-90)" text-anchor="middle">{}</text>"#, (h - bottom + top) / 2.0, esc(y_label));
    for (i, se) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let p: Vec<(f64, f64)> = se.points.iter().copied().filter(|p| p.0 > 0.0 && p.1.is_finite()).map(|(x, y)| (px(x), py(y))).collect();
        if se.markers {
            for (x, y) in &p {
                let _ = write!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{c}"/>"#);
            }
        } else if p.len() == 1 {
            let _ = write!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#, p[0].0, p[0].1);
        } else if !p.is_empty() {
            let d: Vec<String> = p.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = write!(s, r#"<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{}"/>"#, d.join(" "));
        }
        let ly = top + 14.0 * i as f64;
        let _ = write!(s, r#"<rect x="{}" y="{}" width="10" height="10" fill="{c}"/><text x="{}" y="{}">{}</text>"#, w - right + 10.0, ly, w - right + 24.0, ly + 9.0, esc(&se.name));
    }
    s.push_str("</svg>\n");
    s
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn short(v: f64) -> String {
    if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// A round number at least `v` (1, 2 or 5 × a power of ten).
fn nice(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * p).find(|&x| x >= v).unwrap_or(10.0 * p)
}

/// Writes `name.svg` into `dir`; returns its path.
pub fn write(dir: &Path, name: &str, svg: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::invalid(format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join(format!("{name}.svg"));
    std::fs::write(&path, svg).map_err(|e| Error::invalid(format!("cannot write {}: {e}", path.display())))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_well_formed_svg_with_every_series() {
        let s = chart("t <1>", "rows", "ms", &[
            Series { name: "a".into(), points: vec![(1.0, 2.0), (16.0, 5.0)], markers: true },
            Series { name: "b".into(), points: vec![(1.0, 1.0), (512.0, 50.0)], markers: false },
        ]);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("t &lt;1&gt;") && s.contains("<polyline") && s.contains("<circle"));
        // No series at all still draws axes, without NaN.
        assert!(!chart("e", "x", "y", &[]).contains("NaN"));
        // A line of one point is drawn as a dot; a long legend widens the chart; a fixed top.
        let one = chart_to("p", "x", "%", &[Series { name: "a rather long series name, for the legend".into(), points: vec![(2.0, 40.0)], markers: false }], Some(100.0));
        assert!(one.contains("<circle") && one.contains(r#">100</text>"#), "{one}");
        assert!(one.contains(r#"width="771""#), "the legend widens the chart: {one}");
    }
}
