//! The comparison plot: per-request latency over time for each system, one
//! panel per fault, the fault window shaded, failed requests drawn at the top.

use std::path::Path;

use anyhow::{Context, anyhow};
use plotters::prelude::*;

/// One request: seconds since the run started, latency in ms, answered?
pub type Point = (f64, f64, bool);

/// A system's requests in one run.
pub struct Series {
    pub label: String,
    pub points: Vec<Point>,
}

/// One fault scenario: its name, the fault window (s) and each system's run.
pub struct Panel {
    pub title: String,
    pub fault: (f64, f64),
    pub series: Vec<Series>,
}

/// Where the text font comes from (Debian's `fonts-dejavu-core`).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Draws `panels` into a PNG at `out`.
pub fn latency_png(out: &Path, panels: &[Panel], timeout_ms: f64) -> anyhow::Result<()> {
    let font = std::fs::read(FONT)
        .with_context(|| format!("reading the plot font {FONT} (apt-get install fonts-dejavu-core)"))?;
    // plotters keeps registered fonts for the life of the process.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow!("{FONT} is not a usable font"))?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let height = 330 * panels.len() as u32;
    let root = BitMapBackend::new(out, (1100, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let areas = root.split_evenly((panels.len(), 1));
    let x_max = panels
        .iter()
        .flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().map(|q| q.0)))
        .fold(1.0f64, f64::max)
        .ceil();
    let y_top = timeout_ms * 1.5;
    for (area, panel) in areas.iter().zip(panels) {
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, (0.1..y_top).log_scale())
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("latency, ms (log)")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        let (a, b) = panel.fault;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(a, 0.1), (b, y_top)],
                RGBColor(220, 220, 220).mix(0.6).filled(),
            )))
            .map_err(|e| anyhow!("{e}"))?
            .label("fault on blr's uplink")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], RGBColor(200, 200, 200).filled()));
        for (i, s) in panel.series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            chart
                .draw_series(
                    s.points
                        .iter()
                        .filter(|p| p.2)
                        .map(|p| Circle::new((p.0, p.1.max(0.1)), 2, colour.filled())),
                )
                .map_err(|e| anyhow!("{e}"))?
                .label(s.label.as_str())
                .legend(move |(x, y)| Circle::new((x + 7, y), 4, colour.filled()));
            // Failed requests: a cross at the top, in the system's colour.
            chart
                .draw_series(
                    s.points
                        .iter()
                        .filter(|p| !p.2)
                        .map(|p| Cross::new((p.0, timeout_ms * 1.25), 4, colour.stroke_width(2))),
                )
                .map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
