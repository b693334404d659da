//! The byte ledger: encoded frame lengths by message kind and direction.

use serde::{Deserialize, Serialize};

use super::{Direction, MessageKind};

/// Bytes of encoded frames, by kind and by direction. The same type counts one endpoint, one
/// client, one epoch or a whole run; it is what the JSON report prints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Bytes {
    pub activations: u64,
    pub labels: u64,
    pub gradients: u64,
    /// Client-side parameters and BatchNorm buffers handed over.
    pub weights: u64,
    /// Client-side optimizer state handed over.
    pub optimizer_state: u64,
    /// Frames a client sent (to the server or to the next client).
    pub up: u64,
    /// Frames a client received. In a run's totals, where each frame counts once (by its
    /// sender), these are the server's frames; a client's own ledger also counts hand-offs it
    /// received.
    pub down: u64,
    pub total: u64,
    /// Frames counted.
    pub messages: u64,
}

impl Bytes {
    /// Counts one frame of `len` bytes.
    pub fn record(&mut self, kind: MessageKind, direction: Direction, len: u64) {
        *self.kind_mut(kind) += len;
        match direction {
            Direction::Up => self.up += len,
            Direction::Down => self.down += len,
        }
        self.total += len;
        self.messages += 1;
    }

    fn kind_mut(&mut self, kind: MessageKind) -> &mut u64 {
        match kind {
            MessageKind::Activations => &mut self.activations,
            MessageKind::Labels => &mut self.labels,
            MessageKind::Gradients => &mut self.gradients,
            MessageKind::Weights => &mut self.weights,
            MessageKind::OptimizerState => &mut self.optimizer_state,
        }
    }

    /// Activations + gradients: the traffic at the cut that the paper compares.
    pub fn cut_tensors(&self) -> u64 {
        self.activations + self.gradients
    }

    /// Weights + optimizer state: what moving the client-side model costs.
    pub fn model_transfer(&self) -> u64 {
        self.weights + self.optimizer_state
    }

    /// Field by field `f(self, other)`.
    fn zip(&self, other: &Bytes, f: impl Fn(u64, u64) -> u64) -> Bytes {
        Bytes {
            activations: f(self.activations, other.activations),
            labels: f(self.labels, other.labels),
            gradients: f(self.gradients, other.gradients),
            weights: f(self.weights, other.weights),
            optimizer_state: f(self.optimizer_state, other.optimizer_state),
            up: f(self.up, other.up),
            down: f(self.down, other.down),
            total: f(self.total, other.total),
            messages: f(self.messages, other.messages),
        }
    }

    /// The counts since `earlier` (a snapshot of the same ledger).
    pub fn since(&self, earlier: &Bytes) -> Bytes {
        self.zip(earlier, u64::saturating_sub)
    }

    /// Every count divided by `n` (at least 1), rounded down.
    pub fn per(&self, n: usize) -> Bytes {
        let n = n.max(1) as u64;
        self.zip(&Bytes::default(), |a, _| a / n)
    }
}

impl std::ops::Add for Bytes {
    type Output = Bytes;

    fn add(self, other: Bytes) -> Bytes {
        self.zip(&other, |a, b| a + b)
    }
}

impl std::iter::Sum for Bytes {
    fn sum<I: Iterator<Item = Bytes>>(iter: I) -> Bytes {
        iter.fold(Bytes::default(), |a, b| a + b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_by_kind_and_direction() {
        let mut b = Bytes::default();
        b.record(MessageKind::Activations, Direction::Up, 100);
        b.record(MessageKind::Gradients, Direction::Down, 100);
        b.record(MessageKind::Weights, Direction::Up, 40);
        assert_eq!((b.up, b.down, b.total, b.messages), (140, 100, 240, 3));
        assert_eq!((b.cut_tensors(), b.model_transfer()), (200, 40));
        let snapshot = b;
        b.record(MessageKind::Labels, Direction::Up, 8);
        let delta = b.since(&snapshot);
        assert_eq!((delta.labels, delta.total, delta.messages), (8, 8, 1));
        assert_eq!((snapshot + delta), b);
        assert_eq!(b.per(2).total, 124);
    }
}
