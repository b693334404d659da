//! Test-set evaluation of the split model (and of the auxiliary head alone).

use burn::tensor::{Device, Int, Tensor};

use crate::data::batch::epoch_rng;
use crate::data::{Batcher, Split};
use crate::model::{ClientModel, ServerNet, correct};

/// Test accuracy of the split model, and of the auxiliary head when asked. Models in inference
/// mode (BatchNorm running statistics).
pub fn evaluate(
    client: &ClientModel,
    server: &ServerNet,
    test: &Split,
    batcher: &Batcher,
    batch_size: usize,
    device: &Device,
    with_aux: bool,
) -> (f64, Option<f64>) {
    let (mut right, mut aux_right) = (0usize, 0usize);
    for (images, labels) in test_batches(test, batcher, batch_size, device) {
        let h = client.net.forward(images);
        if with_aux {
            aux_right += correct(client.aux.forward(h.clone()), labels.clone());
        }
        right += correct(server.forward(h), labels);
    }
    let n = test.len().max(1) as f64;
    (right as f64 / n, with_aux.then_some(aux_right as f64 / n))
}

/// The test set in evaluation batches of `batch_size` (the last may be smaller), in file order.
///
/// # Shapes
/// - images: `[≤ batch_size, 3, 32, 32]`; labels: `[≤ batch_size]`
pub fn test_batches<'a>(
    test: &'a Split,
    batcher: &'a Batcher,
    batch_size: usize,
    device: &'a Device,
) -> impl Iterator<Item = (Tensor<4>, Tensor<1, Int>)> + 'a {
    let mut unused_rng = epoch_rng(0, 0, 0);
    let step = batch_size.max(1);
    (0..test.len()).step_by(step).map(move |start| {
        let chunk: Vec<usize> = (start..(start + step).min(test.len())).collect();
        batcher
            .batch(test, &chunk, &mut unused_rng)
            .to_tensors(device)
    })
}

/// Evaluation batches of a test set of `images` images.
pub fn test_batch_count(images: usize, batch_size: usize) -> usize {
    images.div_ceil(batch_size.max(1))
}
