//! CIFAR ResNet-(6n+2) building blocks (He et al. 2016, §4.2): a 3×3 stem with 16 channels,
//! then three stages of `n` basic blocks with 16, 32 and 64 channels (stride 2 at the start of
//! stages 2 and 3) and option-A shortcuts: subsample, then zero-pad the new channels.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, PaddingConfig2d};
use burn::tensor::{Device, Tensor};

use crate::kernels::{self, Fork, Kernels};

/// Channels of the three stages.
pub const STAGE_WIDTHS: [usize; 3] = [16, 32, 64];
/// Side of the stage-1 feature maps (the input side, 32).
pub const INPUT_SIDE: usize = 32;

/// He initialization for convolutions (normal, fan-in, gain √2).
fn he_normal() -> Initializer {
    Initializer::KaimingNormal {
        gain: std::f64::consts::SQRT_2,
        fan_out_only: false,
    }
}

fn conv3x3(cin: usize, cout: usize, stride: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([cin, cout], [3, 3])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_bias(false)
        .with_initializer(he_normal())
        .init(device)
}

/// Validation errors of a ResNet shape, or of the shape of its auxiliary head.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShapeError {
    #[error(
        "model.depth = {0}: a CIFAR ResNet has depth 6n+2 with n >= 1 (8, 20, 32, 44, 56, 110, …)"
    )]
    Depth(usize),
    #[error(
        "model.cut = {cut} blocks: ResNet-{depth} has {total} residual blocks, so the cut must be 0..={total}"
    )]
    Cut {
        cut: usize,
        depth: usize,
        total: usize,
    },
    #[error("model.aux_hidden = {0}: the mlp auxiliary head needs at least 1 hidden unit")]
    AuxHidden(usize),
    #[error(
        "model.aux_layers = {0}: the mlp auxiliary head needs at least 1 hidden layer (for a pool and one linear layer, use model.aux = \"linear\")"
    )]
    AuxLayers(usize),
}

/// Residual blocks per stage of a ResNet of `depth`.
pub fn blocks_per_stage(depth: usize) -> Result<usize, ShapeError> {
    if depth < 8 || !(depth - 2).is_multiple_of(6) {
        return Err(ShapeError::Depth(depth));
    }
    Ok((depth - 2) / 6)
}

/// Shape of one residual block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub stride: usize,
}

/// All `3n` blocks of the network, in order.
pub fn block_specs(n: usize) -> Vec<BlockSpec> {
    let mut specs = Vec::with_capacity(3 * n);
    let mut cin = STAGE_WIDTHS[0];
    for (stage, &cout) in STAGE_WIDTHS.iter().enumerate() {
        for b in 0..n {
            let stride = if stage > 0 && b == 0 { 2 } else { 1 };
            specs.push(BlockSpec {
                in_channels: cin,
                out_channels: cout,
                stride,
            });
            cin = cout;
        }
    }
    specs
}

/// 3×3 convolution to 16 channels, BatchNorm, ReLU.
#[derive(Module, Debug)]
pub struct Stem {
    conv: Conv2d,
    bn: BatchNorm,
    #[module(skip)]
    kernels: Kernels,
}

impl Stem {
    pub fn init(kernels: Kernels, device: &Device) -> Self {
        Self {
            conv: conv3x3(3, STAGE_WIDTHS[0], 1, device),
            bn: BatchNormConfig::new(STAGE_WIDTHS[0]).init(device),
            kernels,
        }
    }

    /// # Shapes
    /// - input: `[batch, 3, 32, 32]`
    /// - output: `[batch, 16, 32, 32]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let k = self.kernels;
        kernels::conv_batch_norm(k, &self.conv, x, None, &self.bn, true)
    }
}

/// Two 3×3 convolutions with BatchNorm, plus an option-A shortcut.
#[derive(Module, Debug)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    /// Spatial stride of the first convolution (and of the shortcut's subsampling).
    stride: usize,
    /// Zero channels added on each side of the shortcut: `(out - in) / 2`.
    channel_pad: usize,
    #[module(skip)]
    kernels: Kernels,
}

impl BasicBlock {
    pub fn init(spec: BlockSpec, kernels: Kernels, device: &Device) -> Self {
        Self {
            conv1: conv3x3(spec.in_channels, spec.out_channels, spec.stride, device),
            bn1: BatchNormConfig::new(spec.out_channels).init(device),
            conv2: conv3x3(spec.out_channels, spec.out_channels, 1, device),
            bn2: BatchNormConfig::new(spec.out_channels).init(device),
            stride: spec.stride,
            channel_pad: (spec.out_channels - spec.in_channels) / 2,
            kernels,
        }
    }

    /// # Shapes
    /// - input: `[batch, in, side, side]`
    /// - output: `[batch, out, side / stride, side / stride]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let k = self.kernels;
        // `x` feeds conv1 and the shortcut: the kernels add its two gradients themselves.
        let fork = Fork::new();
        let out = kernels::conv_batch_norm(k, &self.conv1, x.clone(), Some(&fork), &self.bn1, true);
        // relu(bn2(conv2(out)) + shortcut)
        if self.stride == 1 && self.channel_pad == 0 {
            kernels::conv_batch_norm_add_relu(k, &self.conv2, out, &self.bn2, x, Some(&fork))
        } else {
            let p = self.channel_pad;
            let shortcut = kernels::shortcut(k, x, self.stride, p, Some(&fork)); // [b, out, side/2, side/2]
            kernels::conv_batch_norm_add_relu(k, &self.conv2, out, &self.bn2, shortcut, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_rules() {
        assert_eq!(blocks_per_stage(20), Ok(3));
        assert_eq!(blocks_per_stage(110), Ok(18));
        assert_eq!(blocks_per_stage(21), Err(ShapeError::Depth(21)));
        assert_eq!(blocks_per_stage(2), Err(ShapeError::Depth(2)));
    }

    #[test]
    fn block_plan_of_resnet20() {
        let specs = block_specs(3);
        assert_eq!(specs.len(), 9);
        assert_eq!(
            specs[3],
            BlockSpec {
                in_channels: 16,
                out_channels: 32,
                stride: 2
            }
        );
        assert_eq!(specs[6].stride, 2);
        assert_eq!(specs[8].out_channels, 64);
    }

    #[test]
    fn downsampling_block_shapes_and_zero_padded_shortcut() {
        let device = Device::flex();
        let block = BasicBlock::init(
            BlockSpec {
                in_channels: 16,
                out_channels: 32,
                stride: 2,
            },
            Kernels::Fused,
            &device,
        );
        let x = Tensor::<4>::ones([2, 16, 8, 8], &device);
        assert_eq!(block.forward(x).dims(), [2, 32, 4, 4]);
    }

    /// The fused kernels against burn's modules on a stem and identity and downsampling blocks,
    /// every gradient included: each block input's two gradients (conv1's and the shortcut's)
    /// meet through a `Fork` in the fused run and in burn's autodiff in the other, so a gradient
    /// lost or counted twice shows. With the input tracked (a client's first block) and not (a
    /// server's, on detached activations).
    #[test]
    fn fused_blocks_give_burns_values_and_gradients() {
        use burn::tensor::Distribution;

        let device = Device::flex().autodiff();
        let spec = |in_channels, out_channels, stride| BlockSpec {
            in_channels,
            out_channels,
            stride,
        };
        let stem = Stem::init(Kernels::Fused, &device);
        let blocks: Vec<BasicBlock> = [spec(16, 16, 1), spec(16, 32, 2), spec(32, 32, 1)]
            .into_iter()
            .map(|s| BasicBlock::init(s, Kernels::Fused, &device))
            .collect();
        let x = Tensor::<4>::random([3, 3, 8, 8], Distribution::Normal(0.0, 1.0), &device);
        let probe = Tensor::<4>::random([3, 32, 4, 4], Distribution::Normal(0.0, 1.0), &device);

        let run = |kernels, tracked: bool| {
            let stem = Stem {
                kernels,
                ..stem.clone()
            };
            let x = if tracked {
                x.clone().require_grad()
            } else {
                x.clone()
            };
            let mut h = stem.forward(x.clone());
            for block in &blocks {
                h = BasicBlock {
                    kernels,
                    ..block.clone()
                }
                .forward(h);
            }
            let grads = (h.clone() * probe.clone()).sum().backward();
            let mut found = vec![("output".to_string(), h.inner())];
            if tracked {
                found.push(("input gradient".into(), x.grad(&grads).expect("dx")));
            }
            for (i, block) in blocks.iter().enumerate() {
                for (name, weight) in [("conv1", &block.conv1), ("conv2", &block.conv2)] {
                    let dw = weight.weight.grad(&grads).expect("weight gradient");
                    found.push((format!("block {i} {name}"), dw.reshape([-1, 1, 1, 1])));
                }
                for (name, bn) in [("bn1", &block.bn1), ("bn2", &block.bn2)] {
                    let dgamma = bn.gamma.grad(&grads).expect("gamma gradient");
                    found.push((format!("block {i} {name} γ"), dgamma.reshape([-1, 1, 1, 1])));
                }
            }
            found
        };
        for tracked in [true, false] {
            for ((what, fused), (_, reference)) in run(Kernels::Fused, tracked)
                .into_iter()
                .zip(run(Kernels::Burn, tracked))
            {
                let what = format!("{what} (input tracked: {tracked})");
                crate::kernels::test_support::assert_close(fused, reference, 1e-3, &what);
            }
        }
    }
}
