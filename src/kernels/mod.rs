//! splitaux's own CPU kernels for the two operations that dominate a CIFAR ResNet step:
//! 3×3 convolution and training-mode BatchNorm (fused with the residual addition and ReLU after
//! it). They plug into burn as a backend extension ([`CpuKernels`]): a forward on burn's `flex`
//! tensors and, for `Autodiff<Flex>`, a hand-written backward node, so the rest of the model,
//! the optimizers and autodiff stay burn's.
//!
//! [`conv2d`] and [`batch_norm`] (and the two as one op, below) are what the model calls. They run
//! these kernels when the tensors live on the flex device and the model asked for
//! [`Kernels::Fused`]; on any other device (wgpu) or with [`Kernels::Burn`] they run burn's own
//! modules, the reference the tests compare against.
//! [`shortcut`] is the downsampling blocks' option-A shortcut, by its own kernel under the same
//! conditions. A residual block's input feeds two of these ops; a [`Fork`] lets the kernels add
//! its two gradients themselves ([`conv2d_forked`]). [`conv_batch_norm`] and
//! [`conv_batch_norm_add_relu`] run a convolution and the BatchNorm of its output as one op,
//! with the same results, whose backward makes the normalization's input gradient image by image
//! inside the convolution's ([`output_gradient`]) instead of through memory. [`inject_gradient`]
//! is how the coupled client continues backpropagation from the server's gradient at the cut.

mod backend;
pub mod batch_norm;
mod buffer;
pub mod conv;
pub mod cpu;
pub mod direct;
mod fork;
mod gemm;
pub mod geometry;
pub mod output_gradient;
pub mod shortcut;
mod vectorize;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Dispatch, DispatchDevice};
use burn::nn::BatchNorm;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::activation::relu;
use burn::tensor::ops::PadMode;
use burn::tensor::{DType, Tensor, s};
use serde::{Deserialize, Serialize};

pub use backend::{ConvSpec, CpuKernels};
pub use fork::Fork;

/// Images per partial sum in the batch reductions (weight gradients, BatchNorm sums). Fixed
/// rather than one run per thread, so the partial sums, and the order they are added in, do not
/// depend on the thread count: these kernels give bit-identical results on any number of cores.
const REDUCTION_CHUNK: usize = 16;

/// One line on the kernels' cache blocking on this machine (see [`direct::describe_blocking`]).
pub fn describe_blocking() -> String {
    direct::describe_blocking(REDUCTION_CHUNK)
}

/// Adds the per-chunk partial sums of a reduction in chunk order (see [`REDUCTION_CHUNK`]).
fn sum_in_order(partials: &[Vec<f32>], len: usize) -> Vec<f32> {
    let mut total = vec![0.0; len];
    for part in partials {
        total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
    }
    total
}

/// Which implementation runs the model's convolutions and BatchNorms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// splitaux's CPU kernels on the flex device (burn's modules elsewhere).
    #[default]
    Fused,
    /// burn's modules everywhere (the reference; slower on the CPU).
    Burn,
}

impl Kernels {
    /// Whether the fused kernels run for `x`: chosen, on the flex device, in `f32`.
    fn fused_for<const D: usize>(self, x: &Tensor<D>) -> bool {
        self == Kernels::Fused
            && x.dtype() == DType::F32
            && matches!(
                x.device().as_dispatch().clone().inner(),
                DispatchDevice::Flex(_)
            )
    }
}

/// Stride and symmetric padding of `conv` when the fused kernel handles it: square kernel, equal
/// strides, no dilation, one group, no bias.
fn fusable(conv: &Conv2d) -> Option<(usize, usize)> {
    let [kh, kw] = conv.kernel_size;
    let padding = match &conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right)
            if top == left && top == bottom && top == right =>
        {
            *top
        }
        PaddingConfig2d::Valid => 0,
        _ => return None,
    };
    let plain = kh == kw
        && conv.stride[0] == conv.stride[1]
        && conv.dilation == [1, 1]
        && conv.groups == 1
        && conv.bias.is_none();
    plain.then_some((conv.stride[0], padding))
}

/// `conv.forward(x)`, by the fused kernel when it applies.
///
/// # Shapes
/// - `x`: `[batch, in, h, w]`
/// - output: `[batch, out, h', w']`
pub fn conv2d(kernels: Kernels, conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    conv2d_with(kernels, conv, x, None)
}

/// [`conv2d`] on a residual block's input, which also feeds the block's shortcut: the fused
/// kernel claims `fork`, and its backward adds the gradient the shortcut side hands over (see
/// [`Fork`]) to its own input gradient.
///
/// # Shapes
/// - as [`conv2d`]
pub fn conv2d_forked(kernels: Kernels, conv: &Conv2d, x: Tensor<4>, fork: &Fork) -> Tensor<4> {
    conv2d_with(kernels, conv, x, Some(fork))
}

fn conv2d_with(kernels: Kernels, conv: &Conv2d, x: Tensor<4>, fork: Option<&Fork>) -> Tensor<4> {
    match fusable(conv) {
        Some((stride, padding)) if kernels.fused_for(&x) => {
            Tensor::from_dispatch(<Dispatch as CpuKernels>::conv2d_nchw(
                x.into_dispatch(),
                conv.weight.val().into_dispatch(),
                stride,
                padding,
                fork.cloned(),
            ))
        }
        _ => conv.forward(x),
    }
}

/// The option-A shortcut of a residual block: every `stride`-th row and column of `x`, then `pad`
/// zero channels on each side. By the fused kernel when it applies (handing the gradient of `x`
/// to `fork`, if given and claimed); else burn's `slice` and `pad`.
///
/// # Shapes
/// - `x`: `[batch, channels, h, w]`
/// - output: `[batch, channels + 2·pad, ⌈h/stride⌉, ⌈w/stride⌉]`
pub fn shortcut(
    kernels: Kernels,
    x: Tensor<4>,
    stride: usize,
    pad: usize,
    fork: Option<&Fork>,
) -> Tensor<4> {
    if kernels.fused_for(&x) {
        return Tensor::from_dispatch(<Dispatch as CpuKernels>::shortcut_nchw(
            x.into_dispatch(),
            stride,
            pad,
            fork.cloned(),
        ));
    }
    let sub = x.slice(s![.., .., ..;stride, ..;stride]); // [b, c, ⌈h/s⌉, ⌈w/s⌉]
    sub.pad([(pad, pad), (0, 0), (0, 0)], PadMode::Constant(0.0)) // [b, c + 2·pad, …]
}

/// A scalar whose backward pass hands `g` to `h` as its gradient: what the coupled client
/// calls `backward()` on. On the flex device this is one autodiff node ([`CpuKernels`]);
/// elsewhere it is `(h · g).sum()`, which has the same gradient.
///
/// # Shapes
/// - `h`, `g`: the same shape
/// - output: `[1]`
pub fn inject_gradient<const D: usize>(h: Tensor<D>, g: Tensor<D>) -> Tensor<1> {
    assert_eq!(
        h.dims(),
        g.dims(),
        "inject_gradient: h and g differ in shape"
    );
    if Kernels::Fused.fused_for(&h) && g.dtype() == DType::F32 {
        let g = g.detach();
        Tensor::from_dispatch(<Dispatch as CpuKernels>::inject_gradient(
            h.into_dispatch(),
            g.into_dispatch(),
        ))
    } else {
        (h * g.detach()).sum()
    }
}

/// `relu?(bn.forward(x) + residual?)`, by the fused kernel when it applies (training mode on the
/// flex device). Updates `bn`'s running statistics exactly as burn's `BatchNorm` does.
///
/// # Shapes
/// - `x`, `residual`, output: `[batch, channels, h, w]`
pub fn batch_norm(
    kernels: Kernels,
    bn: &BatchNorm,
    x: Tensor<4>,
    residual: Option<Tensor<4>>,
    relu_after: bool,
) -> Tensor<4> {
    batch_norm_with(kernels, bn, x, residual, relu_after, None)
}

/// `relu(bn.forward(x) + residual)`, the end of a residual block, as [`batch_norm`]. With a
/// `fork` (the residual is the block's input itself, an identity shortcut), the fused kernel
/// hands the residual's gradient to it (see [`Fork`]).
///
/// # Shapes
/// - `x`, `residual`, output: `[batch, channels, h, w]`
pub fn batch_norm_add_relu(
    kernels: Kernels,
    bn: &BatchNorm,
    x: Tensor<4>,
    residual: Tensor<4>,
    fork: Option<&Fork>,
) -> Tensor<4> {
    batch_norm_with(kernels, bn, x, Some(residual), true, fork)
}

fn batch_norm_with(
    kernels: Kernels,
    bn: &BatchNorm,
    x: Tensor<4>,
    residual: Option<Tensor<4>>,
    relu_after: bool,
    fork: Option<&Fork>,
) -> Tensor<4> {
    if !fused_norm(kernels, bn, &x) {
        let y = bn.forward(x);
        let y = match residual {
            Some(r) => y + r,
            None => y,
        };
        return if relu_after { relu(y) } else { y };
    }

    let (x, gamma, beta) = (
        x.into_dispatch(),
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
    );
    let (y, mean, variance) = match residual {
        Some(r) if relu_after => <Dispatch as CpuKernels>::batch_norm_add_relu_nchw(
            x,
            gamma,
            beta,
            r.into_dispatch(),
            bn.epsilon,
            fork.cloned(),
        ),
        Some(r) => {
            // Not a ResNet pattern: add after the fused normalization.
            let (y, mean, variance) =
                <Dispatch as CpuKernels>::batch_norm_nchw(x, gamma, beta, false, bn.epsilon);
            let y = Tensor::<4>::from_dispatch(y) + r;
            (y.into_dispatch(), mean, variance)
        }
        None => <Dispatch as CpuKernels>::batch_norm_nchw(x, gamma, beta, relu_after, bn.epsilon),
    };
    update_running_statistics(bn, mean, variance);
    Tensor::from_dispatch(y)
}

/// Blends a fused BatchNorm's batch statistics into `bn`'s running ones, exactly as burn's
/// `BatchNorm` does.
fn update_running_statistics(
    bn: &BatchNorm,
    mean: FloatTensor<Dispatch>,
    variance: FloatTensor<Dispatch>,
) {
    let (mean, variance) = (
        Tensor::<1>::from_dispatch(mean),
        Tensor::<1>::from_dispatch(variance),
    );
    let momentum = bn.momentum;
    let blend = |running: Tensor<1>, batch: Tensor<1>| {
        running
            .mul_scalar(1.0 - momentum)
            .add(batch.detach().mul_scalar(momentum))
            .detach()
    };
    bn.running_mean
        .update(blend(bn.running_mean.value_sync(), mean));
    bn.running_var
        .update(blend(bn.running_var.value_sync(), variance));
}

/// Whether [`batch_norm`] on `x` runs the fused kernel: training on the flex device.
fn fused_norm(kernels: Kernels, bn: &BatchNorm, x: &Tensor<4>) -> bool {
    x.device().is_autodiff() && bn.training.is_enabled() && kernels.fused_for(x)
}

/// `batch_norm(conv2d(x))` ([`conv2d_forked`] when `fork` is given), as one fused op when both
/// would run fused (the same results; its backward makes the normalization's input gradient
/// image by image inside the convolution's, see [`output_gradient`]).
///
/// # Shapes
/// - `x`: `[batch, in, h, w]`
/// - output: `[batch, out, h', w']`
pub fn conv_batch_norm(
    kernels: Kernels,
    conv: &Conv2d,
    x: Tensor<4>,
    fork: Option<&Fork>,
    bn: &BatchNorm,
    relu_after: bool,
) -> Tensor<4> {
    match fusable(conv) {
        Some((stride, padding)) if fused_norm(kernels, bn, &x) => {
            let conv_spec = ConvSpec {
                stride,
                padding,
                fork: fork.cloned(),
            };
            let (y, mean, variance) = <Dispatch as CpuKernels>::conv_batch_norm_nchw(
                x.into_dispatch(),
                conv.weight.val().into_dispatch(),
                bn.gamma.val().into_dispatch(),
                bn.beta.val().into_dispatch(),
                conv_spec,
                relu_after,
                bn.epsilon,
            );
            update_running_statistics(bn, mean, variance);
            Tensor::from_dispatch(y)
        }
        _ => batch_norm(
            kernels,
            bn,
            conv2d_with(kernels, conv, x, fork),
            None,
            relu_after,
        ),
    }
}

/// `relu(bn(conv(x)) + residual)`, the end of a residual block: [`conv2d`] and then
/// [`batch_norm_add_relu`] (with its `fork`), as one fused op when both would run fused (see
/// [`conv_batch_norm`]).
///
/// # Shapes
/// - `x`: `[batch, in, h, w]`
/// - `residual`, output: `[batch, out, h', w']`
pub fn conv_batch_norm_add_relu(
    kernels: Kernels,
    conv: &Conv2d,
    x: Tensor<4>,
    bn: &BatchNorm,
    residual: Tensor<4>,
    fork: Option<&Fork>,
) -> Tensor<4> {
    match fusable(conv) {
        Some((stride, padding)) if fused_norm(kernels, bn, &x) => {
            let conv_spec = ConvSpec {
                stride,
                padding,
                fork: None,
            };
            let (y, mean, variance) = <Dispatch as CpuKernels>::conv_batch_norm_add_relu_nchw(
                x.into_dispatch(),
                conv.weight.val().into_dispatch(),
                bn.gamma.val().into_dispatch(),
                bn.beta.val().into_dispatch(),
                residual.into_dispatch(),
                conv_spec,
                bn.epsilon,
                fork.cloned(),
            );
            update_running_statistics(bn, mean, variance);
            Tensor::from_dispatch(y)
        }
        _ => batch_norm_add_relu(kernels, bn, conv2d(kernels, conv, x), residual, fork),
    }
}

#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;
