//! The campaign's course drawn as an SVG with plotters: share of devices succeeded, bytes per
//! second delivered and chunks re-sent, over seconds since the campaign was created.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// One sample of a running campaign.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the campaign was created.
    pub t: f64,
    /// Devices succeeded, 0..=1.
    pub succeeded: f64,
    /// Chunk bytes served per second since the previous sample.
    pub bytes_per_sec: f64,
    /// Chunks served so far beyond those the devices kept (answers to repeated requests).
    pub resent_chunks: f64,
}

/// A panel: its caption, its unit, the value it shows and its colour.
type Series = (&'static str, &'static str, fn(&Sample) -> f64, RGBColor);

/// Draws `samples` as three stacked panels into `path` (SVG), titled with `title`.
pub fn draw(path: &Path, title: &str, samples: &[Sample]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| err(&e))?;
    let panels = root.split_evenly((3, 1));
    let t_max = samples.iter().map(|s| s.t).fold(1.0, f64::max);
    let series: [Series; 3] = [
        ("devices succeeded", "%", |s| s.succeeded * 100.0, BLUE),
        (
            "delivered",
            "MiB/s",
            |s| s.bytes_per_sec / 1_048_576.0,
            GREEN,
        ),
        ("chunks re-sent", "chunks", |s| s.resent_chunks, RED),
    ];
    for (area, (name, unit, value, color)) in panels.iter().zip(series) {
        let y_max = samples.iter().map(value).fold(0.0, f64::max).max(1.0) * 1.05;
        let mut chart = ChartBuilder::on(area)
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .caption(name, ("sans-serif", 15))
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("s since the campaign was created")
            .y_desc(unit)
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(
                samples.iter().map(|s| (s.t, value(s))),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
