//! SVG figures from `runs.jsonl`, like the paper's figures 4–7: test accuracy per epoch (mean
//! with a ±std band over seeds), test accuracy against cumulative bytes exchanged, and bars of
//! peak memory and seconds per epoch per cut and mode.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::log::RunRecord;
use super::table::{Stats, key_value};
use crate::report::{Report, RunStatus};

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{path}: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("no completed run to plot")]
    Empty,
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];
const SIZE: (u32, u32) = (800, 500);

/// Completed runs grouped into series: `mode` (and `cut`, when several cuts were run).
fn series(records: &[RunRecord]) -> Vec<(String, Vec<&Report>)> {
    let cuts: std::collections::BTreeSet<String> = records
        .iter()
        .filter_map(|r| key_value(r, "model.cut"))
        .collect();
    let mut groups: Vec<(String, Vec<&Report>)> = Vec::new();
    for record in records.iter().filter(|r| r.status == RunStatus::Completed) {
        let Some(report) = &record.report else {
            continue;
        };
        let mode = report.mode.name().to_string();
        let name = match key_value(record, "model.cut") {
            Some(cut) if cuts.len() > 1 => format!("{mode}, cut {cut}"),
            _ => mode,
        };
        match groups.iter_mut().find(|(n, _)| *n == name) {
            Some((_, reports)) => reports.push(report),
            None => groups.push((name, vec![report])),
        }
    }
    groups
}

/// Mean and std over runs of `f(epoch)` per epoch index (epochs all runs reached).
fn per_epoch(reports: &[&Report], f: impl Fn(&Report, usize) -> f64) -> Vec<Stats> {
    let epochs = reports.iter().map(|r| r.epochs.len()).min().unwrap_or(0);
    (0..epochs)
        .filter_map(|e| Stats::of(&reports.iter().map(|r| f(r, e)).collect::<Vec<_>>()))
        .collect()
}

fn draw_err(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |message| PlotError::Draw {
        path: path.to_path_buf(),
        message,
    }
}

/// Writes every figure into `out` and returns their paths.
pub fn plot_all(records: &[RunRecord], out: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let groups = series(records);
    if groups.is_empty() {
        return Err(PlotError::Empty);
    }
    std::fs::create_dir_all(out).map_err(|e| draw_err(out)(e.to_string()))?;
    let accuracy: Vec<(String, Vec<(f64, Stats)>)> = groups
        .iter()
        .map(|(name, reports)| {
            let acc = per_epoch(reports, |r, e| 100.0 * r.epochs[e].test_accuracy);
            (
                name.clone(),
                acc.into_iter()
                    .enumerate()
                    .map(|(e, s)| ((e + 1) as f64, s))
                    .collect(),
            )
        })
        .collect();
    let by_bytes: Vec<(String, Vec<(f64, Stats)>)> = groups
        .iter()
        .map(|(name, reports)| {
            let bytes = per_epoch(reports, |r, e| {
                r.epochs[..=e]
                    .iter()
                    .map(|m| m.bytes.total as f64)
                    .sum::<f64>()
                    / (1u64 << 20) as f64
            });
            let acc = per_epoch(reports, |r, e| 100.0 * r.epochs[e].test_accuracy);
            (
                name.clone(),
                bytes.iter().zip(acc).map(|(b, a)| (b.mean, a)).collect(),
            )
        })
        .collect();
    let mut written = Vec::new();
    let path = out.join("accuracy_vs_epoch.svg");
    lines(
        &path,
        "Test accuracy per epoch (mean ± std over seeds)",
        "epoch",
        "test accuracy (%)",
        &accuracy,
    )?;
    written.push(path);
    let path = out.join("accuracy_vs_bytes.svg");
    lines(
        &path,
        "Test accuracy against data exchanged",
        "cumulative bytes exchanged: cut tensors + client weights (MiB)",
        "test accuracy (%)",
        &by_bytes,
    )?;
    written.push(path);

    let bars_of = |f: &dyn Fn(&Report) -> Option<f64>| -> Vec<(String, String, Stats)> {
        let mut cells: BTreeMap<(usize, String), (String, Vec<f64>)> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        for record in records.iter().filter(|r| r.status == RunStatus::Completed) {
            let Some(report) = &record.report else {
                continue;
            };
            let cut = key_value(record, "model.cut").unwrap_or_else(|| "—".into());
            if !order.contains(&cut) {
                order.push(cut.clone());
            }
            let slot = order.iter().position(|c| *c == cut).unwrap_or(0);
            if let Some(v) = f(report) {
                cells
                    .entry((slot, report.mode.name().to_string()))
                    .or_insert_with(|| (cut.clone(), Vec::new()))
                    .1
                    .push(v);
            }
        }
        cells
            .into_iter()
            .filter_map(|((_, mode), (cut, vs))| Stats::of(&vs).map(|s| (cut, mode, s)))
            .collect()
    };
    let path = out.join("peak_memory.svg");
    bars(
        &path,
        "Peak memory of a training step",
        "peak memory above baseline (MiB)",
        &bars_of(&|r| r.peak_memory_bytes.map(|b| b as f64 / (1u64 << 20) as f64)),
    )?;
    written.push(path);
    let path = out.join("seconds_per_epoch.svg");
    bars(
        &path,
        "Training time per epoch",
        "seconds per epoch",
        &bars_of(&|r| {
            (!r.epochs.is_empty()).then(|| {
                r.epochs.iter().map(|e| e.train_seconds).sum::<f64>() / r.epochs.len() as f64
            })
        }),
    )?;
    written.push(path);
    Ok(written)
}

fn padded_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.05).max(1e-6);
    (lo - pad)..(hi + pad)
}

/// Lines with ±std bands.
fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    data: &[(String, Vec<(f64, Stats)>)],
) -> Result<(), PlotError> {
    let err = draw_err(path);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let xs = padded_range(data.iter().flat_map(|(_, p)| p.iter().map(|(x, _)| *x)));
    let ys = padded_range(
        data.iter()
            .flat_map(|(_, p)| p.iter().flat_map(|(_, s)| [s.mean - s.std, s.mean + s.std])),
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(xs, ys)
        .map_err(|e| err(e.to_string()))?;
    // Whole-number x values (epochs) get one label each, without decimals.
    let integral = data
        .iter()
        .flat_map(|(_, p)| p.iter())
        .all(|(x, _)| x.fract() == 0.0);
    let distinct = data.iter().map(|(_, p)| p.len()).max().unwrap_or(1);
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(x_label).y_desc(y_label).light_line_style(WHITE);
    let whole = |x: &f64| {
        if x.fract().abs() < 1e-9 {
            format!("{x:.0}")
        } else {
            String::new()
        }
    };
    if integral {
        mesh.x_labels(distinct + 2).x_label_formatter(&whole);
    }
    mesh.draw().map_err(|e| err(e.to_string()))?;
    for (i, (name, points)) in data.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let mut band: Vec<(f64, f64)> = points.iter().map(|(x, s)| (*x, s.mean + s.std)).collect();
        band.extend(points.iter().rev().map(|(x, s)| (*x, s.mean - s.std)));
        chart
            .draw_series(std::iter::once(Polygon::new(
                band,
                colour.mix(0.2).filled(),
            )))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|(x, s)| (*x, s.mean)),
                colour.stroke_width(2),
            ))
            .map_err(|e| err(e.to_string()))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .iter()
                    .map(|(x, s)| Circle::new((*x, s.mean), 3, colour.filled())),
            )
            .map_err(|e| err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Grouped bars: one group per cut, one bar per mode, with ±std whiskers.
fn bars(
    path: &Path,
    title: &str,
    y_label: &str,
    cells: &[(String, String, Stats)],
) -> Result<(), PlotError> {
    let err = draw_err(path);
    let mut cuts: Vec<&str> = Vec::new();
    let mut modes: Vec<&str> = Vec::new();
    for (cut, mode, _) in cells {
        if !cuts.contains(&cut.as_str()) {
            cuts.push(cut);
        }
        if !modes.contains(&mode.as_str()) {
            modes.push(mode);
        }
    }
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let top = cells
        .iter()
        .map(|(_, _, s)| s.mean + s.std)
        .fold(0.0, f64::max)
        * 1.15;
    let labels: Vec<String> = cuts.iter().map(|c| c.to_string()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(cuts.len() as f64 - 0.5), 0f64..top.max(1e-6))
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_labels(cuts.len().max(1))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                labels
                    .get(i as usize)
                    .map(|c| format!("cut {c}"))
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("cut")
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let width = 0.8 / modes.len().max(1) as f64;
    for (m, mode) in modes.iter().enumerate() {
        let colour = PALETTE[m % PALETTE.len()];
        let mine: Vec<(f64, Stats)> = cells
            .iter()
            .filter(|(_, md, _)| md == mode)
            .map(|(cut, _, s)| {
                let c = cuts.iter().position(|x| x == cut).unwrap_or(0) as f64;
                (c - 0.4 + width * m as f64, *s)
            })
            .collect();
        chart
            .draw_series(mine.iter().map(|(x, s)| {
                Rectangle::new(
                    [(*x + 0.05 * width, 0.0), (*x + 0.95 * width, s.mean)],
                    colour.filled(),
                )
            }))
            .map_err(|e| err(e.to_string()))?
            .label(mode.to_string())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], colour.filled()));
        chart
            .draw_series(mine.iter().map(|(x, s)| {
                let centre = *x + width / 2.0;
                PathElement::new(
                    vec![(centre, s.mean - s.std), (centre, s.mean + s.std)],
                    BLACK.stroke_width(1),
                )
            }))
            .map_err(|e| err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}
