//! Experiment configuration: a TOML file (every key optional, unknown keys rejected), overridden
//! by `--set key=value` pairs addressed by dotted path. Errors name the file and the key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::BackendKind;
use crate::data::partition::{PartitionRule, PartitionSpec};
use crate::data::{DatasetKind, LabelSet, SubsetRule};
use crate::federation::ClientSchedule;
use crate::kernels::Kernels;
use crate::model::{AUX_HIDDEN, AUX_LAYERS, AuxKind, CutSpec};

/// Everything one run needs. The TOML layout mirrors this structure: `[data]`, `[model]`,
/// `[train]`, `[optim]`, `[clients]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExperimentConfig {
    pub data: DataConfig,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub clients: ClientsConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `cifar10` or `cifar100`.
    pub dataset: DatasetKind,
    /// CIFAR-100 only: `fine` (100 classes) or `coarse` (20 superclasses).
    pub labels: LabelSet,
    /// Data root; empty = `$SPLITAUX_DATA`, else `data/`.
    pub dir: PathBuf,
    /// Training images used (0 = all).
    pub train_limit: usize,
    /// Test images used (0 = all).
    pub test_limit: usize,
    /// How limited subsets are chosen: `first` or `balanced`.
    pub subset: SubsetRule,
    /// Random crop (4-pixel zero padding) and horizontal flip on training batches.
    pub augment: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: DatasetKind::Cifar10,
            labels: LabelSet::Fine,
            dir: PathBuf::new(),
            train_limit: 0,
            test_limit: 0,
            subset: SubsetRule::First,
            augment: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// ResNet depth 6n+2: 8, 20, 32, 44, 56, 110, …
    pub depth: usize,
    /// Residual blocks on the client (0..=3n) or `shallow`, `middle`, `deep`.
    pub cut: CutSpec,
    /// Auxiliary head: `linear` (the paper's), `mlp` or `cnn`.
    pub aux: AuxKind,
    /// `mlp` head only: units of each hidden layer (at least 1).
    pub aux_hidden: usize,
    /// `mlp` head only: number of hidden layers (at least 1). The defaults, 128 × 2, are
    /// splitaux's head; 256 × 3 is the paper authors' released code.
    pub aux_layers: usize,
    /// Convolution and BatchNorm implementation: `fused` (splitaux's CPU kernels on flex) or
    /// `burn` (burn's modules).
    pub kernels: Kernels,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            depth: 20,
            cut: CutSpec::default(),
            aux: AuxKind::Linear,
            aux_hidden: AUX_HIDDEN,
            aux_layers: AUX_LAYERS,
            kernels: Kernels::Fused,
        }
    }
}

/// Coupled (classic) or decoupled (auxiliary-loss) split learning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The server sends the cut gradient back every step.
    Coupled,
    /// The client trains on its auxiliary loss; no gradient crosses the cut.
    #[default]
    Decoupled,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Coupled => "coupled",
            Mode::Decoupled => "decoupled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub mode: Mode,
    pub epochs: usize,
    pub batch_size: usize,
    /// Fixes initialization, data order and augmentation.
    pub seed: u64,
    /// Batch size of evaluation passes.
    pub eval_batch_size: usize,
    /// `flex` (CPU) or `wgpu` (GPU, cargo feature `wgpu`).
    pub backend: BackendKind,
    /// CPU worker threads (0 = one per core).
    pub threads: usize,
    /// Write a checkpoint every this many epochs (and after the last); 0 = never.
    pub checkpoint_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Decoupled,
            epochs: 5,
            batch_size: 128,
            seed: 0,
            eval_batch_size: 500,
            backend: BackendKind::Flex,
            threads: 0,
            checkpoint_every: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    #[default]
    Sgd,
    Adam,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// `lr` throughout.
    #[default]
    Constant,
    /// Cosine decay from `lr` to 0 over the run.
    Cosine,
    /// One-cycle: linear warm-up from `lr/25` to `lr` over `warmup` of the run, then cosine
    /// decay to `lr/1e4`.
    Onecycle,
}

/// One optimizer per side (client and server), both built from these settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// `sgd` or `adam`.
    pub name: OptimizerKind,
    /// Peak learning rate.
    pub lr: f64,
    /// SGD momentum (0 = plain SGD).
    pub momentum: f64,
    /// SGD Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// `constant`, `cosine` or `onecycle`.
    pub schedule: Schedule,
    /// One-cycle: fraction of the run spent warming up.
    pub warmup: f64,
    /// Adam β₁ and β₂.
    pub betas: [f64; 2],
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            name: OptimizerKind::Sgd,
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-4,
            schedule: Schedule::Cosine,
            warmup: 0.3,
            betas: [0.9, 0.999],
        }
    }
}

/// The clients of a run: how many, how they take turns, and how the training images are
/// divided among them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientsConfig {
    /// Number of clients (1 = a single client holding the whole training subset).
    pub count: usize,
    /// How the clients take turns: `sequential` (vanilla split learning).
    pub schedule: ClientSchedule,
    /// `iid`, `contiguous`, `dirichlet` or `shards`.
    pub partition: PartitionRule,
    /// Dirichlet concentration (smaller = more skewed).
    pub alpha: f64,
    /// Fewest training images a client may get.
    pub min_images: usize,
    /// `shards`: label-sorted shards per client.
    pub shards_per_client: usize,
    /// Seed of the partition (separate from `train.seed`, so the partition stays fixed across
    /// training seeds).
    pub seed: u64,
}

impl Default for ClientsConfig {
    fn default() -> Self {
        Self {
            count: 1,
            schedule: ClientSchedule::Sequential,
            partition: PartitionRule::Iid,
            alpha: 0.5,
            min_images: 10,
            shards_per_client: 2,
            seed: 0,
        }
    }
}

impl ClientsConfig {
    /// What the partition depends on.
    pub fn partition_spec(&self) -> PartitionSpec {
        PartitionSpec {
            clients: self.count,
            rule: self.partition,
            alpha: self.alpha,
            min_images: self.min_images,
            shards_per_client: self.shards_per_client,
            seed: self.seed,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The message carries the cause, so the cause is not also `source()` (a chain printed with
    // `{:#}` would repeat it).
    #[error("{path}: cannot read: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{origin}: key `{key}`: {message}")]
    Key {
        origin: String,
        key: String,
        message: String,
    },
    #[error("--set {0}: expected key=value")]
    SetSyntax(String),
    #[error("--set {key}: `{prefix}` is a value, not a table")]
    NotATable { key: String, prefix: String },
    #[error("{key} = {value}: {message}")]
    Invalid {
        key: &'static str,
        value: String,
        message: String,
    },
}

impl ExperimentConfig {
    /// Reads `path` (if given) and applies `overrides` (`key=value`, TOML values; bare words are
    /// strings). A `[sweep]` table in the file (a preset's grid) is ignored: one run.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        let (table, origin) = match path {
            Some(path) => {
                let mut table = read_toml(path)?;
                // A preset may carry a `[sweep]` table (its grid): only `sweep` reads it.
                table.remove("sweep");
                // Check the file alone first, so its own mistakes are blamed on it.
                Self::from_table(table.clone(), &path.display().to_string())?;
                (table, path.display().to_string())
            }
            None => (toml::Table::new(), "defaults".to_string()),
        };
        Self::from_base(table, &origin, overrides)
    }

    /// A config from an already parsed TOML table plus `key=value` overrides.
    pub fn from_base(
        mut table: toml::Table,
        origin: &str,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        for assignment in overrides {
            set_dotted(&mut table, assignment)?;
        }
        let origin = if overrides.is_empty() {
            origin.to_string()
        } else {
            format!("{origin} with --set")
        };
        let config = Self::from_table(table, &origin)?;
        config.validate()?;
        Ok(config)
    }

    fn from_table(table: toml::Table, origin: &str) -> Result<Self, ConfigError> {
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            let message = e.into_inner().to_string();
            // An unknown field is named by its parent table's path in some cases and by its own
            // in others: name the field once.
            let key = match message.split('`').nth(1) {
                Some(field) if message.starts_with("unknown field") => {
                    if key == "." {
                        field.to_string()
                    } else if key == field || key.ends_with(&format!(".{field}")) {
                        key
                    } else {
                        format!("{key}.{field}")
                    }
                }
                _ => key,
            };
            ConfigError::Key {
                origin: origin.to_string(),
                key,
                message: message.trim_end().to_string(),
            }
        })
    }

    /// Range checks serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, value: String, message: &str| {
            Err(ConfigError::Invalid {
                key,
                value,
                message: message.to_string(),
            })
        };
        if self.train.batch_size == 0 {
            return invalid("train.batch_size", "0".into(), "must be at least 1");
        }
        if self.train.eval_batch_size == 0 {
            return invalid("train.eval_batch_size", "0".into(), "must be at least 1");
        }
        if !(self.optim.lr.is_finite() && self.optim.lr > 0.0) {
            return invalid("optim.lr", self.optim.lr.to_string(), "must be positive");
        }
        if !(0.0..1.0).contains(&self.optim.momentum) {
            return invalid(
                "optim.momentum",
                self.optim.momentum.to_string(),
                "must be in [0, 1)",
            );
        }
        if !(0.0..1.0).contains(&self.optim.warmup) {
            return invalid(
                "optim.warmup",
                self.optim.warmup.to_string(),
                "must be in [0, 1)",
            );
        }
        if self.optim.weight_decay < 0.0 {
            return invalid(
                "optim.weight_decay",
                self.optim.weight_decay.to_string(),
                "must be >= 0",
            );
        }
        if self.model.aux_hidden == 0 {
            return invalid("model.aux_hidden", "0".into(), "must be at least 1");
        }
        if self.model.aux_layers == 0 {
            return invalid(
                "model.aux_layers",
                "0".into(),
                "must be at least 1 (for a pool and one linear layer, use model.aux = \"linear\")",
            );
        }
        crate::model::Cut::resolve(self.model.cut, self.model.depth).map_err(|e| {
            ConfigError::Invalid {
                key: "model",
                value: format!("depth {} cut {}", self.model.depth, self.model.cut),
                message: e.to_string(),
            }
        })?;
        Ok(())
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a config always serializes to TOML")
    }
}

/// Keys that cannot change a run's numbers: where the data lives, the CPU thread count (batch
/// reductions run in fixed chunks of images, so results do not depend on it) and how often the
/// run saves a checkpoint.
pub const RESULT_NEUTRAL_KEYS: [&str; 3] = ["data.dir", "train.threads", "train.checkpoint_every"];

/// A configuration flattened to dotted keys (`optim.lr`) and value text (strings bare).
pub type Settings = std::collections::BTreeMap<String, String>;

impl ExperimentConfig {
    /// Every key of the configuration with its value, as [`Settings`].
    pub fn settings(&self) -> Settings {
        fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Settings) {
            match value {
                serde_json::Value::Object(map) => {
                    for (key, value) in map {
                        let key = if prefix.is_empty() {
                            key.clone()
                        } else {
                            format!("{prefix}.{key}")
                        };
                        flatten(&key, value, out);
                    }
                }
                serde_json::Value::String(s) => {
                    out.insert(prefix.to_string(), s.clone());
                }
                other => {
                    out.insert(prefix.to_string(), other.to_string());
                }
            }
        }
        let value = serde_json::to_value(self).expect("a config always serializes to JSON");
        let mut out = Settings::new();
        flatten("", &value, &mut out);
        out
    }
}

/// The keys, in key order, whose values differ between `a` and `b`, leaving out
/// [`RESULT_NEUTRAL_KEYS`].
pub fn differing_keys(a: &ExperimentConfig, b: &ExperimentConfig) -> Vec<String> {
    let (a, b) = (a.settings(), b.settings());
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|key| !RESULT_NEUTRAL_KEYS.contains(&key.as_str()))
        .filter(|key| a.get(*key) != b.get(*key))
        .cloned()
        .collect()
}

/// Reads a TOML file into a table; errors name the file.
pub fn read_toml(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
        path: path.to_path_buf(),
        cause,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })
}

/// Applies one `key=value` to `table`, creating intermediate tables.
fn set_dotted(table: &mut toml::Table, assignment: &str) -> Result<(), ConfigError> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| ConfigError::SetSyntax(assignment.to_string()))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(ConfigError::SetSyntax(assignment.to_string()));
    }
    let value = parse_value(raw.trim());
    let parts: Vec<&str> = key.split('.').collect();
    let (last, parents) = parts.split_last().expect("key has at least one part");
    let mut current = table;
    for (i, part) in parents.iter().enumerate() {
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or_else(|| ConfigError::NotATable {
            key: key.to_string(),
            prefix: parts[..=i].join("."),
        })?;
    }
    current.insert(last.to_string(), value);
    Ok(())
}

/// A TOML value, or the raw text as a string when it is not one (`shallow`, `cifar10`).
fn parse_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(overrides: &[&str]) -> Result<ExperimentConfig, ConfigError> {
        let owned: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        ExperimentConfig::load(None, &owned)
    }

    #[test]
    fn set_overrides_typed_values() {
        let c = with(&[
            "model.cut=middle",
            "model.depth=32",
            "optim.lr=0.05",
            "data.augment=false",
        ])
        .unwrap();
        assert_eq!(c.model.cut, "middle".parse().unwrap());
        assert_eq!(c.model.depth, 32);
        assert_eq!(c.optim.lr, 0.05);
        assert!(!c.data.augment);
        assert_eq!(
            with(&["model.cut=4"]).unwrap().model.cut,
            CutSpec::Blocks(4)
        );
        assert_eq!(with(&[]).unwrap().model.kernels, Kernels::Fused);
        assert_eq!(
            with(&["model.kernels=burn"]).unwrap().model.kernels,
            Kernels::Burn
        );
        let err = with(&["model.kernels=fast"]).unwrap_err().to_string();
        assert!(err.contains("model.kernels"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = with(&["model.width=3"]).unwrap_err().to_string();
        assert!(err.contains("key `model.width`"), "{err}");
        let err = with(&["extra=1"]).unwrap_err().to_string();
        assert!(err.contains("extra"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = with(&["train.epochs=many"]).unwrap_err().to_string();
        assert!(err.contains("train.epochs"), "{err}");
    }

    #[test]
    fn aux_head_shape_keys_have_defaults_and_are_checked() {
        let c = with(&[]).unwrap();
        assert_eq!((c.model.aux_hidden, c.model.aux_layers), (128, 2));
        let c = with(&[
            "model.aux=mlp",
            "model.aux_hidden=256",
            "model.aux_layers=3",
        ])
        .unwrap();
        assert_eq!(
            (c.model.aux, c.model.aux_hidden, c.model.aux_layers),
            (AuxKind::Mlp, 256, 3)
        );
        for (set, named) in [
            ("model.aux_hidden=0", "model.aux_hidden = 0"),
            ("model.aux_layers=0", "model.aux_layers = 0"),
            ("model.aux_layers=-1", "model.aux_layers"),
        ] {
            let err = with(&["model.aux=mlp", set]).unwrap_err().to_string();
            assert!(err.contains(named), "{set}: {err}");
        }
    }

    #[test]
    fn impossible_cut_is_rejected() {
        let err = with(&["model.cut=12"]).unwrap_err().to_string();
        assert!(err.contains("0..=9"), "{err}");
    }

    #[test]
    fn clients_keys_have_defaults_and_unknown_names_are_named() {
        // Values that depend on the data (count, alpha, min_images, shards) are checked where
        // the partition is drawn: see `data::partition`.
        let c = with(&[]).unwrap();
        assert_eq!(c.clients, ClientsConfig::default());
        assert_eq!((c.clients.count, c.clients.alpha), (1, 0.5));
        let c = with(&["clients.count=5", "clients.partition=dirichlet"]).unwrap();
        assert_eq!(
            (c.clients.count, c.clients.partition),
            (5, PartitionRule::Dirichlet)
        );
        for (set, key) in [
            ("clients.partition=zipf", "clients.partition"),
            ("clients.schedule=ring", "clients.schedule"),
        ] {
            let err = with(&[set]).unwrap_err().to_string();
            assert!(err.contains(key), "{set}: {err}");
        }
    }

    #[test]
    fn a_preset_with_a_sweep_table_loads_as_one_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("preset.toml");
        std::fs::write(
            &path,
            "[model]\ndepth = 32\n[sweep]\nseeds = 2\n[sweep.grid]\n\"train.mode\" = [\"coupled\"]\n",
        )
        .unwrap();
        let c = ExperimentConfig::load(Some(&path), &[]).unwrap();
        assert_eq!(c.model.depth, 32);
    }

    #[test]
    fn round_trips_through_toml() {
        let c = with(&["model.cut=deep", "optim.schedule=onecycle"]).unwrap();
        let text = c.to_toml();
        let back: ExperimentConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn differing_keys_names_changed_settings_but_not_neutral_ones() {
        let a = ExperimentConfig::default();
        let mut b = a.clone();
        b.train.epochs += 1;
        b.train.threads = 7;
        b.train.checkpoint_every = 3;
        b.optim.lr = 0.5;
        assert_eq!(differing_keys(&a, &b), ["optim.lr", "train.epochs"]);
        assert!(differing_keys(&a, &a).is_empty());
        assert_eq!(a.settings()["model.cut"], "shallow");
    }
}
