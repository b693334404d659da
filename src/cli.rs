//! The `splitaux` command line: argument definitions and what each subcommand does.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use splitaux::backend::BackendKind;
use splitaux::config::differing_keys;
use splitaux::config::{ExperimentConfig, Mode};
use splitaux::data::partition::class_histograms;
use splitaux::data::{self, DatasetKind, LabelSet, fetch, locate};
use splitaux::experiment::table::aggregate;
use splitaux::experiment::{
    Axis, Shard, Sweep, SweepOptions, plot as plots, read_merged, run_sweep,
};
use splitaux::kernels::Kernels;
use splitaux::model::{AUX_HIDDEN, AUX_LAYERS, AuxKind, CutSpec};
use splitaux::report::{self, Metric, Report, human_bytes};
use splitaux::run::bench::{BenchConfig, bench};
use splitaux::run::{Checkpoint, PreparedData, RunOptions, run};

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
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Base config, optionally with a [sweep] table (seeds, grid); see configs/cpu/.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// A grid axis KEY=V1,V2,… over any config key (repeatable; replaces the file's axis).
    #[arg(long = "grid", value_name = "KEY=V1,V2,…")]
    pub grid: Vec<Axis>,
    /// Seeds per combination, counting up from train.seed [default: the file's, else 1].
    #[arg(long)]
    pub seeds: Option<usize>,
    /// Override a base config field by its dotted path before the grid, e.g. --set
    /// optim.lr=0.05 (repeatable); a key that is also a grid axis is an error.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Run only shard K of N (1-based): every N-th run of the grid starting at the K-th, e.g.
    /// --shard $SLURM_ARRAY_TASK_ID/4; give each shard its own --out.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<Shard>,
    /// Output folder: runs.jsonl and reports/.
    #[arg(long)]
    pub out: PathBuf,
    /// The dataset folder or its parent; beats data.dir and $SPLITAUX_DATA.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Never download: runs fail if the dataset is missing.
    #[arg(long)]
    pub offline: bool,
    /// Run again the combinations recorded as failed or diverged.
    #[arg(long)]
    pub retry_failed: bool,
    /// No progress bars or per-run lines.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print a JSON summary (counts, log path) to stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TableArgs {
    /// One or more runs.jsonl files (e.g. results/shard-*/runs.jsonl), merged.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Merge runs of different splitaux versions or base configurations.
    #[arg(long)]
    pub allow_mixed: bool,
    /// Config key of the table rows (or `seed`).
    #[arg(long, default_value = "model.cut")]
    pub rows: String,
    /// Config key of the table columns (or `seed`).
    #[arg(long, default_value = "train.mode")]
    pub cols: String,
    /// Metrics to show (repeatable) [default: test-accuracy, bytes-per-epoch, peak-memory].
    #[arg(long = "metric")]
    pub metrics: Vec<Metric>,
    #[arg(long, value_enum, default_value = "md")]
    pub format: TableFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TableFormat {
    Md,
    Csv,
    Json,
}

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// One or more runs.jsonl files (e.g. results/shard-*/runs.jsonl), merged.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Merge runs of different splitaux versions or base configurations.
    #[arg(long)]
    pub allow_mixed: bool,
    /// Folder for the SVG files.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Download an official binary tarball, verify its MD5 and extract it atomically.
    Fetch(FetchArgs),
    /// Validate a dataset and print per-split, per-class image counts.
    Check(CheckArgs),
    /// Print how the config's partition divides the training images among the clients
    /// (per client, per class).
    Partition(PartitionArgs),
}

#[derive(Debug, Args)]
pub struct PartitionArgs {
    #[command(flatten)]
    pub source: ConfigSource,
    /// Print the counts as JSON.
    #[arg(long)]
    pub json: bool,
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
        let cifar = data::open(
            config.data.dataset,
            config.data.labels,
            &root,
            self.offline,
            interactive,
        )?;
        Ok(PreparedData::new(&cifar, config))
    }
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Which dataset: cifar10 or cifar100.
    #[arg(value_parser = parse_name::<DatasetKind>)]
    pub dataset: DatasetKind,
    /// Data root to extract into [default: $SPLITAUX_DATA, else data/].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Download from this address instead [env: SPLITAUX_FETCH_URL].
    #[arg(long)]
    pub url: Option<String>,
    /// Expect this MD5 (hex) instead of the official one [env: SPLITAUX_FETCH_MD5].
    #[arg(long)]
    pub md5: Option<String>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Which dataset: cifar10 or cifar100 [default: cifar10].
    #[arg(value_parser = parse_name::<DatasetKind>, conflicts_with = "dataset_flag")]
    pub dataset: Option<DatasetKind>,
    /// The same as the positional DATASET (the older spelling, still accepted).
    #[arg(long = "dataset", value_name = "DATASET", value_parser = parse_name::<DatasetKind>)]
    pub dataset_flag: Option<DatasetKind>,
    /// CIFAR-100 labels to count: fine (100 classes) or coarse (20).
    #[arg(long, default_value = "fine", value_parser = parse_name::<LabelSet>)]
    pub labels: LabelSet,
    /// The dataset folder or its parent [default: $SPLITAUX_DATA, else data/].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print the counts as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub source: ConfigSource,
    /// Override train.mode: coupled or decoupled (train only; compare runs both).
    #[arg(long, value_parser = parse_name::<Mode>)]
    pub mode: Option<Mode>,
    /// Folder for the JSON report(s) and checkpoints [default: runs/<UTC time>-<mode>].
    #[arg(long, conflicts_with = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run whose --out folder is DIR from its last checkpoint (a finished run just
    /// prints its report). --config/--set/--mode, if given, must match the checkpoint.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Print the JSON report to stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// coupled or decoupled.
    #[arg(long, default_value = "decoupled", value_parser = parse_name::<Mode>)]
    pub mode: Mode,
    /// ResNet depth (6n+2).
    #[arg(long, default_value_t = 20)]
    pub depth: usize,
    /// Client blocks, or shallow, middle, deep.
    #[arg(long, default_value = "shallow")]
    pub cut: CutSpec,
    /// Auxiliary head: linear, mlp or cnn.
    #[arg(long, default_value = "linear", value_parser = parse_name::<AuxKind>)]
    pub aux: AuxKind,
    /// mlp head: units of each hidden layer (model.aux_hidden).
    #[arg(long, default_value_t = AUX_HIDDEN)]
    pub aux_hidden: usize,
    /// mlp head: number of hidden layers (model.aux_layers).
    #[arg(long, default_value_t = AUX_LAYERS)]
    pub aux_layers: usize,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// CPU threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// flex (CPU) or wgpu.
    #[arg(long, default_value = "flex", value_parser = parse_name::<BackendKind>)]
    pub backend: BackendKind,
    /// Convolution and BatchNorm implementation: fused or burn.
    #[arg(long, default_value = "fused", value_parser = parse_name::<Kernels>)]
    pub kernels: Kernels,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// A library enum from its config name (`coupled`, `cifar10`, `fused`, …): the command line
/// accepts exactly the words the TOML files do.
fn parse_name<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    use serde::de::value::{Error, StrDeserializer};
    T::deserialize(StrDeserializer::<Error>::new(s)).map_err(|e| e.to_string())
}

pub fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Data(DataCommand::Fetch(args)) => data_fetch(args),
        Command::Data(DataCommand::Check(args)) => data_check(args),
        Command::Data(DataCommand::Partition(args)) => data_partition(args),
        Command::Train(args) => train(args, false),
        Command::Compare(args) => train(args, true),
        Command::Bench(args) => run_bench(args),
        Command::Sweep(args) => sweep(args),
        Command::Table(args) => table(args),
        Command::Plot(args) => plot(args),
    }
}

fn data_fetch(args: FetchArgs) -> Result<()> {
    let root = locate::data_root(args.data_dir.as_deref(), None);
    let source = fetch::Source::resolve(args.dataset, args.url, args.md5);
    let interactive = std::io::stderr().is_terminal();
    eprintln!("fetching {} from {}", args.dataset.name(), source.url);
    let dir = fetch::fetch(args.dataset, &root, &source, interactive)?;
    println!("{} ready in {}", args.dataset.name(), dir.display());
    Ok(())
}

fn data_check(args: CheckArgs) -> Result<()> {
    let root = locate::data_root(args.data_dir.as_deref(), None);
    let dataset = args
        .dataset
        .or(args.dataset_flag)
        .unwrap_or(DatasetKind::Cifar10);
    let cifar = data::open(dataset, args.labels, &root, true, false)?;
    let classes = cifar.num_classes();
    let train = cifar.train.class_counts(classes);
    let test = cifar.test.class_counts(classes);
    if args.json {
        let per_class: Vec<_> = (0..classes)
            .map(|c| {
                serde_json::json!({"class": c, "name": cifar.class_names[c], "train": train[c], "test": test[c]})
            })
            .collect();
        let out = serde_json::json!({
            "dataset": cifar.kind.name(),
            "dir": cifar.dir,
            "train": cifar.train.len(),
            "test": cifar.test.len(),
            "classes": per_class,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} in {}: {} train and {} test images, {classes} classes, all records valid",
        cifar.kind.name(),
        cifar.dir.display(),
        cifar.train.len(),
        cifar.test.len()
    );
    let width = cifar
        .class_names
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:>5}  {:<width$}  {:>7}  {:>6}",
        "class", "name", "train", "test"
    );
    for c in 0..classes {
        println!(
            "{c:>5}  {:<width$}  {:>7}  {:>6}",
            cifar.class_names[c], train[c], test[c]
        );
    }
    Ok(())
}

fn data_partition(args: PartitionArgs) -> Result<()> {
    let config = args.source.load()?;
    let interactive = !args.json && std::io::stdout().is_terminal();
    let prepared = args.source.prepare(&config, interactive)?;
    let parts = prepared.partition(&config)?;
    let histograms = class_histograms(&prepared.train.labels, prepared.classes, &parts);
    let c = &config.clients;
    if args.json {
        let clients: Vec<_> = histograms
            .iter()
            .enumerate()
            .map(|(id, h)| {
                serde_json::json!({"id": id, "images": h.iter().sum::<usize>(), "class_histogram": h})
            })
            .collect();
        let out = serde_json::json!({
            "dataset": prepared.dataset,
            "train_images": prepared.train.len(),
            "classes": prepared.classes,
            "partition": c.partition.name(),
            "alpha": c.alpha,
            "seed": c.seed,
            "clients": clients,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} training images of {} divided among {} clients ({} partition, clients.seed = {})",
        prepared.train.len(),
        prepared.dataset,
        parts.len(),
        c.partition.name(),
        c.seed
    );
    let width = histograms
        .iter()
        .flatten()
        .map(|n| n.to_string().len())
        .max()
        .unwrap_or(1)
        .max(3);
    let mut header = format!("{:>6}  {:>6} ", "client", "images");
    for class in 0..prepared.classes {
        header.push_str(&format!(" {class:>width$}"));
    }
    println!("{header}");
    for (id, h) in histograms.iter().enumerate() {
        let mut line = format!("{id:>6}  {:>6} ", h.iter().sum::<usize>());
        for n in h {
            line.push_str(&format!(" {n:>width$}"));
        }
        println!("{line}");
    }
    Ok(())
}

fn train(args: TrainArgs, compare: bool) -> Result<()> {
    if compare && args.mode.is_some() {
        bail!("--mode does not apply to compare, which runs both modes");
    }
    let (config, out, checkpoints) = match &args.resume {
        Some(dir) => {
            let checkpoints = resumable(dir, compare)?;
            (
                resumed_config(&args, dir, &checkpoints)?,
                dir.clone(),
                checkpoints,
            )
        }
        None => {
            let mut config = args.source.load()?;
            if let Some(mode) = args.mode {
                config.train.mode = mode;
            }
            let label = if compare {
                "compare"
            } else {
                config.train.mode.name()
            };
            let out = args.out.clone().unwrap_or_else(|| default_out_dir(label));
            (config, out, Vec::new())
        }
    };
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let interactive = !args.json && std::io::stdout().is_terminal();

    let modes: &[Mode] = if compare {
        &[Mode::Coupled, Mode::Decoupled]
    } else {
        std::slice::from_ref(&config.train.mode)
    };
    let mut prepared = None;
    let mut reports = Vec::new();
    for &mode in modes {
        let report_path = out.join(format!("{}.json", mode.name()));
        if args.resume.is_some() && report_path.exists() {
            // This mode finished before: its report stands.
            reports.push(read_report(&report_path)?);
            continue;
        }
        let resume = checkpoints
            .iter()
            .find(|c| c.meta.config.train.mode == mode)
            .cloned()
            .map(Arc::new);
        let data = match &mut prepared {
            Some(data) => data,
            None => {
                let recorded = resume.as_ref().and_then(|c| c.meta.data_dir.clone());
                prepared.insert(args.source.prepare_from(
                    recorded.as_deref(),
                    &config,
                    interactive,
                )?)
            }
        };
        let options = RunOptions {
            progress: !args.json,
            multi: None,
            checkpoint_dir: Some(checkpoint_dir(&out, mode, compare)),
            resume,
        };
        if let Some(dir) = &options.checkpoint_dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let report = run(&config, mode, data, options)?;
        write_json(&report_path, &report)?;
        reports.push(report);
    }
    if args.json {
        let json = match reports.as_slice() {
            [one] => serde_json::to_string_pretty(one)?,
            many => serde_json::to_string_pretty(&serde_json::json!({
                "coupled": many[0], "decoupled": many[1]
            }))?,
        };
        println!("{json}");
    } else {
        match reports.as_slice() {
            [one] => print!("{}", report::summary(one)),
            [coupled, decoupled] => print!("{}", report::comparison(coupled, decoupled)),
            _ => unreachable!("one or two modes"),
        }
        eprintln!("reports written to {}", out.display());
    }
    if let Some(failed) = reports.iter().find(|r| r.error.is_some()) {
        bail!(
            "{} training diverged: {} (report kept in {})",
            failed.mode.name(),
            failed.error.as_deref().unwrap_or_default(),
            out.display()
        );
    }
    Ok(())
}

/// Where a mode's checkpoints go: the output folder itself for `train`, a folder per mode for
/// `compare`.
fn checkpoint_dir(out: &Path, mode: Mode, compare: bool) -> PathBuf {
    if compare {
        out.join(mode.name())
    } else {
        out.to_path_buf()
    }
}

/// The checkpoints of the unfinished runs in `dir` (`train --resume` or `compare --resume`);
/// an error when `dir` holds neither a checkpoint nor a finished report.
fn resumable(dir: &Path, compare: bool) -> Result<Vec<Checkpoint>> {
    if !dir.is_dir() {
        bail!("--resume {}: no such folder", dir.display());
    }
    let finished = |mode: Mode| dir.join(format!("{}.json", mode.name())).exists();
    let mut checkpoints = Vec::new();
    for mode in [Mode::Coupled, Mode::Decoupled] {
        // `train` keeps its one checkpoint in the folder itself, whatever its mode.
        if !compare && mode == Mode::Decoupled {
            break;
        }
        if compare && finished(mode) {
            continue;
        }
        if let Some(checkpoint) = Checkpoint::load_from(&checkpoint_dir(dir, mode, compare))?
            && !finished(checkpoint.meta.config.train.mode)
        {
            checkpoints.push(checkpoint);
        }
    }
    let finished = [Mode::Coupled, Mode::Decoupled]
        .into_iter()
        .filter(|&m| finished(m))
        .count();
    if checkpoints.is_empty() && finished == 0 {
        bail!(
            "--resume {}: nothing to resume (no {} and no report)",
            dir.display(),
            splitaux::run::checkpoint::FILE
        );
    }
    Ok(checkpoints)
}

/// The configuration of the run being resumed: the checkpoint's (or the finished report's);
/// `--config`, `--set` and `--mode` may restate it but not change it.
fn resumed_config(
    args: &TrainArgs,
    dir: &Path,
    checkpoints: &[Checkpoint],
) -> Result<ExperimentConfig> {
    let mut recorded = match checkpoints.first() {
        Some(checkpoint) => checkpoint.meta.config.clone(),
        None => {
            let report = [Mode::Coupled, Mode::Decoupled]
                .iter()
                .map(|m| dir.join(format!("{}.json", m.name())))
                .find(|p| p.exists())
                .context("a finished run has its report")?;
            read_report(&report)?.config
        }
    };
    let source = &args.source;
    if source.config.is_some() || !source.overrides.is_empty() || args.mode.is_some() {
        let mut requested = match &source.config {
            Some(_) => source.load()?,
            None => {
                let table = toml::Table::try_from(&recorded)
                    .context("the checkpoint's configuration as TOML")?;
                ExperimentConfig::from_base(table, "the checkpoint", &source.overrides)?
            }
        };
        // The mode is checked only when restated (compare runs both).
        requested.train.mode = args.mode.unwrap_or(recorded.train.mode);
        let keys = differing_keys(&recorded, &requested);
        if !keys.is_empty() {
            bail!(
                "--resume {}: the run was started with other settings; differing: {}",
                dir.display(),
                keys.join(", ")
            );
        }
        // Settings that cannot change the numbers (threads, checkpoint interval) may change.
        recorded.train.threads = requested.train.threads;
        recorded.train.checkpoint_every = requested.train.checkpoint_every;
    }
    Ok(recorded)
}

fn read_report(path: &Path) -> Result<Report> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a splitaux report", path.display()))
}

fn write_json(path: &Path, report: &Report) -> Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// `runs/<UTC yyyymmdd-hhmmss>-<label>`.
fn default_out_dir(label: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    PathBuf::from("runs").join(format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}-{label}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    ))
}

fn run_bench(args: BenchArgs) -> Result<()> {
    if args.batch < 2 {
        bail!(
            "--batch {}: BatchNorm needs at least 2 images per batch",
            args.batch
        );
    }
    let config = BenchConfig {
        mode: args.mode,
        depth: args.depth,
        cut: args.cut,
        aux: args.aux,
        aux_hidden: args.aux_hidden,
        aux_layers: args.aux_layers,
        batch: args.batch,
        steps: args.steps.max(1),
        warmup: args.warmup,
        threads: args.threads,
        classes: 10,
        backend: args.backend,
        kernels: args.kernels,
    };
    let result = bench(&config)?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        let mem = |b: Option<u64>| b.map_or("n/a".to_string(), human_bytes);
        println!(
            "{} ResNet-{} cut {} ({} blocks), batch {}, {} threads: {:.1} images/s ({:.3} s/step), peak step memory {} (client phase {}, server phase {}), {} across the cut per step",
            args.mode.name(),
            args.depth,
            args.cut,
            result.cut_blocks,
            args.batch,
            result.threads,
            result.images_per_s,
            result.seconds_per_step,
            mem(result.peak_memory_bytes),
            mem(result.peak_client_phase_bytes),
            mem(result.peak_server_phase_bytes),
            human_bytes(result.bytes_per_step),
        );
    }
    Ok(())
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

fn sweep(args: SweepArgs) -> Result<()> {
    let sweep = Sweep::load(args.config.as_deref(), &args.grid, args.seeds)?
        .with_overrides(&args.overrides)?;
    let options = SweepOptions {
        data_dir: args.data_dir,
        offline: args.offline,
        retry_failed: args.retry_failed,
        progress: !args.quiet,
        shard: args.shard.unwrap_or_default(),
    };
    let summary = run_sweep(&sweep, &args.out, &options)?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else if !args.quiet {
        let shard = if summary.shard.is_whole() {
            String::new()
        } else {
            format!(
                " shard {} ({} runs in the grid)",
                summary.shard, summary.grid_runs
            )
        };
        eprintln!(
            "sweep{shard}: {} runs, {} skipped (already recorded), {} completed, {} diverged, {} failed; log {}",
            summary.total,
            summary.skipped,
            summary.completed,
            summary.diverged,
            summary.failed,
            summary.log.display()
        );
    }
    if summary.failed + summary.diverged > 0 {
        eprintln!(
            "error: {} of {} runs failed or diverged (recorded in {})",
            summary.failed + summary.diverged,
            summary.total - summary.skipped,
            summary.log.display()
        );
        return Err(ExitStatus(EXIT_RUNS_FAILED).into());
    }
    Ok(())
}

fn table(args: TableArgs) -> Result<()> {
    let records = read_merged(&args.runs, args.allow_mixed)?;
    let metrics = if args.metrics.is_empty() {
        vec![
            Metric::TestAccuracy,
            Metric::BytesPerEpoch,
            Metric::PeakMemory,
        ]
    } else {
        args.metrics
    };
    let table = aggregate(&records, &args.rows, &args.cols, &metrics);
    match args.format {
        TableFormat::Md => print!("{}", table.markdown()),
        TableFormat::Csv => print!("{}", table.csv()),
        TableFormat::Json => println!("{}", serde_json::to_string_pretty(&table)?),
    }
    if table.excluded > 0 {
        eprintln!("{} runs left out: they did not complete", table.excluded);
    }
    Ok(())
}

fn plot(args: PlotArgs) -> Result<()> {
    let records = read_merged(&args.runs, args.allow_mixed)?;
    for path in plots::plot_all(&records, &args.out)? {
        println!("{}", path.display());
    }
    Ok(())
}
