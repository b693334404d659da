//! Sweep definitions: a base config (a file plus `--set` overrides), grid axes over any config
//! key, and a number of seeds; the canonical order of the runs ([`expand`]).
//!
//! A sweep file is an ordinary config file with an extra `[sweep]` table:
//!
//! ```toml
//! [model]
//! depth = 20
//!
//! [sweep]
//! seeds = 3
//! [sweep.grid]
//! "train.mode" = ["coupled", "decoupled"]
//! "model.cut" = ["shallow", "middle", "deep"]
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{ConfigError, ExperimentConfig, read_toml};

/// One grid axis: a config key and the values it takes (as `--set` text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Axis {
    pub key: String,
    pub values: Vec<String>,
}

impl std::str::FromStr for Axis {
    type Err = String;

    /// `key=v1,v2,…`
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (key, values) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: expected key=value1,value2,…"))?;
        let values: Vec<String> = values
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        if key.trim().is_empty() || values.is_empty() {
            return Err(format!("`{s}`: expected key=value1,value2,…"));
        }
        Ok(Self {
            key: key.trim().to_string(),
            values,
        })
    }
}

/// One run of a sweep: its axis values and seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Combination {
    /// `(key, value)` for every axis, in axis order.
    pub assignments: Vec<(String, String)>,
    pub seed: u64,
}

impl Combination {
    /// A stable identity, used to resume: `key=value,…,seed=N`.
    pub fn id(&self) -> String {
        let mut parts: Vec<String> = self
            .assignments
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        parts.push(format!("seed={}", self.seed));
        parts.join(",")
    }

    /// A file-name-safe form of [`id`](Self::id).
    pub fn slug(&self) -> String {
        self.id()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '=' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }

    /// `--set` overrides that produce this run's config.
    pub fn overrides(&self) -> Vec<String> {
        let mut sets: Vec<String> = self
            .assignments
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        sets.push(format!("train.seed={}", self.seed));
        sets
    }
}

/// Every combination of `axes` (the last axis varies fastest) for each of `seeds` seeds starting
/// at `first_seed`; seeds vary slowest so that a partial sweep covers every cell once first.
pub fn expand(axes: &[Axis], seeds: usize, first_seed: u64) -> Vec<Combination> {
    let mut cells: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for axis in axes {
        cells = cells
            .into_iter()
            .flat_map(|prefix| {
                axis.values.iter().map(move |v| {
                    let mut next = prefix.clone();
                    next.push((axis.key.clone(), v.clone()));
                    next
                })
            })
            .collect();
    }
    (0..seeds.max(1) as u64)
        .flat_map(|i| {
            cells.iter().map(move |assignments| Combination {
                assignments: assignments.clone(),
                seed: first_seed + i,
            })
        })
        .collect()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepSection {
    #[serde(default)]
    seeds: Option<usize>,
    #[serde(default)]
    grid: toml::Table,
}

/// A sweep read from a file (or defaults) plus command-line axes.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// The base config file with its `[sweep]` table removed, as TOML text.
    pub base: toml::Table,
    pub origin: PathBuf,
    pub axes: Vec<Axis>,
    pub seeds: usize,
    /// `--set key=value` overrides of the base config, applied before each run's axis values
    /// and seed; none names a grid axis (see [`with_overrides`](Self::with_overrides)).
    pub overrides: Vec<String>,
}

impl Sweep {
    /// Reads `path` (if any); `extra_axes` replace file axes of the same key; `seeds` beats the
    /// file's.
    pub fn load(
        path: Option<&Path>,
        extra_axes: &[Axis],
        seeds: Option<usize>,
    ) -> Result<Self, ConfigError> {
        let (mut base, origin) = match path {
            Some(path) => {
                let table = read_toml(path)?;
                (table, path.to_path_buf())
            }
            None => (toml::Table::new(), PathBuf::from("defaults")),
        };
        let section: SweepSection = match base.remove("sweep") {
            Some(value) => {
                serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Key {
                    origin: origin.display().to_string(),
                    key: format!("sweep.{}", e.path()),
                    message: e.into_inner().to_string(),
                })?
            }
            None => SweepSection::default(),
        };
        let mut axes = Vec::new();
        for (key, value) in section.grid {
            let values = match value {
                toml::Value::Array(items) => items.iter().map(value_text).collect(),
                other => vec![value_text(&other)],
            };
            axes.push(Axis { key, values });
        }
        for axis in extra_axes {
            match axes.iter_mut().find(|a| a.key == axis.key) {
                Some(existing) => *existing = axis.clone(),
                None => axes.push(axis.clone()),
            }
        }
        Ok(Self {
            base,
            origin,
            axes,
            seeds: seeds.or(section.seeds).unwrap_or(1),
            overrides: Vec::new(),
        })
    }

    /// Adds `--set key=value` overrides to the base config (TOML values, as `train --set`):
    /// every run starts from the base with them, then takes its axis values and seed
    /// (`--set train.seed=N` moves the first seed).
    ///
    /// An override of a key that is also a grid axis (of the file or `--grid`; or a key inside
    /// or above one) is an error rather than silently beaten by the axis: to run one value of an
    /// axis, give it as the axis (`--grid key=value`). Unknown keys, wrong types and values out
    /// of range are errors here, naming the key — except a range check that a grid axis may
    /// settle (an impossible cut with a depth axis), which waits for each run's config.
    pub fn with_overrides(mut self, overrides: &[String]) -> Result<Self, ConfigError> {
        if overrides.is_empty() {
            return Ok(self);
        }
        for assignment in overrides {
            let (key, value) = assignment
                .split_once('=')
                .ok_or_else(|| ConfigError::SetSyntax(assignment.clone()))?;
            let key = key.trim();
            if let Some(axis) = self.axes.iter().find(|a| overlaps(key, &a.key)) {
                return Err(ConfigError::Key {
                    origin: format!("--set {assignment}"),
                    key: axis.key.clone(),
                    message: format!(
                        "is also a grid axis of this sweep ({}); to run one value, give it as the axis: --grid {key}={}",
                        axis.values.join(", "),
                        value.trim()
                    ),
                });
            }
        }
        self.overrides.extend(overrides.iter().cloned());
        match self.base_config() {
            Ok(_) => Ok(self),
            // An axis may make it valid (a depth axis for a cut, say): each run is checked.
            Err(ConfigError::Invalid { key, .. })
                if self.axes.iter().any(|a| overlaps(key, &a.key)) =>
            {
                Ok(self)
            }
            Err(e) => Err(e),
        }
    }

    /// The base config: the file with the `--set` overrides, before any axis value or seed.
    pub fn base_config(&self) -> Result<ExperimentConfig, ConfigError> {
        ExperimentConfig::from_base(
            self.base.clone(),
            &self.origin.display().to_string(),
            &self.overrides,
        )
    }

    /// The config of one combination: the base, its `--set` overrides, then the combination's
    /// axis values and seed. Errors name the offending key.
    pub fn config_for(&self, combination: &Combination) -> Result<ExperimentConfig, ConfigError> {
        let mut sets = self.overrides.clone();
        sets.extend(combination.overrides());
        ExperimentConfig::from_base(self.base.clone(), &self.origin.display().to_string(), &sets)
    }

    /// The seed the base config starts from.
    pub fn first_seed(&self) -> Result<u64, ConfigError> {
        Ok(self.base_config()?.train.seed)
    }
}

/// Whether two dotted keys name the same setting, or one lies inside the other (`model` and
/// `model.cut`).
fn overlaps(a: &str, b: &str) -> bool {
    let inside = |inner: &str, outer: &str| {
        inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with('.'))
    };
    a == b || inside(a, b) || inside(b, a)
}

/// A TOML value as `--set` text (strings bare, everything else as TOML).
fn value_text(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn axis(s: &str) -> Axis {
        s.parse().unwrap()
    }

    #[test]
    fn expansion_is_the_cartesian_product_times_seeds() {
        let axes = [
            axis("train.mode=coupled,decoupled"),
            axis("model.cut=shallow,middle,deep"),
        ];
        let runs = expand(&axes, 2, 10);
        assert_eq!(runs.len(), 12);
        assert_eq!(runs[0].id(), "train.mode=coupled,model.cut=shallow,seed=10");
        assert_eq!(runs[1].id(), "train.mode=coupled,model.cut=middle,seed=10");
        assert_eq!(runs[5].id(), "train.mode=decoupled,model.cut=deep,seed=10");
        assert_eq!(runs[6].seed, 11);
        let ids: std::collections::HashSet<_> = runs.iter().map(Combination::id).collect();
        assert_eq!(ids.len(), 12, "all distinct");
        assert_eq!(expand(&[], 3, 0).len(), 3);
    }

    #[test]
    fn axis_syntax() {
        assert_eq!(axis("optim.lr=0.1, 0.01").values, vec!["0.1", "0.01"]);
        assert!("nokey".parse::<Axis>().is_err());
        assert!("k=".parse::<Axis>().is_err());
    }

    #[test]
    fn sweep_file_grid_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "[model]\ndepth = 8\n[sweep]\nseeds = 2\n[sweep.grid]\n\"model.cut\" = [0, 1]\n\"train.mode\" = [\"coupled\"]\n",
        )
        .unwrap();
        let sweep = Sweep::load(Some(&path), &[axis("train.mode=decoupled")], None).unwrap();
        assert_eq!(sweep.seeds, 2);
        let runs = expand(&sweep.axes, sweep.seeds, sweep.first_seed().unwrap());
        assert_eq!(runs.len(), 4);
        let config = sweep.config_for(&runs[1]).unwrap();
        assert_eq!(config.model.depth, 8);
        assert_eq!(config.model.cut, crate::model::CutSpec::Blocks(1));
        assert_eq!(config.train.mode, crate::config::Mode::Decoupled);
        std::fs::write(&path, "[sweep]\nrepeats = 2\n").unwrap();
        let err = Sweep::load(Some(&path), &[], None).unwrap_err().to_string();
        assert!(err.contains("repeats"), "{err}");
    }

    fn sets(overrides: &[&str]) -> Vec<String> {
        overrides.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn set_overrides_apply_to_the_base_before_the_grid() {
        let sweep = Sweep::load(None, &[axis("model.cut=0,1")], None)
            .unwrap()
            .with_overrides(&sets(&["model.depth=8", "optim.lr=0.05", "train.seed=3"]))
            .unwrap();
        let base = sweep.base_config().unwrap();
        assert_eq!((base.model.depth, base.optim.lr), (8, 0.05));
        // --set train.seed moves the first seed; each run still gets its own.
        assert_eq!(sweep.first_seed().unwrap(), 3);
        let runs = expand(&sweep.axes, 2, sweep.first_seed().unwrap());
        assert_eq!(runs[3].id(), "model.cut=1,seed=4");
        let config = sweep.config_for(&runs[3]).unwrap();
        assert_eq!(config.model.cut, crate::model::CutSpec::Blocks(1));
        assert_eq!((config.model.depth, config.optim.lr), (8, 0.05));
        assert_eq!(config.train.seed, 4);
        // No overrides: the sweep as loaded.
        let plain = Sweep::load(None, &[], None)
            .unwrap()
            .with_overrides(&[])
            .unwrap();
        assert!(plain.overrides.is_empty());
    }

    #[test]
    fn set_of_a_grid_axis_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "[sweep.grid]\n\"train.mode\" = [\"coupled\", \"decoupled\"]\n",
        )
        .unwrap();
        for (axes, set) in [
            (vec![], "train.mode=coupled"),
            (vec![axis("model.cut=0,1")], "model.cut=1"),
            (vec![axis("model.cut=0,1")], "model={cut = 1}"),
        ] {
            let err = Sweep::load(Some(&path), &axes, None)
                .unwrap()
                .with_overrides(&sets(&[set]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("--set {set}")), "{err}");
            assert!(err.contains("grid axis"), "{err}");
        }
        let err = Sweep::load(Some(&path), &[], None)
            .unwrap()
            .with_overrides(&sets(&["train.mode=coupled"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--grid train.mode=coupled"), "{err}");
    }

    #[test]
    fn set_errors_are_named_unless_a_grid_axis_may_settle_them() {
        let load = |set: &str| {
            Sweep::load(None, &[axis("model.cut=0,1")], None)
                .unwrap()
                .with_overrides(&sets(&[set]))
        };
        let err = load("optim.rate=0.1").unwrap_err().to_string();
        assert!(err.contains("optim.rate"), "{err}");
        let err = load("train.epochs=many").unwrap_err().to_string();
        assert!(err.contains("train.epochs"), "{err}");
        let err = load("noequals").unwrap_err().to_string();
        assert!(err.contains("noequals"), "{err}");
        let err = load("optim.lr=-1").unwrap_err().to_string();
        assert!(err.contains("optim.lr = -1"), "{err}");
        // Cut 12 does not fit the base's ResNet-20 (9 blocks) but fits every depth of the grid.
        let sweep = Sweep::load(None, &[axis("model.depth=56,110")], None)
            .unwrap()
            .with_overrides(&sets(&["model.cut=12"]))
            .unwrap();
        assert!(sweep.base_config().is_err());
        for run in expand(&sweep.axes, 1, 0) {
            assert_eq!(
                sweep.config_for(&run).unwrap().model.cut,
                crate::model::CutSpec::Blocks(12)
            );
        }
    }
}
