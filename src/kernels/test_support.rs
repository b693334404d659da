//! Test data and comparisons shared by the kernels' tests and the model's.

use burn::tensor::Tensor;

/// `len` deterministic values in `[-1, 1)`, different for each `salt`.
pub fn values(len: usize, salt: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i * 7919 + salt * 104_729) % 1000) as f32 / 500.0) - 1.0)
        .collect()
}

/// Asserts equal shapes and, element by element, `|a − b| / (1 + |b|) < tolerance`.
pub fn assert_close<const D: usize>(
    fused: Tensor<D>,
    reference: Tensor<D>,
    tolerance: f32,
    what: &str,
) {
    assert_eq!(fused.dims(), reference.dims(), "{what}: shape");
    let (a, b) = (fused.into_data(), reference.into_data());
    let (a, b) = (a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0f32, f32::max);
    assert!(worst < tolerance, "{what}: relative difference {worst}");
}
