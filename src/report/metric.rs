//! The quantities read from a run's report: one list, used by the run summary, the
//! coupled/decoupled comparison, sweep tables and the command line.

use serde::{Deserialize, Serialize};

use super::{Report, human_bytes};
use crate::memory::PeakMemory;

/// A quantity read from each run's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Final test accuracy of the split model.
    TestAccuracy,
    /// Final test accuracy of the auxiliary head (decoupled).
    AuxAccuracy,
    /// Mean bytes across the cut per epoch (all kinds).
    BytesPerEpoch,
    /// Activation + gradient bytes of the whole run (the paper's communication).
    CutBytes,
    /// All bytes of the whole run.
    BytesTotal,
    /// Bytes leaving the clients (activations, labels, hand-offs).
    BytesUp,
    /// Bytes arriving at the clients.
    BytesDown,
    /// Client-side weights and optimizer state handed between clients, whole run.
    WeightBytes,
    /// Peak extra memory of a training step.
    PeakMemory,
    /// Peak extra memory while the client computes.
    ClientPeak,
    /// Peak extra memory while the server computes.
    ServerPeak,
    /// Mean training seconds per epoch.
    SecondsPerEpoch,
}

impl Metric {
    pub const ALL: [Metric; 12] = [
        Metric::TestAccuracy,
        Metric::AuxAccuracy,
        Metric::BytesPerEpoch,
        Metric::CutBytes,
        Metric::BytesTotal,
        Metric::BytesUp,
        Metric::BytesDown,
        Metric::WeightBytes,
        Metric::PeakMemory,
        Metric::ClientPeak,
        Metric::ServerPeak,
        Metric::SecondsPerEpoch,
    ];

    /// The name on the command line and in JSON (`test-accuracy`, …).
    pub fn name(self) -> &'static str {
        match self {
            Metric::TestAccuracy => "test-accuracy",
            Metric::AuxAccuracy => "aux-accuracy",
            Metric::BytesPerEpoch => "bytes-per-epoch",
            Metric::CutBytes => "cut-bytes",
            Metric::BytesTotal => "bytes-total",
            Metric::BytesUp => "bytes-up",
            Metric::BytesDown => "bytes-down",
            Metric::WeightBytes => "weight-bytes",
            Metric::PeakMemory => "peak-memory",
            Metric::ClientPeak => "client-peak",
            Metric::ServerPeak => "server-peak",
            Metric::SecondsPerEpoch => "seconds-per-epoch",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Metric::TestAccuracy => "test accuracy",
            Metric::AuxAccuracy => "aux-head accuracy",
            Metric::BytesPerEpoch => "bytes per epoch",
            Metric::CutBytes => "activation+gradient bytes",
            Metric::BytesTotal => "bytes total",
            Metric::BytesUp => "bytes up",
            Metric::BytesDown => "bytes down",
            Metric::WeightBytes => "weight bytes",
            Metric::PeakMemory => "peak memory",
            Metric::ClientPeak => "client-phase peak",
            Metric::ServerPeak => "server-phase peak",
            Metric::SecondsPerEpoch => "seconds per epoch",
        }
    }

    pub fn is_accuracy(self) -> bool {
        matches!(self, Metric::TestAccuracy | Metric::AuxAccuracy)
    }

    fn is_bytes(self) -> bool {
        !self.is_accuracy() && self != Metric::SecondsPerEpoch
    }

    /// The value of this metric in `report`, if it has one.
    pub fn of(self, r: &Report) -> Option<f64> {
        let peak = |f: fn(&PeakMemory) -> u64| r.peak_memory.as_ref().map(|p| f(&p.peaks) as f64);
        match self {
            Metric::TestAccuracy => r.test_accuracy,
            Metric::AuxAccuracy => r.aux_accuracy,
            Metric::BytesPerEpoch => Some(r.bytes_per_epoch.total as f64),
            Metric::CutBytes => Some(r.bytes.cut_tensors() as f64),
            Metric::BytesTotal => Some(r.bytes.total as f64),
            Metric::BytesUp => Some(r.bytes.up as f64),
            Metric::BytesDown => Some(r.bytes.down as f64),
            Metric::WeightBytes => Some(r.bytes.model_transfer() as f64),
            Metric::PeakMemory => r.peak_memory_bytes.map(|b| b as f64),
            Metric::ClientPeak => peak(|p| p.client_phase),
            Metric::ServerPeak => peak(|p| p.server_phase),
            Metric::SecondsPerEpoch => (!r.epochs.is_empty()).then(|| {
                r.epochs.iter().map(|e| e.train_seconds).sum::<f64>() / r.epochs.len() as f64
            }),
        }
    }

    pub fn format(self, value: f64) -> String {
        if self.is_accuracy() {
            format!("{:.2} %", 100.0 * value)
        } else if self.is_bytes() {
            human_bytes(value.round() as u64)
        } else {
            format!("{value:.1} s")
        }
    }
}

impl std::str::FromStr for Metric {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Metric::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
                format!("`{s}` is not a metric: use one of {}", names.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for m in Metric::ALL {
            assert_eq!(m.name().parse::<Metric>().unwrap(), m);
            let json = format!("\"{}\"", m.name().replace('-', "_"));
            assert_eq!(serde_json::to_string(&m).unwrap(), json);
        }
        assert!(
            "speed"
                .parse::<Metric>()
                .unwrap_err()
                .contains("test-accuracy")
        );
    }
}
