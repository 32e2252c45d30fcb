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
        curves.push((name.clone(), smooth));
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
    let f = Frame {
        w: 720.0,
        h: 420.0,
        left: 60.0,
        right: 170.0,
        top: 40.0,
        bottom: 50.0,
    };
    let px = |x: f64| f.left + (x / x_max) * (f.w - f.left - f.right);
    let py = |y: f64| f.top + (y_max - y) / (y_max - y_min) * (f.h - f.top - f.bottom);
    let mut s = f.open(title);
    for i in 0..=5 {
        let y = y_min + (y_max - y_min) * i as f64 / 5.0;
        f.y_grid(&mut s, py(y), &format!("{y:.1}"));
    }
    for i in 0..=4 {
        let x = x_max * i as f64 / 4.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{x:.0}</text>"#,
            px(x),
            f.h - f.bottom + 18.0
        );
    }
    let y_label = format!("training loss ({window}-step mean)");
    f.axis_titles(&mut s, "step", &y_label);
    for (i, (name, c)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        polyline(&mut s, color, c.iter().map(|&(x, y)| (px(x), py(y))));
        f.legend(&mut s, i, color, name);
    }
    s += "</svg>\n";
    Ok(s)
}

/// An SVG plot's size and margins, and the pieces every plot of this crate draws.
pub(crate) struct Frame {
    pub w: f64,
    pub h: f64,
    pub left: f64,
    pub right: f64,
    pub top: f64,
    pub bottom: f64,
}

impl Frame {
    /// The document's opening: white background and the title.
    pub fn open(&self, title: &str) -> String {
        format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" font-size="14">{}</text>
"#,
            self.w,
            self.h,
            self.left,
            escape(title)
        )
    }

    /// A horizontal grid line at pixel height `y`, labelled on the left.
    pub fn y_grid(&self, s: &mut String, y: f64, label: &str) {
        let _ = writeln!(
            s,
            r##"<line x1="{}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{label}</text>"##,
            self.left,
            self.w - self.right,
            self.left - 6.0,
            y + 4.0
        );
    }

    /// The axis titles.
    pub fn axis_titles(&self, s: &mut String, x_label: &str, y_label: &str) {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text><text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">{}</text>"#,
            (self.left + self.w - self.right) / 2.0,
            self.h - 12.0,
            escape(x_label),
            self.h / 2.0,
            self.h / 2.0,
            escape(y_label)
        );
    }

    /// Legend entry `i` in the right margin.
    pub fn legend(&self, s: &mut String, i: usize, color: &str, name: &str) {
        let ly = self.top + 16.0 * i as f64 + 10.0;
        let _ = writeln!(
            s,
            r#"<line x1="{0}" x2="{1}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{2}" y="{3}">{4}</text>"#,
            self.w - self.right + 10.0,
            self.w - self.right + 30.0,
            self.w - self.right + 36.0,
            ly + 4.0,
            escape(name)
        );
    }
}

/// A line through points given in pixels.
pub(crate) fn polyline(s: &mut String, color: &str, points: impl Iterator<Item = (f64, f64)>) {
    let points: Vec<String> = points.map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let _ = writeln!(
        s,
        r#"<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{}"/>"#,
        points.join(" ")
    );
}

/// `text` safe inside SVG markup.
pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
