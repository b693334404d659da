//! `train` and `compare`: one run or both modes, their reports and checkpoints, and `--resume`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;

use splitaux::config::{ExperimentConfig, Mode, differing_keys};
use splitaux::report::{self, Report};
use splitaux::run::{Checkpoint, RunOptions, run};

use super::{ConfigSource, parse_name};

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
    /// How the parties talk: `memory` (one process) or `grpc` (the server and each client as
    /// separate processes on 127.0.0.1; train only).
    #[arg(long, value_enum, default_value_t = TransportKind::Memory)]
    pub transport: TransportKind,
}

/// Where the parties of a `train` run live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportKind {
    /// All in this process, linked in memory.
    Memory,
    /// One process each, linked by gRPC on 127.0.0.1.
    Grpc,
}

pub fn train(args: TrainArgs, compare: bool) -> Result<()> {
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
    if args.transport == TransportKind::Grpc {
        if compare || args.resume.is_some() {
            bail!("--transport grpc runs one `train` from scratch (not compare, not --resume)");
        }
        return super::launch::train_over_grpc(&args, &config, &out);
    }
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
    // `train` keeps its one checkpoint in the folder itself; `compare` one per mode.
    let folders: Vec<PathBuf> = if compare {
        [Mode::Coupled, Mode::Decoupled]
            .iter()
            .map(|&mode| checkpoint_dir(dir, mode, true))
            .collect()
    } else {
        vec![dir.to_path_buf()]
    };
    let mut checkpoints = Vec::new();
    for folder in folders {
        if let Some(checkpoint) = Checkpoint::load_from(&folder)?
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

pub(super) fn read_report(path: &Path) -> Result<Report> {
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
pub(super) fn default_out_dir(label: &str) -> PathBuf {
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
