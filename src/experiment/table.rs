//! Aggregating `runs.jsonl` over seeds into paper-style tables: mean ± std (and n) per cell,
//! plus decoupled/coupled ratios when the columns are the training mode.

use std::collections::BTreeMap;

use serde::Serialize;

use super::log::RunRecord;
use crate::report::{Metric, RunStatus};

/// Mean, sample standard deviation and count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

impl Stats {
    pub fn of(values: &[f64]) -> Option<Self> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = if n > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(Self { mean, std, n })
    }
}

/// The value of grouping key `key` for a run: `seed`, an axis of the sweep, or any config path
/// (`model.cut`, `train.mode`, …).
pub fn key_value(record: &RunRecord, key: &str) -> Option<String> {
    if key == "seed" {
        return Some(record.seed.to_string());
    }
    if let Some((_, v)) = record.axes.iter().find(|(k, _)| k == key) {
        return Some(v.clone());
    }
    let config = serde_json::to_value(&record.report.as_ref()?.config).ok()?;
    let value = key.split('.').try_fold(&config, |v, part| v.get(part))?;
    Some(match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// One aggregated cell.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cell {
    pub row: String,
    pub col: String,
    pub metric: Metric,
    #[serde(flatten)]
    pub stats: Stats,
}

/// A decoupled/coupled ratio of means.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ratio {
    pub row: String,
    pub metric: Metric,
    pub decoupled_over_coupled: f64,
}

/// The aggregated table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Table {
    pub rows_key: String,
    pub cols_key: String,
    /// Row and column values in order of first appearance.
    pub rows: Vec<String>,
    pub cols: Vec<String>,
    pub cells: Vec<Cell>,
    pub ratios: Vec<Ratio>,
    /// Runs left out because they did not complete.
    pub excluded: usize,
}

/// Aggregates the completed runs of `records`.
pub fn aggregate(
    records: &[RunRecord],
    rows_key: &str,
    cols_key: &str,
    metrics: &[Metric],
) -> Table {
    let mut rows: Vec<String> = Vec::new();
    let mut cols: Vec<String> = Vec::new();
    let mut values: BTreeMap<(usize, usize, usize), Vec<f64>> = BTreeMap::new();
    let mut excluded = 0;
    for record in records {
        let Some(report) = record
            .report
            .as_ref()
            .filter(|_| record.status == RunStatus::Completed)
        else {
            excluded += 1;
            continue;
        };
        let row = key_value(record, rows_key).unwrap_or_else(|| "—".into());
        let col = key_value(record, cols_key).unwrap_or_else(|| "—".into());
        let r = position(&mut rows, row);
        let c = position(&mut cols, col);
        for (m, metric) in metrics.iter().enumerate() {
            if let Some(v) = metric.of(report) {
                values.entry((r, m, c)).or_default().push(v);
            }
        }
    }
    let mut cells = Vec::new();
    for ((r, m, c), vs) in &values {
        if let Some(stats) = Stats::of(vs) {
            cells.push(Cell {
                row: rows[*r].clone(),
                col: cols[*c].clone(),
                metric: metrics[*m],
                stats,
            });
        }
    }
    let mut ratios = Vec::new();
    if cols_key == "train.mode" {
        for row in &rows {
            for &metric in metrics.iter().filter(|m| !m.is_accuracy()) {
                let mean = |col: &str| {
                    cells
                        .iter()
                        .find(|c| &c.row == row && c.col == col && c.metric == metric)
                        .map(|c| c.stats.mean)
                };
                if let (Some(d), Some(c)) = (mean("decoupled"), mean("coupled"))
                    && c > 0.0
                {
                    ratios.push(Ratio {
                        row: row.clone(),
                        metric,
                        decoupled_over_coupled: d / c,
                    });
                }
            }
        }
    }
    Table {
        rows_key: rows_key.into(),
        cols_key: cols_key.into(),
        rows,
        cols,
        cells,
        ratios,
        excluded,
    }
}

fn position(list: &mut Vec<String>, value: String) -> usize {
    match list.iter().position(|v| *v == value) {
        Some(i) => i,
        None => {
            list.push(value);
            list.len() - 1
        }
    }
}

impl Table {
    fn cell(&self, row: &str, col: &str, metric: Metric) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.row == row && c.col == col && c.metric == metric)
    }

    fn ratio(&self, row: &str, metric: Metric) -> Option<f64> {
        self.ratios
            .iter()
            .find(|r| r.row == row && r.metric == metric)
            .map(|r| r.decoupled_over_coupled)
    }

    fn metrics(&self) -> Vec<Metric> {
        let mut metrics: Vec<Metric> = Vec::new();
        for cell in &self.cells {
            if !metrics.contains(&cell.metric) {
                metrics.push(cell.metric);
            }
        }
        metrics
    }

    /// A Markdown table: one line per row value and metric, one column per column value.
    pub fn markdown(&self) -> String {
        let with_ratio = !self.ratios.is_empty();
        let mut header = vec![self.rows_key.clone(), "metric".into()];
        header.extend(self.cols.iter().map(|c| format!("{} = {c}", self.cols_key)));
        if with_ratio {
            header.push("decoupled/coupled".into());
        }
        let mut out = format!("| {} |\n", header.join(" | "));
        out.push_str(&format!("|{}\n", " --- |".repeat(header.len())));
        for row in &self.rows {
            for metric in self.metrics() {
                let mut line = vec![row.clone(), metric.label().to_string()];
                for col in &self.cols {
                    line.push(match self.cell(row, col, metric) {
                        Some(c) => format!(
                            "{} ± {} (n={})",
                            metric.format(c.stats.mean),
                            metric.format(c.stats.std),
                            c.stats.n
                        ),
                        None => "—".into(),
                    });
                }
                if with_ratio {
                    line.push(
                        self.ratio(row, metric)
                            .map_or(String::new(), |r| format!("{r:.2}")),
                    );
                }
                out.push_str(&format!("| {} |\n", line.join(" | ")));
            }
        }
        out
    }

    /// CSV: one line per cell (`row,col,metric,mean,std,n`), then the ratios.
    pub fn csv(&self) -> String {
        let mut out = format!("{},{},metric,mean,std,n\n", self.rows_key, self.cols_key);
        for c in &self.cells {
            out.push_str(&format!(
                "{},{},{},{},{},{}\n",
                csv_field(&c.row),
                csv_field(&c.col),
                serde_json::to_value(c.metric)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                c.stats.mean,
                c.stats.std,
                c.stats.n
            ));
        }
        for r in &self.ratios {
            out.push_str(&format!(
                "{},decoupled/coupled,{},{},,\n",
                csv_field(&r.row),
                serde_json::to_value(r.metric)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                r.decoupled_over_coupled
            ));
        }
        out
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_mean_sample_std_n() {
        let s = Stats::of(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.mean, s.n), (2.0, 3));
        assert!((s.std - 1.0).abs() < 1e-12);
        assert_eq!(Stats::of(&[5.0]).unwrap().std, 0.0);
        assert!(Stats::of(&[]).is_none());
    }
}
