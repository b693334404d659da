//! Dividing the training images among the clients of split learning.
//!
//! This module owns the *partition*: which training images each of the N clients holds
//! (config table `[clients]`). A partition is a list of index lists into the training subset, one
//! per client, disjoint, together covering every image, each in file order (ascending). Four
//! rules, from IID to strongly non-IID:
//!
//! - `iid`: a seeded shuffle cut into N parts of (nearly) equal size.
//! - `contiguous`: N consecutive slices in file order.
//! - `dirichlet`: per class, the class's images are split by shares drawn from Dirichlet(α·1_N);
//!   a small `clients.alpha` gives each client few classes, a large one nearly the global mix.
//! - `shards`: the images sorted by label, cut into N × `clients.shards_per_client` shards, each
//!   client getting that many random shards (the "pathological non-IID" split of McMahan et al.).
//!
//! Every call draws from one generator seeded by `clients.seed` alone, so the same labels and
//! [`PartitionSpec`] always give the same partition.

use std::ops::Range;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

use super::batch::epoch_rng;

/// The [`epoch_rng`] stream (of epoch 0) reserved for partitions, far from the training streams.
const PARTITION_STREAM: u64 = 1_000_003;

/// Dirichlet partitions drawn before giving up on `clients.min_images`.
pub const MAX_DIRICHLET_DRAWS: usize = 10_000;

/// Attempts at one Dirichlet vector whose Gamma draws sum to zero (all underflowed, which tiny
/// `clients.alpha` makes likely) or overflow, before giving up.
const MAX_VECTOR_ATTEMPTS: usize = 1_000;

/// How the training subset is divided among the clients (config key `clients.partition`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionRule {
    /// A seeded shuffle cut into parts whose sizes differ by at most one: every client sees
    /// (about) the global class mix.
    #[default]
    Iid,
    /// Consecutive slices in file order, sizes differing by at most one.
    Contiguous,
    /// Per class, shares drawn from Dirichlet(`clients.alpha` · 1): label skew that grows as
    /// alpha shrinks.
    Dirichlet,
    /// Label-sorted shards, `clients.shards_per_client` random ones per client.
    Shards,
}

impl PartitionRule {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            PartitionRule::Iid => "iid",
            PartitionRule::Contiguous => "contiguous",
            PartitionRule::Dirichlet => "dirichlet",
            PartitionRule::Shards => "shards",
        }
    }
}

/// Everything a partition depends on (from the config's `[clients]` table).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PartitionSpec {
    /// `clients.count`: how many clients (at least 1, at most the number of images).
    pub clients: usize,
    /// `clients.partition`.
    pub rule: PartitionRule,
    /// `clients.alpha`: the Dirichlet concentration (used by `dirichlet` only; positive, finite).
    pub alpha: f64,
    /// `clients.min_images`: every client must get at least this many images (every rule).
    pub min_images: usize,
    /// `clients.shards_per_client` (used by `shards` only; at least 1).
    pub shards_per_client: usize,
    /// `clients.seed`.
    pub seed: u64,
}

/// A partition that cannot be made; every message names the config key and value at fault.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PartitionError {
    #[error("clients.count = 0: must be at least 1")]
    NoClients,
    #[error("clients.count = {clients}: more clients than the {images} training images")]
    TooManyClients { clients: usize, images: usize },
    /// Only checked for the `dirichlet` rule.
    #[error("clients.alpha = {alpha}: must be positive and finite")]
    Alpha { alpha: f64 },
    /// `clients.min_images` cannot be met. `shards_per_client` is `None` for the up-front check
    /// (`at_most` = images ÷ clients) and `Some` when a drawn shard partition left a client with
    /// only `at_most` images.
    #[error(
        "clients.min_images = {min_images}: {}",
        min_images_problem(.images, .clients, .at_most, .shards_per_client)
    )]
    MinImages {
        min_images: usize,
        images: usize,
        clients: usize,
        at_most: usize,
        shards_per_client: Option<usize>,
    },
    /// Only checked for the `shards` rule.
    #[error("clients.shards_per_client = 0: must be at least 1")]
    NoShards,
    #[error(
        "clients.shards_per_client = {shards_per_client}: {clients} clients × {shards_per_client} shards need at least {needed} images, have {images}"
    )]
    TooFewImagesForShards {
        shards_per_client: usize,
        clients: usize,
        needed: usize,
        images: usize,
    },
    #[error(
        "clients.partition = dirichlet (clients.alpha = {alpha}): no draw in {draws} gave every client at least clients.min_images = {min_images} images"
    )]
    DirichletExhausted {
        alpha: f64,
        min_images: usize,
        draws: usize,
    },
    #[error(
        "clients.partition = dirichlet (clients.alpha = {alpha}): the Gamma(alpha, 1) draws summed to zero or overflowed {attempts} times in a row; choose a moderate clients.alpha"
    )]
    DirichletDegenerate { alpha: f64, attempts: usize },
    #[error("image {index} has label {label}, outside the {num_classes} classes")]
    LabelOutOfRange {
        index: usize,
        label: u8,
        num_classes: usize,
    },
}

/// The [`PartitionError::MinImages`] message after the key.
fn min_images_problem(
    images: &usize,
    clients: &usize,
    at_most: &usize,
    shards_per_client: &Option<usize>,
) -> String {
    match shards_per_client {
        None => format!("impossible: {images} images ÷ {clients} clients allow at most {at_most}"),
        Some(shards) => format!(
            "not met: {images} images ÷ {clients} clients in {shards} label-sorted shards each \
             (clients.shards_per_client) left a client only {at_most}; another clients.seed may do"
        ),
    }
}

/// Index lists into `labels` (one per client, each ascending = file order), disjoint, covering
/// `0..labels.len()`.
///
/// The spec is validated first (see [`PartitionError`]; `clients.alpha` only for `dirichlet`,
/// `clients.shards_per_client` only for `shards`), and every label must be below `num_classes`.
/// With one client, every rule returns the whole subset. A client can be empty only under
/// `dirichlet` with `clients.min_images = 0`.
pub fn partition(
    labels: &[u8],
    num_classes: usize,
    spec: &PartitionSpec,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    validate(labels, num_classes, spec)?;
    let images = labels.len();
    if spec.clients == 1 {
        return Ok(vec![(0..images).collect()]);
    }
    let mut rng = epoch_rng(spec.seed, 0, PARTITION_STREAM);
    match spec.rule {
        PartitionRule::Iid => Ok(iid(images, spec.clients, &mut rng)),
        PartitionRule::Contiguous => Ok(even_ranges(images, spec.clients)
            .map(|range| range.collect::<Vec<usize>>())
            .collect()),
        PartitionRule::Dirichlet => dirichlet(labels, num_classes, spec, &mut rng),
        PartitionRule::Shards => {
            let parts = shards(labels, spec.clients, spec.shards_per_client, &mut rng);
            let smallest = parts.iter().map(Vec::len).min().unwrap_or(0);
            if smallest < spec.min_images {
                return Err(PartitionError::MinImages {
                    min_images: spec.min_images,
                    images,
                    clients: spec.clients,
                    at_most: smallest,
                    shards_per_client: Some(spec.shards_per_client),
                });
            }
            Ok(parts)
        }
    }
}

/// Per-client, per-class image counts: `result[client][class]`.
///
/// # Panics
/// If an index in `parts` is out of range of `labels`, or a label is not below `num_classes`.
pub fn class_histograms(
    labels: &[u8],
    num_classes: usize,
    parts: &[Vec<usize>],
) -> Vec<Vec<usize>> {
    parts
        .iter()
        .map(|part| {
            let mut counts = vec![0; num_classes];
            for &index in part {
                counts[labels[index] as usize] += 1;
            }
            counts
        })
        .collect()
}

/// Every label is a class index.
fn check_labels(labels: &[u8], num_classes: usize) -> Result<(), PartitionError> {
    if let Some((index, &label)) = labels
        .iter()
        .enumerate()
        .find(|&(_, &label)| label as usize >= num_classes)
    {
        return Err(PartitionError::LabelOutOfRange {
            index,
            label,
            num_classes,
        });
    }
    Ok(())
}

/// Checks `spec` against the data, in the order the config keys are usually read.
fn validate(labels: &[u8], num_classes: usize, spec: &PartitionSpec) -> Result<(), PartitionError> {
    let images = labels.len();
    let clients = spec.clients;
    if clients == 0 {
        return Err(PartitionError::NoClients);
    }
    if clients > images {
        return Err(PartitionError::TooManyClients { clients, images });
    }
    if spec.rule == PartitionRule::Dirichlet && !(spec.alpha > 0.0 && spec.alpha.is_finite()) {
        return Err(PartitionError::Alpha { alpha: spec.alpha });
    }
    // One client holds the whole subset, whatever the rule: nothing below can fail.
    if clients == 1 {
        return check_labels(labels, num_classes);
    }
    // Every rule but dirichlet gives each client at least `images / clients` images (shards:
    // checked again after the draw), so this is the whole up-front check.
    let at_most = images / clients;
    if spec.min_images > at_most {
        return Err(PartitionError::MinImages {
            min_images: spec.min_images,
            images,
            clients,
            at_most,
            shards_per_client: None,
        });
    }
    if spec.rule == PartitionRule::Shards {
        let shards_per_client = spec.shards_per_client;
        if shards_per_client == 0 {
            return Err(PartitionError::NoShards);
        }
        let needed = clients.saturating_mul(shards_per_client);
        if needed > images {
            return Err(PartitionError::TooFewImagesForShards {
                shards_per_client,
                clients,
                needed,
                images,
            });
        }
    }
    check_labels(labels, num_classes)
}

/// `parts` consecutive ranges covering `0..len` whose sizes differ by at most one (the first
/// `len % parts` are one longer). `parts` must be positive.
fn even_ranges(len: usize, parts: usize) -> impl Iterator<Item = Range<usize>> {
    let base = len / parts;
    let extra = len % parts;
    (0..parts).scan(0, move |start, part| {
        let size = base + usize::from(part < extra);
        let range = *start..*start + size;
        *start += size;
        Some(range)
    })
}

/// `indices` in ascending (file) order.
fn ascending(mut indices: Vec<usize>) -> Vec<usize> {
    indices.sort_unstable();
    indices
}

/// A seeded shuffle of `0..images` cut by [`even_ranges`].
fn iid(images: usize, clients: usize, rng: &mut StdRng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..images).collect();
    order.shuffle(rng);
    even_ranges(images, clients)
        .map(|range| ascending(order[range].to_vec()))
        .collect()
}

/// The indices of each class, ascending. Labels must be below `num_classes`.
fn indices_by_class(labels: &[u8], num_classes: usize) -> Vec<Vec<usize>> {
    let mut by_class = vec![Vec::new(); num_classes];
    for (index, &label) in labels.iter().enumerate() {
        by_class[label as usize].push(index);
    }
    by_class
}

/// Per class (in class order): shares `p ~ Dir(α·1_N)`, the class's indices shuffled and cut at
/// `⌊cumsum(p) · n_class⌋`. The whole partition is redrawn (the generator continuing) until every
/// client has `spec.min_images` images, at most [`MAX_DIRICHLET_DRAWS`] times.
fn dirichlet(
    labels: &[u8],
    num_classes: usize,
    spec: &PartitionSpec,
    rng: &mut StdRng,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    let alpha = spec.alpha;
    let gamma = Gamma::new(alpha, 1.0).map_err(|_| PartitionError::Alpha { alpha })?;
    let by_class = indices_by_class(labels, num_classes);
    let mut shares = vec![0.0_f64; spec.clients];
    for _ in 0..MAX_DIRICHLET_DRAWS {
        let mut parts: Vec<Vec<usize>> = vec![Vec::new(); spec.clients];
        for class_indices in &by_class {
            if !draw_dirichlet(&gamma, rng, &mut shares) {
                return Err(PartitionError::DirichletDegenerate {
                    alpha,
                    attempts: MAX_VECTOR_ATTEMPTS,
                });
            }
            let mut shuffled = class_indices.clone();
            shuffled.shuffle(rng);
            let len = shuffled.len();
            let mut start = 0;
            let mut cumulative = 0.0;
            for (client, (part, &share)) in parts.iter_mut().zip(&shares).enumerate() {
                cumulative += share;
                let end = if client + 1 == spec.clients {
                    len
                } else {
                    // `as` saturates; the clamp absorbs rounding past the class size.
                    ((cumulative * len as f64).floor() as usize).clamp(start, len)
                };
                part.extend_from_slice(&shuffled[start..end]);
                start = end;
            }
        }
        if parts.iter().all(|part| part.len() >= spec.min_images) {
            return Ok(parts.into_iter().map(ascending).collect());
        }
    }
    Err(PartitionError::DirichletExhausted {
        alpha,
        min_images: spec.min_images,
        draws: MAX_DIRICHLET_DRAWS,
    })
}

/// Fills `shares` with one draw of Dirichlet(α·1): independent Gamma(α, 1) draws divided by
/// their sum. A sum of zero (or an overflowed one) is redrawn; false after
/// [`MAX_VECTOR_ATTEMPTS`] such sums in a row.
fn draw_dirichlet(gamma: &Gamma<f64>, rng: &mut StdRng, shares: &mut [f64]) -> bool {
    for _ in 0..MAX_VECTOR_ATTEMPTS {
        for share in shares.iter_mut() {
            *share = gamma.sample(rng);
        }
        let sum: f64 = shares.iter().sum();
        if sum > 0.0 && sum.is_finite() {
            for share in shares.iter_mut() {
                *share /= sum;
            }
            return true;
        }
    }
    false
}

/// The indices sorted by label (stably: file order within a class), cut by [`even_ranges`] into
/// `clients × per_client` shards; client `i` gets shards `[i·per_client, (i+1)·per_client)` of a
/// seeded shuffle of the shard ids. The product must not exceed the number of labels.
fn shards(labels: &[u8], clients: usize, per_client: usize, rng: &mut StdRng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..labels.len()).collect();
    order.sort_by_key(|&index| labels[index]);
    let bounds: Vec<Range<usize>> = even_ranges(order.len(), clients * per_client).collect();
    let mut ids: Vec<usize> = (0..bounds.len()).collect();
    ids.shuffle(rng);
    ids.chunks_exact(per_client)
        .map(|chunk| {
            let part = chunk
                .iter()
                .flat_map(|&id| order[bounds[id].clone()].iter().copied())
                .collect();
            ascending(part)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: [PartitionRule; 4] = [
        PartitionRule::Iid,
        PartitionRule::Contiguous,
        PartitionRule::Dirichlet,
        PartitionRule::Shards,
    ];

    /// `images` labels of 10 classes, interleaved: image `i` has label `i % 10`.
    fn interleaved(images: usize) -> Vec<u8> {
        (0..images).map(|i| (i % 10) as u8).collect()
    }

    fn spec(rule: PartitionRule, clients: usize) -> PartitionSpec {
        PartitionSpec {
            clients,
            rule,
            alpha: 0.5,
            min_images: 0,
            shards_per_client: 3,
            seed: 7,
        }
    }

    /// Disjoint, covering `0..images`, each part ascending.
    fn assert_valid(parts: &[Vec<usize>], images: usize) {
        let mut seen = vec![false; images];
        for part in parts {
            assert!(part.windows(2).all(|w| w[0] < w[1]), "part not ascending");
            for &index in part {
                assert!(index < images, "index {index} out of range");
                assert!(!seen[index], "index {index} in two parts");
                seen[index] = true;
            }
        }
        assert!(seen.iter().all(|&s| s), "some image in no part");
    }

    /// Sizes of [`even_ranges`], written out independently.
    fn even_sizes(images: usize, parts: usize) -> Vec<usize> {
        (0..parts)
            .map(|i| images / parts + usize::from(i < images % parts))
            .collect()
    }

    #[test]
    fn names_match_serde() {
        for rule in RULES {
            let json = serde_json::to_string(&rule).unwrap();
            assert_eq!(json, format!("\"{}\"", rule.name()));
            assert_eq!(serde_json::from_str::<PartitionRule>(&json).unwrap(), rule);
        }
        assert_eq!(PartitionRule::default(), PartitionRule::Iid);
    }

    #[test]
    fn every_rule_is_a_partition_in_file_order() {
        let labels = interleaved(1003);
        for rule in RULES {
            let parts = partition(&labels, 10, &spec(rule, 7)).unwrap();
            assert_eq!(parts.len(), 7, "{rule:?}");
            assert_valid(&parts, labels.len());
        }
    }

    #[test]
    fn iid_and_contiguous_sizes_differ_by_at_most_one() {
        let labels = interleaved(1003);
        let expected = even_sizes(1003, 7);
        assert_eq!(
            expected.iter().max().unwrap() - expected.iter().min().unwrap(),
            1
        );
        for rule in [PartitionRule::Iid, PartitionRule::Contiguous] {
            let parts = partition(&labels, 10, &spec(rule, 7)).unwrap();
            let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
            assert_eq!(sizes, expected, "{rule:?}");
        }
    }

    #[test]
    fn contiguous_parts_are_consecutive_ranges() {
        let labels = interleaved(1003);
        let parts = partition(&labels, 10, &spec(PartitionRule::Contiguous, 7)).unwrap();
        let mut start = 0;
        for (part, size) in parts.iter().zip(even_sizes(1003, 7)) {
            assert_eq!(*part, (start..start + size).collect::<Vec<_>>());
            start += size;
        }
    }

    #[test]
    fn iid_mixes_the_file_order() {
        let labels = interleaved(1003);
        let parts = partition(&labels, 10, &spec(PartitionRule::Iid, 7)).unwrap();
        let contiguous = partition(&labels, 10, &spec(PartitionRule::Contiguous, 7)).unwrap();
        assert_ne!(parts, contiguous);
    }

    #[test]
    fn shards_give_each_client_whole_shards() {
        let (images, clients, per_client) = (1003, 7, 3);
        let labels: Vec<u8> = (0..images).map(|i| ((i * 7 + i / 13) % 10) as u8).collect();
        let parts = partition(&labels, 10, &spec(PartitionRule::Shards, clients)).unwrap();
        assert_valid(&parts, images);

        // Shard of each image: label-sorted order (stable), cut into 21 shards of 48 or 47.
        let mut order: Vec<usize> = (0..images).collect();
        order.sort_by_key(|&i| labels[i]);
        let shard_sizes = even_sizes(images, clients * per_client);
        let mut shard_of = vec![0; images];
        let mut start = 0;
        for (shard, &size) in shard_sizes.iter().enumerate() {
            for &index in &order[start..start + size] {
                shard_of[index] = shard;
            }
            start += size;
        }
        for part in &parts {
            let mut ids: Vec<usize> = part.iter().map(|&i| shard_of[i]).collect();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), per_client);
            let whole: usize = ids.iter().map(|&id| shard_sizes[id]).sum();
            assert_eq!(part.len(), whole, "a client holds part of a shard");
            assert!((3 * 47..=3 * 48).contains(&part.len()));
        }
    }

    #[test]
    fn one_class_shards_give_two_classes_per_client() {
        // 100 images per class, 10 shards of 100: each shard is one whole class.
        let labels = interleaved(1000);
        let spec = PartitionSpec {
            shards_per_client: 2,
            ..spec(PartitionRule::Shards, 5)
        };
        let parts = partition(&labels, 10, &spec).unwrap();
        let histograms = class_histograms(&labels, 10, &parts);
        for (part, histogram) in parts.iter().zip(&histograms) {
            assert_eq!(part.len(), 200);
            let mut nonzero: Vec<usize> = histogram.iter().copied().filter(|&c| c > 0).collect();
            nonzero.sort_unstable();
            assert_eq!(nonzero, vec![100, 100]);
        }
    }

    #[test]
    fn same_seed_same_partition_other_seed_other_partition() {
        let labels = interleaved(1003);
        for rule in [
            PartitionRule::Iid,
            PartitionRule::Dirichlet,
            PartitionRule::Shards,
        ] {
            let a = spec(rule, 7);
            let b = PartitionSpec { seed: 8, ..a };
            let first = partition(&labels, 10, &a).unwrap();
            assert_eq!(first, partition(&labels, 10, &a).unwrap(), "{rule:?}");
            assert_ne!(first, partition(&labels, 10, &b).unwrap(), "{rule:?}");
        }
    }

    #[test]
    fn one_client_gets_everything_in_file_order() {
        let labels = interleaved(57);
        for rule in RULES {
            let parts = partition(&labels, 10, &spec(rule, 1)).unwrap();
            assert_eq!(parts, vec![(0..57).collect::<Vec<_>>()], "{rule:?}");
        }
    }

    /// Mean over clients of the largest class share, and of the total variation distance of the
    /// client's class mix from uniform.
    fn skew(labels: &[u8], parts: &[Vec<usize>]) -> (f64, f64) {
        let histograms = class_histograms(labels, 10, parts);
        let (mut max_share, mut distance) = (0.0, 0.0);
        for histogram in &histograms {
            let total: usize = histogram.iter().sum();
            assert!(total > 0);
            let shares: Vec<f64> = histogram.iter().map(|&c| c as f64 / total as f64).collect();
            max_share += shares.iter().copied().fold(0.0, f64::max);
            distance += 0.5 * shares.iter().map(|&s| (s - 0.1).abs()).sum::<f64>();
        }
        let clients = histograms.len() as f64;
        (max_share / clients, distance / clients)
    }

    #[test]
    fn small_alpha_skews_large_alpha_is_uniform() {
        let labels = interleaved(5000);
        let run = |alpha: f64, seeds: u64| {
            let (mut max_share, mut distance) = (0.0, 0.0);
            for seed in 0..seeds {
                let spec = PartitionSpec {
                    alpha,
                    min_images: 50,
                    seed,
                    ..spec(PartitionRule::Dirichlet, 5)
                };
                let parts = partition(&labels, 10, &spec).unwrap();
                assert_valid(&parts, labels.len());
                assert!(parts.iter().all(|p| p.len() >= 50));
                let (m, d) = skew(&labels, &parts);
                max_share += m;
                distance += d;
            }
            (max_share / seeds as f64, distance / seeds as f64)
        };
        // Averaged over seeds: one seed's mean largest share at alpha 0.05 is about 0.55 ± 0.06.
        let (skewed_max, skewed_distance) = run(0.05, 32);
        let (uniform_max, uniform_distance) = run(1000.0, 4);
        assert!(
            skewed_max > 0.5,
            "alpha 0.05: mean largest share {skewed_max}"
        );
        assert!(
            skewed_distance > 0.4,
            "alpha 0.05: mean distance {skewed_distance}"
        );
        assert!(
            uniform_max < 0.13,
            "alpha 1000: mean largest share {uniform_max}"
        );
        assert!(
            uniform_distance < 0.05,
            "alpha 1000: mean distance {uniform_distance}"
        );
        assert!(skewed_max > 3.0 * uniform_max);

        let spec = PartitionSpec {
            alpha: 1000.0,
            ..spec(PartitionRule::Dirichlet, 5)
        };
        let parts = partition(&labels, 10, &spec).unwrap();
        for histogram in class_histograms(&labels, 10, &parts) {
            let total: usize = histogram.iter().sum();
            for count in histogram {
                let share = count as f64 / total as f64;
                assert!(
                    (share - 0.1).abs() < 0.03,
                    "alpha 1000: class share {share}"
                );
            }
        }
    }

    #[test]
    fn dirichlet_respects_min_images() {
        // A single draw at alpha 0.3 rarely gives all five clients 150 of the 1000 images.
        let labels = interleaved(1000);
        for seed in 0..5 {
            let spec = PartitionSpec {
                alpha: 0.3,
                min_images: 150,
                seed,
                ..spec(PartitionRule::Dirichlet, 5)
            };
            let parts = partition(&labels, 10, &spec).unwrap();
            assert_valid(&parts, labels.len());
            for part in &parts {
                assert!(part.len() >= 150, "client with {} images", part.len());
            }
        }
    }

    #[test]
    fn impossible_dirichlet_gives_up() {
        // Alpha 0.001 hands each class of 20 to one client; 4 clients × 50 of 200 never happens.
        let labels = interleaved(200);
        let spec = PartitionSpec {
            alpha: 0.001,
            min_images: 50,
            ..spec(PartitionRule::Dirichlet, 4)
        };
        let err = partition(&labels, 10, &spec).unwrap_err();
        assert_eq!(
            err,
            PartitionError::DirichletExhausted {
                alpha: 0.001,
                min_images: 50,
                draws: MAX_DIRICHLET_DRAWS,
            }
        );
        assert_eq!(
            err.to_string(),
            "clients.partition = dirichlet (clients.alpha = 0.001): no draw in 10000 gave every client at least clients.min_images = 50 images"
        );
    }

    /// The message of the error `spec` must give on `labels` (10 classes).
    fn message(spec: PartitionSpec, labels: &[u8]) -> String {
        partition(labels, 10, &spec).unwrap_err().to_string()
    }

    #[test]
    fn bad_specs_name_their_key() {
        let labels = interleaved(10);

        let m = message(spec(PartitionRule::Iid, 0), &labels);
        assert_eq!(m, "clients.count = 0: must be at least 1");
        let m = message(spec(PartitionRule::Iid, 12), &labels);
        assert_eq!(
            m,
            "clients.count = 12: more clients than the 10 training images"
        );
        assert!(message(spec(PartitionRule::Iid, 1), &[]).contains("clients.count = 1"));

        for alpha in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let spec = PartitionSpec {
                alpha,
                ..spec(PartitionRule::Dirichlet, 2)
            };
            let m = message(spec, &labels);
            assert!(
                m.contains("clients.alpha") && m.contains("must be positive"),
                "{m}"
            );
        }
        let m = message(
            PartitionSpec {
                alpha: 0.0,
                ..spec(PartitionRule::Dirichlet, 2)
            },
            &labels,
        );
        assert_eq!(m, "clients.alpha = 0: must be positive and finite");
        // Alpha is not read by the other rules.
        let iid = PartitionSpec {
            alpha: 0.0,
            ..spec(PartitionRule::Iid, 2)
        };
        assert!(partition(&labels, 10, &iid).is_ok());

        let big = interleaved(5000);
        for rule in RULES {
            let spec = PartitionSpec {
                min_images: 600,
                shards_per_client: 1,
                ..spec(rule, 10)
            };
            assert_eq!(
                message(spec, &big),
                "clients.min_images = 600: impossible: 5000 images ÷ 10 clients allow at most 500",
                "{rule:?}"
            );
            // Exactly images ÷ clients is allowed (dirichlet would need a perfectly even draw).
            if rule != PartitionRule::Dirichlet {
                let spec = PartitionSpec {
                    min_images: 500,
                    ..spec
                };
                assert!(partition(&big, 10, &spec).is_ok(), "{rule:?}");
            }
        }

        let shards = PartitionSpec {
            shards_per_client: 0,
            ..spec(PartitionRule::Shards, 2)
        };
        assert_eq!(
            message(shards, &labels),
            "clients.shards_per_client = 0: must be at least 1"
        );
        let shards = PartitionSpec {
            shards_per_client: 3,
            ..spec(PartitionRule::Shards, 4)
        };
        assert_eq!(
            message(shards, &labels),
            "clients.shards_per_client = 3: 4 clients × 3 shards need at least 12 images, have 10"
        );
        let shards = PartitionSpec {
            shards_per_client: usize::MAX,
            ..spec(PartitionRule::Shards, 4)
        };
        assert!(message(shards, &labels).contains("clients.shards_per_client"));

        let err = partition(&[0, 5], 3, &spec(PartitionRule::Iid, 1)).unwrap_err();
        assert_eq!(
            err,
            PartitionError::LabelOutOfRange {
                index: 1,
                label: 5,
                num_classes: 3,
            }
        );
    }

    #[test]
    fn shards_check_min_images_after_the_draw() {
        // 150 images in 100 shards: 50 of 2 images, 50 of 1. Each of 10 clients reaches 15 only
        // if the big shards fall exactly 5 per client, which a shuffle practically never does.
        let labels = interleaved(150);
        let spec = PartitionSpec {
            min_images: 15,
            shards_per_client: 10,
            ..spec(PartitionRule::Shards, 10)
        };
        let err = partition(&labels, 10, &spec).unwrap_err();
        match &err {
            PartitionError::MinImages {
                at_most,
                shards_per_client: Some(10),
                ..
            } => assert!(*at_most < 15),
            other => panic!("unexpected error {other:?}"),
        }
        assert!(
            err.to_string()
                .starts_with("clients.min_images = 15: not met")
        );
    }

    #[test]
    fn histograms_sum_to_class_counts() {
        let labels: Vec<u8> = (0..1000usize)
            .map(|i| ((i * 5 + i / 11) % 7) as u8)
            .collect();
        let mut class_counts = vec![0usize; 7];
        for &label in &labels {
            class_counts[label as usize] += 1;
        }
        for rule in RULES {
            let parts = partition(&labels, 7, &spec(rule, 6)).unwrap();
            let histograms = class_histograms(&labels, 7, &parts);
            assert_eq!(histograms.len(), 6);
            for (part, histogram) in parts.iter().zip(&histograms) {
                assert_eq!(histogram.iter().sum::<usize>(), part.len());
            }
            let totals: Vec<usize> = (0..7)
                .map(|class| histograms.iter().map(|h| h[class]).sum())
                .collect();
            assert_eq!(totals, class_counts, "{rule:?}");
        }
    }
}
