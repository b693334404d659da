//! Every preset in `configs/` keeps working: each one (its first grid combination, and each of
//! its client schedules with one and with several clients) trains on tiny limits of the
//! generated data, with its own model, cut, schedule and partition, so no preset rots —
//! including the GPU-scale ones.

mod common;

use std::path::{Path, PathBuf};

use splitaux::config::ExperimentConfig;
use splitaux::data::{self, DatasetKind};
use splitaux::experiment::{Sweep, expand};
use splitaux::report::RunStatus;
use splitaux::run::{PreparedData, RunOptions, run};

fn presets() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut found = Vec::new();
    for dir in [root.clone(), root.join("cpu"), root.join("paper")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// `config` cut down to one batch per client (enough images that a Dirichlet draw over 100
/// classes leaves none empty) and one epoch.
fn tiny(mut config: ExperimentConfig) -> ExperimentConfig {
    let clients = config.clients.count;
    config.data.train_limit = 20 * clients;
    config.data.test_limit = 8;
    config.clients.min_images = 1;
    config.train.epochs = 1;
    config.train.batch_size = 40;
    config.train.eval_batch_size = 8;
    config.train.threads = 2;
    config
}

#[test]
fn every_preset_trains_on_tiny_limits() {
    let mut trained = 0;
    for path in presets() {
        let sweep = Sweep::load(Some(&path), &[], None).unwrap();
        let combinations = expand(&sweep.axes, sweep.seeds, 0);
        // The first combination, plus one per schedule with one and with several clients.
        let mut seen = Vec::new();
        for combination in &combinations {
            let config = sweep
                .config_for(combination)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let key = (config.clients.count.min(2), config.clients.schedule);
            if !seen.is_empty() && seen.contains(&key) {
                continue;
            }
            seen.push(key);
            let config = tiny(config);
            let dir = match config.data.dataset {
                DatasetKind::Cifar10 => common::cifar10(),
                DatasetKind::Cifar100 => common::cifar100(),
            };
            let cifar =
                data::open(config.data.dataset, config.data.labels, dir, true, false).unwrap();
            let prepared = PreparedData::new(&cifar, &config);
            let report = run(&config, config.train.mode, &prepared, RunOptions::default())
                .unwrap_or_else(|e| panic!("{} ({}): {e}", path.display(), combination.id()));
            assert_eq!(report.status, RunStatus::Completed, "{}", path.display());
            assert_eq!(report.epochs.len(), 1);
            assert_eq!(report.clients.len(), config.clients.count);
            trained += 1;
        }
    }
    assert!(trained >= 12, "every preset and client setting: {trained}");
}
