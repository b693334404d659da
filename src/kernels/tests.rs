//! The fused kernels against burn's own modules: forward values, gradients of every input and
//! parameter, and BatchNorm's running statistics.

use burn::module::Param;
use burn::nn::conv::Conv2dConfig;
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::tensor::{Device, Distribution, Tensor};

use super::{Kernels, batch_norm, conv2d, test_support};

fn device() -> Device {
    Device::flex().autodiff()
}

fn random<const D: usize>(shape: [usize; D]) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device())
}

/// [`test_support::assert_close`] at the tolerance of a single fused operation.
fn assert_close<const D: usize>(fused: Tensor<D>, reference: Tensor<D>, what: &str) {
    test_support::assert_close(fused, reference, 1e-4, what);
}

#[test]
fn fused_kernels_run_on_flex_in_f32_only() {
    let x = random([1, 1, 2, 2]);
    assert!(Kernels::Fused.fused_for(&x));
    assert!(Kernels::Fused.fused_for(&x.clone().inner()));
    assert!(!Kernels::Burn.fused_for(&x));
    assert!(!Kernels::Fused.fused_for(&x.cast(burn::tensor::DType::F64)));
}

#[test]
fn convolution_and_its_gradients_equal_burns() {
    for (cin, cout, side, stride) in [
        (3, 5, 8, 1),
        (4, 6, 9, 2),
        (2, 3, 4, 1),
        (5, 40, 6, 1),
        (3, 5, 8, 2),
    ] {
        let conv = Conv2dConfig::new([cin, cout], [3, 3])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .with_bias(false)
            .init(&device());
        let x = random([3, cin, side, side]);
        let probe = random([3, cout, side.div_ceil(stride), side.div_ceil(stride)]);
        let what = format!("conv {cin}->{cout} side {side} stride {stride}");

        let run = |kernels| {
            let x = x.clone().require_grad();
            let y = conv2d(kernels, &conv, x.clone());
            let grads = (y.clone() * probe.clone()).sum().backward();
            let dx = x.grad(&grads).expect("input gradient");
            let dw = conv.weight.grad(&grads).expect("weight gradient");
            (y, dx, dw)
        };
        let (y, dx, dw) = run(Kernels::Fused);
        let (y_ref, dx_ref, dw_ref) = run(Kernels::Burn);
        assert_close(y, y_ref, &format!("{what}: output"));
        assert_close(dx, dx_ref, &format!("{what}: input gradient"));
        assert_close(dw, dw_ref, &format!("{what}: weight gradient"));
    }
}

#[test]
fn shortcut_and_its_gradient_equal_burns() {
    for (channels, side, stride, pad) in [(4, 8, 2, 2), (3, 7, 2, 1), (2, 6, 3, 0), (3, 4, 1, 1)] {
        let x = random([2, channels, side, side]);
        let out_side = side.div_ceil(stride);
        let probe = random([2, channels + 2 * pad, out_side, out_side]);
        let run = |kernels| {
            let x = x.clone().require_grad();
            let y = super::shortcut(kernels, x.clone(), stride, pad, None);
            let grads = (y.clone() * probe.clone()).sum().backward();
            (y, x.grad(&grads).expect("input gradient"))
        };
        let ((y, dx), (y_ref, dx_ref)) = (run(Kernels::Fused), run(Kernels::Burn));
        let what = format!("shortcut of {channels} channels, side {side}, stride {stride}");
        // A copy and a scatter: the same values exactly.
        assert_eq!(y.to_data(), y_ref.to_data(), "{what}: output");
        assert_eq!(dx.to_data(), dx_ref.to_data(), "{what}: input gradient");
    }
}

/// A BatchNorm with non-trivial affine parameters (the same for every call).
fn norm(channels: usize) -> BatchNorm {
    let mut bn = BatchNormConfig::new(channels).init(&device());
    let ramp = |offset: f32| {
        let values: Vec<f32> = (0..channels).map(|c| offset + 0.25 * c as f32).collect();
        Param::from_tensor(Tensor::<1>::from_floats(values.as_slice(), &device()))
    };
    bn.gamma = ramp(0.5);
    bn.beta = ramp(-0.3);
    bn
}

#[test]
fn batch_norm_epilogues_and_gradients_equal_burns() {
    let shape = [4, 3, 5, 5];
    let x = random(shape);
    let residual = random(shape);
    let probe = random(shape);
    for (with_residual, relu) in [(false, false), (false, true), (true, true)] {
        let what = format!("residual {with_residual}, relu {relu}");
        // Separate modules: clones would share running statistics.
        let run = |kernels| {
            let bn = norm(3);
            let x = x.clone().require_grad();
            let r = residual.clone().require_grad();
            let y = batch_norm(
                kernels,
                &bn,
                x.clone(),
                with_residual.then(|| r.clone()),
                relu,
            );
            let grads = (y.clone() * probe.clone()).sum().backward();
            let dr = with_residual.then(|| r.grad(&grads).expect("residual gradient"));
            let dx = x.grad(&grads).expect("input gradient");
            let dgamma = bn.gamma.grad(&grads).expect("gamma gradient");
            let dbeta = bn.beta.grad(&grads).expect("beta gradient");
            let running = (bn.running_mean.value_sync(), bn.running_var.value_sync());
            (y, dx, dr, dgamma, dbeta, running)
        };
        let fused = run(Kernels::Fused);
        let reference = run(Kernels::Burn);
        assert_close(fused.0, reference.0, &format!("{what}: output"));
        assert_close(fused.1, reference.1, &format!("{what}: input gradient"));
        if let (Some(a), Some(b)) = (fused.2, reference.2) {
            assert_close(a, b, &format!("{what}: residual gradient"));
        }
        assert_close(fused.3, reference.3, &format!("{what}: gamma gradient"));
        assert_close(fused.4, reference.4, &format!("{what}: beta gradient"));
        assert_close(fused.5.0, reference.5.0, &format!("{what}: running mean"));
        assert_close(
            fused.5.1,
            reference.5.1,
            &format!("{what}: running variance"),
        );
    }
}

#[test]
fn inference_and_unsupported_convolutions_fall_back_to_burn() {
    let device = Device::flex();
    let bn = BatchNormConfig::new(2).init(&device);
    let x = Tensor::<4>::ones([2, 2, 3, 3], &device);
    // Not training: burn's module with running statistics (mean 0, var 1) is the identity here.
    let y = batch_norm(Kernels::Fused, &bn, x.clone(), None, false);
    assert_close(y, x.clone(), "inference BatchNorm");

    let dilated = Conv2dConfig::new([2, 2], [3, 3])
        .with_dilation([2, 2])
        .init(&device);
    let out = conv2d(
        Kernels::Fused,
        &dilated,
        Tensor::ones([1, 2, 7, 7], &device),
    );
    assert_close(
        out,
        dilated.forward(Tensor::ones([1, 2, 7, 7], &device)),
        "dilated conv",
    );
}

#[test]
fn reductions_do_not_depend_on_the_thread_count() {
    use super::batch_norm::{self as bn, NormShape, ReluGate};
    use super::conv;
    use super::geometry::ConvGeometry;
    use super::output_gradient::OutputGradient;

    let g = ConvGeometry {
        batch: 40, // more than two reduction chunks, the last one partial
        in_channels: 3,
        out_channels: 4,
        height: 6,
        width: 6,
        kernel: 3,
        stride: 1,
        padding: 1,
    };
    let wave = |len: usize, k: f32| (0..len).map(|i| (i as f32 * k).sin()).collect::<Vec<f32>>();
    let (x, w, dy) = (
        wave(g.batch * g.in_len(), 0.37),
        wave(4 * 3 * 9, 0.11),
        wave(g.batch * g.out_len(), 0.23),
    );
    let s = NormShape {
        batch: g.batch,
        channels: 4,
        plane: 36,
    };
    let (gamma, beta) = (vec![1.5f32; 4], vec![0.1f32; 4]);
    let upstream = wave(dy.len(), 0.51);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let given = OutputGradient::Given(&dy);
            let (_, dw) = conv::backward(&g, &x, &w, given, conv::InputGradient::Skip, true);
            let (y, stats) = bn::forward(s, &dy, &gamma, &beta, None, true, 1e-5);
            let gate = ReluGate::Output(&y);
            let grads = bn::backward(s, &dy, &upstream, gate, &gamma, &stats, false, 1e-5);
            (
                dw.unwrap(),
                stats.mean,
                stats.variance,
                grads.dgamma,
                grads.dx,
            )
        })
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn injected_gradient_reaches_the_input_unchanged() {
    let w = random([2, 3]).require_grad();
    let h = w.clone().exp(); // a non-leaf, as the cut activations are
    let g = random([2, 3]);
    let grads = super::inject_gradient(h.clone(), g.clone()).backward();
    // d/dw Σ exp(w)·g = exp(w)·g
    assert_close(
        w.grad(&grads).unwrap(),
        w.clone().inner().exp() * g.clone().inner(),
        "through exp",
    );

    // The same as the (h · g).sum() surrogate (a fresh forward: a graph runs backward once).
    drop(h);
    let reference = (w.clone().exp() * g.clone()).sum().backward();
    assert_close(
        w.grad(&grads).unwrap(),
        w.grad(&reference).unwrap(),
        "against (h · g).sum()",
    );
    // Scaled upstream gradients are honoured.
    let h = w.clone().exp();
    let grads = super::inject_gradient(h, g.clone())
        .mul_scalar(2.0)
        .backward();
    assert_close(
        w.grad(&grads).unwrap(),
        w.clone().inner().exp() * g.inner() * 2.0,
        "scaled",
    );
}

/// A convolution and the BatchNorm of its output in one op (whose backward makes the
/// normalization's input gradient image by image inside the convolution's) give the bits of the
/// two ops: outputs, every gradient and the running statistics. A stem on an untracked input
/// (the weight gradient alone), an identity residual block (forks on both sides; stride 1, the
/// one-sweep backward: two chunks of images for two threads) and a downsampling block (stride 2,
/// its output gradient made whole first; the shortcut's fork).
#[test]
fn a_convolution_and_its_batch_norm_in_one_op_give_the_bits_of_two() {
    use super::{
        Fork, batch_norm_add_relu, conv_batch_norm, conv_batch_norm_add_relu, conv2d_forked,
        shortcut,
    };
    let k = Kernels::Fused;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a pool of two threads");
    let conv = |cin: usize, cout: usize, stride: usize| {
        Conv2dConfig::new([cin, cout], [3, 3])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .with_bias(false)
            .init(&device())
    };
    let convs = [
        conv(3, 8, 1),
        conv(8, 8, 1),
        conv(8, 8, 1),
        conv(8, 16, 2),
        conv(16, 16, 1),
    ];
    let x = random([32, 3, 8, 8]);
    let probe = random([32, 16, 4, 4]);

    let run = |fused: bool| {
        pool.install(|| {
            let norms = [norm(8), norm(8), norm(8), norm(16), norm(16)];
            let ([c0, c1, c2, c3, c4], [n0, n1, n2, n3, n4]) = (&convs, &norms);
            let stem = if fused {
                conv_batch_norm(k, c0, x.clone(), None, n0, true)
            } else {
                batch_norm(k, n0, conv2d(k, c0, x.clone()), None, true)
            };
            let identity = Fork::new();
            let block = if fused {
                let out = conv_batch_norm(k, c1, stem.clone(), Some(&identity), n1, true);
                conv_batch_norm_add_relu(k, c2, out, n2, stem.clone(), Some(&identity))
            } else {
                let out = conv2d_forked(k, c1, stem.clone(), &identity);
                let out = batch_norm(k, n1, out, None, true);
                let out = conv2d(k, c2, out);
                batch_norm_add_relu(k, n2, out, stem.clone(), Some(&identity))
            };
            let down = Fork::new();
            let short = shortcut(k, block.clone(), 2, 4, Some(&down));
            let out = if fused {
                let out = conv_batch_norm(k, c3, block.clone(), Some(&down), n3, true);
                conv_batch_norm_add_relu(k, c4, out, n4, short, None)
            } else {
                let out = conv2d_forked(k, c3, block.clone(), &down);
                let out = batch_norm(k, n3, out, None, true);
                batch_norm_add_relu(k, n4, conv2d(k, c4, out), short, None)
            };
            let grads = (out.clone() * probe.clone()).sum().backward();
            let mut data = vec![stem.into_data(), block.into_data(), out.into_data()];
            for c in &convs {
                data.push(c.weight.grad(&grads).expect("dw").into_data());
            }
            for n in &norms {
                data.push(n.gamma.grad(&grads).expect("dgamma").into_data());
                data.push(n.beta.grad(&grads).expect("dbeta").into_data());
                data.push(n.running_mean.value().into_data());
                data.push(n.running_var.value().into_data());
            }
            data
        })
    };
    let (fused, apart) = (run(true), run(false));
    assert_eq!(fused.len(), apart.len());
    for (i, (a, b)) in fused.iter().zip(&apart).enumerate() {
        assert_eq!(a, b, "result {i}");
    }
}
