//! Shards of a sweep: `--shard K/N` takes every N-th run of the sweep's canonical order (the
//! order of [`expand`](super::grid::expand), each combination × seed one run), starting at the
//! K-th, so N machines or a Slurm job array share one grid with no run done twice.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// Shard K of N (1-based K): the runs whose 0-based index `i` in the canonical order has
/// `i % N == K − 1`. The N shards of a grid are disjoint, together hold every run, and none is
/// empty when the grid has at least N runs. `1/1` (the default) is the whole grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Shard {
    /// K, 1-based.
    index: usize,
    /// N.
    count: usize,
}

/// A `--shard` value that is not K/N with 1 ≤ K ≤ N.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("shard `{0}`: expected K/N, shard K of N counting from 1 (e.g. 2/4)")]
    Syntax(String),
    #[error("shard `{0}`: N, the number of shards, must be at least 1")]
    NoShards(String),
    #[error("shard `{value}`: K must be between 1 and N = {count}")]
    OutOfRange { value: String, count: usize },
}

impl Shard {
    /// The whole grid: shard 1 of 1.
    pub const WHOLE: Shard = Shard { index: 1, count: 1 };

    /// Shard `index` (K, from 1) of `count` (N).
    pub fn new(index: usize, count: usize) -> Result<Self, ShardError> {
        Self::checked(index, count, &format!("{index}/{count}"))
    }

    fn checked(index: usize, count: usize, value: &str) -> Result<Self, ShardError> {
        if count == 0 {
            return Err(ShardError::NoShards(value.to_string()));
        }
        if !(1..=count).contains(&index) {
            return Err(ShardError::OutOfRange {
                value: value.to_string(),
                count,
            });
        }
        Ok(Self { index, count })
    }

    /// K (1-based).
    pub fn index(&self) -> usize {
        self.index
    }

    /// N.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether this is the whole grid (N = 1).
    pub fn is_whole(&self) -> bool {
        self.count == 1
    }

    /// Whether the run at 0-based position `i` of the canonical order belongs to this shard.
    pub fn contains(&self, i: usize) -> bool {
        i % self.count == self.index - 1
    }

    /// This shard's items of `items` (in the canonical order), in order.
    pub fn select<'a, T>(&self, items: &'a [T]) -> Vec<&'a T> {
        items
            .iter()
            .skip(self.index - 1)
            .step_by(self.count)
            .collect()
    }
}

impl Default for Shard {
    fn default() -> Self {
        Self::WHOLE
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = ShardError;

    /// `K/N`, e.g. `2/4` (what `--shard $SLURM_ARRAY_TASK_ID/4` gives).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || ShardError::Syntax(s.to_string());
        let (k, n) = s.split_once('/').ok_or_else(syntax)?;
        let k: usize = k.trim().parse().map_err(|_| syntax())?;
        let n: usize = n.trim().parse().map_err(|_| syntax())?;
        Self::checked(k, n, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::grid::{Axis, Combination, expand};

    fn shard(s: &str) -> Shard {
        s.parse().unwrap()
    }

    #[test]
    fn parses_k_of_n() {
        assert_eq!(shard("2/4"), Shard::new(2, 4).unwrap());
        assert_eq!((shard("2/4").index(), shard("2/4").count()), (2, 4));
        assert_eq!(shard("1/1"), Shard::WHOLE);
        assert_eq!(shard(" 3 / 3 "), Shard::new(3, 3).unwrap());
        assert_eq!(shard("4/4").to_string(), "4/4");
        assert_eq!(Shard::default(), Shard::WHOLE);
        assert!(Shard::WHOLE.is_whole() && !shard("1/2").is_whole());
    }

    #[test]
    fn bad_values_are_named() {
        for (bad, says) in [
            ("0/3", "between 1 and N = 3"),
            ("4/3", "between 1 and N = 3"),
            ("1/0", "at least 1"),
            ("0/0", "at least 1"),
            ("x", "expected K/N"),
            ("2", "expected K/N"),
            ("-1/3", "expected K/N"),
            ("1/3/5", "expected K/N"),
            ("a/b", "expected K/N"),
            ("", "expected K/N"),
        ] {
            let err = bad.parse::<Shard>().unwrap_err().to_string();
            assert!(err.contains(&format!("`{bad}`")), "{bad}: {err}");
            assert!(err.contains(says), "{bad}: {err}");
        }
        assert!(Shard::new(0, 2).is_err());
        assert!(Shard::new(3, 2).is_err());
        assert!(Shard::new(1, 0).is_err());
    }

    #[test]
    fn shards_are_disjoint_cover_the_grid_and_none_is_empty() {
        for runs in 0..=23usize {
            let items: Vec<usize> = (0..runs).collect();
            for n in 1..=8 {
                let mut seen = vec![0usize; runs];
                for k in 1..=n {
                    let shard = Shard::new(k, n).unwrap();
                    let picked = shard.select(&items);
                    if runs >= n {
                        assert!(!picked.is_empty(), "{runs} runs, shard {shard} is empty");
                    }
                    // Sizes differ by at most one.
                    assert!(picked.len() == runs / n || picked.len() == runs / n + 1);
                    for &&i in &picked {
                        assert!(shard.contains(i));
                        assert_eq!(i % n, k - 1);
                        seen[i] += 1;
                    }
                    // In the canonical order.
                    assert!(picked.windows(2).all(|w| w[0] < w[1]));
                }
                assert!(
                    seen.iter().all(|&times| times == 1),
                    "{runs} runs in {n} shards: {seen:?}"
                );
            }
        }
    }

    #[test]
    fn shards_of_a_sweep_grid() {
        let axes: Vec<Axis> = [
            "train.mode=coupled,decoupled",
            "model.cut=shallow,middle,deep",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let grid = expand(&axes, 2, 0);
        assert_eq!(grid.len(), 12);
        let ids = |s: &str| -> Vec<String> {
            shard(s)
                .select(&grid)
                .into_iter()
                .map(Combination::id)
                .collect()
        };
        assert_eq!(ids("1/1").len(), 12);
        // Index i goes to shard i % 5 + 1: shard 1 takes runs 0, 5 and 10, shard 5 runs 4 and 9.
        assert_eq!(
            ids("1/5"),
            vec![
                "train.mode=coupled,model.cut=shallow,seed=0",
                "train.mode=decoupled,model.cut=deep,seed=0",
                "train.mode=decoupled,model.cut=middle,seed=1",
            ]
        );
        assert_eq!(
            ids("5/5"),
            vec![
                "train.mode=decoupled,model.cut=middle,seed=0",
                "train.mode=decoupled,model.cut=shallow,seed=1",
            ]
        );
        let mut all: Vec<String> = (1..=5).flat_map(|k| ids(&format!("{k}/5"))).collect();
        all.sort();
        let mut expected: Vec<String> = grid.iter().map(Combination::id).collect();
        expected.sort();
        assert_eq!(all, expected);
    }
}
