//! The server party: the rest of the network, its optimizer, and one link per client. It trains
//! on whatever activations a client sends and, when its mode says so, returns the cut gradient.

use burn::tensor::Device;

use super::PartyError;
use super::endpoint::Endpoint;
use super::trainable::{Trainable, loss_value};
use crate::memory::{MemoryMeter, Phase};
use crate::model::{ServerNet, cross_entropy};
use crate::protocol::{Bytes, Message, MessageKind};

/// The server.
pub struct ServerParty {
    model: Trainable<ServerNet>,
    /// `links[i]` talks to client `i`.
    links: Vec<Endpoint>,
    returns_gradient: bool,
    device: Device,
}

impl ServerParty {
    pub fn new(
        model: Trainable<ServerNet>,
        links: Vec<Endpoint>,
        returns_gradient: bool,
        device: Device,
    ) -> Self {
        Self {
            model,
            links,
            returns_gradient,
            device,
        }
    }

    pub fn model(&self) -> &ServerNet {
        self.model.model()
    }

    /// Serves one step of `client`: receives its activations and labels, trains on them with
    /// the true loss, and sends the gradient at the cut back when the mode wants it. Returns the
    /// loss.
    pub fn serve(
        &mut self,
        client: usize,
        lr: f64,
        meter: &mut MemoryMeter,
    ) -> Result<f32, PartyError> {
        meter.enter(Phase::Server);
        let link = self
            .links
            .get_mut(client)
            .ok_or(PartyError::UnknownClient { client })?;
        let protocol = |source| PartyError::Protocol {
            peer: format!("client {client}"),
            source,
        };
        // A fresh leaf: shares nothing with the client's graph.
        let a = link
            .recv()?
            .into_float::<4>(MessageKind::Activations, &self.device)
            .map_err(protocol)?;
        let labels = link.recv()?.into_labels(&self.device).map_err(protocol)?;
        let a = if self.returns_gradient {
            a.require_grad()
        } else {
            a
        };
        let loss = cross_entropy(self.model.model().forward(a.clone()), labels);
        let value = loss_value(&loss);
        let mut grads = loss.backward();
        if self.returns_gradient {
            let g = a.grad_remove(&mut grads).ok_or(PartyError::State(
                "the received activations got no gradient".into(),
            ))?;
            link.send(&Message::float(MessageKind::Gradients, g))?;
        }
        self.model.apply(lr, grads);
        Ok(value)
    }

    /// Everything the server sent (each frame of a run is counted once by its sender).
    pub fn sent(&self) -> Bytes {
        self.links.iter().map(Endpoint::sent).sum()
    }
}
