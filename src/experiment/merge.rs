//! Merging `runs.jsonl` files — the shards of one sweep, or several sweeps — into one list of
//! runs for `table` and `plot`, and deciding whether runs belong together: the same splitaux
//! version, the same base configuration, and no run in two files.
//!
//! Two runs have the same base configuration when their configs agree on every key except the
//! grid axes (of any of the merged files), the per-run `train.seed`, and the keys that do not
//! change results ([`uncompared_keys`]). A record's config is the base config its sweep recorded
//! (`base`), or, in records written before splitaux recorded it, the run's own config.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use super::log::{LogError, RunRecord, read_records};
use crate::config::{RESULT_NEUTRAL_KEYS, Settings};

/// Config keys never compared: `train.seed` (each run of a sweep sets its own) and the keys
/// that cannot change results ([`RESULT_NEUTRAL_KEYS`]).
pub fn uncompared_keys() -> impl Iterator<Item = &'static str> {
    std::iter::once("train.seed").chain(RESULT_NEUTRAL_KEYS)
}

/// The settings a record's run shares with its sweep: the recorded base config, else the run's
/// own config (older records); `None` for an old record of a run that never started.
pub fn record_settings(record: &RunRecord) -> Option<Settings> {
    match (&record.base, &record.report) {
        (Some(base), _) => Some(base.settings()),
        (None, Some(report)) => Some(report.config.settings()),
        (None, None) => None,
    }
}

/// The splitaux version that made a record: its own field, else its report's (older records);
/// `None` for an old record of a run that never started.
pub fn record_version(record: &RunRecord) -> Option<&str> {
    record
        .splitaux_version
        .as_deref()
        .or_else(|| record.report.as_ref().map(|r| r.splitaux_version.as_str()))
}

/// The keys left out of a comparison: [`uncompared_keys`] and `axis_keys` (with every key below
/// them).
pub fn skip_keys<'a>(axis_keys: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    uncompared_keys()
        .map(str::to_string)
        .chain(axis_keys.into_iter().map(str::to_string))
        .collect()
}

fn skipped(key: &str, skip: &BTreeSet<String>) -> bool {
    skip.iter().any(|s| {
        key == s
            || key
                .strip_prefix(s.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// A key whose value differs between two configs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub key: String,
    /// The value in the first config (`(unset)` when it lacks the key).
    pub first: String,
    pub second: String,
}

/// The first key, in key order, whose value differs between `a` and `b`, leaving out `skip`
/// (see [`skip_keys`]).
pub fn first_difference(a: &Settings, b: &Settings, skip: &BTreeSet<String>) -> Option<Difference> {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|key| !skipped(key, skip))
        .find(|key| a.get(*key) != b.get(*key))
        .map(|key| {
            let text = |s: &Settings| s.get(key).cloned().unwrap_or_else(|| "(unset)".into());
            Difference {
                key: key.clone(),
                first: text(a),
                second: text(b),
            }
        })
}

/// A run and the file it is in, as errors name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAt {
    pub path: PathBuf,
    pub id: String,
}

impl fmt::Display for RunAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (run `{}`)", self.path.display(), self.id)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("{0}: no runs recorded")]
    Empty(PathBuf),
    #[error("run `{id}` is in both {first} and {second}")]
    DuplicateRun {
        id: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error(
        "runs of different splitaux versions: {first} is splitaux {first_version}, {second} is splitaux {second_version} (--allow-mixed merges them anyway)"
    )]
    MixedVersions {
        first: Box<RunAt>,
        first_version: String,
        second: Box<RunAt>,
        second_version: String,
    },
    #[error(
        "runs of different base configurations: `{key}` is {first_value} in {first} but {second_value} in {second} (--allow-mixed merges them anyway)"
    )]
    MixedBase {
        key: String,
        first: Box<RunAt>,
        first_value: String,
        second: Box<RunAt>,
        second_value: String,
    },
}

/// One `runs.jsonl` and its records.
#[derive(Debug, Clone)]
pub struct RunsFile {
    pub path: PathBuf,
    pub records: Vec<RunRecord>,
}

impl RunsFile {
    /// Reads `path`; a missing or empty log is an error naming it.
    pub fn read(path: &Path) -> Result<Self, MergeError> {
        let records = read_records(path)?;
        if records.is_empty() {
            return Err(MergeError::Empty(path.to_path_buf()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            records,
        })
    }
}

/// Reads every file of `paths` and merges them with [`merge_files`].
pub fn read_merged(paths: &[PathBuf], allow_mixed: bool) -> Result<Vec<RunRecord>, MergeError> {
    let files = paths
        .iter()
        .map(|path| RunsFile::read(path))
        .collect::<Result<Vec<_>, _>>()?;
    merge_files(files, allow_mixed)
}

/// The records of `files`, file after file, each in its own order.
///
/// With more than one file: runs of different splitaux versions or base configurations are
/// refused unless `allow_mixed`, and a run id in two files is an error naming the id and both
/// files — except, with `allow_mixed`, when the two runs differ in version or base
/// configuration (then they are different runs that share a grid). One file is taken as it is:
/// a sweep may record one id twice (a failed run, then its retry).
pub fn merge_files(files: Vec<RunsFile>, allow_mixed: bool) -> Result<Vec<RunRecord>, MergeError> {
    if files.len() > 1 {
        check(&files, allow_mixed)?;
    }
    Ok(files.into_iter().flat_map(|f| f.records).collect())
}

/// A record with what the checks compare.
struct Entry<'a> {
    file: usize,
    record: &'a RunRecord,
    version: Option<&'a str>,
    settings: Option<Settings>,
}

fn check(files: &[RunsFile], allow_mixed: bool) -> Result<(), MergeError> {
    let skip = skip_keys(
        files
            .iter()
            .flat_map(|f| &f.records)
            .flat_map(|r| r.axes.iter().map(|(key, _)| key.as_str())),
    );
    let entries: Vec<Entry<'_>> = files
        .iter()
        .enumerate()
        .flat_map(|(file, f)| {
            f.records.iter().map(move |record| Entry {
                file,
                record,
                version: record_version(record),
                settings: record_settings(record),
            })
        })
        .collect();
    let at = |e: &Entry<'_>| RunAt {
        path: files[e.file].path.clone(),
        id: e.record.id.clone(),
    };
    let differ = |a: &Entry<'_>, b: &Entry<'_>| -> Option<Difference> {
        match (&a.settings, &b.settings) {
            (Some(x), Some(y)) => first_difference(x, y, &skip),
            _ => None,
        }
    };

    if !allow_mixed {
        if let Some(reference) = entries.iter().find(|e| e.version.is_some())
            && let Some(other) = entries
                .iter()
                .find(|e| e.version.is_some() && e.version != reference.version)
        {
            return Err(MergeError::MixedVersions {
                first: Box::new(at(reference)),
                first_version: reference.version.unwrap_or_default().to_string(),
                second: Box::new(at(other)),
                second_version: other.version.unwrap_or_default().to_string(),
            });
        }
        if let Some(reference) = entries.iter().find(|e| e.settings.is_some()) {
            for other in &entries {
                if let Some(d) = differ(reference, other) {
                    return Err(MergeError::MixedBase {
                        key: d.key,
                        first: Box::new(at(reference)),
                        first_value: d.first,
                        second: Box::new(at(other)),
                        second_value: d.second,
                    });
                }
            }
        }
    }

    // The same run in two files.
    let mut seen: HashMap<&str, Vec<usize>> = HashMap::new();
    for (n, entry) in entries.iter().enumerate() {
        let earlier = seen.entry(entry.record.id.as_str()).or_default();
        for &m in earlier.iter() {
            let first = &entries[m];
            if first.file == entry.file {
                continue;
            }
            let different_runs =
                allow_mixed && (first.version != entry.version || differ(first, entry).is_some());
            if !different_runs {
                return Err(MergeError::DuplicateRun {
                    id: entry.record.id.clone(),
                    first: files[first.file].path.clone(),
                    second: files[entry.file].path.clone(),
                });
            }
        }
        earlier.push(n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExperimentConfig;
    use crate::data::partition::PartitionRule;
    use crate::report::RunStatus;

    fn record(id: &str, axes: &[(&str, &str)], base: ExperimentConfig) -> RunRecord {
        RunRecord {
            id: id.into(),
            axes: axes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            seed: 0,
            status: RunStatus::Failed,
            error: Some("not run".into()),
            report: None,
            splitaux_version: Some("1.0.0".into()),
            base: Some(base),
        }
    }

    fn file(name: &str, records: Vec<RunRecord>) -> RunsFile {
        RunsFile {
            path: PathBuf::from(name),
            records,
        }
    }

    fn lr(lr: f64) -> ExperimentConfig {
        let mut config = ExperimentConfig::default();
        config.optim.lr = lr;
        config
    }

    #[test]
    fn disjoint_files_of_one_base_merge_in_file_order() {
        let mut other_machine = lr(0.1);
        other_machine.data.dir = PathBuf::from("/scratch/cifar");
        other_machine.train.threads = 16;
        other_machine.train.seed = 3;
        let merged = merge_files(
            vec![
                file(
                    "a",
                    vec![record("x", &[], lr(0.1)), record("z", &[], lr(0.1))],
                ),
                file("b", vec![record("y", &[], other_machine)]),
            ],
            false,
        )
        .unwrap();
        let ids: Vec<&str> = merged.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["x", "z", "y"]);
    }

    #[test]
    fn one_file_is_taken_as_it_is() {
        let merged = merge_files(
            vec![file(
                "a",
                vec![record("x", &[], lr(0.1)), record("x", &[], lr(0.2))],
            )],
            false,
        )
        .unwrap();
        assert_eq!(merged.len(), 2);
    }

    #[test]
    fn a_run_in_two_files_is_named_with_both_files() {
        let files = || {
            vec![
                file("shard-1/runs.jsonl", vec![record("x", &[], lr(0.1))]),
                file(
                    "shard-2/runs.jsonl",
                    vec![record("y", &[], lr(0.1)), record("x", &[], lr(0.1))],
                ),
            ]
        };
        let err = merge_files(files(), false).unwrap_err().to_string();
        assert!(err.contains("run `x`"), "{err}");
        assert!(
            err.contains("shard-1/runs.jsonl") && err.contains("shard-2/runs.jsonl"),
            "{err}"
        );
        // Same base and version: the same run even with --allow-mixed.
        assert!(matches!(
            merge_files(files(), true),
            Err(MergeError::DuplicateRun { .. })
        ));
    }

    #[test]
    fn different_base_configs_are_refused_unless_allowed() {
        let files = || {
            vec![
                file("a", vec![record("x", &[], lr(0.1))]),
                file("b", vec![record("x", &[], lr(0.05))]),
            ]
        };
        let err = merge_files(files(), false).unwrap_err().to_string();
        assert!(err.contains("`optim.lr` is 0.1 in a (run `x`)"), "{err}");
        assert!(err.contains("0.05 in b (run `x`)"), "{err}");
        assert!(err.contains("--allow-mixed"), "{err}");
        // Allowed: the same id under another base is another run.
        assert_eq!(merge_files(files(), true).unwrap().len(), 2);
    }

    #[test]
    fn different_versions_are_refused_unless_allowed() {
        let mut newer = record("y", &[], lr(0.1));
        newer.splitaux_version = Some("2.0.0".into());
        let files = || {
            vec![
                file("a", vec![record("x", &[], lr(0.1))]),
                file("b", vec![newer.clone()]),
            ]
        };
        let err = merge_files(files(), false).unwrap_err().to_string();
        assert!(
            err.contains("a (run `x`) is splitaux 1.0.0, b (run `y`) is splitaux 2.0.0"),
            "{err}"
        );
        assert_eq!(merge_files(files(), true).unwrap().len(), 2);
    }

    #[test]
    fn a_key_that_is_an_axis_in_either_file_is_not_compared() {
        // One sweep fixed the partition with --set, the other made it an axis.
        let mut dirichlet = ExperimentConfig::default();
        dirichlet.clients.partition = PartitionRule::Dirichlet;
        let merged = merge_files(
            vec![
                file(
                    "set",
                    vec![record(
                        "clients.count=5,seed=0",
                        &[("clients.count", "5")],
                        dirichlet,
                    )],
                ),
                file(
                    "grid",
                    vec![record(
                        "clients.partition=iid,seed=0",
                        &[("clients.partition", "iid")],
                        ExperimentConfig::default(),
                    )],
                ),
            ],
            false,
        )
        .unwrap();
        assert_eq!(merged.len(), 2);
    }

    #[test]
    fn differences_skip_axes_and_keys_below_them() {
        let a = lr(0.1).settings();
        let b = lr(0.2).settings();
        assert_eq!(a.get("optim.lr").map(String::as_str), Some("0.1"));
        assert_eq!(a.get("train.mode").map(String::as_str), Some("decoupled"));
        let d = first_difference(&a, &b, &skip_keys([] as [&str; 0])).unwrap();
        assert_eq!(
            (d.key.as_str(), d.first.as_str(), d.second.as_str()),
            ("optim.lr", "0.1", "0.2")
        );
        assert_eq!(first_difference(&a, &b, &skip_keys(["optim.lr"])), None);
        assert_eq!(first_difference(&a, &b, &skip_keys(["optim"])), None);
        assert!(first_difference(&a, &b, &skip_keys(["optim.l"])).is_some());
    }
}
