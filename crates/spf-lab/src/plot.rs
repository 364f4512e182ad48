//! SVG plots of a run's curves: the harmful score and the fine-tune accuracy over the
//! fine-tuning steps, one line per method, averaged over seeds.

use std::path::Path;

use plotters::prelude::*;

use crate::error::LabError;
use crate::eval::Scores;
use crate::experiment::Results;
use crate::finetune::Method;

const COLORS: [RGBColor; 6] = [
    RGBColor(200, 30, 30),
    RGBColor(30, 90, 200),
    RGBColor(30, 150, 60),
    RGBColor(150, 60, 180),
    RGBColor(230, 140, 20),
    RGBColor(90, 90, 90),
];

/// `(step, value)` averaged over seeds for `method` at share `p`.
fn curve(results: &Results, method: Method, p: f64, value: fn(&Scores) -> f64) -> Vec<(f64, f64)> {
    let runs: Vec<_> = results
        .seeds
        .iter()
        .flat_map(|s| &s.runs)
        .filter(|r| r.method == method && r.p == p)
        .collect();
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    (0..first.curve.len())
        .map(|i| {
            let mean = runs.iter().map(|r| value(&r.curve[i])).sum::<f64>() / runs.len() as f64;
            (first.curve[i].step as f64, 100.0 * mean)
        })
        .collect()
}

/// Draws the harmful score (seen and unseen topics together) and the fine-tune accuracy over
/// steps at share `p`, for every method, into the SVG file `path`.
///
/// # Errors
///
/// [`LabError::Plot`] when the file cannot be drawn or written.
pub fn curves(results: &Results, p: f64, path: &Path) -> Result<(), LabError> {
    let fail = |e: &dyn std::fmt::Display| LabError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let root = SVGBackend::new(path, (1100, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let panels = root.split_evenly((1, 2));
    let steps = results.config.finetune.steps as f64;
    type Metric = (&'static str, fn(&Scores) -> f64, SeriesLabelPosition);
    let metrics: [Metric; 2] = [
        (
            "harmful score (%)",
            |s| s.harmful(),
            SeriesLabelPosition::MiddleRight,
        ),
        (
            "fine-tune accuracy (%)",
            |s| s.accuracy,
            SeriesLabelPosition::UpperLeft,
        ),
    ];
    for (panel, (name, value, legend)) in panels.iter().zip(metrics) {
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{name}, p = {p:.2}"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(0.0..steps, 0.0..100.0)
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc("fine-tuning step")
            .y_desc(name)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(|e| fail(&e))?;
        for (i, &method) in results.config.methods.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(
                    curve(results, method, p, value),
                    color.stroke_width(2),
                ))
                .map_err(|e| fail(&e))?
                .label(method.label())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(legend)
            .draw()
            .map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))
}
