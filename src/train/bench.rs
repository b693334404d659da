//! `splitaux bench`: times training steps of the real split step on random inputs.

use std::time::Instant;

use burn::tensor::{Distribution, Int, Tensor, TensorData};
use rand::RngExt;
use serde::Serialize;

use super::optim::build_optimizer;
use super::party::{Client, Server, Trainable};
use super::runner::RunError;
use super::strategy::{StepContext, strategy_for};
use crate::backend::{BackendKind, configure_cpu};
use crate::config::{Mode, OptimConfig};
use crate::data::batch::epoch_rng;
use crate::kernels::Kernels;
use crate::link::Link;
use crate::memory::MemoryMeter;
use crate::model::{AuxKind, CutSpec, SplitResNetConfig};

/// What to time.
#[derive(Debug, Clone, Serialize)]
pub struct BenchConfig {
    pub mode: Mode,
    pub depth: usize,
    pub cut: CutSpec,
    pub aux: AuxKind,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    /// 0 = one per core.
    pub threads: usize,
    pub classes: usize,
    pub backend: BackendKind,
    pub kernels: Kernels,
}

/// Measured speed and memory.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub config: BenchConfig,
    pub cut_blocks: usize,
    pub threads: usize,
    pub images_per_s: f64,
    pub seconds_per_step: f64,
    /// Highest extra bytes over a timed step; null when the backend reports no memory.
    pub peak_memory_bytes: Option<u64>,
    pub peak_client_phase_bytes: Option<u64>,
    pub peak_server_phase_bytes: Option<u64>,
    /// Bytes that crossed the cut per step.
    pub bytes_per_step: u64,
}

/// Runs `warmup` untimed steps, then `steps` timed ones.
pub fn bench(config: &BenchConfig) -> Result<BenchResult, RunError> {
    configure_cpu(config.threads);
    let device = config.backend.device()?;
    let train_device = device.clone().autodiff();
    train_device.seed(0);
    let (client_model, server_net, cut) = SplitResNetConfig {
        depth: config.depth,
        classes: config.classes,
        cut: config.cut,
        aux: config.aux,
        kernels: config.kernels,
    }
    .init(&train_device)?;
    let optim = OptimConfig::default();
    let mut client = Client(Trainable::new(client_model, build_optimizer(&optim)));
    let mut server = Server(Trainable::new(server_net, build_optimizer(&optim)));
    let strategy = strategy_for(config.mode);
    let mut link = Link::new();
    let mut rng = epoch_rng(0, 0, 2);
    let images = Tensor::<4>::random(
        [config.batch, 3, 32, 32],
        Distribution::Normal(0.0, 1.0),
        &train_device,
    );
    let labels: Vec<i64> = (0..config.batch)
        .map(|_| rng.random_range(0..config.classes as i64))
        .collect();
    let labels =
        Tensor::<1, Int>::from_data(TensorData::new(labels, [config.batch]), &train_device);

    let mut warm_meter = MemoryMeter::new(&device, config.backend.host_resident());
    let mut meter = MemoryMeter::new(&device, config.backend.host_resident());
    let mut elapsed = 0f64;
    let mut traffic_after_warmup = link.traffic();
    for step in 0..config.warmup + config.steps {
        let timed = step >= config.warmup;
        if step == config.warmup {
            traffic_after_warmup = link.traffic();
        }
        let meter = if timed { &mut meter } else { &mut warm_meter };
        let start = Instant::now();
        meter.begin_step();
        let mut ctx = StepContext {
            client: &mut client,
            server: &mut server,
            link: &mut link,
            memory: meter,
            device: &train_device,
        };
        strategy.step(&mut ctx, images.clone(), labels.clone(), 0.01)?;
        meter.end_step();
        if timed {
            elapsed += start.elapsed().as_secs_f64();
        }
    }
    let steps = config.steps.max(1) as f64;
    let peaks = meter.peaks();
    Ok(BenchResult {
        config: config.clone(),
        cut_blocks: cut.blocks,
        threads: rayon::current_num_threads(),
        images_per_s: config.batch as f64 * steps / elapsed,
        seconds_per_step: elapsed / steps,
        peak_memory_bytes: peaks.map(|p| p.step),
        peak_client_phase_bytes: peaks.map(|p| p.client_phase),
        peak_server_phase_bytes: peaks.map(|p| p.server_phase),
        bytes_per_step: link.traffic().since(&traffic_after_warmup).total() / steps as u64,
    })
}
