//! The server process: admits the run's clients ([`super::admission`]), then trains the server side in the schedule's order, relays hand-offs, has the
//! evaluating client send the test activations, and writes the report after every epoch. A
//! client that fails ends the run: the report so far is written with `status = "failed"`,
//! naming the client, epoch and step, and the other clients are told to stop.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::tensor::TensorData;

use super::admission::{Link, admit_clients, tell_stop};
use super::shard_digest;
use crate::config::{ExperimentConfig, Mode};
use crate::federation::ModelFlow;
use crate::memory;
use crate::model::correct;
use crate::party::{Endpoint, PartyError, ServerParty};
use crate::protocol::control::Control;
use crate::protocol::{Bytes, Direction, Message, MessageKind, ProtocolError};
use crate::report::{ClientWire, NetworkReport, PeakMemoryReport, Report, RunStatus};
use crate::run::eval::test_batch_count;
use crate::run::pace::{PacedStep, Pacer};
use crate::run::runner::{KillSwitch, check_divergence, fresh_report};
use crate::run::tally::{EpochTally, progress_bar};
use crate::run::{PreparedData, RunError, RunSetup};
use crate::transport::Transport;
use crate::transport::grpc::GrpcServer;
use crate::transport::mux::Channel;

/// How long the server waits for each client's `bye` at the end of a run.
const FAREWELL_WAIT: Duration = Duration::from_secs(30);

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// A line per epoch (and the refusals) on stderr, progress bars on a terminal.
    pub progress: bool,
    /// The report so far is written here after every epoch, and on failure.
    pub report_path: Option<PathBuf>,
    /// How long to wait for every client to connect.
    pub wait_for_clients: Duration,
    /// How long a connected peer may take to say hello.
    pub hello_timeout: Duration,
    /// How long to wait for each message during the run.
    pub timeout: Duration,
    /// Whether the links are encrypted (for the report).
    pub tls: bool,
}

/// Waits for `config`'s clients, trains with them and returns the report (also written to
/// `options.report_path`). A failed run's report is written before the error returns.
pub fn serve(
    config: &ExperimentConfig,
    data: &PreparedData,
    listener: &mut GrpcServer,
    options: &ServeOptions,
) -> Result<Report, RunError> {
    let started = Instant::now();
    let parts = data.partition(config)?;
    let digests: Vec<String> = parts.iter().map(|p| shard_digest(&data.train, p)).collect();
    let links = admit_clients(config, &digests, listener, options)?;
    let setup = RunSetup::from_data(config, data, parts.clone())?;
    let report = fresh_report(config, data, &setup, &parts);
    let RunSetup {
        parties,
        meter,
        device,
        server_copies_bytes,
        ..
    } = setup;
    let mut server = parties.server;
    // The other parties live in their own processes.
    drop(parties.clients);
    server.attach_links(
        links
            .iter()
            .map(|l| Endpoint::new(Box::new(l.mux.channel(Channel::Train)), Direction::Down))
            .collect(),
    )?;
    let baseline = memory::current() as u64;
    let shard_sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
    let mut serving = Serving {
        pacer: Pacer::new(config, &shard_sizes),
        weights: shard_sizes.iter().map(|&n| n as u64).collect(),
        config,
        data,
        options,
        server,
        links,
        meter,
        device,
        report,
        tally: EpochTally::default(),
        place: Place {
            epoch: 0,
            step: None,
        },
        baseline,
        server_copies: server_copies_bytes,
        kill_after: KillSwitch::from_env(),
    };
    for epoch in 1..=config.train.epochs {
        match serving.epoch(epoch) {
            Ok(true) => {}
            Ok(false) => break,
            Err(error) => return Err(serving.fail(error, started)),
        }
    }
    let report = serving.finish(started);
    serving.write(&report)?;
    if report.status == RunStatus::Completed {
        serving.farewell();
    }
    Ok(report)
}

/// Where a failure happened.
struct Place {
    epoch: usize,
    step: Option<(usize, PacedStep)>,
}

/// The server's side of a run in progress.
struct Serving<'a> {
    config: &'a ExperimentConfig,
    data: &'a PreparedData,
    options: &'a ServeOptions,
    pacer: Pacer,
    /// FedAvg weights: the shard sizes.
    weights: Vec<u64>,
    server: ServerParty,
    links: Vec<Link>,
    meter: memory::MemoryMeter,
    device: burn::tensor::Device,
    report: Report,
    tally: EpochTally,
    /// Where the run is (named when it fails).
    place: Place,
    /// Bytes live before training, and of SplitFed v1's server copies (see the report).
    baseline: u64,
    server_copies: u64,
    kill_after: KillSwitch,
}

impl Serving<'_> {
    /// The run's training bytes so far, each frame counted once by its sender — all counted
    /// here, where every frame passes.
    fn bytes(&self) -> Bytes {
        self.server.sent()
            + (0..self.links.len())
                .map(|i| self.client_sent(i))
                .sum::<Bytes>()
    }

    /// What client `i` sent (to the server, and hand-offs through it).
    fn client_sent(&self, i: usize) -> Bytes {
        self.links[i].client_sent(&self.server.links()[i])
    }

    /// One epoch; `false` when a loss diverged (the report says where).
    fn epoch(&mut self, epoch: usize) -> Result<bool, RunError> {
        let config = self.config;
        self.place = Place { epoch, step: None };
        let plan = config
            .clients
            .schedule
            .plan(epoch, self.pacer.batches(), config.train.seed);
        let bar = progress_bar(
            self.options.progress,
            None,
            self.pacer.steps_per_epoch(),
            epoch,
            config.train.epochs,
            config.train.mode,
        );
        self.tally = EpochTally::begin(self.pacer.global_rate(), self.bytes(), bar);
        if let ModelFlow::Federated { server_copies } = plan.model {
            for client in 0..self.links.len() {
                self.server.send_global_client(client)?;
            }
            if server_copies {
                self.server.make_copies(&config.optim)?;
            }
        }
        self.pacer.begin_epoch(epoch);
        for (index, &client) in plan.steps.iter().enumerate() {
            let step = self.pacer.next(&plan, client);
            self.place.step = Some((index, step.clone()));
            self.step(&step, epoch)?;
            if self.report.status == RunStatus::Diverged {
                let reason = self.report.error.clone().unwrap_or_default();
                self.stop_all(&format!("the run diverged: {reason}"));
                return Ok(false);
            }
        }
        self.place.step = None;
        if let ModelFlow::Federated { server_copies } = plan.model {
            self.server.average_clients(&self.weights)?;
            if server_copies {
                self.server.average_copies(&self.weights)?;
            }
        }
        self.tally.stop_clock();
        let eval_start = Instant::now();
        let accuracy = self.evaluate(epoch, self.pacer.evaluator(&plan))?;
        let eval_seconds = eval_start.elapsed().as_secs_f64();
        for id in 0..self.links.len() {
            self.epoch_done(id, epoch)?;
        }
        let mode = config.train.mode;
        let metrics = self
            .tally
            .metrics(epoch, mode, accuracy, self.bytes(), eval_seconds);
        if self.options.progress {
            self.tally.print(&metrics, mode, config.train.epochs);
        }
        self.report.test_accuracy = Some(metrics.test_accuracy);
        self.report.aux_accuracy = metrics.aux_accuracy;
        self.report.epochs.push(metrics);
        let mut so_far = self.report.clone();
        so_far.status = RunStatus::Running;
        self.write(&so_far)?;
        // After the last epoch `done` follows once the final report is on disk (see `serve`).
        if epoch < config.train.epochs {
            for link in &mut self.links {
                link.control
                    .send(&Control::NextEpoch { epoch: epoch + 1 })?;
            }
        }
        Ok(true)
    }

    /// Client `id`'s end of `epoch`: what it counted must be what the server counted.
    fn epoch_done(&mut self, id: usize, epoch: usize) -> Result<(), RunError> {
        let link = &mut self.links[id];
        let (sent, traffic) = link.control.expect("epoch_done", |m| match m {
            Control::EpochDone {
                epoch: e,
                sent,
                traffic,
            } if *e == epoch => Some((*sent, *traffic)),
            _ => None,
        })?;
        let train = &self.server.links()[id];
        let counted = (link.client_sent(train), link.client_traffic(train));
        if (sent, traffic) != counted {
            return Err(RunError::Peer {
                peer: link.mux.peer().to_string(),
                detail: format!(
                    "counted {} bytes sent and {} in all by epoch {epoch}; the server counted {}                      and {}",
                    sent.total, traffic.total, counted.0.total, counted.1.total
                ),
            });
        }
        Ok(())
    }

    /// After the last epoch, with the report on disk: tells every client the run is done and
    /// waits (at most [`FAREWELL_WAIT`] in all) for each one's `bye`, so that no client misses
    /// the `done` when this process ends.
    fn farewell(&mut self) {
        for link in &mut self.links {
            if let Err(e) = link.control.send(&Control::Done) {
                eprintln!(
                    "{}: the run is done but could not be told: {e}",
                    link.mux.peer()
                );
            }
        }
        let deadline = Instant::now() + FAREWELL_WAIT;
        for link in &mut self.links {
            let left = deadline.saturating_duration_since(Instant::now());
            link.mux.set_timeout(left.max(Duration::from_millis(1)));
            let _ = link
                .control
                .expect("bye", |m| matches!(m, Control::Bye).then_some(()));
        }
    }

    /// One step: the hand-offs it needs, then (if the batch trains) serving it.
    fn step(&mut self, step: &PacedStep, epoch: usize) -> Result<(), RunError> {
        for &(from, to) in &step.hand_offs {
            self.relay(from, to)?;
        }
        if !step.trains() {
            return Ok(());
        }
        let client = step.client;
        self.meter.begin_step();
        let server_loss = self
            .server
            .serve(client, step.rates.server, &mut self.meter)?;
        self.meter.end_step();
        let client_loss = match self.config.train.mode {
            Mode::Coupled => None,
            Mode::Decoupled => {
                Some(self.links[client].control.expect("aux_loss", |m| match m {
                    Control::AuxLoss { loss_bits } => Some(f32::from_bits(*loss_bits)),
                    _ => None,
                })?)
            }
        };
        self.tally.lr = step.rates.server;
        self.pacer.trained(client);
        self.kill_after.after(self.pacer.global_step());
        let losses = crate::party::StepLosses {
            server: server_loss,
            client: client_loss,
        };
        if check_divergence(&mut self.report, losses, epoch, step, &self.pacer) {
            self.tally.abandon();
            return Ok(());
        }
        self.tally.add(losses, step.images);
        Ok(())
    }

    /// Passes the model's two hand-off frames (weights, optimizer state) from client `from`
    /// to client `to`, checking that they are what a hand-off carries.
    fn relay(&mut self, from: usize, to: usize) -> Result<(), RunError> {
        use burn::tensor::DType;
        for (kind, dtype) in [
            (MessageKind::Weights, DType::F32),
            (MessageKind::OptimizerState, DType::U8),
        ] {
            let peer = self.links[from].mux.peer().to_string();
            let frame = self.links[from]
                .relay
                .recv()
                .map_err(|e| RunError::Party(e.into()))?;
            let protocol = |source| {
                RunError::Party(PartyError::Protocol {
                    peer: peer.clone(),
                    source,
                })
            };
            let message = Message::decode(&frame).map_err(protocol)?;
            if message.kind != kind {
                return Err(protocol(ProtocolError::Unexpected {
                    expected: kind.name(),
                    got: message.kind.name(),
                }));
            }
            message.check_dims(&[None]).map_err(protocol)?;
            if message.data.dtype() != dtype {
                return Err(protocol(ProtocolError::UnsupportedDtype(
                    message.data.dtype(),
                )));
            }
            let len = frame.len() as u64;
            self.links[from]
                .relayed_from
                .record(kind, Direction::Up, len);
            self.links[to].relayed_to.record(kind, Direction::Down, len);
            self.links[to]
                .relay
                .send(frame)
                .map_err(|e| RunError::Party(e.into()))?;
        }
        Ok(())
    }

    /// Has the evaluating client — the model's holder, or client 0 with the global model under
    /// SplitFed — send the test set's activations; returns the test accuracy (and the
    /// auxiliary head's).
    fn evaluate(&mut self, epoch: usize, evaluator: usize) -> Result<(f64, Option<f64>), RunError> {
        let expects_batch = self.config.train.eval_batch_size.max(1);
        let test = &self.data.test;
        let classes = self.data.classes;
        let server = self.server.model().valid();
        let link = &mut self.links[evaluator];
        link.control.send(&Control::Evaluate { epoch })?;
        if let Some(global) = self.server.global_client() {
            let n = global.len();
            link.eval.send(&Message {
                kind: MessageKind::Weights,
                data: TensorData::new(global.to_vec(), [n]),
            })?;
        }
        let peer = link.mux.peer().to_string();
        let protocol = |source| {
            RunError::Party(PartyError::Protocol {
                peer: peer.clone(),
                source,
            })
        };
        let [c, h, w] = self.report.cut.activation_shape;
        let mut right = 0;
        for batch in 0..test_batch_count(test.len(), expects_batch) {
            let size = expects_batch.min(test.len() - batch * expects_batch);
            let activations = link.eval.recv()?;
            activations
                .check_dims(&[Some(size), Some(c), Some(h), Some(w)])
                .map_err(protocol)?;
            let activations = activations
                .into_float::<4>(MessageKind::Activations, &self.device)
                .map_err(protocol)?;
            let labels = link.eval.recv()?;
            if labels.kind == MessageKind::Labels {
                labels.check_labels(size, classes).map_err(protocol)?;
            }
            let labels = labels.into_labels(&self.device).map_err(protocol)?;
            right += correct(server.forward(activations), labels);
        }
        let aux_correct = link.control.expect("evaluated", |m| match m {
            Control::Evaluated { aux_correct } => Some(*aux_correct),
            _ => None,
        })?;
        let n = test.len().max(1) as f64;
        let decoupled = self.config.train.mode == Mode::Decoupled;
        Ok((
            right as f64 / n,
            decoupled.then(|| aux_correct.unwrap_or(0) as f64 / n),
        ))
    }

    /// Tells every client that the run stops, and lets them hang up.
    fn stop_all(&mut self, reason: &str) {
        tell_stop(self.links.iter_mut(), reason);
    }

    /// Ends a run that failed at `place`: the report so far (status `failed`) is written and
    /// the clients are told; the error names the peer, epoch and step.
    fn fail(&mut self, error: RunError, started: Instant) -> RunError {
        let place = &self.place;
        let (epoch, step) = (place.epoch, place.step.clone());
        self.tally.abandon();
        let at = match &step {
            Some((index, step)) => format!(
                "epoch {}, step {} of {} (client {}'s batch {} of {})",
                epoch,
                index + 1,
                self.pacer.steps_per_epoch(),
                step.client,
                step.batch + 1,
                self.pacer.batches()[step.client]
            ),
            None => format!("epoch {epoch}"),
        };
        // A client that stopped on its own error said why before it hung up.
        let error = match &step {
            Some((_, step)) => {
                let link = &mut self.links[step.client];
                super::last_word(&link.mux, &mut link.control, &error).unwrap_or(error)
            }
            None => error,
        };
        let message = format!("{error}, at {at}");
        self.stop_all(&message);
        let mut report = self.finish(started);
        report.status = RunStatus::Failed;
        report.error = Some(message.clone());
        match self.write(&report) {
            Ok(()) => RunError::Failed(message),
            Err(e) => RunError::Failed(format!("{message}; and the report: {e}")),
        }
    }

    fn network(&self) -> NetworkReport {
        let mut eval_bytes = Bytes::default();
        let mut control_bytes = 0;
        let (mut wire_sent, mut wire_received) = (0, 0);
        let mut clients = Vec::new();
        for (id, link) in self.links.iter().enumerate() {
            eval_bytes = eval_bytes + link.eval.sent() + link.eval.received();
            control_bytes += link.control.bytes();
            let (sent, received) = link.mux.wire_bytes().unwrap_or((0, 0));
            wire_sent += sent;
            wire_received += received;
            clients.push(ClientWire {
                id,
                peer: link.mux.peer().to_string(),
                wire_sent: sent,
                wire_received: received,
            });
        }
        NetworkReport {
            transport: "grpc".into(),
            tls: self.options.tls,
            eval_bytes,
            control_bytes,
            relayed_bytes: self.links.iter().map(|l| l.relayed_from.total).sum(),
            wire_sent,
            wire_received,
            clients,
        }
    }

    /// The report of the run so far.
    fn finish(&self, started: Instant) -> Report {
        let (baseline, server_copies) = (self.baseline, self.server_copies);
        let mut report = self.report.clone();
        report.bytes = self.bytes();
        report.bytes_per_epoch = report.bytes.per(report.epochs.len());
        for (client, (link, train)) in report
            .clients
            .iter_mut()
            .zip(self.links.iter().zip(self.server.links()))
        {
            client.bytes = link.client_traffic(train);
        }
        if let Some(peaks) = self.meter.peaks() {
            report.peak_memory_bytes = Some(peaks.step);
            report.peak_memory = Some(PeakMemoryReport {
                peaks,
                baseline,
                server_copies,
                source: self.meter.source(),
            });
        }
        report.wall_seconds = started.elapsed().as_secs_f64();
        report.network = Some(self.network());
        report
    }

    /// Writes `report` to the report path (atomically: a reader never sees half a file).
    fn write(&self, report: &Report) -> Result<(), RunError> {
        let Some(path) = &self.options.report_path else {
            return Ok(());
        };
        let text = serde_json::to_string_pretty(report)
            .map_err(|e| RunError::Failed(format!("the report as JSON: {e}")))?;
        let partial = path.with_extension("json.partial");
        crate::run::checkpoint::write_atomically(&partial, path, (text + "\n").as_bytes())
            .map_err(|(at, e)| RunError::Failed(format!("cannot write {}: {e}", at.display())))
    }
}
