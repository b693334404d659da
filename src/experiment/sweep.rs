//! Running a sweep: every combination one after another (or one shard's, `--shard K/N`), each
//! recorded in `runs.jsonl` with its full report beside it; finished combinations are skipped on
//! a re-run, and a log holding runs of another base configuration is not resumed into.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;

use super::grid::{Combination, Sweep, expand};
use super::log::{LogError, RunRecord, append, read_records};
use super::merge::{first_difference, record_settings, skip_keys};
use super::shard::Shard;
use crate::data::{self, Cifar, DatasetKind, LabelSet, locate};
use crate::report::RunStatus;
use crate::run::{Checkpoint, PreparedData, RunOptions, run};

/// How a sweep runs.
#[derive(Debug, Clone, Default)]
pub struct SweepOptions {
    /// `--data-dir`, beating each config's `data.dir`.
    pub data_dir: Option<PathBuf>,
    pub offline: bool,
    /// Run again the combinations recorded as failed or diverged.
    pub retry_failed: bool,
    /// Progress bars and per-run lines on stderr.
    pub progress: bool,
    /// Which runs of the grid to run: shard K of N takes every N-th run of the canonical order
    /// (that of [`expand`]) starting at the K-th; [`Shard::WHOLE`] (the default) runs them all.
    pub shard: Shard,
}

/// What a sweep did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepSummary {
    /// Runs of this shard (of the whole grid when not sharded).
    pub total: usize,
    /// Runs of the whole grid, all shards together.
    pub grid_runs: usize,
    /// The shard that ran: `{"index": K, "count": N}` (`1`, `1` when not sharded).
    pub shard: Shard,
    /// Already in `runs.jsonl`, not run again.
    pub skipped: usize,
    pub completed: usize,
    pub diverged: usize,
    pub failed: usize,
    pub log: PathBuf,
}

/// The name of the log inside the output folder.
pub const LOG_FILE: &str = "runs.jsonl";

/// The folder (inside the output folder) of the checkpoints of unfinished runs, one folder per
/// run: a sweep interrupted in the middle of a run resumes it from there.
pub const CHECKPOINTS: &str = "checkpoints";

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Log(#[from] LogError),
    /// Resuming into this log would mix runs of two base configurations under one set of ids.
    #[error(
        "{log} holds runs of another base configuration: `{key}` is {recorded} in its run `{run}` but {now} in this sweep; write this sweep to another --out"
    )]
    OtherBase {
        log: PathBuf,
        run: String,
        key: String,
        recorded: String,
        now: String,
    },
}

pub fn run_sweep(
    sweep: &Sweep,
    out: &Path,
    options: &SweepOptions,
) -> Result<SweepSummary, SweepError> {
    let log = out.join(LOG_FILE);
    let reports = out.join("reports");
    std::fs::create_dir_all(&reports).map_err(|cause| LogError::Io {
        path: reports.clone(),
        cause,
    })?;
    let first_seed = sweep.first_seed().unwrap_or(0);
    let grid = expand(&sweep.axes, sweep.seeds, first_seed);
    // The shard first, then what is done: resuming a shard skips its own finished runs.
    let combinations: Vec<&Combination> = options.shard.select(&grid);
    let recorded = read_records(&log)?;
    check_same_base(sweep, &log, &recorded)?;
    let done: HashSet<String> = recorded
        .into_iter()
        .filter(|r| !options.retry_failed || r.status == RunStatus::Completed)
        .map(|r| r.id)
        .collect();
    let todo: Vec<&Combination> = combinations
        .iter()
        .copied()
        .filter(|c| !done.contains(&c.id()))
        .collect();
    let mut summary = SweepSummary {
        total: combinations.len(),
        grid_runs: grid.len(),
        shard: options.shard,
        skipped: combinations.len() - todo.len(),
        log: log.clone(),
        ..SweepSummary::default()
    };
    if options.progress && !options.shard.is_whole() {
        eprintln!(
            "shard {}: {} of the grid's {} runs{}",
            options.shard,
            summary.total,
            summary.grid_runs,
            if summary.total == 0 {
                " (more shards than runs: nothing to do)"
            } else {
                ""
            }
        );
    }
    if options.progress && summary.skipped > 0 {
        eprintln!(
            "{} of {} runs already in {}: skipping them",
            summary.skipped,
            summary.total,
            log.display()
        );
    }

    let multi = MultiProgress::new();
    let overall = if options.progress && std::io::stderr().is_terminal() {
        let bar = multi.add(ProgressBar::new(todo.len() as u64));
        bar.set_style(
            ProgressStyle::with_template(
                "sweep [{bar:30}] {pos}/{len} runs, {elapsed} elapsed, ~{eta} left {msg}",
            )
            .expect("valid progress template")
            .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut datasets = DatasetCache::default();
    for combination in todo {
        overall.set_message(combination.id());
        let checkpoints = out.join(CHECKPOINTS).join(combination.slug());
        let record = run_one(
            sweep,
            combination,
            options,
            &multi,
            &mut datasets,
            &checkpoints,
        );
        match record.status {
            RunStatus::Completed => summary.completed += 1,
            RunStatus::Diverged => summary.diverged += 1,
            RunStatus::Failed | RunStatus::Running => summary.failed += 1,
        }
        if let Some(report) = &record.report {
            let path = reports.join(format!("{}.json", combination.slug()));
            let text = serde_json::to_string_pretty(report).map_err(|e| LogError::Io {
                path: path.clone(),
                cause: e.into(),
            })?;
            std::fs::write(&path, text + "\n").map_err(|cause| LogError::Io { path, cause })?;
        }
        append(&log, &record)?;
        // Recorded: its checkpoint is no longer needed (a failed run keeps it to resume from).
        if record.status != RunStatus::Failed {
            let _ = std::fs::remove_dir_all(&checkpoints);
        }
        if options.progress {
            overall.suspend(|| match &record.error {
                None => eprintln!("done {}", record.id),
                Some(error) => eprintln!("{} {}: {error}", record.status.name(), record.id),
            });
        }
        overall.inc(1);
    }
    overall.finish_and_clear();
    Ok(summary)
}

/// Refuses to resume into a log whose runs were made from another base configuration (compared
/// as `table` compares the files it merges: grid axes, `train.seed` and the keys that do not
/// change results left out). Records of older versions without a base are compared by their
/// report's config; a sweep whose base alone is not a valid config is not checked.
fn check_same_base(sweep: &Sweep, log: &Path, recorded: &[RunRecord]) -> Result<(), SweepError> {
    let Ok(now) = sweep.base_config().map(|c| c.settings()) else {
        return Ok(());
    };
    let skip = skip_keys(
        sweep.axes.iter().map(|a| a.key.as_str()).chain(
            recorded
                .iter()
                .flat_map(|r| r.axes.iter().map(|(key, _)| key.as_str())),
        ),
    );
    for record in recorded {
        if let Some(then) = record_settings(record)
            && let Some(d) = first_difference(&then, &now, &skip)
        {
            return Err(SweepError::OtherBase {
                log: log.to_path_buf(),
                run: record.id.clone(),
                key: d.key,
                recorded: d.first,
                now: d.second,
            });
        }
    }
    Ok(())
}

/// Datasets already loaded in this sweep, by kind, label set and folder.
#[derive(Default)]
struct DatasetCache(HashMap<(DatasetKind, LabelSet, PathBuf), Cifar>);

fn run_one(
    sweep: &Sweep,
    combination: &Combination,
    options: &SweepOptions,
    multi: &MultiProgress,
    datasets: &mut DatasetCache,
    checkpoints: &Path,
) -> RunRecord {
    let failed = |error: String| RunRecord {
        id: combination.id(),
        axes: combination.assignments.clone(),
        seed: combination.seed,
        status: RunStatus::Failed,
        error: Some(error),
        report: None,
        splitaux_version: Some(crate::VERSION.to_string()),
        base: sweep.base_config().ok(),
    };
    let config = match sweep.config_for(combination) {
        Ok(config) => config,
        Err(e) => return failed(e.to_string()),
    };
    let root = locate::data_root(options.data_dir.as_deref(), Some(config.data.dir.as_path()));
    let key = (config.data.dataset, config.data.labels, root.clone());
    if !datasets.0.contains_key(&key) {
        match data::open(
            config.data.dataset,
            config.data.labels,
            &root,
            options.offline,
            options.progress,
        ) {
            Ok(cifar) => {
                datasets.0.insert(key.clone(), cifar);
            }
            Err(e) => return failed(e.to_string()),
        }
    }
    let prepared = PreparedData::new(&datasets.0[&key], &config);
    if let Err(e) = std::fs::create_dir_all(checkpoints) {
        return failed(format!("cannot create {}: {e}", checkpoints.display()));
    }
    let resume = match Checkpoint::load_from(checkpoints) {
        Ok(checkpoint) => checkpoint.map(Arc::new),
        Err(e) => return failed(e.to_string()),
    };
    let run_options = RunOptions {
        progress: options.progress,
        multi: Some(multi.clone()),
        checkpoint_dir: Some(checkpoints.to_path_buf()),
        resume,
    };
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        run(&config, config.train.mode, &prepared, run_options)
    }));
    match outcome {
        Ok(Ok(report)) => RunRecord {
            id: combination.id(),
            axes: combination.assignments.clone(),
            seed: combination.seed,
            status: report.status,
            error: report.error.clone(),
            report: Some(report),
            splitaux_version: Some(crate::VERSION.to_string()),
            base: sweep.base_config().ok(),
        },
        Ok(Err(e)) => failed(e.to_string()),
        Err(panic) => failed(format!(
            "crashed: {}",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic")
        )),
    }
}
