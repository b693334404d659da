//! The training loop: epochs, the clients' passes over their shards in the order the schedule
//! sets, learning rates, the divergence check, per-epoch evaluation and the report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rand::rngs::StdRng;

use super::checkpoint::{Checkpoint, CheckpointMeta};
use super::eval::evaluate;
use super::setup::RunSetup;
use super::{PreparedData, RunError};
use crate::config::differing_keys;
use crate::config::{ExperimentConfig, Mode};
use crate::data::Batcher;
use crate::data::partition::class_histograms;
use crate::federation::{ModelFlow, RatePosition};
use crate::memory;
use crate::party::optim::LrSchedule;
use crate::party::{Rates, StepLosses};
use crate::protocol::Bytes;
use crate::report::{ClientReport, CutReport, EpochMetrics, PeakMemoryReport, Report, RunStatus};

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
    let histograms = class_histograms(&data.train.labels, data.classes, &parts);
    let setup = RunSetup::new(
        &config,
        data.classes,
        Arc::clone(&data.train),
        parts.clone(),
        data.normalization,
    )?;
    let baseline = memory::current() as u64;

    let batch = config.train.batch_size;
    let batches: Vec<usize> = parts.iter().map(|p| p.len().div_ceil(batch)).collect();
    let steps_per_epoch: usize = batches.iter().sum();
    let epochs = config.train.epochs;
    let checkpoint_dir = options.checkpoint_dir.clone();
    let resume = options.resume.clone();
    let report = Report {
        splitaux_version: crate::VERSION.to_string(),
        mode,
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
    };
    let mut trainer = Trainer {
        schedule: LrSchedule::new(&config.optim, steps_per_epoch * epochs),
        client_schedules: batches
            .iter()
            .map(|&b| LrSchedule::new(&config.optim, b * epochs))
            .collect(),
        shard_sizes: parts.iter().map(|p| p.len() as u64).collect(),
        batches,
        steps_per_epoch,
        setup,
        data,
        options,
        report,
        global_step: 0,
        epoch: EpochSums::default(),
        checkpoint_dir,
        earlier_seconds: 0.0,
        kill_after: std::env::var(KILL_AFTER_STEP_ENV)
            .ok()
            .and_then(|v| v.parse().ok()),
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
    /// Batches taken so far, and steps trained (batches of one image are skipped).
    taken: usize,
    trained: usize,
}

/// Sums over the passes of one epoch.
#[derive(Default)]
struct EpochSums {
    server_loss: f64,
    client_loss: f64,
    steps: usize,
    images: usize,
    lr: f64,
    data_seconds: f64,
    started: Option<Instant>,
    bytes_before: Bytes,
    bar: Option<ProgressBar>,
}

/// A run in progress: the parties, where the schedule is, and the report so far.
struct Trainer<'a> {
    setup: RunSetup,
    data: &'a PreparedData,
    options: RunOptions,
    /// The learning rate by the run's step count, and by each client's own steps (SplitFed).
    schedule: LrSchedule,
    client_schedules: Vec<LrSchedule>,
    /// Per client: batches per epoch, and shard size (the FedAvg weight).
    batches: Vec<usize>,
    shard_sizes: Vec<u64>,
    steps_per_epoch: usize,
    /// Steps taken so far (the learning-rate schedule's position).
    global_step: usize,
    epoch: EpochSums,
    report: Report,
    checkpoint_dir: Option<PathBuf>,
    /// Seconds spent in earlier processes of a resumed run.
    earlier_seconds: f64,
    /// See [`KILL_AFTER_STEP_ENV`].
    kill_after: Option<usize>,
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
        self.global_step = meta.global_step;
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
                global_step: self.global_step,
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
        let mode = self.setup.config.train.mode;
        self.epoch = EpochSums {
            started: Some(Instant::now()),
            bytes_before: self.setup.parties.bytes(),
            lr: self.schedule.at(self.global_step),
            bar: Some(progress_bar(
                &self.options,
                self.steps_per_epoch,
                epoch,
                self.setup.config.train.epochs,
                mode,
            )),
            ..EpochSums::default()
        };
    }

    /// One epoch as `clients.schedule` plans it: the client of each step, the model's moves
    /// (hand-offs, or SplitFed's download and upload around the round).
    fn train_epoch(&mut self, epoch: usize) -> Result<Flow, RunError> {
        let config = &self.setup.config;
        let plan = config
            .clients
            .schedule
            .plan(epoch, &self.batches, config.train.seed);
        let optim = config.optim.clone();
        if let ModelFlow::Federated { server_copies } = plan.model {
            self.setup.parties.begin_round(server_copies, &optim)?;
        }
        let mut passes: Vec<Option<Pass>> = self.batches.iter().map(|_| None).collect();
        for &client in &plan.steps {
            if plan.model == ModelFlow::HandOff {
                self.take_over(client)?;
            }
            let pass = passes[client].get_or_insert_with(|| {
                let (order, augment) = self.setup.parties.clients[client]
                    .epoch_order(self.setup.config.train.seed, epoch);
                Pass {
                    order,
                    augment,
                    taken: 0,
                    trained: 0,
                }
            });
            // A client's local step counts its trained steps; its epoch offset counts every
            // batch (a skipped one-image batch included), so a round starts where the schedule
            // says whatever was skipped before.
            let rate = |position: RatePosition| match position {
                RatePosition::Global => self.schedule.at(self.global_step),
                RatePosition::PerClient => self.client_schedules[client]
                    .at((epoch - 1) * self.batches[client] + pass.trained),
            };
            let rates = Rates {
                client: rate(plan.client_rate),
                server: rate(plan.server_rate),
            };
            if self.train_step(client, epoch, pass, rates)? == Flow::Stop {
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

    /// Sequential: hands the model round the ring until `client` holds it (a client with no
    /// images passes it straight on).
    fn take_over(&mut self, client: usize) -> Result<(), RunError> {
        let parties = &mut self.setup.parties;
        let n = parties.clients.len();
        for _ in 0..n {
            if parties.clients[client].holds_model() {
                return Ok(());
            }
            let holder = (0..n)
                .find(|&c| parties.clients[c].holds_model())
                .unwrap_or((client + n - 1) % n);
            parties.hand_off(holder, (holder + 1) % n)?;
        }
        Ok(())
    }

    /// `client`'s next batch of its pass (a batch of one image is skipped: BatchNorm needs
    /// two).
    fn train_step(
        &mut self,
        client: usize,
        epoch: usize,
        pass: &mut Pass,
        rates: Rates,
    ) -> Result<Flow, RunError> {
        let batch = self.setup.config.train.batch_size;
        let index = pass.taken;
        pass.taken += 1;
        let Some(chunk) = pass.order.chunks(batch).nth(index) else {
            return Ok(Flow::Continue);
        };
        if chunk.len() < 2 {
            return Ok(Flow::Continue);
        }
        let data_start = Instant::now();
        let (images, labels) = self.setup.parties.clients[client].batch(chunk, &mut pass.augment);
        self.epoch.data_seconds += data_start.elapsed().as_secs_f64();

        self.epoch.lr = rates.server;
        let losses =
            self.setup
                .parties
                .step(client, images, labels, rates, &mut self.setup.meter)?;
        self.global_step += 1;
        pass.trained += 1;
        if self.kill_after == Some(self.global_step) {
            // SAFETY: plain libc calls on this process's own id; nothing runs after them.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        if let Some(bad) = non_finite(losses) {
            let batches = self.batches[client];
            let place = if self.setup.parties.clients.len() == 1 {
                format!("step {} of {batches}", index + 1)
            } else {
                format!("client {client}, step {} of {batches}", index + 1)
            };
            if let Some(bar) = &self.epoch.bar {
                bar.abandon();
            }
            self.report.status = RunStatus::Diverged;
            self.report.error = Some(format!(
                "{bad} loss is not finite at epoch {epoch}, {place}"
            ));
            return Ok(Flow::Stop);
        }
        let sums = &mut self.epoch;
        sums.server_loss += losses.server as f64;
        sums.client_loss += losses.client.unwrap_or(0.0) as f64;
        sums.steps += 1;
        sums.images += chunk.len();
        if let (Some(bar), Some(started)) = (&sums.bar, sums.started) {
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.3}  {:.0} img/s",
                sums.server_loss / sums.steps as f64,
                sums.images as f64 / started.elapsed().as_secs_f64()
            ));
        }
        Ok(Flow::Continue)
    }

    fn end_epoch(&mut self, epoch: usize) -> Result<(), RunError> {
        let sums = std::mem::take(&mut self.epoch);
        let train_seconds = sums.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        if let Some(bar) = &sums.bar {
            bar.finish_and_clear();
        }
        let config = &self.setup.config;
        let mode = config.train.mode;
        let decoupled = mode == Mode::Decoupled;
        let eval_start = Instant::now();
        let server = burn::module::Module::valid(self.setup.parties.server.model());
        let (data, device) = (self.data, &self.setup.device);
        let eval_batch = config.train.eval_batch_size;
        let (test_accuracy, aux_accuracy) = self.setup.parties.with_client_model(|client| {
            evaluate(
                &burn::module::Module::valid(client),
                &server,
                &data.test,
                &Batcher::new(data.normalization, false),
                eval_batch,
                device,
                decoupled,
            )
        })?;
        let parties = &self.setup.parties;
        let steps = sums.steps.max(1) as f64;
        self.report.epochs.push(EpochMetrics {
            epoch,
            lr: sums.lr,
            server_loss: sums.server_loss / steps,
            client_loss: decoupled.then_some(sums.client_loss / steps),
            test_accuracy,
            aux_accuracy,
            bytes: parties.bytes().since(&sums.bytes_before),
            train_seconds,
            data_seconds: sums.data_seconds,
            eval_seconds: eval_start.elapsed().as_secs_f64(),
            images_per_s: sums.images as f64 / train_seconds,
        });
        self.report.test_accuracy = Some(test_accuracy);
        self.report.aux_accuracy = aux_accuracy;
        if self.options.progress {
            let line = format!(
                "{} epoch {epoch}/{}: loss {:.3}, test accuracy {:.2} %{}",
                mode.name(),
                config.train.epochs,
                sums.server_loss / steps,
                100.0 * test_accuracy,
                aux_accuracy.map_or(String::new(), |a| format!(", aux head {:.2} %", 100.0 * a)),
            );
            match &sums.bar {
                Some(bar) => bar.suspend(|| eprintln!("{line}")),
                None => eprintln!("{line}"),
            }
        }
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

fn progress_bar(
    options: &RunOptions,
    steps: usize,
    epoch: usize,
    epochs: usize,
    mode: Mode,
) -> ProgressBar {
    use std::io::IsTerminal;
    if !options.progress || !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps as u64);
    let bar = match &options.multi {
        Some(multi) => multi.add(bar),
        None => bar,
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})")
            .expect("valid progress template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{} epoch {epoch}/{epochs}", mode.name()));
    bar
}
