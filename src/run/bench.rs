//! `splitaux bench`: times training steps of the real split step on random inputs, built
//! through the same [`RunSetup`] as a training run.

use std::sync::Arc;
use std::time::Instant;

use burn::tensor::{Distribution, Int, Tensor, TensorData};
use rand::RngExt;
use serde::Serialize;

use super::RunError;
use super::setup::RunSetup;
use crate::backend::BackendKind;
use crate::config::{ExperimentConfig, Mode};
use crate::data::batch::epoch_rng;
use crate::data::{Normalization, Split};
use crate::kernels::Kernels;
use crate::memory::MemoryMeter;
use crate::model::{AuxKind, CutSpec};
use crate::party::Rates;

/// What to time.
#[derive(Debug, Clone, Serialize)]
pub struct BenchConfig {
    pub mode: Mode,
    pub depth: usize,
    pub cut: CutSpec,
    pub aux: AuxKind,
    /// `mlp` head: units of each hidden layer and number of hidden layers.
    pub aux_hidden: usize,
    pub aux_layers: usize,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    /// 0 = one per core.
    pub threads: usize,
    pub classes: usize,
    pub backend: BackendKind,
    pub kernels: Kernels,
}

impl BenchConfig {
    /// The run configuration this benchmark trains with (one client, default optimizer).
    pub fn experiment(&self) -> ExperimentConfig {
        let mut config = ExperimentConfig::default();
        config.model.depth = self.depth;
        config.model.cut = self.cut;
        config.model.aux = self.aux;
        config.model.aux_hidden = self.aux_hidden;
        config.model.aux_layers = self.aux_layers;
        config.model.kernels = self.kernels;
        config.train.mode = self.mode;
        config.train.batch_size = self.batch;
        config.train.threads = self.threads;
        config.train.backend = self.backend;
        config
    }
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
    let experiment = config.experiment();
    let identity = Normalization {
        mean: [0.0; 3],
        std: [1.0; 3],
    };
    let no_images = Arc::new(Split::default());
    let mut setup = RunSetup::new(
        &experiment,
        config.classes,
        no_images,
        vec![Vec::new()],
        identity,
    )?;
    let device = &setup.train_device;
    let mut rng = epoch_rng(0, 0, 2);
    let images = Tensor::<4>::random(
        [config.batch, 3, 32, 32],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let labels: Vec<i64> = (0..config.batch)
        .map(|_| rng.random_range(0..config.classes as i64))
        .collect();
    let labels = Tensor::<1, Int>::from_data(TensorData::new(labels, [config.batch]), device);

    let mut warm_meter = MemoryMeter::new(&setup.device, config.backend.host_resident());
    let mut elapsed = 0f64;
    let mut bytes_after_warmup = setup.parties.bytes();
    for step in 0..config.warmup + config.steps {
        let timed = step >= config.warmup;
        if step == config.warmup {
            bytes_after_warmup = setup.parties.bytes();
        }
        let meter = if timed {
            &mut setup.meter
        } else {
            &mut warm_meter
        };
        let start = Instant::now();
        setup
            .parties
            .step(0, images.clone(), labels.clone(), Rates::both(0.01), meter)?;
        if timed {
            elapsed += start.elapsed().as_secs_f64();
        }
    }
    let steps = config.steps.max(1) as f64;
    let peaks = setup.meter.peaks();
    Ok(BenchResult {
        config: config.clone(),
        cut_blocks: setup.cut.blocks,
        threads: rayon::current_num_threads(),
        images_per_s: config.batch as f64 * steps / elapsed,
        seconds_per_step: elapsed / steps,
        peak_memory_bytes: peaks.map(|p| p.step),
        peak_client_phase_bytes: peaks.map(|p| p.client_phase),
        peak_server_phase_bytes: peaks.map(|p| p.server_phase),
        bytes_per_step: setup.parties.bytes().since(&bytes_after_warmup).total / steps as u64,
    })
}
