//! Auxiliary classifier heads the client trains at the cut in decoupled mode.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::module::adaptive_avg_pool2d;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// Which auxiliary head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuxKind {
    /// Global average pool + one linear layer (the paper's head).
    #[default]
    Linear,
    /// Adaptive pool to 2×2, two hidden layers with BatchNorm and ReLU, then linear (DGL-style).
    Mlp,
    /// conv3×3 + BatchNorm + ReLU, global pool, linear 128, ReLU, linear (InfoPro-style).
    Cnn,
}

/// Hidden width of the `mlp` and `cnn` heads.
pub const AUX_HIDDEN: usize = 128;

/// Global average pool: `[b, c, h, w]` → `[b, c]`.
fn global_pool(x: Tensor<4>) -> Tensor<2> {
    let [b, c, _, _] = x.dims();
    adaptive_avg_pool2d(x, [1, 1]).reshape([b, c])
}

#[derive(Module, Debug)]
pub struct LinearHead {
    fc: Linear,
}

#[derive(Module, Debug)]
pub struct MlpHead {
    fc1: Linear,
    bn1: BatchNorm,
    fc2: Linear,
    bn2: BatchNorm,
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
}

impl AuxHeadConfig {
    pub fn init(&self, device: &Device) -> AuxHead {
        let (c, k, h) = (self.channels, self.classes, AUX_HIDDEN);
        match self.kind {
            AuxKind::Linear => AuxHead::Linear(LinearHead {
                fc: LinearConfig::new(c, k).init(device),
            }),
            AuxKind::Mlp => AuxHead::Mlp(MlpHead {
                fc1: LinearConfig::new(4 * c, h).init(device),
                bn1: BatchNormConfig::new(h).init(device),
                fc2: LinearConfig::new(h, h).init(device),
                bn2: BatchNormConfig::new(h).init(device),
                out: LinearConfig::new(h, k).init(device),
            }),
            AuxKind::Cnn => AuxHead::Cnn(CnnHead {
                conv: Conv2dConfig::new([c, c], [3, 3])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .with_bias(false)
                    .init(device),
                bn: BatchNormConfig::new(c).init(device),
                fc1: LinearConfig::new(c, h).init(device),
                out: LinearConfig::new(h, k).init(device),
            }),
        }
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
                let x = relu(head.bn1.forward(head.fc1.forward(x)));
                let x = relu(head.bn2.forward(head.fc2.forward(x)));
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
    use super::*;

    #[test]
    fn every_head_maps_activations_to_logits() {
        let device = Device::flex();
        for kind in [AuxKind::Linear, AuxKind::Mlp, AuxKind::Cnn] {
            let head = AuxHeadConfig {
                kind,
                channels: 16,
                classes: 10,
            }
            .init(&device);
            let x = Tensor::<4>::ones([3, 16, 8, 8], &device);
            assert_eq!(head.forward(x).dims(), [3, 10], "{kind:?}");
        }
    }
}
