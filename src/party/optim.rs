//! Optimizers and learning-rate schedules.

use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, ModuleOptimizer, SgdConfig};

use crate::config::{OptimConfig, OptimizerKind, Schedule};

/// A fresh optimizer (one per side) from the config.
pub fn build_optimizer(config: &OptimConfig) -> ModuleOptimizer {
    let decay = (config.weight_decay > 0.0).then_some(WeightDecayConfig {
        penalty: config.weight_decay as f32,
    });
    match config.name {
        OptimizerKind::Sgd => SgdConfig::new()
            .with_momentum((config.momentum > 0.0).then_some(MomentumConfig {
                momentum: config.momentum,
                // PyTorch's default: the whole gradient enters the velocity.
                dampening: 0.0,
                nesterov: config.nesterov,
            }))
            .with_weight_decay(decay)
            .init(),
        OptimizerKind::Adam => AdamConfig::new()
            .with_beta_1(config.betas[0] as f32)
            .with_beta_2(config.betas[1] as f32)
            .with_epsilon(1e-8)
            .with_weight_decay(decay)
            .init(),
    }
}

/// Learning rate of each step of a run.
#[derive(Debug, Clone, Copy)]
pub struct LrSchedule {
    peak: f64,
    schedule: Schedule,
    total_steps: usize,
    warmup: f64,
}

impl LrSchedule {
    pub fn new(config: &OptimConfig, total_steps: usize) -> Self {
        Self {
            peak: config.lr,
            schedule: config.schedule,
            total_steps: total_steps.max(1),
            warmup: config.warmup,
        }
    }

    /// The rate at `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        let t = step.min(self.total_steps) as f64 / self.total_steps as f64;
        let cosine = |from: f64, to: f64, x: f64| {
            to + (from - to) * 0.5 * (1.0 + (std::f64::consts::PI * x).cos())
        };
        match self.schedule {
            Schedule::Constant => self.peak,
            Schedule::Cosine => cosine(self.peak, 0.0, t),
            Schedule::Onecycle => {
                let start = self.peak / 25.0;
                if t < self.warmup {
                    start + (self.peak - start) * t / self.warmup
                } else {
                    let x = (t - self.warmup) / (1.0 - self.warmup);
                    cosine(self.peak, self.peak / 1e4, x)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: Schedule) -> LrSchedule {
        let config = OptimConfig {
            lr: 0.1,
            schedule: kind,
            warmup: 0.25,
            ..OptimConfig::default()
        };
        LrSchedule::new(&config, 100)
    }

    #[test]
    fn shapes_of_schedules() {
        assert_eq!(schedule(Schedule::Constant).at(70), 0.1);
        let cos = schedule(Schedule::Cosine);
        assert!((cos.at(0) - 0.1).abs() < 1e-12);
        assert!((cos.at(50) - 0.05).abs() < 1e-12);
        assert!(cos.at(100).abs() < 1e-12);
        let one = schedule(Schedule::Onecycle);
        assert!((one.at(0) - 0.004).abs() < 1e-12);
        assert!((one.at(25) - 0.1).abs() < 1e-12);
        assert!(one.at(10) < one.at(20) && one.at(60) > one.at(90));
    }
}
