//! Auxiliary classifier heads the client trains at the cut in decoupled mode.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::module::adaptive_avg_pool2d;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::resnet::ShapeError;

/// Which auxiliary head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuxKind {
    /// Global average pool + one linear layer (the paper's head).
    #[default]
    Linear,
    /// Adaptive pool to 2×2, `model.aux_layers` hidden layers of `model.aux_hidden` units with
    /// BatchNorm and ReLU, then linear (DGL-style). The defaults, 2 × 128, are splitaux's head;
    /// 3 × 256 is the head of the paper authors' released code.
    Mlp,
    /// conv3×3 + BatchNorm + ReLU, global pool, linear 128, ReLU, linear (InfoPro-style).
    Cnn,
}

/// Default width of the `mlp` head's hidden layers (`model.aux_hidden`).
pub const AUX_HIDDEN: usize = 128;
/// Default number of hidden layers of the `mlp` head (`model.aux_layers`).
pub const AUX_LAYERS: usize = 2;
/// Hidden width of the `cnn` head. Fixed: `model.aux_hidden` and `model.aux_layers` shape the
/// `mlp` head only.
pub const CNN_HIDDEN: usize = 128;

/// Global average pool: `[b, c, h, w]` → `[b, c]`.
fn global_pool(x: Tensor<4>) -> Tensor<2> {
    let [b, c, _, _] = x.dims();
    adaptive_avg_pool2d(x, [1, 1]).reshape([b, c])
}

#[derive(Module, Debug)]
pub struct LinearHead {
    fc: Linear,
}

/// One hidden layer of the `mlp` head: linear, BatchNorm (then ReLU).
#[derive(Module, Debug)]
pub struct MlpLayer {
    fc: Linear,
    bn: BatchNorm,
}

#[derive(Module, Debug)]
pub struct MlpHead {
    hidden: Vec<MlpLayer>,
    out: Linear,
}

#[derive(Module, Debug)]
pub struct CnnHead {
    conv: Conv2d,
    bn: BatchNorm,
    fc1: Linear,
    out: Linear,
}

/// An auxiliary head of any [`AuxKind`].
// One head exists per run, so the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum AuxHead {
    Linear(LinearHead),
    Mlp(MlpHead),
    Cnn(CnnHead),
}

/// Builds an [`AuxHead`] for activations with `channels` channels.
#[derive(Debug, Clone, Copy)]
pub struct AuxHeadConfig {
    pub kind: AuxKind,
    pub channels: usize,
    pub classes: usize,
    /// `mlp` only: units of each hidden layer (`model.aux_hidden`, at least 1).
    pub hidden: usize,
    /// `mlp` only: number of hidden layers (`model.aux_layers`, at least 1).
    pub layers: usize,
}

impl AuxHeadConfig {
    /// A head of `kind` with the default `mlp` shape ([`AUX_HIDDEN`] × [`AUX_LAYERS`]).
    pub fn new(kind: AuxKind, channels: usize, classes: usize) -> Self {
        Self {
            kind,
            channels,
            classes,
            hidden: AUX_HIDDEN,
            layers: AUX_LAYERS,
        }
    }

    /// The same head with an `mlp` shape of `layers` hidden layers of `hidden` units.
    pub fn with_shape(self, hidden: usize, layers: usize) -> Self {
        Self {
            hidden,
            layers,
            ..self
        }
    }

    /// Refuses a shape no `mlp` head can have (checked whatever the kind, so a bad value never
    /// waits for the day it is combined with `mlp`).
    pub fn check(&self) -> Result<(), ShapeError> {
        if self.hidden == 0 {
            return Err(ShapeError::AuxHidden(self.hidden));
        }
        if self.layers == 0 {
            return Err(ShapeError::AuxLayers(self.layers));
        }
        Ok(())
    }

    /// Builds the head. The `mlp` head's parameters come in the order fc, bn of each hidden
    /// layer, then the output layer: with the default shape, exactly the order of the earlier
    /// fixed head (fc1, bn1, fc2, bn2, out), so a seed draws the same numbers.
    pub fn init(&self, device: &Device) -> Result<AuxHead, ShapeError> {
        self.check()?;
        let (c, k) = (self.channels, self.classes);
        Ok(match self.kind {
            AuxKind::Linear => AuxHead::Linear(LinearHead {
                fc: LinearConfig::new(c, k).init(device),
            }),
            AuxKind::Mlp => {
                let h = self.hidden;
                let hidden = (0..self.layers)
                    .map(|i| MlpLayer {
                        fc: LinearConfig::new(if i == 0 { 4 * c } else { h }, h).init(device),
                        bn: BatchNormConfig::new(h).init(device),
                    })
                    .collect();
                AuxHead::Mlp(MlpHead {
                    hidden,
                    out: LinearConfig::new(h, k).init(device),
                })
            }
            AuxKind::Cnn => AuxHead::Cnn(CnnHead {
                conv: Conv2dConfig::new([c, c], [3, 3])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .with_bias(false)
                    .init(device),
                bn: BatchNormConfig::new(c).init(device),
                fc1: LinearConfig::new(c, CNN_HIDDEN).init(device),
                out: LinearConfig::new(CNN_HIDDEN, k).init(device),
            }),
        })
    }
}

impl AuxHead {
    /// # Shapes
    /// - input: `[batch, channels, side, side]` (the activations at the cut)
    /// - output: `[batch, classes]` logits
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        match self {
            AuxHead::Linear(head) => head.fc.forward(global_pool(x)),
            AuxHead::Mlp(head) => {
                let [b, c, _, _] = x.dims();
                let x = adaptive_avg_pool2d(x, [2, 2]).reshape([b, 4 * c]);
                let x = head
                    .hidden
                    .iter()
                    .fold(x, |x, layer| relu(layer.bn.forward(layer.fc.forward(x))));
                head.out.forward(x)
            }
            AuxHead::Cnn(head) => {
                let x = relu(head.bn.forward(head.conv.forward(x)));
                let x = relu(head.fc1.forward(global_pool(x)));
                head.out.forward(x)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::module::{ModuleVisitor, Param};

    use super::*;
    use crate::config::ModelConfig;

    #[test]
    fn every_head_maps_activations_to_logits() {
        let device = Device::flex();
        for kind in [AuxKind::Linear, AuxKind::Mlp, AuxKind::Cnn] {
            let head = AuxHeadConfig::new(kind, 16, 10).init(&device).unwrap();
            let x = Tensor::<4>::ones([3, 16, 8, 8], &device);
            assert_eq!(head.forward(x).dims(), [3, 10], "{kind:?}");
        }
    }

    /// Shapes of every parameter and buffer, in visiting order (the order a seed draws them in).
    fn shapes<M: Module>(module: &M) -> Vec<Vec<usize>> {
        struct Shapes(Vec<Vec<usize>>);
        impl ModuleVisitor for Shapes {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                self.0.push(param.val().dims().to_vec());
            }
        }
        let mut out = Shapes(Vec::new());
        module.visit(&mut out);
        out.0
    }

    /// The paper authors' head: pool 2×2, three hidden layers of 256 with BatchNorm and ReLU,
    /// then linear.
    #[test]
    fn authors_mlp_head_has_the_hand_counted_parameters() {
        let device = Device::flex();
        let head = AuxHeadConfig::new(AuxKind::Mlp, 16, 10)
            .with_shape(256, 3)
            .init(&device)
            .unwrap();
        // burn counts BatchNorm's running mean and variance with γ and β: 4 values a unit.
        let first = 4 * 16 * 256 + 256; // 2×2-pooled 16 channels → 256
        let next = 256 * 256 + 256; // 256 → 256, twice
        let norms = 3 * 4 * 256;
        let out = 256 * 10 + 10;
        assert_eq!(first + 2 * next + norms + out, 153_866);
        assert_eq!(head.num_params(), 153_866);
        for side in [8, 32] {
            let x = Tensor::<4>::ones([2, 16, side, side], &device);
            assert_eq!(head.forward(x).dims(), [2, 10], "side {side}");
        }
    }

    /// The `mlp` head as it was before its shape became configurable.
    #[derive(Module, Debug)]
    struct FixedMlpHead {
        fc1: Linear,
        bn1: BatchNorm,
        fc2: Linear,
        bn2: BatchNorm,
        out: Linear,
    }

    #[test]
    fn default_mlp_head_is_the_fixed_one() {
        let device = Device::flex();
        let model = ModelConfig::default();
        assert_eq!((model.aux_hidden, model.aux_layers), (128, 2));
        let head = AuxHeadConfig::new(AuxKind::Mlp, 16, 10)
            .with_shape(model.aux_hidden, model.aux_layers)
            .init(&device)
            .unwrap();
        // 64 → 128, 128 → 128, 128 → 10, and two BatchNorms of 128 units (4 values each).
        let expected = (64 * 128 + 128) + (128 * 128 + 128) + (128 * 10 + 10) + 2 * 4 * 128;
        assert_eq!(expected, 27_146);
        assert_eq!(head.num_params(), 27_146);
        // Same parameters in the same visiting order: a seed draws the same numbers as before.
        let fixed = FixedMlpHead {
            fc1: LinearConfig::new(64, 128).init(&device),
            bn1: BatchNormConfig::new(128).init(&device),
            fc2: LinearConfig::new(128, 128).init(&device),
            bn2: BatchNormConfig::new(128).init(&device),
            out: LinearConfig::new(128, 10).init(&device),
        };
        assert_eq!(fixed.num_params(), 27_146);
        assert_eq!(shapes(&head), shapes(&fixed));
    }

    #[test]
    fn impossible_mlp_shape_is_an_error_naming_the_key() {
        let device = Device::flex();
        for kind in [AuxKind::Mlp, AuxKind::Linear] {
            let config = AuxHeadConfig::new(kind, 16, 10);
            let err = config.with_shape(0, 2).init(&device).unwrap_err();
            assert_eq!(err, ShapeError::AuxHidden(0));
            assert!(err.to_string().contains("model.aux_hidden = 0"), "{err}");
            let err = config.with_shape(128, 0).init(&device).unwrap_err();
            assert_eq!(err, ShapeError::AuxLayers(0));
            assert!(err.to_string().contains("model.aux_layers = 0"), "{err}");
        }
    }
}
