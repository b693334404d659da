//! Test-set evaluation of the split model (and of the auxiliary head alone).

use burn::tensor::Device;

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
    let mut unused_rng = epoch_rng(0, 0, 0);
    let indices: Vec<usize> = (0..test.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let (images, labels) = batcher
            .batch(test, chunk, &mut unused_rng)
            .to_tensors(device);
        let h = client.net.forward(images);
        if with_aux {
            aux_right += correct(client.aux.forward(h.clone()), labels.clone());
        }
        right += correct(server.forward(h), labels);
    }
    let n = test.len().max(1) as f64;
    (right as f64 / n, with_aux.then_some(aux_right as f64 / n))
}
