//! The overview's chart: pushes per hour by outcome as an inline SVG drawn on the server
//! (no script; colours come from the stylesheet's `seg-*` classes).

use std::fmt::Write as _;

use super::i18n::Lang;
use super::view::{TimeView, OUTCOMES};

/// One hour of the chart: its start (Unix seconds) and a count per outcome group.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HourBar {
    pub hour: i64,
    pub label: String,
    pub counts: [u64; 5],
    pub total: u64,
}

const W: f64 = 720.0;
const H: f64 = 240.0;
const LEFT: f64 = 40.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 28.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round top for the y axis at or above `max`.
fn axis_max(max: u64) -> u64 {
    let max = max.max(1);
    let mut step = 1;
    while step * 10 < max {
        step *= 10;
    }
    // Even multiples, so the middle grid line is a whole number.
    for m in [2, 4, 6, 8, 10] {
        if step * m >= max {
            return step * m;
        }
    }
    max
}

/// The SVG markup (text in it escaped here).
pub fn svg(bars: &[HourBar], lang: Lang) -> String {
    let top = axis_max(bars.iter().map(|b| b.total).max().unwrap_or(0));
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let slot = plot_w / bars.len().max(1) as f64;
    let bar_w = (slot * 0.72).max(1.0);
    let y = |v: u64| TOP + plot_h - plot_h * (v as f64) / (top as f64);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-labelledby="chart-title chart-desc" xmlns="http://www.w3.org/2000/svg"><title id="chart-title">{}</title><desc id="chart-desc">{}</desc>"#,
        esc(lang.t("last_24h")),
        esc(lang.t("chart_desc"))
    );
    for v in [0, top / 2, top] {
        let yy = y(v);
        let _ = write!(
            s,
            r#"<line class="grid" x1="{LEFT}" x2="{}" y1="{yy:.1}" y2="{yy:.1}"/><text class="axis" x="{}" y="{:.1}" text-anchor="end">{v}</text>"#,
            W - RIGHT,
            LEFT - 6.0,
            yy + 4.0
        );
    }
    for (i, b) in bars.iter().enumerate() {
        let x = LEFT + slot * i as f64 + (slot - bar_w) / 2.0;
        let mut tip = format!("{} · {} {}", b.label, lang.t("total"), b.total);
        for (k, c) in OUTCOMES.iter().zip(b.counts) {
            if c > 0 {
                let _ = write!(tip, " · {} {c}", lang.t(outcome_key(k)));
            }
        }
        let _ = write!(s, r#"<g><title>{}</title>"#, esc(&tip));
        // An invisible full-height target so hovering anywhere in the slot shows the tip.
        let _ = write!(
            s,
            r#"<rect class="hover" x="{:.1}" y="{TOP}" width="{slot:.1}" height="{plot_h:.1}"/>"#,
            LEFT + slot * i as f64
        );
        let mut base = 0u64;
        for (k, c) in OUTCOMES.iter().zip(b.counts) {
            if c == 0 {
                continue;
            }
            let y1 = y(base + c);
            let y0 = y(base);
            let _ = write!(
                s,
                r#"<rect class="seg-{k}" x="{x:.1}" y="{y1:.1}" width="{bar_w:.1}" height="{:.1}"/>"#,
                (y0 - y1).max(0.5)
            );
            base += c;
        }
        s.push_str("</g>");
        if i % 3 == 0 {
            let _ = write!(
                s,
                r#"<text class="axis" x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                x + bar_w / 2.0,
                H - 8.0,
                esc(&b.label)
            );
        }
    }
    s.push_str("</svg>");
    s
}

pub fn outcome_key(k: &str) -> &'static str {
    match k {
        "ok" => "o_ok",
        "failed" => "o_failed",
        "unknown" => "o_unknown",
        "pending" => "o_pending",
        _ => "o_cancelled",
    }
}

/// The hour label in Beijing time ("14:00").
pub fn hour_label(hour: i64) -> String {
    TimeView::of_unix(hour)
        .map(|t| t.bj.get(11..16).unwrap_or_default().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_rounds_up() {
        assert_eq!(axis_max(0), 2);
        assert_eq!(axis_max(3), 4);
        assert_eq!(axis_max(7), 8);
        assert_eq!(axis_max(11), 20);
        assert_eq!(axis_max(180), 200);
        assert_eq!(axis_max(1000), 1000);
    }

    #[test]
    fn svg_escapes_and_stacks() {
        let bars = vec![HourBar {
            hour: 0,
            label: "08:00".into(),
            counts: [3, 1, 0, 0, 0],
            total: 4,
        }];
        let s = svg(&bars, Lang::En);
        assert!(s.starts_with("<svg"), "{s}");
        assert_eq!(s.matches("class=\"seg-ok\"").count(), 1, "{s}");
        assert_eq!(s.matches("class=\"seg-failed\"").count(), 1, "{s}");
        assert!(s.contains("08:00 · Total 4 · Accepted 3 · Failed 1"), "{s}");
    }
}
