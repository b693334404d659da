//! The server party: the rest of the network, its optimizer, and one link per client. It trains
//! on whatever activations a client sends and, when its mode says so, returns the cut gradient.
//! Under SplitFed it is also the federation server: it keeps the global client-side model,
//! sends it to the clients at the start of a round and averages their uploads at the end; in
//! v1 it trains one copy of its own model per client and averages those too.

use burn::module::Module;
use burn::tensor::{Device, TensorData};

use super::PartyError;
use super::endpoint::{Endpoint, Ledger};
use super::optim::build_optimizer;
use super::state::{ModelState, flatten, load_flat, load_optimizer, optimizer_bytes};
use super::trainable::{Trainable, loss_value};
use crate::config::OptimConfig;
use crate::federation::fedavg;
use crate::memory::{MemoryMeter, Phase};
use crate::model::{ServerNet, cross_entropy};
use crate::protocol::{Bytes, Message, MessageKind, ProtocolError};

/// The server.
pub struct ServerParty {
    /// The global server model (SplitFed v1: the average of the last round's copies; its
    /// optimizer is then never stepped: the copies train).
    model: Trainable<ServerNet>,
    /// SplitFed v1, during a round: client `i`'s copy of the server model.
    copies: Vec<Option<Trainable<ServerNet>>>,
    /// Models of the same architecture that copies are loaded into (one per client, v1 only).
    templates: Vec<ServerNet>,
    /// SplitFed: the global client-side model, flattened (see `party::client::client_state`).
    global_client: Option<Vec<f32>>,
    /// `links[i]` talks to client `i`.
    links: Vec<Endpoint>,
    returns_gradient: bool,
    device: Device,
    /// What a client may send: `[channels, height, width]` of one image's activations, batches
    /// of at most `max_batch` images, and labels below `classes`.
    expects: Expected,
}

/// The shapes and values the server accepts from a client.
#[derive(Debug, Clone, Copy)]
pub struct Expected {
    pub activation_shape: [usize; 3],
    pub max_batch: usize,
    pub classes: usize,
}

/// How the server is wired and what it starts with.
pub struct ServerParts {
    pub model: Trainable<ServerNet>,
    /// SplitFed v1: one per client; otherwise empty.
    pub templates: Vec<ServerNet>,
    /// SplitFed: the initial global client-side model; otherwise `None`.
    pub global_client: Option<Vec<f32>>,
    pub links: Vec<Endpoint>,
    pub returns_gradient: bool,
    pub device: Device,
    pub expects: Expected,
}

impl ServerParty {
    pub fn new(parts: ServerParts) -> Self {
        Self {
            model: parts.model,
            copies: parts.links.iter().map(|_| None).collect(),
            templates: parts.templates,
            global_client: parts.global_client,
            links: parts.links,
            returns_gradient: parts.returns_gradient,
            device: parts.device,
            expects: parts.expects,
        }
    }

    /// Talks to the clients over `links` from now on (`links[i]` to client `i`; a
    /// multi-process server replaces its in-memory links by network ones). The byte counts
    /// start again from zero.
    pub fn attach_links(&mut self, links: Vec<Endpoint>) -> Result<(), PartyError> {
        if links.len() != self.links.len() {
            return Err(PartyError::State(format!(
                "{} links for {} clients",
                links.len(),
                self.links.len()
            )));
        }
        self.links = links;
        Ok(())
    }

    /// The global server model.
    pub fn model(&self) -> &ServerNet {
        self.model.model()
    }

    /// SplitFed: the global client-side model, flattened.
    pub fn global_client(&self) -> Option<&[f32]> {
        self.global_client.as_deref()
    }

    /// The links to the clients (`[i]` to client `i`), with their counts.
    pub fn links(&self) -> &[Endpoint] {
        &self.links
    }

    fn link(&mut self, client: usize) -> Result<&mut Endpoint, PartyError> {
        self.links
            .get_mut(client)
            .ok_or(PartyError::UnknownClient { client })
    }

    /// Serves one step of `client`: receives its activations and labels, trains on them with
    /// the true loss (its own server copy in SplitFed v1), and sends the gradient at the cut
    /// back when the mode wants it. Returns the loss.
    pub fn serve(
        &mut self,
        client: usize,
        lr: f64,
        meter: &mut MemoryMeter,
    ) -> Result<f32, PartyError> {
        meter.enter(Phase::Server);
        let protocol = |source| PartyError::Protocol {
            peer: format!("client {client}"),
            source,
        };
        let (device, expects) = (self.device.clone(), self.expects);
        let link = self.link(client)?;
        let [c, h, w] = expects.activation_shape;
        let a = link.recv()?;
        a.check_dims(&[None, Some(c), Some(h), Some(w)])
            .map_err(protocol)?;
        let batch = a.data.shape().as_slice()[0];
        if !(1..=expects.max_batch).contains(&batch) {
            return Err(protocol(ProtocolError::Malformed(format!(
                "a batch of {batch} activations (at most {})",
                expects.max_batch
            ))));
        }
        // A fresh leaf: shares nothing with the client's graph.
        let a = a
            .into_float::<4>(MessageKind::Activations, &device)
            .map_err(protocol)?;
        let labels = link.recv()?;
        if labels.kind == MessageKind::Labels {
            labels
                .check_labels(batch, expects.classes)
                .map_err(protocol)?;
        }
        let labels = labels.into_labels(&device).map_err(protocol)?;
        let a = if self.returns_gradient {
            a.require_grad()
        } else {
            a
        };
        let model = match self.copies.get_mut(client) {
            Some(Some(copy)) => copy,
            _ => &mut self.model,
        };
        let loss = cross_entropy(model.model().forward(a.clone()), labels);
        let value = loss_value(&loss);
        let mut grads = loss.backward();
        let gradient = if self.returns_gradient {
            Some(a.grad_remove(&mut grads).ok_or(PartyError::State(
                "the received activations got no gradient".into(),
            ))?)
        } else {
            None
        };
        model.apply(lr, grads);
        if let Some(g) = gradient {
            self.link(client)?
                .send(&Message::float(MessageKind::Gradients, g))?;
        }
        Ok(value)
    }

    /// SplitFed, start of a round: sends the global client-side model to `client`.
    pub fn send_global_client(&mut self, client: usize) -> Result<(), PartyError> {
        let values = self.global_client.clone().ok_or(PartyError::State(
            "no global client-side model (not SplitFed)".into(),
        ))?;
        let n = values.len();
        self.link(client)?.send(&Message {
            kind: MessageKind::Weights,
            data: TensorData::new(values, [n]),
        })
    }

    /// SplitFed, end of a round: receives every client's trained client-side model and makes
    /// their FedAvg (weighted by `weights`, the shard sizes) the new global one.
    pub fn average_clients(&mut self, weights: &[u64]) -> Result<(), PartyError> {
        let mut uploads = Vec::with_capacity(self.links.len());
        for link in &mut self.links {
            let peer = link.peer().to_string();
            let values: Vec<f32> = link
                .recv()?
                .into_vec(MessageKind::Weights)
                .map_err(|source| PartyError::Protocol { peer, source })?;
            uploads.push(values);
        }
        let expected = self.global_client.as_ref().map_or(0, Vec::len);
        if let Some((client, upload)) = uploads
            .iter()
            .enumerate()
            .find(|(_, u)| u.len() != expected)
        {
            return Err(PartyError::Model {
                peer: format!("client {client}"),
                source: super::state::StateError::WrongLength {
                    expected,
                    got: upload.len(),
                },
            });
        }
        let views: Vec<&[f32]> = uploads.iter().map(Vec::as_slice).collect();
        self.global_client = Some(fedavg(&views, weights));
        Ok(())
    }

    /// SplitFed v1, start of a round: one copy of the global server model per client, each with
    /// a fresh optimizer.
    pub fn make_copies(&mut self, optim: &OptimConfig) -> Result<(), PartyError> {
        let global = flatten(self.model.model());
        let templates = std::mem::take(&mut self.templates);
        if templates.len() != self.links.len() {
            return Err(PartyError::State(format!(
                "{} server templates for {} clients",
                templates.len(),
                self.links.len()
            )));
        }
        for (copy, template) in self.copies.iter_mut().zip(templates) {
            let model = load_flat(template, &global).map_err(|source| PartyError::Model {
                peer: "server".into(),
                source,
            })?;
            *copy = Some(Trainable::new(model, build_optimizer(optim)));
        }
        Ok(())
    }

    /// SplitFed v1, end of a round: the FedAvg of the copies (weighted by `weights`) becomes the
    /// global server model; the copies become templates again.
    pub fn average_copies(&mut self, weights: &[u64]) -> Result<(), PartyError> {
        let mut trained = Vec::with_capacity(self.copies.len());
        for copy in &mut self.copies {
            let copy = copy
                .take()
                .ok_or(PartyError::State("a server copy is missing".into()))?
                .into_model();
            // BatchNorm running statistics lag one update until synchronized.
            drop(copy.valid());
            trained.push(copy);
        }
        let flats: Vec<Vec<f32>> = trained.iter().map(flatten).collect();
        let views: Vec<&[f32]> = flats.iter().map(Vec::as_slice).collect();
        let average = fedavg(&views, weights);
        // The average goes into one trained copy, which becomes the global model; the other
        // copies and the old global model are the next round's templates.
        let mut models = trained.into_iter();
        let first = models
            .next()
            .ok_or(PartyError::State("no server copies to average".into()))?;
        let global = load_flat(first, &average).map_err(|source| PartyError::Model {
            peer: "server".into(),
            source,
        })?;
        let old = self.model.replace_model(global);
        self.templates = models.chain(std::iter::once(old)).collect();
        Ok(())
    }

    /// The global server model and its optimizer's state, for a checkpoint.
    pub fn model_state(&self) -> Result<ModelState, PartyError> {
        // BatchNorm running statistics lag one update until synchronized; `valid` syncs them.
        drop(self.model.model().valid());
        let optimizer =
            optimizer_bytes(self.model.optimizer()).map_err(|source| PartyError::Model {
                peer: "server".into(),
                source,
            })?;
        Ok(ModelState {
            weights: flatten(self.model.model()),
            optimizer,
        })
    }

    /// Puts back what [`Self::model_state`] saved, and (SplitFed) the global client-side model.
    pub fn restore(
        &mut self,
        state: &ModelState,
        global_client: Option<&[f32]>,
        optim: &OptimConfig,
    ) -> Result<(), PartyError> {
        let model_error = |source| PartyError::Model {
            peer: "checkpoint".into(),
            source,
        };
        let optimizer =
            load_optimizer(build_optimizer(optim), state.optimizer.clone()).map_err(model_error)?;
        self.model
            .restore(&state.weights, optimizer)
            .map_err(model_error)?;
        match (&mut self.global_client, global_client) {
            (Some(current), Some(saved)) if current.len() == saved.len() => {
                current.copy_from_slice(saved);
            }
            (None, None) => {}
            (current, saved) => {
                return Err(PartyError::State(format!(
                    "the checkpoint's global client-side model ({} values) does not fit this run's ({} values)",
                    saved.map_or(0, <[f32]>::len),
                    current.as_ref().map_or(0, Vec::len)
                )));
            }
        }
        Ok(())
    }

    /// What each link has counted, client by client.
    pub fn ledgers(&self) -> Vec<Ledger> {
        self.links.iter().map(Endpoint::ledger).collect()
    }

    /// Continues counting from [`Self::ledgers`] of an earlier process.
    pub fn restore_ledgers(&mut self, ledgers: &[Ledger]) -> Result<(), PartyError> {
        if ledgers.len() != self.links.len() {
            return Err(PartyError::State(format!(
                "the server has {} links, the checkpoint counted {}",
                self.links.len(),
                ledgers.len()
            )));
        }
        for (link, ledger) in self.links.iter_mut().zip(ledgers) {
            link.restore_ledger(*ledger);
        }
        Ok(())
    }

    /// Everything the server sent (each frame of a run is counted once by its sender).
    pub fn sent(&self) -> Bytes {
        self.links.iter().map(Endpoint::sent).sum()
    }
}
