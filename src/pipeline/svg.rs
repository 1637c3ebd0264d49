//! `report.svg`: perplexity against file size, one labelled point per quantization level and one
//! series per eval text, with ticked axes, a title and a legend, as a standalone SVG that reads
//! without the table (and with KLD against size when there is no eval text but KLD was measured).

use super::report::Report;
use std::fmt::Write as _;

const W: f64 = 760.0;
const H: f64 = 500.0;
const LEFT: f64 = 84.0;
const RIGHT: f64 = 28.0;
const TOP: f64 = 64.0;
const BOTTOM: f64 = 70.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];

/// Escapes text for XML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

/// "Nice" tick positions (steps of 1, 2 or 5 × 10^k) covering `[lo, hi]`, about `n` of them.
pub fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || n == 0 {
        return Vec::new();
    }
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, lo + 0.5)
    };
    let raw = (hi - lo) / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).floor();
    let last = (hi / step).ceil();
    let n_ticks = (last - first) as i64;
    (0..=n_ticks.clamp(0, 1000))
        .map(|k| (first + k as f64) * step)
        .collect()
}

fn fmt_tick(t: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{t:.decimals$}")
}

/// Picks a spot for a point's label (baseline-left corner) that overlaps no label or dot placed so
/// far, trying positions around the point; falls back to the first one.
fn place_label(
    placed: &mut Vec<(f64, f64, f64, f64)>,
    min_y: f64,
    px: f64,
    py: f64,
    label: &str,
) -> (f64, f64) {
    let w = 7.0 * label.chars().count() as f64;
    let h = 12.0;
    let cands = [
        (6.0, -6.0),
        (6.0, 16.0),
        (-w - 6.0, -6.0),
        (-w - 6.0, 16.0),
        (6.0, -20.0),
        (6.0, 30.0),
        (-w / 2.0, -12.0),
        (-w / 2.0, 24.0),
        (6.0, -34.0),
        (6.0, 44.0),
    ];
    let overlaps = |b: &(f64, f64, f64, f64)| {
        placed
            .iter()
            .any(|p| b.0 < p.2 && p.0 < b.2 && b.1 < p.3 && p.1 < b.3)
    };
    let boxed = |(dx, dy): (f64, f64)| {
        let (x, y) = (px + dx, py + dy);
        (x, y, (x, y - h, x + w, y + 2.0))
    };
    let (x, y, b) = cands
        .iter()
        .map(|c| boxed(*c))
        .find(|(x, _, b)| !overlaps(b) && *x >= LEFT && b.2 <= W - 2.0 && b.1 >= min_y)
        .unwrap_or_else(|| boxed(cands[0]));
    placed.push(b);
    (x, y)
}

/// One plotted series.
struct Series {
    name: String,
    /// (x, y, label)
    points: Vec<(f64, f64, String)>,
}

/// One plot (axes, ticks, grid, series, labels, legend) with its frame's top-left at height `oy`.
fn panel(s: &mut String, oy: f64, series: &[Series], y_label: &str, color0: usize) {
    let top = oy + TOP;
    let all: Vec<&(f64, f64, String)> = series.iter().flat_map(|x| &x.points).collect();
    let (mut x0, mut x1) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
    for (x, y, _) in &all {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    let pad = |a: f64, b: f64| {
        let d = if b > a {
            (b - a) * 0.08
        } else {
            a.abs().max(1e-3) * 0.1
        };
        (a - d, b + d)
    };
    let (x0, x1) = pad(x0, x1);
    let nonneg = y0 >= 0.0;
    let (y0, y1) = pad(y0, y1);
    let y0 = if nonneg { y0.max(0.0) } else { y0 };
    let x0 = x0.max(0.0);
    let xt = ticks(x0, x1, 6);
    let yt = ticks(y0, y1, 6);
    // The axis range is the tick range, so ticks sit on the frame.
    let (ax0, ax1) = (
        xt.first().copied().unwrap_or(x0).min(x0),
        xt.last().copied().unwrap_or(x1).max(x1),
    );
    let (ay0, ay1) = (
        yt.first().copied().unwrap_or(y0).min(y0),
        yt.last().copied().unwrap_or(y1).max(y1),
    );
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (x - ax0) / (ax1 - ax0).max(1e-12) * pw;
    let sy = |y: f64| top + ph - (y - ay0) / (ay1 - ay0).max(1e-12) * ph;
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let xstep = if xt.len() > 1 { xt[1] - xt[0] } else { 1.0 };
    let ystep = if yt.len() > 1 { yt[1] - yt[0] } else { 1.0 };
    for t in &xt {
        let x = sx(*t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#e4e4e4"/><line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#333"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            top + ph,
            top + ph,
            top + ph + 5.0,
            top + ph + 19.0,
            fmt_tick(*t, xstep)
        );
    }
    for t in &yt {
        let y = sy(*t);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e4e4e4"/><line x1="{:.1}" y1="{y:.1}" x2="{LEFT}" y2="{y:.1}" stroke="#333"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 5.0,
            LEFT - 8.0,
            y + 4.0,
            fmt_tick(*t, ystep)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">file size (MiB)</text>"#,
        LEFT + pw / 2.0,
        oy + H - 24.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" text-anchor="middle" font-size="13" transform="rotate(-90 18 {:.1})">{}</text>"#,
        top + ph / 2.0,
        top + ph / 2.0,
        esc(y_label)
    );
    // Label boxes already placed (x0, y0, x1, y1), the points' own dots included.
    let mut placed: Vec<(f64, f64, f64, f64)> = all
        .iter()
        .map(|(x, y, _)| (sx(*x) - 4.0, sy(*y) - 4.0, sx(*x) + 4.0, sy(*y) + 4.0))
        .collect();
    for (i, se) in series.iter().enumerate() {
        let color = COLORS[(color0 + i) % COLORS.len()];
        let mut pts = se.points.clone();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y, _)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.5" opacity="0.6"/>"#,
            path.join(" ")
        );
        for (x, y, label) in &pts {
            let (px, py) = (sx(*x), sy(*y));
            let (tx, ty) = place_label(&mut placed, top, px, py, label);
            let _ = writeln!(
                s,
                r#"<circle cx="{px:.1}" cy="{py:.1}" r="4" fill="{color}"><title>{}: {:.2} MiB, {:.4}</title></circle><text x="{tx:.1}" y="{ty:.1}" fill="{color}">{}</text>"#,
                esc(label),
                x,
                y,
                esc(label)
            );
        }
        let ly = top + 16.0 + 18.0 * i as f64;
        let lx = LEFT + pw - 210.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"/><circle cx="{:.1}" cy="{ly:.1}" r="4" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 24.0,
            lx + 12.0,
            lx + 30.0,
            ly + 4.0,
            esc(&se.name)
        );
    }
}

/// The chart for `r`: PPL against file size (one series per eval text) and, when measured, mean
/// KLD against file size below it.
pub fn render(r: &Report) -> String {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let ppl: Vec<Series> = r
        .texts
        .iter()
        .enumerate()
        .map(|(ti, t)| Series {
            name: format!("PPL on {}", t.name),
            points: r
                .levels
                .iter()
                .filter_map(|l| {
                    let c = l.ppl.get(ti)?.as_ref()?;
                    c.ppl
                        .is_finite()
                        .then(|| (mib(l.file_size), c.ppl, l.level.clone()))
                })
                .collect(),
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    let kld_pts: Vec<(f64, f64, String)> = r
        .levels
        .iter()
        .filter_map(|l| {
            let k = l.kld.as_ref()?;
            k.mean_kld
                .is_finite()
                .then(|| (mib(l.file_size), k.mean_kld, l.level.clone()))
        })
        .collect();
    let mut panels: Vec<(Vec<Series>, &str)> = Vec::new();
    let n_ppl = ppl.len();
    if !ppl.is_empty() {
        panels.push((ppl, "perplexity (lower is better)"));
    }
    if !kld_pts.is_empty() {
        panels.push((
            vec![Series {
                name: "mean KLD vs F16".into(),
                points: kld_pts,
            }],
            "mean KL divergence from F16 (lower is better)",
        ));
    }
    let total_h = H * panels.len().max(1) as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{total_h}" viewBox="0 0 {W} {total_h}" font-family="Helvetica, Arial, sans-serif" font-size="12">
<title>kiln: quality against file size per quantization level</title>
<rect x="0" y="0" width="{W}" height="{total_h}" fill="white"/>
<text x="{}" y="26" text-anchor="middle" font-size="16" font-weight="bold">Quality against file size per quantization level</text>"#,
        W / 2.0
    );
    let sub = format!(
        "kiln {} · context {} · {}",
        r.provenance.kiln_version, r.provenance.n_ctx, r.provenance.cpu
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="44" text-anchor="middle" fill="#555">{}</text>"##,
        W / 2.0,
        esc(&sub)
    );
    if panels.is_empty() {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#555">no quality numbers: run kiln pipeline with --eval-text FILE (or --kld)</text>"##,
            W / 2.0,
            H / 2.0
        );
    }
    for (k, (series, label)) in panels.iter().enumerate() {
        let color0 = if k == 0 { 0 } else { n_ppl };
        panel(&mut s, H * k as f64, series, label, color0);
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::report::tests::sample;

    #[test]
    fn ticks_are_nice_and_cover_the_range() {
        let t = ticks(0.31, 1.9, 6);
        assert!(
            t.first().unwrap() <= &0.31 && t.last().unwrap() >= &1.9,
            "{t:?}"
        );
        let step = t[1] - t[0];
        assert!(
            (step - 0.2).abs() < 1e-9 || (step - 0.5).abs() < 1e-9,
            "{t:?}"
        );
        let t = ticks(5.0, 5.0, 5);
        assert!(!t.is_empty());
        assert!(ticks(f64::NAN, 1.0, 5).is_empty());
        assert_eq!(fmt_tick(2.0, 0.5), "2.0");
        assert_eq!(fmt_tick(200.0, 50.0), "200");
    }

    #[test]
    fn chart_is_standalone_svg_with_labels_and_ticks() {
        let r = sample();
        let s = render(&r);
        assert!(s.starts_with("<?xml"));
        assert!(s.contains("file size (MiB)") && s.contains("perplexity"));
        for l in &r.levels {
            assert!(s.contains(&format!(">{}</text>", l.level)), "{}", l.level);
        }
        assert_eq!(s.matches("<circle").count(), r.levels.len() + 1);
        let doc = roxmltree::Document::parse(&s).unwrap();
        assert_eq!(doc.root_element().tag_name().name(), "svg");
    }

    #[test]
    fn kld_gets_its_own_panel() {
        let mut r = sample();
        for (i, l) in r.levels.iter_mut().enumerate().skip(1) {
            l.kld = Some(crate::pipeline::report::KldCell {
                mean_kld: 0.1 / i as f64,
                mean_kld_err: None,
                same_top_pct: 90.0,
            });
        }
        let s = render(&r);
        let doc = roxmltree::Document::parse(&s).unwrap();
        assert_eq!(doc.root_element().attribute("height"), Some("1000"));
        assert!(s.contains("mean KL divergence from F16"));
        // 4 PPL points + 3 KLD points + 2 legend dots
        assert_eq!(s.matches("<circle").count(), 9);
        // KLD only (no eval text): one panel
        r.texts.clear();
        for l in &mut r.levels {
            l.ppl.clear();
        }
        let s = render(&r);
        roxmltree::Document::parse(&s).unwrap();
        assert!(s.contains("height=\"500\""));
        assert!(!s.contains("perplexity (lower"));
    }

    #[test]
    fn hostile_names_are_escaped_and_empty_reports_still_render() {
        let mut r = sample();
        r.texts[0].name = "<a&b>\"'".into();
        roxmltree::Document::parse(&render(&r)).unwrap();
        r.texts.clear();
        for l in &mut r.levels {
            l.ppl.clear();
        }
        let s = render(&r);
        roxmltree::Document::parse(&s).unwrap();
        assert!(s.contains("no quality numbers"));
    }
}
