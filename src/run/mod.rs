//! Running an experiment: the data it trains on ([`PreparedData`]) and how it is divided among
//! the clients, the set-up built once from the config ([`setup`]), the training loop and its
//! report ([`runner`]), evaluation ([`eval`]) and the speed benchmark ([`bench`]).

pub mod bench;
pub mod checkpoint;
pub mod eval;
pub mod pace;
pub mod remote;
pub mod runner;
pub mod setup;
pub mod tally;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use runner::{KILL_AFTER_STEP_ENV, RunOptions, run};
pub use setup::RunSetup;

use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::BackendError;
use crate::config::ExperimentConfig;
use crate::data::partition::{self, PartitionError};
use crate::data::{Cifar, Normalization, Split, subset};
use crate::model::ShapeError;
use crate::party::PartyError;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Shape(#[from] ShapeError),
    #[error(transparent)]
    Party(#[from] PartyError),
    #[error(transparent)]
    Partition(#[from] PartitionError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("the checkpoint was written with other settings: {}", keys.join(", "))]
    ResumeMismatch { keys: Vec<String> },
    #[error("training set is empty (data.train_limit too small?)")]
    NoTrainingData,
    #[error("a run needs at least one client")]
    NoClients,
    #[error(transparent)]
    Network(#[from] crate::transport::grpc::GrpcError),
    #[error("{peer}: {detail}")]
    Peer { peer: String, detail: String },
    #[error("{peer} refused this client: {reason}")]
    Refused { peer: String, reason: String },
    #[error("{peer} stopped the run: {reason}")]
    Stopped { peer: String, reason: String },
    #[error("{0}")]
    Failed(String),
}

/// The data a run trains and evaluates on, prepared once (and shared by `compare`'s two runs).
#[derive(Debug, Clone)]
pub struct PreparedData {
    /// Shared by the clients, each of which trains on its shard of it.
    pub train: Arc<Split>,
    pub test: Split,
    pub classes: usize,
    pub normalization: Normalization,
    pub dataset: String,
    /// The dataset folder the images came from (recorded in checkpoints).
    pub dir: Option<PathBuf>,
}

impl PreparedData {
    /// Applies the config's subset limits; normalization statistics come from the training
    /// images actually used (all clients' together).
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
            train: Arc::new(train),
            test,
            classes,
            normalization,
            dataset: cifar.kind.name().to_string(),
            dir: Some(cifar.dir.clone()),
        }
    }

    /// The training subset's indices per client, by `clients.partition`.
    pub fn partition(&self, config: &ExperimentConfig) -> Result<Vec<Vec<usize>>, RunError> {
        if self.train.is_empty() {
            return Err(RunError::NoTrainingData);
        }
        Ok(partition::partition(
            &self.train.labels,
            self.classes,
            &config.clients.partition_spec(),
        )?)
    }
}
