//! A loss-curve plot as a plain SVG file (no plotting crate: a few lines of markup).

use std::fmt::Write;
use std::path::Path;

pub(crate) const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// Draws each run's training loss (`window`-step running mean) against the step, from
/// `history.json` files written by `loftq train`.
pub fn loss_svg(runs: &[(String, &Path)], window: usize, title: &str) -> Result<String, String> {
    let mut curves = Vec::new();
    for (name, path) in runs {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let h: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a training history: {e}", path.display()))?;
        let steps = h["steps"]
            .as_array()
            .ok_or_else(|| format!("{}: no `steps`", path.display()))?;
        let losses: Vec<f64> = steps.iter().filter_map(|s| s["loss"].as_f64()).collect();
        let w = window.max(1);
        let smooth: Vec<(f64, f64)> = (0..losses.len())
            .map(|i| {
                let lo = (i + 1).saturating_sub(w);
                let mean = losses[lo..=i].iter().sum::<f64>() / (i + 1 - lo) as f64;
                ((i + 1) as f64, mean)
            })
            .collect();
        curves.push((escape(name), smooth));
    }
    let all = curves.iter().flat_map(|(_, c)| c.iter());
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        return Err("no loss values to plot".into());
    }
    let (y_min, y_max) = (y_min.floor(), y_max.ceil().max(y_min.floor() + 1.0));
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 60.0, 170.0, 40.0, 50.0);
    let px = |x: f64| left + (x / x_max) * (w - left - right);
    let py = |y: f64| top + (y_max - y) / (y_max - y_min) * (h - top - bottom);
    let title = escape(title);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" font-size="14">{title}</text>
"#,
        left
    );
    for i in 0..=5 {
        let y = y_min + (y_max - y_min) * i as f64 / 5.0;
        let (x2, yy, lx, ly) = (w - right, py(y), left - 6.0, py(y) + 4.0);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{x2}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{lx}" y="{ly:.1}" text-anchor="end">{y:.1}</text>"##
        );
    }
    for i in 0..=4 {
        let x = x_max * i as f64 / 4.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{x:.0}</text>"#,
            px(x),
            h - bottom + 18.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">step</text><text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">training loss ({window}-step mean)</text>"#,
        (left + w - right) / 2.0,
        h - 12.0,
        h / 2.0,
        h / 2.0
    );
    for (i, (name, c)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> = c
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{}"/>"#,
            points.join(" ")
        );
        let ly = top + 16.0 * i as f64 + 10.0;
        let _ = writeln!(
            s,
            r#"<line x1="{0}" x2="{1}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{2}" y="{3}">{name}</text>"#,
            w - right + 10.0,
            w - right + 30.0,
            w - right + 36.0,
            ly + 4.0
        );
    }
    s += "</svg>\n";
    Ok(s)
}

/// `text` safe inside SVG markup.
pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
