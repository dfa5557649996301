//! The SVG chart of `cargo xtask bench` (plotters, SVG backend only):
//! per-call cost of each path on Bochs (CET on and off), and lookup cost
//! against the active batch size.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::bench::BenchResults;
use crate::error::{Error, Result};

/// The bar groups: (label, figure key).
const PATHS: [(&str, &str); 7] = [
    ("direct call", "direct_call"),
    ("int3 + iret", "int3_iret"),
    ("classic", "emul_call/classic"),
    ("trampoline", "emul_call/trampoline"),
    ("shadow gap", "emul_call/shadowgap"),
    ("shadow gap, 1 site", "emul_call_1site/shadowgap"),
    ("patched call", "patched_call"),
];

/// The series: (machine label, legend, colour).
const SERIES: [(&str, &str, RGBColor); 2] = [
    ("bochs", "Bochs, CET shadow stacks on", RGBColor(0x1f, 0x77, 0xb4)),
    ("bochs-cetoff", "Bochs, CET off", RGBColor(0xff, 0x7f, 0x0e)),
];

const LOOKUP_SIZES: [u64; 5] = [1, 16, 256, 4096, 65536];

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// The chart as SVG text.
pub fn svg(r: &BenchResults) -> Result<String> {
    let mut out = String::new();
    draw(r, &mut out).map_err(|e| Error::new(format!("cannot draw the chart: {e}")))?;
    Ok(out)
}

fn median(r: &BenchResults, machine: &str, key: &str) -> Option<f64> {
    r.machine(machine)?.figure(key).map(|f| f.median)
}

fn draw(r: &BenchResults, out: &mut String) -> DrawResult {
    let root = SVGBackend::with_string(out, (1000, 1040)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "shadowcall benchmarks: Bochs (instructions per operation), {} on {}",
        r.date.get(..10).unwrap_or(&r.date),
        r.host
    );
    let root = root.titled(&title, ("sans-serif", 22))?;
    let (top, bottom) = root.split_vertically(540);
    bars(r, &top)?;
    lookup(r, &bottom)?;
    root.present()?;
    Ok(())
}

fn bars<DB: DrawingBackend>(r: &BenchResults, area: &DrawingArea<DB, plotters::coord::Shift>) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let values: Vec<Vec<Option<f64>>> =
        SERIES.iter().map(|(m, _, _)| PATHS.iter().map(|(_, k)| median(r, m, k)).collect()).collect();
    let ymax = values.iter().flatten().flatten().fold(10f64, |a, &b| a.max(b)) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption("Cost of one call through each path (emulated CALL at an int3 patch site)", ("sans-serif", 17))
        .margin(16)
        .x_label_area_size(46)
        .y_label_area_size(72)
        .build_cartesian_2d(0f64..PATHS.len() as f64, 0f64..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(1)
        .x_label_formatter(&|_| String::new())
        .y_desc("instructions per call")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    let width = 0.8 / SERIES.len() as f64;
    for (si, (_, legend, colour)) in SERIES.iter().enumerate() {
        let colour = *colour;
        let bars: Vec<(f64, f64)> = values[si]
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i as f64 + 0.1 + si as f64 * width, v)))
            .collect();
        chart
            .draw_series(bars.iter().map(|&(x, v)| Rectangle::new([(x, 0.0), (x + width * 0.95, v)], colour.filled())))?
            .label(*legend)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], colour.filled()));
        let label_style = TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
        chart
            .draw_series(bars.iter().map(|&(x, v)| {
                Text::new(format!("{v:.0}"), (x + width * 0.475, v + ymax * 0.01), label_style.clone())
            }))?;
        // Paths a configuration cannot take (classic with shadow stacks, shadow gap without).
        let missing: Vec<f64> = values[si]
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_none())
            .map(|(i, _)| i as f64 + 0.1 + si as f64 * width)
            .collect();
        chart.draw_series(
            missing.iter().map(|&x| Text::new("n/a", (x + width * 0.475, ymax * 0.01), label_style.color(&colour))),
        )?;
    }
    // Category names under the groups, in pixel space.
    let name_style = TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    let base = area.get_base_pixel();
    for (i, (name, _)) in PATHS.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        area.draw(&Text::new(*name, (px - base.0, py - base.1 + 10), name_style.clone()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

fn lookup<DB: DrawingBackend>(r: &BenchResults, area: &DrawingArea<DB, plotters::coord::Shift>) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let series: Vec<Vec<(f64, f64)>> = SERIES
        .iter()
        .map(|(m, _, _)| {
            LOOKUP_SIZES
                .iter()
                .filter_map(|&s| median(r, m, &format!("lookup[{s}]")).map(|v| ((s as f64).log2(), v)))
                .collect()
        })
        .collect();
    let all = series.iter().flatten().map(|p| p.1);
    let (lo, hi) = all.fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo > hi { (0.0, 100.0) } else { (lo, hi) };
    let pad = ((hi - lo) * 0.15).max(10.0);
    let mut chart = ChartBuilder::on(area)
        .caption("Emulated call with a patch batch of N sites in flight (site lookup cost)", ("sans-serif", 17))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(72)
        .build_cartesian_2d(-0.5f64..16.5, (lo - pad).max(0.0)..hi + pad)?;
    chart
        .configure_mesh()
        .x_labels(9)
        .x_label_formatter(&|x| {
            if x.fract() == 0.0 && *x >= 0.0 {
                format!("{}", 1u64 << (*x as u32))
            } else {
                String::new()
            }
        })
        .x_desc("sites in the active batch (log2 scale)")
        .y_desc("instructions per emulated call")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    for (si, (_, legend, colour)) in SERIES.iter().enumerate() {
        let colour = *colour;
        let strategy = r
            .machine(SERIES[si].0)
            .and_then(|m| m.figure("lookup[16]"))
            .and_then(|f| f.strategy.clone())
            .unwrap_or_default();
        chart
            .draw_series(LineSeries::new(series[si].clone(), colour.stroke_width(2)))?
            .label(format!("{legend} ({strategy})"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
        chart.draw_series(series[si].iter().map(|&p| Circle::new(p, 4, colour.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{merge_runs, parse_diagnostics, BenchResults, MachineResult};

    #[test]
    fn draws_an_svg_with_labels() {
        let diags: Vec<String> = [
            r#"# bench {"name":"direct_call","shstk":true,"per_op":[4,4]}"#,
            r#"# bench {"name":"emul_call","shstk":true,"strategy":"shadowgap","per_op":[290]}"#,
            r#"# bench {"name":"emul_call_1site","shstk":true,"strategy":"shadowgap","per_op":[283]}"#,
            r#"# bench {"name":"lookup","shstk":true,"strategy":"shadowgap","sites":16,"per_op":[313]}"#,
            r#"# bench {"name":"lookup","shstk":true,"strategy":"shadowgap","sites":65536,"per_op":[367]}"#,
        ]
        .map(String::from)
        .to_vec();
        let r = BenchResults {
            test_hooks: false,
            date: "2025-01-02T00:00:00Z".into(),
            host: "testhost".into(),
            cpu_model: "cpu".into(),
            kernel_source: String::new(),
            machines: vec![MachineResult {
                test_hooks: false,
                machine: "bochs".into(),
                unit: "instructions".into(),
                shstk: true,
                runs: 1,
                wall_boot_to_end_s: vec![1.0],
                figures: merge_runs(&[parse_diagnostics(&diags).unwrap()]),
            }],
            not_covered: vec![],
            targets: vec![],
        };
        let s = svg(&r).unwrap();
        assert!(s.starts_with("<svg"), "{}", &s[..100.min(s.len())]);
        for want in ["2025-01-02 on testhost", "shadow gap", "290", "shadow gap, 1 site", "283", "65536", "(shadowgap)"]
        {
            assert!(s.contains(want), "missing {want}");
        }
    }
}
