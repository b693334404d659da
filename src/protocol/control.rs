//! Control messages between the processes of a run: who a client is and what it runs (hello),
//! the server's answer, per-step auxiliary losses, the epoch's end and evaluation, and how a run
//! ends. Each is one frame of JSON on the link's control channel (see
//! [`crate::transport::mux`]); they are counted apart from the training bytes.

use serde::{Deserialize, Serialize};

use super::Bytes;
use crate::config::ExperimentConfig;

/// The largest control frame accepted (a hello carries the whole configuration: a few KiB).
pub const MAX_CONTROL_BYTES: usize = 256 << 10;

/// One control message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Control {
    /// Client → server, first: who it is, what it runs, and which images its shard holds.
    Hello {
        client: usize,
        version: String,
        config: Box<ExperimentConfig>,
        /// Images in its shard, and a digest of their indices and labels (the seeded partition
        /// of the same data gives the same digest in every process).
        shard_images: usize,
        shard_digest: String,
    },
    /// Server → client: admitted.
    Welcome,
    /// Server → client: not admitted, and why (the link closes).
    Refused { reason: String },
    /// Client → server, decoupled mode, after each trained step: its auxiliary loss, as the
    /// bits of the `f32` (exact, NaN and infinities included).
    AuxLoss { loss_bits: u32 },
    /// Server → client: evaluate the client-side model on the test set now.
    Evaluate { epoch: usize },
    /// Client → server: the evaluation's batches are sent; the auxiliary head's correct
    /// answers (decoupled).
    Evaluated { aux_correct: Option<usize> },
    /// Client → server: the client's part of an epoch is done; what it has sent so far (each
    /// frame counted by its sender) and its whole traffic.
    EpochDone {
        epoch: usize,
        sent: Bytes,
        traffic: Bytes,
    },
    /// Server → client: the epoch is over; start the next one.
    NextEpoch { epoch: usize },
    /// Server → client: the run is finished.
    Done,
    /// Client → server, after `done`: it has everything; the server may close the link.
    Bye,
    /// Either way: the run stops on an error (the reason names the party at fault).
    Stop { reason: String },
}

impl Control {
    pub fn name(&self) -> &'static str {
        match self {
            Control::Hello { .. } => "hello",
            Control::Welcome => "welcome",
            Control::Refused { .. } => "refused",
            Control::AuxLoss { .. } => "aux_loss",
            Control::Evaluate { .. } => "evaluate",
            Control::Evaluated { .. } => "evaluated",
            Control::EpochDone { .. } => "epoch_done",
            Control::NextEpoch { .. } => "next_epoch",
            Control::Done => "done",
            Control::Bye => "bye",
            Control::Stop { .. } => "stop",
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Plain data with string keys: serializing cannot fail.
        serde_json::to_vec(self).expect("control messages serialize")
    }

    /// Parses a control frame, refusing oversized and malformed ones.
    pub fn decode(frame: &[u8]) -> Result<Self, String> {
        if frame.len() > MAX_CONTROL_BYTES {
            return Err(format!(
                "a control message of {} bytes (at most {MAX_CONTROL_BYTES})",
                frame.len()
            ));
        }
        serde_json::from_slice(frame).map_err(|e| format!("a malformed control message: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let hello = Control::Hello {
            client: 1,
            version: "0.1.0".into(),
            config: Box::default(),
            shard_images: 10,
            shard_digest: "ab".into(),
        };
        assert_eq!(Control::decode(&hello.encode()).unwrap(), hello);
        let loss = Control::AuxLoss {
            loss_bits: f32::NAN.to_bits(),
        };
        assert_eq!(Control::decode(&loss.encode()).unwrap(), loss);
        assert!(Control::decode(b"{\"type\":\"launch\"}").is_err());
        assert!(Control::decode(&vec![b' '; MAX_CONTROL_BYTES + 1]).is_err());
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let frame = hello.encode();
        for _ in 0..500 {
            let mut bytes = frame[..rng.random_range(0..frame.len())].to_vec();
            if let Some(b) = bytes.last_mut() {
                *b = rng.random();
            }
            let _ = Control::decode(&bytes);
        }
    }
}
