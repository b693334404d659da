//! The client party: its shard of the training images, its data streams, the client-side model
//! while it holds it (partition, auxiliary head, optimizer), and its links to the server and to
//! the clients before and after it.

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use rand::rngs::StdRng;

use super::PartyError;
use super::endpoint::{Endpoint, Ledger};
use super::optim::build_optimizer;
use super::state::{self, ModelState, load_optimizer, optimizer_bytes};
use super::trainable::Trainable;
use super::update::{AfterSend, ClientUpdate};
use crate::config::OptimConfig;
use crate::data::batch::{epoch_order, epoch_rng};
use crate::data::{Batcher, Split};
use crate::kernels::inject_gradient;
use crate::memory::{MemoryMeter, Phase};
use crate::model::ClientModel;
use crate::protocol::{Bytes, Message, MessageKind};

/// One client.
pub struct ClientParty {
    id: usize,
    /// The training subset (shared by the in-process clients) and this client's images in it,
    /// in file order.
    data: Arc<Split>,
    shard: Vec<usize>,
    batcher: Batcher,
    update: Box<dyn ClientUpdate>,
    optim: OptimConfig,
    device: Device,
    to_server: Endpoint,
    /// Sequential hand-offs: to the next client and from the previous one (none with 1 client).
    to_next: Option<Endpoint>,
    from_prev: Option<Endpoint>,
    /// The client-side model, while this client holds it.
    model: Option<Trainable<ClientModel>>,
    /// A model of the same architecture that a received model (a hand-off, or SplitFed's
    /// global model) is loaded into.
    template: Option<ClientModel>,
    /// Coupled: the activations whose gradient is awaited.
    pending: Option<Tensor<4>>,
}

/// How a client is wired and what it starts with.
pub struct ClientParts {
    pub id: usize,
    pub data: Arc<Split>,
    /// Indices into `data`, ascending.
    pub shard: Vec<usize>,
    pub batcher: Batcher,
    pub update: Box<dyn ClientUpdate>,
    pub optim: OptimConfig,
    /// The autodiff device it trains on.
    pub device: Device,
    pub to_server: Endpoint,
    pub to_next: Option<Endpoint>,
    pub from_prev: Option<Endpoint>,
    pub model: StartingModel,
}

/// What a client starts with.
pub enum StartingModel {
    /// The client-side model, which it trains first (with a fresh optimizer).
    Holds(ClientModel),
    /// No model: a template of the architecture that the first model it receives is loaded
    /// into.
    Template(ClientModel),
}

impl ClientParty {
    pub fn new(parts: ClientParts) -> Self {
        let (model, template) = match parts.model {
            StartingModel::Holds(model) => (
                Some(Trainable::new(model, build_optimizer(&parts.optim))),
                None,
            ),
            StartingModel::Template(template) => (None, Some(template)),
        };
        Self {
            id: parts.id,
            data: parts.data,
            shard: parts.shard,
            batcher: parts.batcher,
            update: parts.update,
            optim: parts.optim,
            device: parts.device,
            to_server: parts.to_server,
            to_next: parts.to_next,
            from_prev: parts.from_prev,
            model,
            template,
            pending: None,
        }
    }

    /// Talks over these links from now on (a client process replaces its in-memory links by
    /// network ones); the byte counts start again from zero.
    pub fn attach_links(
        &mut self,
        to_server: Endpoint,
        to_next: Option<Endpoint>,
        from_prev: Option<Endpoint>,
    ) {
        self.to_server = to_server;
        self.to_next = to_next;
        self.from_prev = from_prev;
    }

    /// The client's id.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Whether the client has links to its neighbours (sequential hand-offs).
    pub fn hands_off(&self) -> bool {
        self.to_next.is_some()
    }

    /// The client-side model, if this client holds it.
    pub fn model(&self) -> Option<&ClientModel> {
        self.model.as_ref().map(Trainable::model)
    }

    /// Whether the auxiliary head travels with the client-side model (decoupled mode).
    pub fn carries_aux_head(&self) -> bool {
        self.update.carries_aux_head()
    }

    pub fn holds_model(&self) -> bool {
        self.model.is_some()
    }

    /// This epoch's order of the shard's images (stream 2·id), as indices into the training
    /// subset, and the augmentation generator (stream 2·id + 1); client 0's streams are those
    /// of a single-client run.
    pub fn epoch_order(&self, seed: u64, epoch: usize) -> (Vec<usize>, StdRng) {
        let stream = 2 * self.id as u64;
        let order = epoch_order(self.shard.len(), seed, epoch, stream, true)
            .into_iter()
            .map(|position| self.shard[position])
            .collect();
        (order, epoch_rng(seed, epoch, stream + 1))
    }

    /// The batch of training images at `indices` (from [`Self::epoch_order`]).
    ///
    /// # Shapes
    /// - images: `[indices.len(), 3, 32, 32]`; labels: `[indices.len()]`
    pub fn batch(&self, indices: &[usize], augment: &mut StdRng) -> (Tensor<4>, Tensor<1, Int>) {
        self.batcher
            .batch(&self.data, indices, augment)
            .to_tensors(&self.device)
    }

    /// Runs the client side of a step up to sending the activations and labels, then updates as
    /// its mode says. Returns the auxiliary loss when the client has trained already.
    pub fn send_batch(
        &mut self,
        images: Tensor<4>,
        labels: Tensor<1, Int>,
        lr: f64,
        meter: &mut MemoryMeter,
    ) -> Result<Option<f32>, PartyError> {
        meter.enter(Phase::Client);
        let model = self
            .model
            .as_mut()
            .ok_or(PartyError::NoModel { client: self.id })?;
        let h = model.model().net.forward(images); // [b, C, S, S], graph attached
        self.to_server.send(&Message::float(
            MessageKind::Activations,
            h.clone().detach(),
        ))?;
        self.to_server.send(&Message::labels(labels.clone()))?;
        Ok(match self.update.after_send(model, h, labels, lr) {
            AfterSend::Trained { aux_loss } => Some(aux_loss),
            AfterSend::AwaitGradient(h) => {
                self.pending = Some(*h);
                None
            }
        })
    }

    /// Finishes a step that waits for the server: receives the cut gradient and
    /// back-propagates it. Nothing to do when the client has trained already.
    pub fn finish_step(&mut self, lr: f64, meter: &mut MemoryMeter) -> Result<(), PartyError> {
        let Some(h) = self.pending.take() else {
            return Ok(());
        };
        meter.enter(Phase::Client);
        let peer = self.to_server.peer().to_string();
        let protocol = |source| PartyError::Protocol { peer, source };
        let g = self.to_server.recv()?;
        let dims: Vec<Option<usize>> = h.dims().into_iter().map(Some).collect();
        let g = match g.check_dims(&dims) {
            Ok(()) => g.into_float(MessageKind::Gradients, &self.device),
            Err(e) => Err(e),
        }
        .map_err(protocol)?;
        // The surrogate's gradient with respect to `h` is `g`: its backward pass continues the
        // chain rule from the server.
        let model = self
            .model
            .as_mut()
            .ok_or(PartyError::NoModel { client: self.id })?;
        model.apply(lr, inject_gradient(h, g).backward());
        Ok(())
    }

    /// Hands the client-side model (weights, BatchNorm buffers, optimizer state) to the next
    /// client; this client keeps the architecture as its template for the next time round.
    pub fn hand_off(&mut self) -> Result<(), PartyError> {
        let id = self.id;
        let (Some(model), Some(to_next)) = (self.model.as_ref(), self.to_next.as_mut()) else {
            return Err(match self.model {
                None => PartyError::NoModel { client: id },
                Some(_) => PartyError::NoPeer { client: id },
            });
        };
        let peer = to_next.peer().to_string();
        // BatchNorm running statistics lag one update until synchronized; `valid` syncs them.
        drop(model.model().valid());
        let weights = client_state(model.model(), self.update.carries_aux_head());
        let optimizer = optimizer_bytes(model.optimizer())
            .map_err(|source| PartyError::Model { peer, source })?;
        let n = weights.len();
        to_next.send(&Message {
            kind: MessageKind::Weights,
            data: TensorData::new(weights, [n]),
        })?;
        let n = optimizer.len();
        to_next.send(&Message {
            kind: MessageKind::OptimizerState,
            data: TensorData::from_bytes_vec(optimizer, [n], DType::U8),
        })?;
        if let Some(model) = self.model.take() {
            self.template = Some(model.into_model());
        }
        Ok(())
    }

    /// Takes over the client-side model handed on by the previous client.
    pub fn receive_hand_off(&mut self) -> Result<(), PartyError> {
        let id = self.id;
        let from_prev = self
            .from_prev
            .as_mut()
            .ok_or(PartyError::NoPeer { client: id })?;
        let peer = from_prev.peer().to_string();
        let protocol = |source| PartyError::Protocol {
            peer: peer.clone(),
            source,
        };
        let weights: Vec<f32> = from_prev
            .recv()?
            .into_vec(MessageKind::Weights)
            .map_err(protocol)?;
        let optimizer_state: Vec<u8> = from_prev
            .recv()?
            .into_vec(MessageKind::OptimizerState)
            .map_err(protocol)?;
        let template = self.template.take().ok_or(PartyError::State(format!(
            "client {id} has no model to load into"
        )))?;
        let model_error = |source| PartyError::Model {
            peer: peer.clone(),
            source,
        };
        let model = load_client_state(template, &weights, self.update.carries_aux_head())
            .map_err(model_error)?;
        let optimizer =
            load_optimizer(build_optimizer(&self.optim), optimizer_state).map_err(model_error)?;
        self.model = Some(Trainable::new(model, optimizer));
        Ok(())
    }

    /// SplitFed, start of a round: loads the global client-side model the server sends, with
    /// a fresh optimizer.
    pub fn download(&mut self) -> Result<(), PartyError> {
        let values: Vec<f32> = self
            .to_server
            .recv()?
            .into_vec(MessageKind::Weights)
            .map_err(|source| PartyError::Protocol {
                peer: self.to_server.peer().to_string(),
                source,
            })?;
        let template = match (self.template.take(), self.model.take()) {
            (Some(template), _) => template,
            (None, Some(model)) => model.into_model(),
            (None, None) => {
                return Err(PartyError::State(format!(
                    "client {} has no model to load into",
                    self.id
                )));
            }
        };
        let model = load_client_state(template, &values, self.update.carries_aux_head()).map_err(
            |source| PartyError::Model {
                peer: self.to_server.peer().to_string(),
                source,
            },
        )?;
        self.model = Some(Trainable::new(model, build_optimizer(&self.optim)));
        Ok(())
    }

    /// SplitFed, end of a round: sends the trained client-side model to the server and keeps
    /// the architecture as its template.
    pub fn upload(&mut self) -> Result<(), PartyError> {
        let model = self
            .model
            .take()
            .ok_or(PartyError::NoModel { client: self.id })?
            .into_model();
        // BatchNorm running statistics lag one update until synchronized; `valid` syncs them.
        drop(model.valid());
        let values = client_state(&model, self.update.carries_aux_head());
        let n = values.len();
        self.template = Some(model);
        self.to_server.send(&Message {
            kind: MessageKind::Weights,
            data: TensorData::new(values, [n]),
        })
    }

    /// The model this client holds, for a checkpoint: its values (with the auxiliary head when
    /// that travels) and its optimizer's state; `None` when it holds no model.
    pub fn model_state(&self) -> Result<Option<ModelState>, PartyError> {
        let Some(model) = &self.model else {
            return Ok(None);
        };
        // BatchNorm running statistics lag one update until synchronized; `valid` syncs them.
        drop(model.model().valid());
        let weights = client_state(model.model(), self.update.carries_aux_head());
        let optimizer = optimizer_bytes(model.optimizer()).map_err(|source| PartyError::Model {
            peer: format!("client {}", self.id),
            source,
        })?;
        Ok(Some(ModelState { weights, optimizer }))
    }

    /// Puts back what [`Self::model_state`] saved: afterwards this client holds `state`'s model
    /// and optimizer, or no model when `state` is `None`.
    pub fn restore_model(&mut self, state: Option<&ModelState>) -> Result<(), PartyError> {
        if let Some(model) = self.model.take() {
            self.template = Some(model.into_model());
        }
        let Some(state) = state else {
            return Ok(());
        };
        let template = self.template.take().ok_or(PartyError::State(format!(
            "client {} has no model to load into",
            self.id
        )))?;
        let model_error = |source| PartyError::Model {
            peer: "checkpoint".into(),
            source,
        };
        let model = load_client_state(template, &state.weights, self.update.carries_aux_head())
            .map_err(model_error)?;
        let optimizer = load_optimizer(build_optimizer(&self.optim), state.optimizer.clone())
            .map_err(model_error)?;
        self.model = Some(Trainable::new(model, optimizer));
        Ok(())
    }

    /// What each of this client's endpoints has counted (to the server, to the next client,
    /// from the previous one).
    pub fn ledgers(&self) -> Vec<Ledger> {
        [
            Some(&self.to_server),
            self.to_next.as_ref(),
            self.from_prev.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(Endpoint::ledger)
        .collect()
    }

    /// Continues counting from [`Self::ledgers`] of an earlier process.
    pub fn restore_ledgers(&mut self, ledgers: &[Ledger]) -> Result<(), PartyError> {
        let ends: Vec<&mut Endpoint> = [
            Some(&mut self.to_server),
            self.to_next.as_mut(),
            self.from_prev.as_mut(),
        ]
        .into_iter()
        .flatten()
        .collect();
        if ends.len() != ledgers.len() {
            return Err(PartyError::State(format!(
                "client {} has {} links, the checkpoint counted {}",
                self.id,
                ends.len(),
                ledgers.len()
            )));
        }
        for (end, ledger) in ends.into_iter().zip(ledgers) {
            end.restore_ledger(*ledger);
        }
        Ok(())
    }

    /// Everything this client sent and received, by kind (sent frames `up`, received `down`).
    pub fn bytes(&self) -> Bytes {
        [
            Some(&self.to_server),
            self.to_next.as_ref(),
            self.from_prev.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|e| e.sent() + e.received())
        .sum()
    }

    /// Everything this client sent (each frame of a run is counted once by its sender).
    pub fn sent(&self) -> Bytes {
        [Some(&self.to_server), self.to_next.as_ref()]
            .into_iter()
            .flatten()
            .map(Endpoint::sent)
            .sum()
    }
}

/// The values of the client-side model that travel: the partition, and the auxiliary head when
/// it is trained.
pub fn client_state(model: &ClientModel, with_aux: bool) -> Vec<f32> {
    let mut values = state::flatten(&model.net);
    if with_aux {
        values.extend(state::flatten(&model.aux));
    }
    values
}

/// `template` carrying `values` (as made by [`client_state`]).
pub fn load_client_state(
    template: ClientModel,
    values: &[f32],
    with_aux: bool,
) -> Result<ClientModel, state::StateError> {
    let ClientModel { net, aux } = template;
    let expected = net.num_params() + if with_aux { aux.num_params() } else { 0 };
    if values.len() != expected {
        return Err(state::StateError::WrongLength {
            expected,
            got: values.len(),
        });
    }
    let (net_values, aux_values) = values.split_at(net.num_params());
    let net = state::load_flat(net, net_values)?;
    let aux = if with_aux {
        state::load_flat(aux, aux_values)?
    } else {
        aux
    };
    Ok(ClientModel { net, aux })
}
