//! What crosses the cut between client and server.
//!
//! Every tensor that crosses goes through the [`Link`] as a [`Message`]: it is encoded to bytes
//! (header + raw little-endian payload), counted, and decoded on the other side into a fresh
//! tensor that shares nothing with the sender's graph. Today both parties live in one process and
//! the bytes are handed over in memory; a network transport will carry the same encoded bytes.
//!
//! Wire format of a message (all integers little-endian):
//!
//! | bytes | field |
//! | --- | --- |
//! | 2 | magic `SX` |
//! | 1 | format version (1) |
//! | 1 | kind: 1 activations, 2 labels, 3 gradients |
//! | 1 | dtype: 1 f32, 2 i64, 3 i32, 4 u8, 5 f16, 6 bf16, 7 f64 |
//! | 1 | rank r |
//! | 4·r | dimensions, u32 each |
//! | rest | payload, `product(dims) × dtype size` bytes |

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use serde::Serialize;

const MAGIC: &[u8; 2] = b"SX";
const VERSION: u8 = 1;

/// What a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// Client → server: the activations at the cut.
    Activations,
    /// Client → server: the batch's labels (the server computes the true loss).
    Labels,
    /// Server → client: the loss gradient at the cut (coupled mode only).
    Gradients,
}

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → server.
    Up,
    /// Server → client.
    Down,
}

impl MessageKind {
    pub fn direction(self) -> Direction {
        match self {
            MessageKind::Activations | MessageKind::Labels => Direction::Up,
            MessageKind::Gradients => Direction::Down,
        }
    }

    fn code(self) -> u8 {
        match self {
            MessageKind::Activations => 1,
            MessageKind::Labels => 2,
            MessageKind::Gradients => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => MessageKind::Activations,
            2 => MessageKind::Labels,
            3 => MessageKind::Gradients,
            _ => return None,
        })
    }
}

const DTYPES: [(u8, DType); 7] = [
    (1, DType::F32),
    (2, DType::I64),
    (3, DType::I32),
    (4, DType::U8),
    (5, DType::F16),
    (6, DType::BF16),
    (7, DType::F64),
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("message is malformed: {0}")]
    Malformed(String),
    #[error("dtype {0:?} cannot be sent over the link")]
    UnsupportedDtype(DType),
}

/// One tensor crossing the cut.
#[derive(Debug, Clone)]
pub struct Message {
    pub kind: MessageKind,
    pub data: TensorData,
}

impl Message {
    /// The bytes that cross the wire.
    pub fn encode(&self) -> Result<Vec<u8>, LinkError> {
        let dtype = self.data.dtype();
        let code = DTYPES
            .iter()
            .find(|(_, d)| *d == dtype)
            .map(|(c, _)| *c)
            .ok_or(LinkError::UnsupportedDtype(dtype))?;
        let dims = self.data.shape().as_slice();
        let payload = self.data.as_bytes();
        let mut bytes = Vec::with_capacity(6 + 4 * dims.len() + payload.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&[VERSION, self.kind.code(), code, dims.len() as u8]);
        for &d in dims {
            bytes.extend_from_slice(&(d as u32).to_le_bytes());
        }
        bytes.extend_from_slice(payload);
        Ok(bytes)
    }

    /// Rebuilds a message from its wire bytes, checking every field.
    pub fn decode(bytes: &[u8]) -> Result<Self, LinkError> {
        let bad = |what: &str| LinkError::Malformed(what.to_string());
        if bytes.len() < 6 || &bytes[..2] != MAGIC {
            return Err(bad("no `SX` header"));
        }
        if bytes[2] != VERSION {
            return Err(bad(&format!(
                "format version {} (expected {VERSION})",
                bytes[2]
            )));
        }
        let kind = MessageKind::from_code(bytes[3]).ok_or_else(|| bad("unknown kind"))?;
        let dtype = DTYPES
            .iter()
            .find(|(c, _)| *c == bytes[4])
            .map(|(_, d)| *d)
            .ok_or_else(|| bad("unknown dtype"))?;
        let rank = bytes[5] as usize;
        let header = 6 + 4 * rank;
        if bytes.len() < header {
            return Err(bad("truncated shape"));
        }
        let dims: Vec<usize> = bytes[6..header]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
            .collect();
        let expected = dims.iter().product::<usize>() * dtype.size();
        let payload = &bytes[header..];
        if payload.len() != expected {
            return Err(bad(&format!(
                "payload has {} bytes, shape {dims:?} needs {expected}",
                payload.len()
            )));
        }
        let data = if dtype == DType::F32 {
            // Straight into an `f32` buffer: one copy. (`from_bytes_vec` would copy the bytes
            // twice, the second time to align them for `f32`.)
            let values: Vec<f32> = payload
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            TensorData::new(values, dims)
        } else {
            TensorData::from_bytes_vec(payload.to_vec(), dims, dtype)
        };
        Ok(Self { kind, data })
    }
}

/// Bytes that crossed the cut, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub activations: u64,
    pub labels: u64,
    pub gradients: u64,
    /// Messages sent.
    pub messages: u64,
}

impl Traffic {
    /// Client → server bytes.
    pub fn up(&self) -> u64 {
        self.activations + self.labels
    }

    /// Server → client bytes.
    pub fn down(&self) -> u64 {
        self.gradients
    }

    pub fn total(&self) -> u64 {
        self.up() + self.down()
    }

    /// The traffic the paper compares: activations and gradients (labels aside).
    pub fn cut_tensors(&self) -> u64 {
        self.activations + self.gradients
    }

    /// The traffic since `earlier`.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        Traffic {
            activations: self.activations - earlier.activations,
            labels: self.labels - earlier.labels,
            gradients: self.gradients - earlier.gradients,
            messages: self.messages - earlier.messages,
        }
    }

    fn add(&mut self, kind: MessageKind, bytes: u64) {
        self.messages += 1;
        match kind {
            MessageKind::Activations => self.activations += bytes,
            MessageKind::Labels => self.labels += bytes,
            MessageKind::Gradients => self.gradients += bytes,
        }
    }
}

/// The channel between client and server: serializes every message and counts its bytes.
#[derive(Debug, Default)]
pub struct Link {
    traffic: Traffic,
}

impl Link {
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything sent so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// Sends `message` across: encodes it, counts the encoded bytes, and returns what the other
    /// side decodes.
    pub fn send(&mut self, message: Message) -> Result<Message, LinkError> {
        let bytes = message.encode()?;
        self.traffic.add(message.kind, bytes.len() as u64);
        Message::decode(&bytes)
    }

    /// Sends a float tensor; the receiver's copy lives on `device`, detached from any graph.
    pub fn send_float<const D: usize>(
        &mut self,
        kind: MessageKind,
        tensor: Tensor<D>,
        device: &Device,
    ) -> Result<Tensor<D>, LinkError> {
        let data = tensor.into_data();
        let received = self.send(Message { kind, data })?;
        Ok(Tensor::from_data(received.data, device))
    }

    /// Sends the batch labels to the server.
    pub fn send_labels(
        &mut self,
        labels: Tensor<1, Int>,
        device: &Device,
    ) -> Result<Tensor<1, Int>, LinkError> {
        let data = labels.into_data();
        let received = self.send(Message {
            kind: MessageKind::Labels,
            data,
        })?;
        Ok(Tensor::from_data(received.data, device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_exact_count() {
        let device = Device::flex();
        let mut link = Link::new();
        let t = Tensor::<4>::from_data(
            TensorData::new((0..24).map(|v| v as f32).collect::<Vec<_>>(), [1, 2, 3, 4]),
            &device,
        );
        let got = link
            .send_float(MessageKind::Activations, t.clone(), &device)
            .unwrap();
        assert_eq!(got.to_data(), t.to_data());
        // Header: 6 bytes + 4 dims × 4 bytes; payload: 24 f32.
        assert_eq!(link.traffic().activations, 6 + 16 + 24 * 4);
        assert_eq!(link.traffic().gradients, 0);
        assert_eq!(link.traffic().messages, 1);
    }

    #[test]
    fn decode_rejects_garbage() {
        assert!(Message::decode(b"nope").is_err());
        let ok = Message {
            kind: MessageKind::Gradients,
            data: TensorData::new(vec![1f32, 2.0], [2]),
        }
        .encode()
        .unwrap();
        assert!(Message::decode(&ok[..ok.len() - 1]).is_err());
        let mut wrong_kind = ok.clone();
        wrong_kind[3] = 9;
        assert!(Message::decode(&wrong_kind).is_err());
        assert_eq!(Message::decode(&ok).unwrap().kind, MessageKind::Gradients);
    }
}
