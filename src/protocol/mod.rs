//! What crosses between parties: the message kinds, their wire format ([`wire`]) and the byte
//! ledger ([`Bytes`]) filled where frames are encoded.
//!
//! Every tensor that crosses — activations, labels, gradients at the cut, and the client-side
//! weights and optimizer state handed from one client to the next — is one [`Message`], encoded
//! into one frame. A [`crate::party::Endpoint`] encodes, counts and hands the frame to a
//! [`crate::transport::Transport`]; the receiver decodes it into a fresh tensor that shares
//! nothing with the sender.

mod bytes;
pub mod control;
pub mod wire;

pub use bytes::Bytes;
pub use wire::{Message, ProtocolError};

use serde::Serialize;

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
    /// Client → client: the client-side parameters and BatchNorm buffers, flattened in the
    /// module's visiting order (sequential hand-off).
    Weights,
    /// Client → client: the client-side optimizer's state (burn's optimizer record bytes).
    OptimizerState,
}

impl MessageKind {
    pub const ALL: [MessageKind; 5] = [
        MessageKind::Activations,
        MessageKind::Labels,
        MessageKind::Gradients,
        MessageKind::Weights,
        MessageKind::OptimizerState,
    ];

    /// The one-byte code on the wire.
    pub fn code(self) -> u8 {
        match self {
            MessageKind::Activations => 1,
            MessageKind::Labels => 2,
            MessageKind::Gradients => 3,
            MessageKind::Weights => 4,
            MessageKind::OptimizerState => 5,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            MessageKind::Activations => "activations",
            MessageKind::Labels => "labels",
            MessageKind::Gradients => "gradients",
            MessageKind::Weights => "weights",
            MessageKind::OptimizerState => "optimizer_state",
        }
    }
}

/// Which way a frame travels, seen from the clients: `Up` leaves a client (to the server or to
/// the next client), `Down` arrives at one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
}
