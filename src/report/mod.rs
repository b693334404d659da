//! The JSON report of a run (a stable interface: see the README), the metrics read from it, and
//! the human-readable tables.

mod metric;

pub use metric::Metric;

use serde::{Deserialize, Serialize};

use crate::config::{ExperimentConfig, Mode};
use crate::memory::{MemorySource, PeakMemory};
pub use crate::protocol::Bytes;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Every epoch finished.
    Completed,
    /// A NaN/infinite loss stopped the run (`error` says where).
    Diverged,
    /// The run stopped on an error: a sweep's run that could not start (recorded with no
    /// report), or a multi-process run whose peer failed (the server writes the epochs finished
    /// so far; `error` names the peer, epoch and step).
    Failed,
    /// Still training: the report a multi-process server writes after each finished epoch.
    Running,
}

impl RunStatus {
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Completed => "completed",
            RunStatus::Diverged => "diverged",
            RunStatus::Failed => "failed",
            RunStatus::Running => "running",
        }
    }
}

/// One client of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientReport {
    pub id: usize,
    /// Training images in the client's shard.
    pub images: usize,
    /// The shard's images per class.
    pub class_histogram: Vec<usize>,
    /// What this client sent (`up`) and received (`down`), by kind.
    pub bytes: Bytes,
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
    /// Bytes exchanged during this epoch (cut tensors, labels, hand-offs).
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
    /// `step`, `client_phase`, `server_phase`.
    #[serde(flatten)]
    pub peaks: PeakMemory,
    /// Bytes live before training started (model, dataset, buffers).
    pub baseline: u64,
    /// SplitFed v1: bytes of the server's per-client copies of its model (parameters and
    /// BatchNorm buffers; their optimizer state comes on top during a round), measured while
    /// they are built at set-up and so part of `baseline`; 0 otherwise.
    #[serde(default)]
    pub server_copies: u64,
    /// `host_allocator` (exact) or `device_pool` (sampled at phase changes).
    pub source: MemorySource,
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
    pub status: RunStatus,
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
    /// Per client: its shard and its traffic.
    #[serde(default)]
    pub clients: Vec<ClientReport>,
    /// Highest extra bytes over a training step; null when the backend reports no memory.
    pub peak_memory_bytes: Option<u64>,
    pub peak_memory: Option<PeakMemoryReport>,
    /// Whole run, including data loading and evaluation.
    pub wall_seconds: f64,
    pub config: ExperimentConfig,
    /// Runs whose parties are separate processes: the network's side of the traffic (absent
    /// from in-process runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkReport>,
}

/// What a multi-process run moved besides the training frames in `bytes`, seen from the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkReport {
    /// `grpc`.
    pub transport: String,
    /// Whether the links were encrypted (TLS).
    pub tls: bool,
    /// Evaluation traffic: the test activations and labels the evaluating client sent, and the
    /// global client-side model sent to it for evaluation (SplitFed); counted like `bytes`.
    pub eval_bytes: Bytes,
    /// Control messages (hello, per-step auxiliary losses, end of epoch, …), both ways.
    pub control_bytes: u64,
    /// Hand-off frames the server relayed from one client to the next (already in `bytes`,
    /// counted there once by their sender).
    pub relayed_bytes: u64,
    /// Bytes on the server's sockets, gRPC, HTTP/2 and TLS framing included: sent and received
    /// over all links.
    pub wire_sent: u64,
    pub wire_received: u64,
    /// Per client: its peer address and its link's socket bytes.
    pub clients: Vec<ClientWire>,
}

/// One client's link, seen from the server's socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientWire {
    pub id: usize,
    pub peer: String,
    pub wire_sent: u64,
    pub wire_received: u64,
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

/// A metric's value in `r`, formatted (`—` where the run has none).
fn shown(metric: Metric, r: &Report) -> String {
    match metric.of(r) {
        Some(v) => metric.format(v),
        None if metric.is_accuracy() => "—".into(),
        None => "n/a".into(),
    }
}

/// One run as a short table.
pub fn summary(r: &Report) -> String {
    let mut rows = vec![
        vec!["mode".to_string(), r.mode.name().to_string()],
        vec!["status".to_string(), r.status.name().to_string()],
        vec![
            "cut".to_string(),
            format!(
                "{} of {} blocks, activations {:?}",
                r.cut.blocks, r.cut.total_blocks, r.cut.activation_shape
            ),
        ],
    ];
    if r.clients.len() > 1 {
        let c = &r.config.clients;
        rows.push(vec![
            "clients".to_string(),
            format!(
                "{} ({}, {} partition)",
                r.clients.len(),
                c.schedule.name(),
                c.partition.name()
            ),
        ]);
    }
    for metric in [
        Metric::TestAccuracy,
        Metric::AuxAccuracy,
        Metric::CutBytes,
        Metric::WeightBytes,
        Metric::BytesUp,
        Metric::BytesDown,
        Metric::BytesPerEpoch,
        Metric::PeakMemory,
        Metric::ClientPeak,
        Metric::ServerPeak,
        Metric::SecondsPerEpoch,
    ] {
        rows.push(vec![metric.label().to_string(), shown(metric, r)]);
    }
    rows.push(vec!["wall time".into(), format!("{:.1} s", r.wall_seconds)]);
    if let Some(error) = &r.error {
        rows.push(vec!["error".into(), error.clone()]);
    }
    render(&["", ""], &rows)
}

/// Coupled and decoupled side by side, with the decoupled/coupled ratios of every quantity
/// that is not an accuracy.
pub fn comparison(coupled: &Report, decoupled: &Report) -> String {
    let rows: Vec<Vec<String>> = [
        Metric::TestAccuracy,
        Metric::AuxAccuracy,
        Metric::CutBytes,
        Metric::WeightBytes,
        Metric::BytesPerEpoch,
        Metric::BytesUp,
        Metric::BytesDown,
        Metric::BytesTotal,
        Metric::PeakMemory,
        Metric::ClientPeak,
        Metric::ServerPeak,
        Metric::SecondsPerEpoch,
    ]
    .into_iter()
    .map(|metric| {
        let ratio = match (metric.of(decoupled), metric.of(coupled)) {
            (Some(d), Some(c)) if !metric.is_accuracy() && c > 0.0 => format!("{:.2}", d / c),
            _ => String::new(),
        };
        vec![
            metric.label().to_string(),
            shown(metric, coupled),
            shown(metric, decoupled),
            ratio,
        ]
    })
    .collect();
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
