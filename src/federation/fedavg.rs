//! Federated averaging: the weighted mean of models of one architecture, given as flat value
//! vectors (parameters and BatchNorm running statistics, see `party::state`).

/// The mean of `models` weighted by `weights` (shard sizes), value by value.
///
/// Accumulated in f64 with integer weights (shard sizes): for identical models every product
/// and sum is exact, so averaging them returns them unchanged; otherwise the mean is rounded
/// once, to f32, from an f64 accumulation.
///
/// # Panics
/// If `models` is empty, the lengths differ, or the weights sum to zero: callers pass one model
/// per client, each of the same architecture, and clients hold at least one image.
pub fn fedavg(models: &[&[f32]], weights: &[u64]) -> Vec<f32> {
    assert!(!models.is_empty(), "FedAvg of no models");
    assert_eq!(models.len(), weights.len(), "one weight per model");
    let total: u64 = weights.iter().sum();
    assert!(total > 0, "FedAvg weights sum to zero");
    let len = models[0].len();
    let mut sum = vec![0f64; len];
    for (model, &w) in models.iter().zip(weights) {
        assert_eq!(model.len(), len, "models of one architecture");
        for (s, &v) in sum.iter_mut().zip(model.iter()) {
            *s += w as f64 * v as f64;
        }
    }
    sum.into_iter().map(|s| (s / total as f64) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_models_are_returned_unchanged() {
        let model: Vec<f32> = (0..1000)
            .map(|i| (i as f32).sin() * 1e3 + 1e-7 * i as f32)
            .collect();
        let averaged = fedavg(&[&model, &model, &model], &[4999, 1, 37]);
        assert_eq!(averaged, model);
    }

    #[test]
    fn two_models_give_the_weighted_mean() {
        let a = [1.0f32, -2.0, 10.0];
        let b = [3.0f32, 2.0, 0.0];
        assert_eq!(fedavg(&[&a, &b], &[1, 3]), vec![2.5, 1.0, 2.5]);
        assert_eq!(fedavg(&[&a, &b], &[1, 1]), vec![2.0, 0.0, 5.0]);
    }
}
