//! Sweep definitions: a base config, grid axes over any config key, and a number of seeds.
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
        })
    }

    /// The config of one combination; errors name the offending key.
    pub fn config_for(&self, combination: &Combination) -> Result<ExperimentConfig, ConfigError> {
        ExperimentConfig::from_base(
            self.base.clone(),
            &self.origin.display().to_string(),
            &combination.overrides(),
        )
    }

    /// The seed the base config starts from.
    pub fn first_seed(&self) -> Result<u64, ConfigError> {
        Ok(
            ExperimentConfig::from_base(
                self.base.clone(),
                &self.origin.display().to_string(),
                &[],
            )?
            .train
            .seed,
        )
    }
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
}
