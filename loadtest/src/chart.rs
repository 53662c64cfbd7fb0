//! The run over time as an SVG chart: calls per second above, p50 and p99 latency below, from
//! the per-second timeline of the summary.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

const WIDTH: u32 = 960;
const HEIGHT: u32 = 560;

fn series(timeline: &[Value], field: &str) -> Vec<(u32, f64)> {
    timeline
        .iter()
        .map(|s| {
            (
                s["second"].as_u64().unwrap_or(0) as u32,
                s[field].as_f64().unwrap_or(0.0),
            )
        })
        .collect()
}

fn top(points: &[(u32, f64)]) -> f64 {
    points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1
}

/// Writes the chart of `summary` (see [`crate::stats::Recorder::summary`]) to `path`.
pub fn write_svg(path: &Path, summary: &Value, title: &str) -> anyhow::Result<()> {
    let timeline = summary["timeline"].as_array().cloned().unwrap_or_default();
    let seconds = (timeline.len() as u32).max(1);
    let calls = series(&timeline, "calls");
    let p50 = series(&timeline, "p50_ms");
    let p99 = series(&timeline, "p99_ms");
    let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());

    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| fail(&e))?;
    let (upper, lower) = root.split_vertically(HEIGHT / 2 - 10);

    let mut throughput = ChartBuilder::on(&upper)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0..seconds, 0.0..top(&calls))
        .map_err(|e| fail(&e))?;
    throughput
        .configure_mesh()
        .x_desc("second")
        .y_desc("calls/s")
        .draw()
        .map_err(|e| fail(&e))?;
    throughput
        .draw_series(LineSeries::new(calls, &BLUE))
        .map_err(|e| fail(&e))?;

    let mut latency = ChartBuilder::on(&lower)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0..seconds, 0.0..top(&p99))
        .map_err(|e| fail(&e))?;
    latency
        .configure_mesh()
        .x_desc("second")
        .y_desc("latency (ms)")
        .draw()
        .map_err(|e| fail(&e))?;
    latency
        .draw_series(LineSeries::new(p50, &GREEN))
        .map_err(|e| fail(&e))?
        .label("p50")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    latency
        .draw_series(LineSeries::new(p99, &RED))
        .map_err(|e| fail(&e))?
        .label("p99")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    latency
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}
