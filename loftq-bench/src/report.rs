//! `loftq-bench report`: back ends side by side (Markdown with ratios) and two SVG plots, from
//! the JSON records of `loftq-bench suite` (and of `bench/peft_loftq.py`).

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::plot::{COLORS, Frame, escape, polyline};
use crate::suite::{Case, Run};

/// The Markdown report; `command` is what produced the runs, `skipped` the back ends that did
/// not run and why.
pub fn markdown(runs: &[Run], command: &str, skipped: &[String]) -> String {
    let mut s = String::from("# Benchmarks\n\n");
    let _ = writeln!(s, "Produced by `{command}`.\n");
    s += "| back end | profile | commit | started (UTC) | machine | OS |\n|---|---|---|---|---|---|\n";
    for r in runs {
        let _ = writeln!(
            s,
            "| {} | {} | `{}` | {} | {} | {} |",
            r.backend,
            format!("{:?}", r.profile).to_lowercase(),
            r.commit,
            utc(r.started_unix),
            r.machine.summary(),
            r.machine.os
        );
    }
    for k in skipped {
        let _ = writeln!(s, "\nSkipped: {k}.");
    }
    let first = runs.first().map(|r| r.backend.clone()).unwrap_or_default();
    let suites: Vec<String> = ordered(
        runs.iter()
            .flat_map(|r| r.cases.iter().map(|c| c.suite.clone())),
    );
    for suite in suites {
        let _ = write!(s, "\n## {suite}\n\n| case |");
        for r in runs {
            let _ = write!(s, " {}: median (min–max) |", r.backend);
        }
        for r in &runs[1..] {
            let _ = write!(s, " {} vs {first} |", r.backend);
        }
        s += " error or rate |";
        for r in runs {
            let _ = write!(s, " peak RSS ({}) |", r.backend);
        }
        s += "\n|---|";
        s += &"---|".repeat(runs.len() * 2 + runs.len().saturating_sub(1) + 1);
        s += "\n";
        let names = ordered(runs.iter().flat_map(|r| {
            r.cases
                .iter()
                .filter(|c| c.suite == suite)
                .map(|c| c.name.clone())
        }));
        for name in names {
            let found: Vec<Option<&Case>> = runs
                .iter()
                .map(|r| r.cases.iter().find(|c| c.suite == suite && c.name == name))
                .collect();
            let _ = write!(s, "| {name} |");
            for c in &found {
                let cell = c.map_or("–".into(), |c| {
                    let t = &c.timing;
                    let (scale, unit) = if t.median_s >= 1.0 {
                        (1.0, "s")
                    } else {
                        (1e3, "ms")
                    };
                    let f = |v: f64| {
                        let v = v * scale;
                        if v >= 100.0 {
                            format!("{v:.0}")
                        } else if v >= 10.0 {
                            format!("{v:.1}")
                        } else {
                            format!("{v:.2}")
                        }
                    };
                    format!("{} {unit} ({}–{})", f(t.median_s), f(t.min_s), f(t.max_s))
                });
                let _ = write!(s, " {cell} |");
            }
            for c in &found[1..] {
                let cell = match (found[0], c) {
                    (Some(a), Some(b)) => {
                        let mut cell = speed(a.timing.median_s / b.timing.median_s);
                        if let (Some(x), Some(y)) = (a.error, b.error) {
                            cell += &format!(", error {:+.4}", y - x);
                        }
                        cell
                    }
                    _ => "–".into(),
                };
                let _ = write!(s, " {cell} |");
            }
            let errors: Vec<String> = found
                .iter()
                .map(|c| match c {
                    Some(c) if c.error.is_none() && !c.metric.is_empty() => c.metric.clone(),
                    Some(c) => c.error.map_or("–".into(), |e| format!("{e:.4}")),
                    None => "–".into(),
                })
                .collect();
            let metric = found
                .iter()
                .flatten()
                .find(|c| c.error.is_some())
                .map(|c| c.metric.clone());
            let _ = write!(
                s,
                " {}{} |",
                errors.join(" / "),
                metric.map_or(String::new(), |m| format!(" ({m})"))
            );
            for c in &found {
                let cell = c.map_or("–".into(), |c| gib(c.memory.peak_rss_bytes));
                let _ = write!(s, " {cell} |");
            }
            s += "\n";
        }
    }
    s
}

/// Time against matrix size of per-matrix LoftQ, one line per back end (log–log).
pub fn loftq_time_svg(runs: &[Run]) -> Option<String> {
    // The randomized configuration measured at the most sizes (the largest T on ties).
    let config = |c: &Case| {
        let mut parts = c.name.split(' ');
        let _shape = parts.next();
        parts.collect::<Vec<_>>().join(" ")
    };
    let candidates = ordered(
        runs.iter()
            .flat_map(|r| r.cases.iter())
            .filter(|c| c.suite == "loftq" && c.name.ends_with("randomized"))
            .map(config),
    );
    let best = candidates.into_iter().max_by_key(|k| {
        let sizes: BTreeSet<u64> = runs
            .iter()
            .flat_map(|r| r.cases.iter())
            .filter(|c| c.suite == "loftq" && config(c) == *k)
            .map(|c| c.size as u64)
            .collect();
        (
            sizes.len(),
            k.contains("T5"),
            k.contains("r64"),
            k.contains("nf4"),
        )
    })?;
    let series = per_backend(runs, true, |c| {
        (c.suite == "loftq" && config(c) == best).then(|| {
            let shape = c.name.split(' ').next().unwrap_or("");
            (c.size, c.timing.median_s, shape.to_string())
        })
    });
    Some(chart(
        &format!("Per-matrix LoftQ ({best}): median time"),
        "matrix elements",
        "seconds",
        &series,
    ))
}

/// Error against time of the exact and randomized SVDs on the largest matrix measured.
pub fn svd_error_svg(runs: &[Run]) -> Option<String> {
    let largest = runs
        .iter()
        .flat_map(|r| r.cases.iter())
        .filter(|c| c.suite == "svd")
        .map(|c| c.size)
        .fold(0.0, f64::max);
    if largest == 0.0 {
        return None;
    }
    let series = per_backend(runs, false, |c| {
        let error = c.error.filter(|_| c.suite == "svd" && c.size == largest)?;
        let label = c.name.split(' ').skip(2).collect::<Vec<_>>().join(" ");
        Some((c.timing.median_s, error, label))
    });
    let title = runs
        .iter()
        .flat_map(|r| r.cases.iter())
        .find(|c| c.suite == "svd" && c.size == largest)
        .map_or(String::new(), |c| {
            c.name.split(' ').take(2).collect::<Vec<_>>().join(" ")
        });
    Some(chart(
        &format!("Truncated SVD of a LoftQ residual ({title}): error vs time"),
        "seconds",
        "‖A − A_r‖ / ‖A‖",
        &series,
    ))
}

/// One series per run: the points `point` picks out of its cases.
fn per_backend(
    runs: &[Run],
    line: bool,
    point: impl Fn(&Case) -> Option<(f64, f64, String)>,
) -> Vec<Series> {
    runs.iter()
        .map(|r| Series {
            name: r.backend.clone(),
            points: r.cases.iter().filter_map(&point).collect(),
            line,
        })
        .collect()
}

struct Series {
    name: String,
    /// `(x, y, label)`.
    points: Vec<(f64, f64, String)>,
    line: bool,
}

/// A log-scale x axis and a log-scale (seconds) or linear (errors) y axis.
fn chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y, _) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let log_y = y_label == "seconds";
    let (lx0, lx1) = (
        x0.log10().floor(),
        x1.log10().ceil().max(x0.log10().floor() + 1.0),
    );
    let (ty0, ty1) = if log_y {
        (
            y0.log10().floor(),
            y1.log10().ceil().max(y0.log10().floor() + 1.0),
        )
    } else {
        let pad = (y1 - y0).max(y1.abs() * 0.01) * 0.1;
        (y0 - pad, y1 + pad)
    };
    let f = Frame {
        w: 720.0,
        h: 420.0,
        left: 70.0,
        right: 150.0,
        top: 40.0,
        bottom: 50.0,
    };
    let px = |x: f64| f.left + (x.log10() - lx0) / (lx1 - lx0) * (f.w - f.left - f.right);
    let py = |y: f64| {
        let v = if log_y { y.log10() } else { y };
        f.top + (ty1 - v) / (ty1 - ty0) * (f.h - f.top - f.bottom)
    };
    let mut s = f.open(title);
    for e in lx0 as i32..=lx1 as i32 {
        let x = px(10f64.powi(e));
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">1e{e}</text>"##,
            f.top,
            f.h - f.bottom,
            f.h - f.bottom + 16.0
        );
    }
    let ticks: Vec<f64> = if log_y {
        (ty0 as i32..=ty1 as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        (0..=5)
            .map(|i| ty0 + (ty1 - ty0) * f64::from(i) / 5.0)
            .collect()
    };
    for t in ticks {
        let label = if log_y {
            format!("{t}")
        } else {
            format!("{t:.4}")
        };
        f.y_grid(&mut s, py(t), &label);
    }
    f.axis_titles(&mut s, x_label, y_label);
    for (i, se) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut points = se.points.clone();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        if se.line && points.len() > 1 {
            polyline(
                &mut s,
                color,
                points.iter().map(|(x, y, _)| (px(*x), py(*y))),
            );
        }
        for (x, y, label) in &points {
            let (cx, cy) = (px(*x), py(*y));
            let _ = writeln!(
                s,
                r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="3.5" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="10" fill="{color}">{}</text>"#,
                cx + 5.0,
                cy - 5.0,
                escape(label)
            );
        }
        f.legend(&mut s, i, color, &se.name);
    }
    s += "</svg>\n";
    s
}

/// Distinct values in first-seen order.
fn ordered(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for i in items {
        if !v.contains(&i) {
            v.push(i);
        }
    }
    v
}

/// `r` = first back end's time / this one's.
fn speed(r: f64) -> String {
    if r >= 1.0 {
        format!("{r:.2}× faster")
    } else {
        format!("{:.2}× slower", 1.0 / r)
    }
}

fn gib(bytes: u64) -> String {
    if bytes == 0 {
        "–".into()
    } else {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    }
}

/// `YYYY-MM-DD HH:MM` of a Unix time (proleptic Gregorian calendar).
fn utc(t: u64) -> String {
    let (days, rem) = ((t / 86_400) as i64, t % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_ratios() {
        assert_eq!(utc(0), "1970-01-01 00:00");
        assert_eq!(utc(1_796_000_000), "2026-11-30 00:53");
        assert_eq!(speed(2.0), "2.00× faster");
        assert_eq!(speed(0.25), "4.00× slower");
    }
}
