//! The CIFAR ResNet, its split into client and server partitions, and the auxiliary heads.

pub mod aux_head;
pub mod resnet;
pub mod split;

pub use aux_head::{AUX_HIDDEN, AUX_LAYERS, AuxHead, AuxHeadConfig, AuxKind};
pub use resnet::ShapeError;
pub use split::{ClientModel, ClientNet, Cut, CutPreset, CutSpec, ServerNet, SplitResNetConfig};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

/// burn draws a parameter's initial values lazily, on first use. Drawing them right away, in
/// declaration order, makes a seed fix the initialization whatever runs first afterwards.
pub fn materialize<M: Module>(module: &M) {
    struct Touch;
    impl ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
}

/// Mean cross-entropy of `logits` (`[batch, classes]`) against class indices (`[batch]`).
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let [batch, _] = logits.dims();
    log_softmax(logits, 1)
        .gather(1, targets.reshape([batch, 1]))
        .mean()
        .neg()
}

/// Number of `logits` rows whose arg-max equals the target.
pub fn correct(logits: Tensor<2>, targets: Tensor<1, Int>) -> usize {
    let [batch, _] = logits.dims();
    let predicted = logits.argmax(1).reshape([batch]);
    predicted.equal(targets).int().sum().into_scalar::<i64>() as usize
}
