//! `sweep`, `table` and `plot`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use splitaux::experiment::table::aggregate;
use splitaux::experiment::{
    Axis, Shard, Sweep, SweepOptions, plot as plots, read_merged, run_sweep,
};
use splitaux::report::Metric;

use super::{EXIT_RUNS_FAILED, ExitStatus};

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

pub fn sweep(args: SweepArgs) -> Result<()> {
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

pub fn table(args: TableArgs) -> Result<()> {
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

pub fn plot(args: PlotArgs) -> Result<()> {
    let records = read_merged(&args.runs, args.allow_mixed)?;
    for path in plots::plot_all(&records, &args.out)? {
        println!("{}", path.display());
    }
    Ok(())
}
