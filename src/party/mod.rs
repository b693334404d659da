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

pub use client::{ClientParts, ClientParty, StartingModel};
pub use endpoint::Endpoint;
pub use server::{Expected, ServerParts, ServerParty};
pub use trainable::Trainable;
pub use update::{AfterSend, ClientUpdate};

use burn::tensor::{Int, Tensor};

use crate::config::OptimConfig;
use crate::model::ClientModel;

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

/// Learning rates of one step's updates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub client: f64,
    pub server: f64,
}

impl Rates {
    /// The same rate on both sides.
    pub fn both(lr: f64) -> Self {
        Self {
            client: lr,
            server: lr,
        }
    }
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
    /// SplitFed: a client-side model that the global one is loaded into for evaluation.
    pub eval_template: Option<ClientModel>,
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
        rates: Rates,
        meter: &mut MemoryMeter,
    ) -> Result<StepLosses, PartyError> {
        let party = self
            .clients
            .get_mut(client)
            .ok_or(PartyError::UnknownClient { client })?;
        meter.begin_step();
        let aux = party.send_batch(images, labels, rates.client, meter)?;
        let server = self.server.serve(client, rates.server, meter)?;
        self.clients[client].finish_step(rates.client, meter)?;
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

    /// SplitFed, start of a round: every client downloads the global client-side model (and,
    /// with `server_copies`, the server makes one copy of its model per client).
    pub fn begin_round(
        &mut self,
        server_copies: bool,
        optim: &OptimConfig,
    ) -> Result<(), PartyError> {
        for (i, client) in self.clients.iter_mut().enumerate() {
            self.server.send_global_client(i)?;
            client.download()?;
        }
        if server_copies {
            self.server.make_copies(optim)?;
        }
        Ok(())
    }

    /// SplitFed, end of a round: every client uploads its model; the server averages them
    /// (weighted by `weights`, the shard sizes), and its own copies with `server_copies`.
    pub fn end_round(&mut self, server_copies: bool, weights: &[u64]) -> Result<(), PartyError> {
        for client in &mut self.clients {
            client.upload()?;
        }
        self.server.average_clients(weights)?;
        if server_copies {
            self.server.average_copies(weights)?;
        }
        Ok(())
    }

    /// Calls `f` with the current client-side model: the holder's, or (SplitFed) the global
    /// one.
    pub fn with_client_model<R>(
        &mut self,
        f: impl FnOnce(&ClientModel) -> R,
    ) -> Result<R, PartyError> {
        if let Some(holder) = self.holder().and_then(ClientParty::model) {
            return Ok(f(holder));
        }
        let values = self
            .server
            .global_client()
            .ok_or(PartyError::State(
                "no client holds the client-side model".into(),
            ))?
            .to_vec();
        let template = self.eval_template.take().ok_or(PartyError::State(
            "no model to evaluate the global client-side model".into(),
        ))?;
        let with_aux = self.clients.iter().any(ClientParty::carries_aux_head);
        let model = client::load_client_state(template, &values, with_aux).map_err(|source| {
            PartyError::Model {
                peer: "server".into(),
                source,
            }
        })?;
        let result = f(&model);
        self.eval_template = Some(model);
        Ok(result)
    }

    /// Every frame of the run so far, each counted once by its sender.
    pub fn bytes(&self) -> Bytes {
        self.clients.iter().map(ClientParty::sent).sum::<Bytes>() + self.server.sent()
    }
}
