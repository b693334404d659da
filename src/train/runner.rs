//! The training loop shared by every strategy: data order, learning rate, the divergence check,
//! per-epoch evaluation, traffic and memory accounting.

use std::time::Instant;

use burn::module::Module;
use burn::tensor::Device;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::optim::{LrSchedule, build_optimizer};
use super::party::{Client, Server, Trainable};
use super::strategy::{StepContext, StepLosses, strategy_for};
use crate::backend::{BackendError, configure_cpu};
use crate::config::{ExperimentConfig, Mode};
use crate::data::batch::{epoch_order, epoch_rng};
use crate::data::{Batcher, Cifar, Normalization, Split, subset};
use crate::link::{Link, LinkError, Traffic};
use crate::memory::{self, MemoryMeter};
use crate::model::{ClientModel, ServerNet, ShapeError, SplitResNetConfig, correct};
use crate::report::{Bytes, CutReport, EpochMetrics, Parameters, PeakMemoryReport, Report};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Shape(#[from] ShapeError),
    #[error("link: {0}")]
    Link(#[from] LinkError),
    #[error("training set is empty (data.train_limit too small?)")]
    NoTrainingData,
}

/// The data a run trains and evaluates on, prepared once (and shared by `compare`'s two runs).
#[derive(Debug, Clone)]
pub struct PreparedData {
    pub train: Split,
    pub test: Split,
    pub classes: usize,
    pub normalization: Normalization,
    pub dataset: String,
}

impl PreparedData {
    /// Applies the config's subset limits; normalization statistics come from the training
    /// images actually used.
    pub fn new(cifar: &Cifar, config: &ExperimentConfig) -> Self {
        let classes = cifar.num_classes();
        let train = subset::take(
            &cifar.train,
            config.data.train_limit,
            config.data.subset,
            classes,
        );
        let test = subset::take(
            &cifar.test,
            config.data.test_limit,
            config.data.subset,
            classes,
        );
        let normalization = Normalization::of(&train);
        Self {
            train,
            test,
            classes,
            normalization,
            dataset: cifar.kind.name().to_string(),
        }
    }
}

/// How a run shows itself.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Show per-epoch progress bars (only on a terminal) and a line per epoch on stderr.
    pub progress: bool,
    /// Draw the epoch bar below these bars (a sweep's overall bar).
    pub multi: Option<MultiProgress>,
}

/// Trains one split model from scratch in `mode` and reports on it. A diverging loss ends the
/// run early with `status = "diverged"` and the epochs finished so far.
pub fn run(
    config: &ExperimentConfig,
    mode: Mode,
    data: &PreparedData,
    options: RunOptions,
) -> Result<Report, RunError> {
    let started = Instant::now();
    let mut config = config.clone();
    config.train.mode = mode;
    if data.train.is_empty() {
        return Err(RunError::NoTrainingData);
    }
    configure_cpu(config.train.threads);
    let device = config.train.backend.device()?;
    let train_device = device.clone().autodiff();
    device.seed(config.train.seed);
    train_device.seed(config.train.seed);

    let (client_model, server_net, cut) = SplitResNetConfig {
        depth: config.model.depth,
        classes: data.classes,
        cut: config.model.cut,
        aux: config.model.aux,
        kernels: config.model.kernels,
    }
    .init(&train_device)?;
    let parameters = Parameters {
        client: client_model.net.num_params(),
        aux_head: client_model.aux.num_params(),
        server: server_net.num_params(),
    };
    let mut client = Client(Trainable::new(client_model, build_optimizer(&config.optim)));
    let mut server = Server(Trainable::new(server_net, build_optimizer(&config.optim)));
    let strategy = strategy_for(mode);
    let mut link = Link::new();
    let mut meter = MemoryMeter::new(&device, config.train.backend.host_resident());
    let baseline = memory::current() as u64;

    let batch_size = config.train.batch_size;
    let steps_per_epoch = data.train.len().div_ceil(batch_size);
    let schedule = LrSchedule::new(&config.optim, steps_per_epoch * config.train.epochs);
    let train_batcher = Batcher::new(data.normalization, config.data.augment);
    let eval_batcher = Batcher::new(data.normalization, false);

    let mut report = Report {
        splitaux_version: crate::VERSION.to_string(),
        mode,
        status: "completed".into(),
        error: None,
        dataset: data.dataset.clone(),
        train_images: data.train.len(),
        test_images: data.test.len(),
        cut: CutReport {
            blocks: cut.blocks,
            total_blocks: cut.total_blocks,
            activation_shape: cut.activation_shape,
        },
        parameters,
        test_accuracy: None,
        aux_accuracy: None,
        epochs: Vec::new(),
        bytes: Bytes::default(),
        bytes_per_epoch: Bytes::default(),
        peak_memory_bytes: None,
        peak_memory: None,
        wall_seconds: 0.0,
        config: config.clone(),
    };

    let mut global_step = 0;
    'epochs: for epoch in 1..=config.train.epochs {
        let bar = progress_bar(&options, steps_per_epoch, epoch, config.train.epochs, mode);
        let traffic_before = link.traffic();
        let order = epoch_order(data.train.len(), config.train.seed, epoch, true);
        let mut augment_rng = epoch_rng(config.train.seed, epoch, 1);
        let (mut server_sum, mut client_sum, mut steps) = (0f64, 0f64, 0usize);
        let (mut data_seconds, epoch_start) = (0f64, Instant::now());
        let mut lr = schedule.at(global_step);

        for (index, chunk) in order.chunks(batch_size).enumerate() {
            if chunk.len() < 2 {
                continue; // BatchNorm needs at least two samples per batch.
            }
            let data_start = Instant::now();
            let batch = train_batcher.batch(&data.train, chunk, &mut augment_rng);
            let (images, labels) = batch.to_tensors(&train_device);
            data_seconds += data_start.elapsed().as_secs_f64();

            lr = schedule.at(global_step);
            meter.begin_step();
            let mut ctx = StepContext {
                client: &mut client,
                server: &mut server,
                link: &mut link,
                memory: &mut meter,
                device: &train_device,
            };
            let losses = strategy.step(&mut ctx, images, labels, lr)?;
            meter.end_step();
            global_step += 1;

            if let Some(bad) = non_finite(losses) {
                bar.abandon();
                report.status = "diverged".into();
                report.error = Some(format!(
                    "{bad} loss is not finite at epoch {epoch}, step {} of {steps_per_epoch}",
                    index + 1
                ));
                break 'epochs;
            }
            server_sum += losses.server as f64;
            client_sum += losses.client.unwrap_or(0.0) as f64;
            steps += 1;
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.3}  {:.0} img/s",
                server_sum / steps as f64,
                (steps * batch_size) as f64 / epoch_start.elapsed().as_secs_f64()
            ));
        }
        let train_seconds = epoch_start.elapsed().as_secs_f64();
        bar.finish_and_clear();

        let eval_start = Instant::now();
        let (test_accuracy, aux_accuracy) = evaluate(
            &client.0.model().valid(),
            &server.0.model().valid(),
            &data.test,
            &eval_batcher,
            config.train.eval_batch_size,
            &device,
            mode == Mode::Decoupled,
        );
        let steps_f = steps.max(1) as f64;
        report.epochs.push(EpochMetrics {
            epoch,
            lr,
            server_loss: server_sum / steps_f,
            client_loss: (mode == Mode::Decoupled).then_some(client_sum / steps_f),
            test_accuracy,
            aux_accuracy,
            bytes: link.traffic().since(&traffic_before).into(),
            train_seconds,
            data_seconds,
            eval_seconds: eval_start.elapsed().as_secs_f64(),
            images_per_s: (steps * batch_size).min(data.train.len()) as f64 / train_seconds,
        });
        report.test_accuracy = Some(test_accuracy);
        report.aux_accuracy = aux_accuracy;
        if options.progress {
            bar.suspend(|| {
                eprintln!(
                    "{} epoch {epoch}/{}: loss {:.3}, test accuracy {:.2} %{}",
                    mode.name(),
                    config.train.epochs,
                    server_sum / steps_f,
                    100.0 * test_accuracy,
                    aux_accuracy
                        .map_or(String::new(), |a| format!(", aux head {:.2} %", 100.0 * a)),
                )
            });
        }
    }

    let traffic = link.traffic();
    report.bytes = traffic.into();
    report.bytes_per_epoch = per_epoch(traffic, report.epochs.len());
    if let Some(peaks) = meter.peaks() {
        report.peak_memory_bytes = Some(peaks.step);
        report.peak_memory = Some(PeakMemoryReport::new(peaks, baseline, meter.source()));
    }
    report.wall_seconds = started.elapsed().as_secs_f64();
    Ok(report)
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

fn per_epoch(traffic: Traffic, epochs: usize) -> Bytes {
    let n = epochs.max(1) as u64;
    Bytes::from(Traffic {
        activations: traffic.activations / n,
        labels: traffic.labels / n,
        gradients: traffic.gradients / n,
        messages: traffic.messages / n,
    })
}

/// Test accuracy of the split model, and of the auxiliary head when asked. Models in inference
/// mode (BatchNorm running statistics).
pub fn evaluate(
    client: &ClientModel,
    server: &ServerNet,
    test: &Split,
    batcher: &Batcher,
    batch_size: usize,
    device: &Device,
    with_aux: bool,
) -> (f64, Option<f64>) {
    let (mut right, mut aux_right) = (0usize, 0usize);
    let mut unused_rng = epoch_rng(0, 0, 0);
    let indices: Vec<usize> = (0..test.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let (images, labels) = batcher
            .batch(test, chunk, &mut unused_rng)
            .to_tensors(device);
        let h = client.net.forward(images);
        if with_aux {
            aux_right += correct(client.aux.forward(h.clone()), labels.clone());
        }
        right += correct(server.forward(h), labels);
    }
    let n = test.len().max(1) as f64;
    (right as f64 / n, with_aux.then_some(aux_right as f64 / n))
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
