//! The `splitaux` command line: argument definitions and what each subcommand does, one module
//! per group of subcommands ([`data`], [`train`] for `train`/`compare`, [`experiment`] for
//! `sweep`/`table`/`plot`, [`bench`]). The library does the work; these modules parse arguments
//! into its config types, call it, and print.

mod bench;
mod data;
mod experiment;
mod launch;
mod network;
mod train;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};

use splitaux::config::ExperimentConfig;
use splitaux::data::locate;
use splitaux::run::PreparedData;

pub use self::bench::BenchArgs;
pub use self::data::DataCommand;
pub use self::experiment::{PlotArgs, SweepArgs, TableArgs};
pub use self::network::{ClientArgs, ServeArgs};
pub use self::train::TrainArgs;

/// Split learning on CIFAR: classic (coupled) versus decoupled training with an auxiliary loss,
/// with measured accuracy, bytes across the cut and peak memory.
#[derive(Debug, Parser)]
#[command(name = "splitaux", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fetch or check the CIFAR datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Train one split model (coupled or decoupled) and report on it.
    Train(TrainArgs),
    /// Train coupled and decoupled from identical seeds and compare them side by side.
    Compare(TrainArgs),
    /// Time training steps on random inputs (images/s and peak memory).
    Bench(BenchArgs),
    /// Run every combination of a config grid (and seeds), appending each run to runs.jsonl.
    Sweep(SweepArgs),
    /// Aggregate runs.jsonl over seeds into a table (mean ± std, n).
    Table(TableArgs),
    /// Draw SVG figures from runs.jsonl.
    Plot(PlotArgs),
    /// Run the server party of a multi-process run: wait for the clients, train, report.
    Serve(ServeArgs),
    /// Run one client party of a multi-process run, connected to a `serve` process.
    Client(ClientArgs),
}

/// A configuration and the data it names: the arguments `train`, `compare` and
/// `data partition` share.
#[derive(Debug, Args)]
pub struct ConfigSource {
    /// TOML config (see configs/); without it the built-in defaults are used.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Override any config field by its dotted path, e.g. --set model.cut=middle (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// The dataset folder or its parent; beats data.dir and $SPLITAUX_DATA.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Never download: fail if the dataset is missing.
    #[arg(long)]
    pub offline: bool,
}

impl ConfigSource {
    fn load(&self) -> Result<ExperimentConfig> {
        Ok(ExperimentConfig::load(
            self.config.as_deref(),
            &self.overrides,
        )?)
    }

    /// The training and test images `config` uses (fetched first unless offline).
    fn prepare(&self, config: &ExperimentConfig, interactive: bool) -> Result<PreparedData> {
        self.prepare_from(None, config, interactive)
    }

    /// As [`Self::prepare`]; `recorded` (a checkpoint's dataset folder) is used when no
    /// `--data-dir` is given.
    fn prepare_from(
        &self,
        recorded: Option<&Path>,
        config: &ExperimentConfig,
        interactive: bool,
    ) -> Result<PreparedData> {
        let given = self.data_dir.as_deref().or(recorded);
        let root = locate::data_root(given, Some(config.data.dir.as_path()));
        let cifar = splitaux::data::open(
            config.data.dataset,
            config.data.labels,
            &root,
            self.offline,
            interactive,
        )?;
        Ok(PreparedData::new(&cifar, config))
    }
}

/// A library enum from its config name (`coupled`, `cifar10`, `fused`, …): the command line
/// accepts exactly the words the TOML files do.
fn parse_name<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    use serde::de::value::{Error, StrDeserializer};
    T::deserialize(StrDeserializer::<Error>::new(s)).map_err(|e| e.to_string())
}

pub fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Data(DataCommand::Fetch(args)) => data::fetch(args),
        Command::Data(DataCommand::Check(args)) => data::check(args),
        Command::Data(DataCommand::Partition(args)) => data::partition(args),
        Command::Train(args) => train::train(args, false),
        Command::Compare(args) => train::train(args, true),
        Command::Bench(args) => bench::run(args),
        Command::Sweep(args) => experiment::sweep(args),
        Command::Table(args) => experiment::table(args),
        Command::Plot(args) => experiment::plot(args),
        Command::Serve(args) => network::serve(args),
        Command::Client(args) => network::client(args),
    }
}

/// Exit status of a sweep in which some run failed or diverged.
pub const EXIT_RUNS_FAILED: u8 = 3;

/// A finished command that still wants a particular non-zero exit status.
#[derive(Debug)]
pub struct ExitStatus(pub u8);

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for ExitStatus {}
