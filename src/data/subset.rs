//! Taking part of a split for quick experiments.

use serde::{Deserialize, Serialize};

use super::cifar::Split;

/// How a limited number of images is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubsetRule {
    /// The first N images in file order.
    #[default]
    First,
    /// N images with (as nearly as possible) equally many per class: the first of each class in
    /// file order.
    Balanced,
}

/// At most `limit` images of `split` (0 = all), chosen by `rule`.
pub fn take(split: &Split, limit: usize, rule: SubsetRule, num_classes: usize) -> Split {
    if limit == 0 || limit >= split.len() {
        return split.clone();
    }
    let indices: Vec<usize> = match rule {
        SubsetRule::First => (0..limit).collect(),
        SubsetRule::Balanced => balanced_indices(&split.labels, limit, num_classes),
    };
    split.select(&indices)
}

/// `limit` indices, `limit / classes` of each class (the first classes get one more for the
/// remainder), each class's in file order; the result is in file order.
fn balanced_indices(labels: &[u8], limit: usize, num_classes: usize) -> Vec<usize> {
    let base = limit / num_classes;
    let extra = limit % num_classes;
    let mut quota: Vec<usize> = (0..num_classes)
        .map(|class| base + usize::from(class < extra))
        .collect();
    let mut picked = Vec::with_capacity(limit);
    for (index, &label) in labels.iter().enumerate() {
        if quota[label as usize] > 0 {
            quota[label as usize] -= 1;
            picked.push(index);
            if picked.len() == limit {
                break;
            }
        }
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::cifar::IMAGE_BYTES;

    fn split(labels: &[u8]) -> Split {
        Split {
            images: vec![0; labels.len() * IMAGE_BYTES],
            labels: labels.to_vec(),
        }
    }

    #[test]
    fn first_takes_prefix() {
        let s = take(&split(&[0, 0, 0, 1, 1]), 3, SubsetRule::First, 2);
        assert_eq!(s.labels, vec![0, 0, 0]);
    }

    #[test]
    fn balanced_takes_equal_share() {
        let s = take(&split(&[0, 0, 0, 1, 1, 2]), 4, SubsetRule::Balanced, 3);
        assert_eq!(s.class_counts(3), vec![2, 1, 1]);
        let s = take(&split(&[0, 0, 0, 1, 1, 2]), 3, SubsetRule::Balanced, 3);
        assert_eq!(s.class_counts(3), vec![1, 1, 1]);
    }

    #[test]
    fn zero_means_all() {
        assert_eq!(take(&split(&[0, 1]), 0, SubsetRule::First, 2).len(), 2);
    }
}
