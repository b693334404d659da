//! How a client updates after sending its activations: the one thing the training mode changes
//! on the client (the server's side is whether it returns the cut gradient,
//! [`Mode::server_returns_gradient`]).

use burn::tensor::{Int, Tensor};

use super::trainable::{Trainable, loss_value};
use crate::config::Mode;
use crate::model::{ClientModel, cross_entropy};

/// What a client step leaves behind once the activations are sent.
pub enum AfterSend {
    /// The client has updated itself; its auxiliary loss.
    Trained { aux_loss: f32 },
    /// The client waits for the cut gradient to back-propagate through `h` (graph attached).
    AwaitGradient(Box<Tensor<4>>),
}

/// A client's update rule.
pub trait ClientUpdate: Send + Sync {
    /// Called right after the activations `h` (`[batch, C, S, S]`) and labels are sent.
    fn after_send(
        &self,
        client: &mut Trainable<ClientModel>,
        h: Tensor<4>,
        labels: Tensor<1, Int>,
        lr: f64,
    ) -> AfterSend;

    /// Whether the auxiliary head is part of the client-side model that travels between
    /// clients (it is trained only in decoupled mode).
    fn carries_aux_head(&self) -> bool;
}

impl Mode {
    /// The client's update rule in this mode.
    pub fn client_update(self) -> Box<dyn ClientUpdate> {
        match self {
            Mode::Coupled => Box::new(CutGradient),
            Mode::Decoupled => Box::new(AuxLoss),
        }
    }

    /// Whether the server sends the loss gradient at the cut back to the client.
    pub fn server_returns_gradient(self) -> bool {
        matches!(self, Mode::Coupled)
    }
}

/// Classic (coupled) split learning: the client back-propagates the server's gradient at the
/// cut, so its graph stays alive while the server works.
pub struct CutGradient;

impl ClientUpdate for CutGradient {
    fn after_send(
        &self,
        _client: &mut Trainable<ClientModel>,
        h: Tensor<4>,
        _labels: Tensor<1, Int>,
        _lr: f64,
    ) -> AfterSend {
        AfterSend::AwaitGradient(Box::new(h))
    }

    fn carries_aux_head(&self) -> bool {
        false
    }
}

/// Decoupled split learning: the auxiliary head's cross-entropy trains the client partition and
/// the head before the server starts; no gradient crosses the cut.
pub struct AuxLoss;

impl ClientUpdate for AuxLoss {
    fn after_send(
        &self,
        client: &mut Trainable<ClientModel>,
        h: Tensor<4>,
        labels: Tensor<1, Int>,
        lr: f64,
    ) -> AfterSend {
        let loss = cross_entropy(client.model().aux.forward(h), labels);
        let aux_loss = loss_value(&loss);
        client.apply(lr, loss.backward());
        AfterSend::Trained { aux_loss }
    }

    fn carries_aux_head(&self) -> bool {
        true
    }
}
