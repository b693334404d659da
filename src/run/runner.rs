//! The training loop: epochs, the clients' passes over their shards in the order the schedule
//! sets, learning rates, the divergence check, per-epoch evaluation and the report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use indicatif::MultiProgress;
use rand::rngs::StdRng;

use super::checkpoint::{Checkpoint, CheckpointMeta};
use super::eval::evaluate;
use super::pace::{PacedStep, Pacer};
use super::setup::RunSetup;
use super::tally::{EpochTally, progress_bar};
use super::{PreparedData, RunError};
use crate::config::differing_keys;
use crate::config::{ExperimentConfig, Mode};
use crate::data::Batcher;
use crate::data::partition::class_histograms;
use crate::federation::ModelFlow;
use crate::memory;
use crate::party::StepLosses;
use crate::protocol::Bytes;
use crate::report::{ClientReport, CutReport, PeakMemoryReport, Report, RunStatus};

/// How a run shows itself.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Show per-epoch progress bars (only on a terminal) and a line per epoch on stderr.
    pub progress: bool,
    /// Draw the epoch bar below these bars (a sweep's overall bar).
    pub multi: Option<MultiProgress>,
    /// Write checkpoints into this folder (every `train.checkpoint_every` epochs).
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue from this checkpoint instead of starting afresh.
    pub resume: Option<Arc<Checkpoint>>,
}

/// Set to a step count N, a run kills its own process (SIGKILL) right after its N-th training
/// step: the deterministic interruption that the resume tests use.
pub const KILL_AFTER_STEP_ENV: &str = "SPLITAUX_KILL_AFTER_STEP";

/// Trains one split model in `mode` (from scratch, or from `options.resume`) and reports on it.
/// A diverging loss ends the run early with `status = "diverged"` and the epochs finished so
/// far.
pub fn run(
    config: &ExperimentConfig,
    mode: Mode,
    data: &PreparedData,
    options: RunOptions,
) -> Result<Report, RunError> {
    let started = Instant::now();
    let mut config = config.clone();
    config.train.mode = mode;
    let parts = data.partition(&config)?;
    let setup = RunSetup::from_data(&config, data, parts.clone())?;
    let baseline = memory::current() as u64;

    let shard_sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
    let epochs = config.train.epochs;
    let checkpoint_dir = options.checkpoint_dir.clone();
    let resume = options.resume.clone();
    let report = fresh_report(&config, data, &setup, &parts);
    let mut trainer = Trainer {
        pacer: Pacer::new(&config, &shard_sizes),
        shard_sizes: shard_sizes.iter().map(|&n| n as u64).collect(),
        setup,
        data,
        options,
        report,
        epoch: EpochTally::default(),
        checkpoint_dir,
        earlier_seconds: 0.0,
        kill_after: KillSwitch::from_env(),
    };
    let first = match resume {
        Some(checkpoint) => trainer.restore(&checkpoint)? + 1,
        None => 1,
    };

    for epoch in first..=epochs {
        trainer.begin_epoch(epoch);
        if trainer.train_epoch(epoch)? == Flow::Stop {
            break;
        }
        trainer.end_epoch(epoch)?;
        trainer.checkpoint(epoch, started)?;
    }
    Ok(trainer.finish(baseline, started))
}

/// The report of a run about to start: its set-up and shards, no epochs yet.
pub(crate) fn fresh_report(
    config: &ExperimentConfig,
    data: &PreparedData,
    setup: &RunSetup,
    parts: &[Vec<usize>],
) -> Report {
    let histograms = class_histograms(&data.train.labels, data.classes, parts);
    Report {
        splitaux_version: crate::VERSION.to_string(),
        mode: config.train.mode,
        status: RunStatus::Completed,
        error: None,
        dataset: data.dataset.clone(),
        train_images: data.train.len(),
        test_images: data.test.len(),
        cut: CutReport {
            blocks: setup.cut.blocks,
            total_blocks: setup.cut.total_blocks,
            activation_shape: setup.cut.activation_shape,
        },
        parameters: setup.parameters,
        test_accuracy: None,
        aux_accuracy: None,
        epochs: Vec::new(),
        bytes: Bytes::default(),
        bytes_per_epoch: Bytes::default(),
        clients: parts
            .iter()
            .zip(histograms)
            .enumerate()
            .map(|(id, (p, class_histogram))| ClientReport {
                id,
                images: p.len(),
                class_histogram,
                bytes: Bytes::default(),
            })
            .collect(),
        peak_memory_bytes: None,
        peak_memory: None,
        wall_seconds: 0.0,
        config: config.clone(),
        network: None,
    }
}

/// Whether training goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    /// A loss diverged; the report says where.
    Stop,
}

/// A client's pass over its shard in the current epoch.
struct Pass {
    /// Training-subset indices in this epoch's order.
    order: Vec<usize>,
    augment: StdRng,
}

/// A run in progress: the parties, where the schedule is, and the report so far.
struct Trainer<'a> {
    setup: RunSetup,
    data: &'a PreparedData,
    options: RunOptions,
    /// The learning rates, batches and hand-offs of each step.
    pacer: Pacer,
    /// Per client: shard size (the FedAvg weight).
    shard_sizes: Vec<u64>,
    epoch: EpochTally,
    report: Report,
    checkpoint_dir: Option<PathBuf>,
    /// Seconds spent in earlier processes of a resumed run.
    earlier_seconds: f64,
    kill_after: KillSwitch,
}

impl Trainer<'_> {
    /// Puts the run back where `checkpoint` left it; returns the epochs it had finished.
    fn restore(&mut self, checkpoint: &Checkpoint) -> Result<usize, RunError> {
        let meta = &checkpoint.meta;
        let keys = differing_keys(&meta.config, &self.setup.config);
        if !keys.is_empty() {
            return Err(RunError::ResumeMismatch { keys });
        }
        let parties = &mut self.setup.parties;
        if meta.client_ledgers.len() != parties.clients.len() {
            return Err(RunError::ResumeMismatch {
                keys: vec!["clients.count".into()],
            });
        }
        for (id, client) in parties.clients.iter_mut().enumerate() {
            let state = match meta.holder {
                Some(holder) if holder == id => checkpoint.client.as_ref(),
                _ => None,
            };
            client.restore_model(state)?;
            client.restore_ledgers(&meta.client_ledgers[id])?;
        }
        parties.server.restore(
            &checkpoint.server,
            checkpoint.global_client.as_deref(),
            &self.setup.config.optim,
        )?;
        parties.server.restore_ledgers(&meta.server_ledgers)?;
        if let Some(peaks) = meta.peaks {
            self.setup.meter.carry_peaks(peaks);
        }
        self.pacer.resume(meta.global_step, meta.holder);
        self.earlier_seconds = meta.wall_seconds;
        self.report.epochs = meta.report.epochs.clone();
        self.report.test_accuracy = meta.report.test_accuracy;
        self.report.aux_accuracy = meta.report.aux_accuracy;
        if self.options.progress {
            eprintln!(
                "resuming {} after epoch {} of {} (step {})",
                self.setup.config.train.mode.name(),
                meta.epochs_done,
                self.setup.config.train.epochs,
                meta.global_step
            );
        }
        Ok(meta.epochs_done)
    }

    /// Writes a checkpoint after `epoch` when the run has a checkpoint folder and
    /// `train.checkpoint_every` says so (always after the last epoch).
    fn checkpoint(&mut self, epoch: usize, started: Instant) -> Result<(), RunError> {
        let config = &self.setup.config;
        let every = config.train.checkpoint_every;
        let Some(dir) = &self.checkpoint_dir else {
            return Ok(());
        };
        if every == 0 || (!epoch.is_multiple_of(every) && epoch != config.train.epochs) {
            return Ok(());
        }
        let parties = &self.setup.parties;
        let holder = parties.clients.iter().position(|c| c.holds_model());
        let client = match holder {
            Some(holder) => parties.clients[holder].model_state()?,
            None => None,
        };
        let checkpoint = Checkpoint {
            meta: CheckpointMeta {
                splitaux_version: crate::VERSION.to_string(),
                config: config.clone(),
                data_dir: self.data.dir.clone(),
                epochs_done: epoch,
                global_step: self.pacer.global_step(),
                wall_seconds: self.earlier_seconds + started.elapsed().as_secs_f64(),
                report: self.report.clone(),
                client_ledgers: parties.clients.iter().map(|c| c.ledgers()).collect(),
                server_ledgers: parties.server.ledgers(),
                peaks: self.setup.meter.peaks(),
                holder,
            },
            client,
            global_client: parties.server.global_client().map(<[f32]>::to_vec),
            server: parties.server.model_state()?,
        };
        checkpoint.save(dir)?;
        Ok(())
    }

    fn begin_epoch(&mut self, epoch: usize) {
        let config = &self.setup.config;
        let bar = progress_bar(
            self.options.progress,
            self.options.multi.as_ref(),
            self.pacer.steps_per_epoch(),
            epoch,
            config.train.epochs,
            config.train.mode,
        );
        self.epoch = EpochTally::begin(self.pacer.global_rate(), self.setup.parties.bytes(), bar);
    }

    /// One epoch as `clients.schedule` plans it: the client of each step, the model's moves
    /// (hand-offs, or SplitFed's download and upload around the round).
    fn train_epoch(&mut self, epoch: usize) -> Result<Flow, RunError> {
        let config = &self.setup.config;
        let seed = config.train.seed;
        let plan = config
            .clients
            .schedule
            .plan(epoch, self.pacer.batches(), seed);
        let optim = config.optim.clone();
        if let ModelFlow::Federated { server_copies } = plan.model {
            self.setup.parties.begin_round(server_copies, &optim)?;
        }
        self.pacer.begin_epoch(epoch);
        let mut passes: Vec<Option<Pass>> = self.shard_sizes.iter().map(|_| None).collect();
        for &client in &plan.steps {
            let step = self.pacer.next(&plan, client);
            for &(from, to) in &step.hand_offs {
                self.setup.parties.hand_off(from, to)?;
            }
            let pass = passes[client].get_or_insert_with(|| {
                let (order, augment) = self.setup.parties.clients[client].epoch_order(seed, epoch);
                Pass { order, augment }
            });
            if self.train_step(&step, epoch, pass)? == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        if let ModelFlow::Federated { server_copies } = plan.model {
            self.setup
                .parties
                .end_round(server_copies, &self.shard_sizes)?;
        }
        Ok(Flow::Continue)
    }

    /// The step's batch of its client's pass (a batch of one image is skipped: BatchNorm needs
    /// two).
    fn train_step(
        &mut self,
        step: &PacedStep,
        epoch: usize,
        pass: &mut Pass,
    ) -> Result<Flow, RunError> {
        if !step.trains() {
            return Ok(Flow::Continue);
        }
        let client = step.client;
        let batch = self.setup.config.train.batch_size;
        let start = step.batch * batch;
        let chunk = &pass.order[start..start + step.images];
        let data_start = Instant::now();
        let (images, labels) = self.setup.parties.clients[client].batch(chunk, &mut pass.augment);
        self.epoch.data_seconds += data_start.elapsed().as_secs_f64();

        self.epoch.lr = step.rates.server;
        let losses =
            self.setup
                .parties
                .step(client, images, labels, step.rates, &mut self.setup.meter)?;
        self.pacer.trained(client);
        self.kill_after.after(self.pacer.global_step());
        if check_divergence(&mut self.report, losses, epoch, step, &self.pacer) {
            self.epoch.abandon();
            return Ok(Flow::Stop);
        }
        self.epoch.add(losses, step.images);
        Ok(Flow::Continue)
    }

    fn end_epoch(&mut self, epoch: usize) -> Result<(), RunError> {
        let mut tally = std::mem::take(&mut self.epoch);
        tally.stop_clock();
        let config = &self.setup.config;
        let mode = config.train.mode;
        let eval_start = Instant::now();
        let server = burn::module::Module::valid(self.setup.parties.server.model());
        let (data, device) = (self.data, &self.setup.device);
        let eval_batch = config.train.eval_batch_size;
        let accuracy = self.setup.parties.with_client_model(|client| {
            evaluate(
                &burn::module::Module::valid(client),
                &server,
                &data.test,
                &Batcher::new(data.normalization, false),
                eval_batch,
                device,
                mode == Mode::Decoupled,
            )
        })?;
        let metrics = tally.metrics(
            epoch,
            mode,
            accuracy,
            self.setup.parties.bytes(),
            eval_start.elapsed().as_secs_f64(),
        );
        if self.options.progress {
            tally.print(&metrics, mode, config.train.epochs);
        }
        self.report.test_accuracy = Some(metrics.test_accuracy);
        self.report.aux_accuracy = metrics.aux_accuracy;
        self.report.epochs.push(metrics);
        Ok(())
    }

    fn finish(mut self, baseline: u64, started: Instant) -> Report {
        let parties = &self.setup.parties;
        self.report.bytes = parties.bytes();
        self.report.bytes_per_epoch = self.report.bytes.per(self.report.epochs.len());
        for (client, party) in self.report.clients.iter_mut().zip(&parties.clients) {
            client.bytes = party.bytes();
        }
        if let Some(peaks) = self.setup.meter.peaks() {
            self.report.peak_memory_bytes = Some(peaks.step);
            self.report.peak_memory = Some(PeakMemoryReport {
                peaks,
                baseline,
                server_copies: self.setup.server_copies_bytes,
                source: self.setup.meter.source(),
            });
        }
        self.report.wall_seconds = self.earlier_seconds + started.elapsed().as_secs_f64();
        self.report
    }
}

/// Marks `report` diverged when a loss of `step` is not finite; whether it did.
pub(crate) fn check_divergence(
    report: &mut Report,
    losses: StepLosses,
    epoch: usize,
    step: &PacedStep,
    pacer: &Pacer,
) -> bool {
    let Some(bad) = non_finite(losses) else {
        return false;
    };
    let batches = pacer.batches()[step.client];
    let (client, batch) = (step.client, step.batch + 1);
    let place = match pacer.batches().len() {
        1 => format!("step {batch} of {batches}"),
        _ => format!("client {client}, step {batch} of {batches}"),
    };
    report.status = RunStatus::Diverged;
    report.error = Some(format!(
        "{bad} loss is not finite at epoch {epoch}, {place}"
    ));
    true
}

/// The test hook of [`KILL_AFTER_STEP_ENV`]: the process kills itself after its N-th step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KillSwitch(Option<usize>);

impl KillSwitch {
    pub(crate) fn from_env() -> Self {
        Self(
            std::env::var(KILL_AFTER_STEP_ENV)
                .ok()
                .and_then(|v| v.parse().ok()),
        )
    }

    /// SIGKILLs this process if `steps` is the set count.
    pub(crate) fn after(&self, steps: usize) {
        if self.0 == Some(steps) {
            // SAFETY: plain libc calls on this process's own id; nothing runs after them.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}

/// Which loss is NaN or infinite, if any.
fn non_finite(losses: StepLosses) -> Option<&'static str> {
    if !losses.server.is_finite() {
        Some("server")
    } else if losses.client.is_some_and(|l| !l.is_finite()) {
        Some("client auxiliary")
    } else {
        None
    }
}
