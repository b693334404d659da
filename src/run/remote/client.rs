//! A client process: says hello (its id, version, configuration and shard), then takes its
//! steps of every epoch in the schedule's order — sending activations and labels, training its
//! auxiliary head or waiting for the cut gradient, handing the model on through the server —
//! evaluates when it is the evaluating client, and reports its own traffic and memory.

use std::time::Instant;

use burn::module::Module;
use serde::{Deserialize, Serialize};

use super::{ControlLink, last_word, linger, model_error, say_stop, shard_digest};
use crate::config::{ExperimentConfig, Mode};
use crate::data::Batcher;
use crate::federation::ModelFlow;
use crate::memory::PeakMemory;
use crate::model::{ClientModel, correct};
use crate::party::client::load_client_state;
use crate::party::{ClientParty, Endpoint, PartyError};
use crate::protocol::control::Control;
use crate::protocol::{Bytes, Direction, Message, MessageKind};
use crate::report::RunStatus;
use crate::run::eval::test_batches;
use crate::run::pace::Pacer;
use crate::run::runner::KillSwitch;
use crate::run::{PreparedData, RunError, RunSetup};
use crate::transport::Transport;
use crate::transport::mux::{self, Channel, Mux};

/// What a client process reports about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientRunReport {
    pub id: usize,
    /// Where the server was.
    pub server: String,
    /// `completed`, or `failed` (then `error` says why).
    pub status: RunStatus,
    pub error: Option<String>,
    /// Training images in its shard.
    pub images: usize,
    /// Epochs it finished.
    pub epochs: usize,
    /// Everything it sent (`up`) and received (`down`), by kind, as in the run report.
    pub bytes: Bytes,
    /// Evaluation traffic (when it evaluated) and control messages.
    pub eval_bytes: Bytes,
    pub control_bytes: u64,
    /// Peak extra bytes of its training steps.
    pub peak_memory: Option<PeakMemory>,
    pub wall_seconds: f64,
}

/// Takes part in the run as client `id` over `transport` (a fresh link to the server). The
/// report says how it ended; an `Err` means the run never started (refused, or bad set-up).
pub fn take_part(
    config: &ExperimentConfig,
    data: &PreparedData,
    id: usize,
    transport: Box<dyn Transport>,
) -> Result<ClientRunReport, RunError> {
    let started = Instant::now();
    let parts = data.partition(config)?;
    let Some(shard) = parts.get(id) else {
        return Err(RunError::Failed(format!(
            "client id {id}: the run has {} clients (ids 0 to {})",
            parts.len(),
            parts.len() - 1
        )));
    };
    let mut transport = transport;
    let server = transport.peer().to_string();
    let hello = Control::Hello {
        client: id,
        version: crate::VERSION.to_string(),
        config: Box::new(config.clone()),
        shard_images: shard.len(),
        shard_digest: shard_digest(&data.train, shard),
    }
    .encode();
    let hello_len = hello.len();
    transport
        .send(mux::tag(Channel::Control, &hello))
        .map_err(|e| RunError::Party(e.into()))?;
    let mux = super::link(transport);
    let mut control = ControlLink::new(&mux, hello_len as u64);
    match control.recv()? {
        Control::Welcome => {}
        Control::Refused { reason } => {
            return Err(RunError::Refused {
                peer: server,
                reason,
            });
        }
        other => {
            return Err(RunError::Peer {
                peer: server,
                detail: format!("answered the hello with {}", other.name()),
            });
        }
    }
    let images = shard.len();
    let mut taking = match Taking::new(config, data, id, parts.clone(), &mux) {
        Ok(taking) => taking,
        Err(error) => {
            // The server is waiting for this client: say why it will not come.
            say_stop(&mux, &mut control, format!("client {id}: {error}"));
            return Err(error);
        }
    };
    let mut report = ClientRunReport {
        id,
        server,
        status: RunStatus::Completed,
        error: None,
        images,
        epochs: 0,
        bytes: Bytes::default(),
        eval_bytes: Bytes::default(),
        control_bytes: 0,
        peak_memory: None,
        wall_seconds: 0.0,
    };
    for epoch in 1..=config.train.epochs {
        match taking.epoch(epoch, &mut control) {
            Ok(true) => report.epochs = epoch,
            Ok(false) => {
                report.epochs = epoch;
                // Tell the server this client has everything, then wait for it to close.
                if control.send(&Control::Bye).is_ok() {
                    linger(&mux, &mut control, FAREWELL_WAIT);
                }
                break;
            }
            Err(error) => {
                let error = match last_word(&mux, &mut control, &error) {
                    Some(stop) => stop,
                    None => {
                        // Tell the server why this client stops (it may be gone already).
                        say_stop(&mux, &mut control, format!("client {id}: {error}"));
                        error
                    }
                };
                report.status = RunStatus::Failed;
                report.error = Some(error.to_string());
                break;
            }
        }
    }
    report.bytes = taking.me.bytes();
    report.eval_bytes = taking.eval.sent() + taking.eval.received();
    report.control_bytes = control.bytes();
    report.peak_memory = taking.meter.peaks();
    report.wall_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// A client's side of a run in progress.
struct Taking<'a> {
    config: &'a ExperimentConfig,
    data: &'a PreparedData,
    me: ClientParty,
    eval: Endpoint,
    /// SplitFed: a model of the client side's architecture that the global model is loaded
    /// into for evaluation.
    eval_template: Option<ClientModel>,
    pacer: Pacer,
    meter: crate::memory::MemoryMeter,
    device: burn::tensor::Device,
    kill_after: KillSwitch,
    /// Steps this client trained.
    trained: usize,
}

/// How long a client waits for the server to close the link after its `bye`.
const FAREWELL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl<'a> Taking<'a> {
    /// Builds the run as every process does and keeps client `id`, linked over `mux`.
    fn new(
        config: &'a ExperimentConfig,
        data: &'a PreparedData,
        id: usize,
        parts: Vec<Vec<usize>>,
        mux: &Mux,
    ) -> Result<Self, RunError> {
        let shard_sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
        let n = shard_sizes.len();
        let setup = RunSetup::from_data(config, data, parts)?;
        let RunSetup {
            parties,
            meter,
            device,
            ..
        } = setup;
        let mut clients = parties.clients;
        let mut me = clients.swap_remove(id);
        // The other parties live in their own processes.
        drop(clients);
        let server = mux.peer();
        let (prev, next) = ((id + n - 1) % n, (id + 1) % n);
        let relayed = |peer: usize| {
            let name = format!("client {peer} (relayed by {server})");
            Endpoint::new(
                Box::new(mux.relayed_channel(Channel::Relay, name)),
                Direction::Up,
            )
        };
        let hands_off = me.hands_off();
        me.attach_links(
            Endpoint::new(Box::new(mux.channel(Channel::Train)), Direction::Up),
            hands_off.then(|| relayed(next)),
            hands_off.then(|| relayed(prev)),
        );
        Ok(Self {
            config,
            data,
            me,
            eval: Endpoint::new(Box::new(mux.channel(Channel::Eval)), Direction::Up),
            eval_template: parties.eval_template,
            pacer: Pacer::new(config, &shard_sizes),
            meter,
            device,
            kill_after: KillSwitch::from_env(),
            trained: 0,
        })
    }

    /// This client's part of one epoch; `false` when the server ends the run after it.
    fn epoch(&mut self, epoch: usize, control: &mut ControlLink) -> Result<bool, RunError> {
        let config = self.config;
        let seed = config.train.seed;
        let id = self.me.id();
        let plan = config
            .clients
            .schedule
            .plan(epoch, self.pacer.batches(), seed);
        let federated = matches!(plan.model, ModelFlow::Federated { .. });
        if federated {
            self.me.download()?;
        }
        self.pacer.begin_epoch(epoch);
        let (order, mut augment) = self.me.epoch_order(seed, epoch);
        let decoupled = config.train.mode == Mode::Decoupled;
        for &client in &plan.steps {
            let step = self.pacer.next(&plan, client);
            for &(from, to) in &step.hand_offs {
                if from == id {
                    self.me.hand_off()?;
                }
                if to == id {
                    self.me.receive_hand_off()?;
                }
            }
            if !step.trains() {
                continue;
            }
            if client == id {
                let start = step.batch * config.train.batch_size;
                let chunk = &order[start..start + step.images];
                let (images, labels) = self.me.batch(chunk, &mut augment);
                self.meter.begin_step();
                let aux = self
                    .me
                    .send_batch(images, labels, step.rates.client, &mut self.meter)?;
                if decoupled {
                    let loss = aux.unwrap_or(f32::NAN);
                    control.send(&Control::AuxLoss {
                        loss_bits: loss.to_bits(),
                    })?;
                }
                self.me.finish_step(step.rates.client, &mut self.meter)?;
                self.meter.end_step();
                self.trained += 1;
                self.kill_after.after(self.trained);
            }
            self.pacer.trained(client);
        }
        if federated {
            self.me.upload()?;
        }
        if self.pacer.evaluator(&plan) == id {
            control.expect("evaluate", |m| match m {
                Control::Evaluate { epoch: e } if *e == epoch => Some(()),
                _ => None,
            })?;
            let aux_correct = self.evaluate(federated)?;
            control.send(&Control::Evaluated { aux_correct })?;
        }
        control.send(&Control::EpochDone {
            epoch,
            sent: self.me.sent(),
            traffic: self.me.bytes(),
        })?;
        control.expect("next_epoch or done", |m| match m {
            Control::NextEpoch { epoch: next } if *next == epoch + 1 => Some(true),
            Control::Done => Some(false),
            _ => None,
        })
    }

    /// Runs the client-side model (its own, or under SplitFed the global one the server sends)
    /// over the test set and sends the activations and labels; returns the auxiliary head's
    /// correct answers (decoupled).
    fn evaluate(&mut self, federated: bool) -> Result<Option<usize>, RunError> {
        let decoupled = self.config.train.mode == Mode::Decoupled;
        let global = if federated {
            let values: Vec<f32> =
                self.eval
                    .recv()?
                    .into_vec(MessageKind::Weights)
                    .map_err(|source| {
                        RunError::Party(PartyError::Protocol {
                            peer: self.eval.peer().to_string(),
                            source,
                        })
                    })?;
            let template = self.eval_template.take().ok_or_else(|| {
                RunError::Failed(format!(
                    "client {}: no model to evaluate the global one in",
                    self.me.id()
                ))
            })?;
            Some(
                load_client_state(template, &values, self.me.carries_aux_head())
                    .map_err(|e| model_error(self.eval.peer(), e))?,
            )
        } else {
            None
        };
        let model = match (&global, self.me.model()) {
            (Some(global), _) => global.valid(),
            (None, Some(own)) => own.valid(),
            (None, None) => {
                return Err(RunError::Party(PartyError::NoModel {
                    client: self.me.id(),
                }));
            }
        };
        let batcher = Batcher::new(self.data.normalization, false);
        let mut aux_right = 0;
        for (images, labels) in test_batches(
            &self.data.test,
            &batcher,
            self.config.train.eval_batch_size,
            &self.device,
        ) {
            let h = model.net.forward(images); // [b, C, S, S]
            if decoupled {
                aux_right += correct(model.aux.forward(h.clone()), labels.clone());
            }
            self.eval
                .send(&Message::float(MessageKind::Activations, h))?;
            self.eval.send(&Message::labels(labels))?;
        }
        self.eval_template = global;
        Ok(decoupled.then_some(aux_right))
    }
}
