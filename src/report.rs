//! The JSON report of a run (a stable interface: see the README) and the human-readable tables.

use serde::{Deserialize, Serialize};

use crate::config::{ExperimentConfig, Mode};
use crate::link::Traffic;
use crate::memory::{MemorySource, PeakMemory};

/// Bytes that crossed the cut, by kind and direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bytes {
    pub activations: u64,
    pub labels: u64,
    pub gradients: u64,
    /// Client → server (activations + labels).
    pub up: u64,
    /// Server → client (gradients).
    pub down: u64,
    pub total: u64,
    pub messages: u64,
}

impl From<Traffic> for Bytes {
    fn from(t: Traffic) -> Self {
        Self {
            activations: t.activations,
            labels: t.labels,
            gradients: t.gradients,
            up: t.up(),
            down: t.down(),
            total: t.total(),
            messages: t.messages,
        }
    }
}

impl Bytes {
    /// Activations + gradients: the traffic the paper compares.
    pub fn cut_tensors(&self) -> u64 {
        self.activations + self.gradients
    }
}

/// Metrics of one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based.
    pub epoch: usize,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Mean server (true) loss over the epoch's steps.
    pub server_loss: f64,
    /// Mean client auxiliary loss (decoupled; null in coupled mode).
    pub client_loss: Option<f64>,
    /// Accuracy of the whole split model on the test set (0–1).
    pub test_accuracy: f64,
    /// Accuracy of the client's auxiliary head alone (decoupled; null in coupled mode).
    pub aux_accuracy: Option<f64>,
    /// Bytes that crossed the cut during this epoch.
    pub bytes: Bytes,
    /// Wall time of the epoch's training steps (evaluation excluded).
    pub train_seconds: f64,
    /// Of which building batches (decode, augment, normalize, copy to tensors).
    pub data_seconds: f64,
    /// Wall time of the epoch's evaluation.
    pub eval_seconds: f64,
    pub images_per_s: f64,
}

/// Measured peak memory of a training step, above the bytes live when the step began.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeakMemoryReport {
    pub step: u64,
    pub client_phase: u64,
    pub server_phase: u64,
    /// Bytes live before training started (model, dataset, buffers).
    pub baseline: u64,
    /// `host_allocator` (exact) or `device_pool` (sampled at phase changes).
    pub source: MemorySource,
}

impl PeakMemoryReport {
    pub fn new(peaks: PeakMemory, baseline: u64, source: MemorySource) -> Self {
        Self {
            step: peaks.step,
            client_phase: peaks.client_phase,
            server_phase: peaks.server_phase,
            baseline,
            source,
        }
    }
}

/// The cut of the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutReport {
    /// Residual blocks on the client.
    pub blocks: usize,
    pub total_blocks: usize,
    /// `[channels, height, width]` of one image's activations at the cut.
    pub activation_shape: [usize; 3],
}

/// Trainable parameter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parameters {
    pub client: usize,
    pub aux_head: usize,
    pub server: usize,
}

/// Everything about one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub splitaux_version: String,
    pub mode: Mode,
    /// `completed`, or `diverged` (then `error` says where).
    pub status: String,
    pub error: Option<String>,
    pub dataset: String,
    pub train_images: usize,
    pub test_images: usize,
    pub cut: CutReport,
    pub parameters: Parameters,
    /// Test accuracy after the last finished epoch (0–1); null if none finished.
    pub test_accuracy: Option<f64>,
    /// Auxiliary-head test accuracy after the last finished epoch (decoupled only).
    pub aux_accuracy: Option<f64>,
    pub epochs: Vec<EpochMetrics>,
    /// Whole-run traffic.
    pub bytes: Bytes,
    /// Mean traffic per finished epoch.
    pub bytes_per_epoch: Bytes,
    /// Highest extra bytes over a training step; null when the backend reports no memory.
    pub peak_memory_bytes: Option<u64>,
    pub peak_memory: Option<PeakMemoryReport>,
    /// Whole run, including data loading and evaluation.
    pub wall_seconds: f64,
    pub config: ExperimentConfig,
}

/// Bytes in binary units.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn percent(x: Option<f64>) -> String {
    x.map_or("—".into(), |v| format!("{:.2} %", 100.0 * v))
}

fn memory(x: Option<u64>) -> String {
    x.map_or("n/a".into(), human_bytes)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "n/a".into(),
    }
}

fn seconds_per_epoch(r: &Report) -> Option<f64> {
    (!r.epochs.is_empty())
        .then(|| r.epochs.iter().map(|e| e.train_seconds).sum::<f64>() / r.epochs.len() as f64)
}

/// One run as a short table.
pub fn summary(r: &Report) -> String {
    let mut rows = vec![
        ("mode", r.mode.name().to_string()),
        ("status", r.status.clone()),
        (
            "cut",
            format!(
                "{} of {} blocks, activations {:?}",
                r.cut.blocks, r.cut.total_blocks, r.cut.activation_shape
            ),
        ),
        ("test accuracy", percent(r.test_accuracy)),
        ("aux-head accuracy", percent(r.aux_accuracy)),
        ("bytes up (total)", human_bytes(r.bytes.up)),
        ("bytes down (total)", human_bytes(r.bytes.down)),
        ("bytes per epoch", human_bytes(r.bytes_per_epoch.total)),
        ("peak step memory", memory(r.peak_memory_bytes)),
        (
            "peak client / server phase",
            match &r.peak_memory {
                Some(p) => format!(
                    "{} / {}",
                    human_bytes(p.client_phase),
                    human_bytes(p.server_phase)
                ),
                None => "n/a".into(),
            },
        ),
        (
            "seconds per epoch",
            seconds_per_epoch(r).map_or("—".into(), |s| format!("{s:.1}")),
        ),
        ("wall time", format!("{:.1} s", r.wall_seconds)),
    ];
    if let Some(error) = &r.error {
        rows.push(("error", error.clone()));
    }
    render(
        &["", ""],
        &rows
            .into_iter()
            .map(|(k, v)| vec![k.to_string(), v])
            .collect::<Vec<_>>(),
    )
}

/// Coupled and decoupled side by side, with the decoupled/coupled ratios.
pub fn comparison(coupled: &Report, decoupled: &Report) -> String {
    let both = |f: &dyn Fn(&Report) -> String| vec![f(coupled), f(decoupled)];
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut row = |name: &str, values: Vec<String>, ratio: String| {
        let mut r = vec![name.to_string()];
        r.extend(values);
        r.push(ratio);
        rows.push(r);
    };
    row(
        "test accuracy",
        both(&|r| percent(r.test_accuracy)),
        String::new(),
    );
    row(
        "aux-head accuracy",
        both(&|r| percent(r.aux_accuracy)),
        String::new(),
    );
    let cut = |r: &Report| Some(r.bytes.cut_tensors() as f64);
    row(
        "activation+gradient bytes",
        both(&|r| human_bytes(r.bytes.cut_tensors())),
        ratio(cut(decoupled), cut(coupled)),
    );
    let per_epoch = |r: &Report| Some(r.bytes_per_epoch.total as f64);
    row(
        "bytes per epoch (all)",
        both(&|r| human_bytes(r.bytes_per_epoch.total)),
        ratio(per_epoch(decoupled), per_epoch(coupled)),
    );
    row(
        "bytes up (total)",
        both(&|r| human_bytes(r.bytes.up)),
        String::new(),
    );
    row(
        "bytes down (total)",
        both(&|r| human_bytes(r.bytes.down)),
        String::new(),
    );
    let total = |r: &Report| Some(r.bytes.total as f64);
    row(
        "bytes total",
        both(&|r| human_bytes(r.bytes.total)),
        ratio(total(decoupled), total(coupled)),
    );
    let peak = |r: &Report| r.peak_memory_bytes.map(|b| b as f64);
    row(
        "peak step memory",
        both(&|r| memory(r.peak_memory_bytes)),
        ratio(peak(decoupled), peak(coupled)),
    );
    let phase = |r: &Report, server: bool| {
        r.peak_memory.map(|p| {
            if server {
                p.server_phase
            } else {
                p.client_phase
            }
        })
    };
    row(
        "peak client phase",
        both(&|r| memory(phase(r, false))),
        ratio(
            phase(decoupled, false).map(|b| b as f64),
            phase(coupled, false).map(|b| b as f64),
        ),
    );
    row(
        "peak server phase",
        both(&|r| memory(phase(r, true))),
        ratio(
            phase(decoupled, true).map(|b| b as f64),
            phase(coupled, true).map(|b| b as f64),
        ),
    );
    row(
        "seconds per epoch",
        both(&|r| seconds_per_epoch(r).map_or("—".into(), |s| format!("{s:.1}"))),
        ratio(seconds_per_epoch(decoupled), seconds_per_epoch(coupled)),
    );
    render(&["", "coupled", "decoupled", "decoupled/coupled"], &rows)
}

/// A plain aligned text table.
fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let columns = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i] - cell.chars().count();
            if i == 0 {
                out.push_str(cell);
                out.push_str(&" ".repeat(pad));
            } else {
                out.push_str("  ");
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            }
        }
        out.trim_end().to_string()
    };
    let mut out = String::new();
    if header.iter().any(|h| !h.is_empty()) {
        out.push_str(&line(header.to_vec()));
        out.push('\n');
    }
    for row in rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).take(columns).collect();
        out.push_str(&line(cells));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }

    #[test]
    fn table_aligns_columns() {
        let t = render(
            &["", "a"],
            &[
                vec!["x".into(), "1".into()],
                vec!["long".into(), "22".into()],
            ],
        );
        assert_eq!(t, "       a\nx      1\nlong  22\n");
    }
}
