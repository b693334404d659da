//! The parties of split learning. Each owns its state and reacts to the messages it receives
//! through its [`Endpoint`]s: a [`ClientParty`] (its shard, the client-side model while it holds
//! it, its update rule) and the [`ServerParty`] (the rest of the network and one link per
//! client). [`Parties`] wires them together and drives one lock-step training step.

pub mod client;
pub mod endpoint;
pub mod optim;
pub mod server;
pub mod state;
pub mod trainable;
pub mod update;

pub use client::{ClientParts, ClientParty};
pub use endpoint::Endpoint;
pub use server::ServerParty;
pub use trainable::Trainable;
pub use update::{AfterSend, ClientUpdate};

use burn::tensor::{Int, Tensor};

use crate::memory::MemoryMeter;
use crate::protocol::{Bytes, ProtocolError};
use crate::transport::TransportError;

/// A failure between parties; each names the party at fault or the peer involved.
#[derive(Debug, thiserror::Error)]
pub enum PartyError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("from {peer}: {source}")]
    Protocol { peer: String, source: ProtocolError },
    #[error("to {peer}: {source}")]
    Encode { peer: String, source: ProtocolError },
    #[error("model state from {peer}: {source}")]
    Model {
        peer: String,
        source: state::StateError,
    },
    #[error("client {client} does not hold the client-side model")]
    NoModel { client: usize },
    #[error("client {client} has no link to another client")]
    NoPeer { client: usize },
    #[error("no client {client}")]
    UnknownClient { client: usize },
    #[error("client {from} hands the model to the next client, {next}, not to client {to}")]
    NotNext { from: usize, to: usize, next: usize },
    #[error("{0}")]
    State(String),
}

/// Losses of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLosses {
    /// The server's (true) cross-entropy.
    pub server: f32,
    /// The client's auxiliary cross-entropy (decoupled only).
    pub client: Option<f32>,
}

/// The clients and the server of one run, connected.
pub struct Parties {
    pub clients: Vec<ClientParty>,
    pub server: ServerParty,
}

impl Parties {
    /// One lock-step training step of `client` on a batch: the client sends, the server serves,
    /// the client finishes. The mode lives in the parties (how the client updates, whether the
    /// server returns the gradient), not here.
    ///
    /// # Shapes
    /// - images: `[batch, 3, 32, 32]` on the autodiff device; labels: `[batch]`
    pub fn step(
        &mut self,
        client: usize,
        images: Tensor<4>,
        labels: Tensor<1, Int>,
        lr: f64,
        meter: &mut MemoryMeter,
    ) -> Result<StepLosses, PartyError> {
        let party = self
            .clients
            .get_mut(client)
            .ok_or(PartyError::UnknownClient { client })?;
        meter.begin_step();
        let aux = party.send_batch(images, labels, lr, meter)?;
        let server = self.server.serve(client, lr, meter)?;
        self.clients[client].finish_step(lr, meter)?;
        meter.end_step();
        Ok(StepLosses {
            server,
            client: aux,
        })
    }

    /// Moves the client-side model from client `from` to client `to`, the next one round the
    /// ring (over their link).
    pub fn hand_off(&mut self, from: usize, to: usize) -> Result<(), PartyError> {
        let next = (from + 1) % self.clients.len().max(1);
        if to != next {
            return Err(PartyError::NotNext { from, to, next });
        }
        self.clients
            .get_mut(from)
            .ok_or(PartyError::UnknownClient { client: from })?
            .hand_off()?;
        self.clients
            .get_mut(to)
            .ok_or(PartyError::UnknownClient { client: to })?
            .receive_hand_off()
    }

    /// The client that holds the client-side model.
    pub fn holder(&self) -> Option<&ClientParty> {
        self.clients.iter().find(|c| c.holds_model())
    }

    /// Every frame of the run so far, each counted once by its sender.
    pub fn bytes(&self) -> Bytes {
        self.clients.iter().map(ClientParty::sent).sum::<Bytes>() + self.server.sent()
    }
}
