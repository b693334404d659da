//! Running a sweep: every combination one after another, each recorded in `runs.jsonl` with its
//! full report beside it; finished combinations are skipped on a re-run.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;

use super::grid::{Combination, Sweep, expand};
use super::log::{LogError, RunRecord, append, read_records};
use crate::data::{self, Cifar, DatasetKind, LabelSet, locate};
use crate::report::RunStatus;
use crate::run::{PreparedData, RunOptions, run};

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
}

/// What a sweep did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepSummary {
    pub total: usize,
    /// Already in `runs.jsonl`, not run again.
    pub skipped: usize,
    pub completed: usize,
    pub diverged: usize,
    pub failed: usize,
    pub log: PathBuf,
}

/// The name of the log inside the output folder.
pub const LOG_FILE: &str = "runs.jsonl";

pub fn run_sweep(
    sweep: &Sweep,
    out: &Path,
    options: &SweepOptions,
) -> Result<SweepSummary, LogError> {
    let log = out.join(LOG_FILE);
    let reports = out.join("reports");
    std::fs::create_dir_all(&reports).map_err(|source| LogError::Io {
        path: reports.clone(),
        source,
    })?;
    let first_seed = sweep.first_seed().unwrap_or(0);
    let combinations = expand(&sweep.axes, sweep.seeds, first_seed);
    let done: HashSet<String> = read_records(&log)?
        .into_iter()
        .filter(|r| !options.retry_failed || r.status == RunStatus::Completed)
        .map(|r| r.id)
        .collect();
    let todo: Vec<&Combination> = combinations
        .iter()
        .filter(|c| !done.contains(&c.id()))
        .collect();
    let mut summary = SweepSummary {
        total: combinations.len(),
        skipped: combinations.len() - todo.len(),
        log: log.clone(),
        ..SweepSummary::default()
    };
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
        let record = run_one(sweep, combination, options, &multi, &mut datasets);
        match record.status {
            RunStatus::Completed => summary.completed += 1,
            RunStatus::Diverged => summary.diverged += 1,
            RunStatus::Failed => summary.failed += 1,
        }
        if let Some(report) = &record.report {
            let path = reports.join(format!("{}.json", combination.slug()));
            let text = serde_json::to_string_pretty(report).map_err(|e| LogError::Io {
                path: path.clone(),
                source: e.into(),
            })?;
            std::fs::write(&path, text + "\n").map_err(|source| LogError::Io { path, source })?;
        }
        append(&log, &record)?;
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

/// Datasets already loaded in this sweep, by kind, label set and folder.
#[derive(Default)]
struct DatasetCache(HashMap<(DatasetKind, LabelSet, PathBuf), Cifar>);

fn run_one(
    sweep: &Sweep,
    combination: &Combination,
    options: &SweepOptions,
    multi: &MultiProgress,
    datasets: &mut DatasetCache,
) -> RunRecord {
    let failed = |error: String| RunRecord {
        id: combination.id(),
        axes: combination.assignments.clone(),
        seed: combination.seed,
        status: RunStatus::Failed,
        error: Some(error),
        report: None,
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
    let run_options = RunOptions {
        progress: options.progress,
        multi: Some(multi.clone()),
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
