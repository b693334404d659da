//! Times splitaux's CPU kernels on the layer shapes of a CIFAR ResNet-20 training step
//! (batch 128 by default): convolution forward and backward (and, of the backward, the weight
//! gradient alone), BatchNorm forward and backward.
//! Where a step's time goes, op by op, without the autodiff and model around it.
//!
//! `cargo run --release --example kernel_times -- [batch] [threads]`

use std::time::Instant;

use splitaux::kernels::batch_norm::{self, NormShape, ReluGate};
use splitaux::kernels::conv::{self, ConvGeometry};
use splitaux::kernels::output_gradient::OutputGradient;

/// The fastest of `reps` timed calls (after one untimed): on a shared VM the minimum is the
/// estimate least disturbed by other tenants.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>().expect("a number"));
    let batch = args.next().unwrap_or(128);
    let threads = args.next().unwrap_or(2);
    splitaux::backend::configure_cpu(threads);

    // (in, out, side, stride, how many such convolutions in ResNet-20)
    let convs = [
        (3, 16, 32, 1, 1),
        (16, 16, 32, 1, 6),
        (16, 32, 32, 2, 1),
        (32, 32, 16, 1, 5),
        (32, 64, 16, 2, 1),
        (64, 64, 8, 1, 5),
    ];
    let mut totals = [0.0f64; 4];
    println!("layer                     fwd ms   bwd ms   GF/s fwd  GF/s bwd   dw ms  GF/s dw");
    for (cin, cout, side, stride, count) in convs {
        let g = ConvGeometry {
            batch,
            in_channels: cin,
            out_channels: cout,
            height: side,
            width: side,
            kernel: 3,
            stride,
            padding: 1,
        };
        let x = vec![0.5f32; batch * g.in_len()];
        let w = vec![0.1f32; cout * cin * 9];
        let dy = vec![0.2f32; batch * g.out_len()];
        let want_dx = cin != 3;
        let fwd = time(5, || {
            std::hint::black_box(conv::forward(&g, &x, &w));
        });
        let bwd = time(5, || {
            let input = if want_dx {
                conv::InputGradient::Plain
            } else {
                conv::InputGradient::Skip
            };
            std::hint::black_box(conv::backward(
                &g,
                &x,
                &w,
                OutputGradient::Given(&dy),
                input,
                true,
            ));
        });
        let dw = time(5, || {
            std::hint::black_box(conv::backward(
                &g,
                &x,
                &w,
                OutputGradient::Given(&dy),
                conv::InputGradient::Skip,
                true,
            ));
        });
        let flops = 2.0 * (batch * g.out_len() * cin * 9) as f64;
        let bwd_flops = flops * if want_dx { 2.0 } else { 1.0 };
        println!(
            "conv {cin:>2}->{cout:<2} {side:>2}px s{stride} x{count}   {:>7.2}  {:>7.2}  {:>8.1}  {:>8.1}  {:>6.2}  {:>7.1}",
            fwd * 1e3,
            bwd * 1e3,
            flops / fwd / 1e9,
            bwd_flops / bwd / 1e9,
            dw * 1e3,
            flops / dw / 1e9
        );
        totals[0] += fwd * count as f64;
        totals[1] += bwd * count as f64;
    }
    // (channels, side, how many BatchNorms in ResNet-20, of which with residual)
    for (channels, side, count, residual) in [(16, 32, 7, 3), (32, 16, 6, 3), (64, 8, 6, 3)] {
        let s = NormShape {
            batch,
            channels,
            plane: side * side,
        };
        let n = batch * channels * side * side;
        let x: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.1).collect();
        let r = vec![0.1f32; n];
        let (gamma, beta) = (vec![1.0f32; channels], vec![0.0f32; channels]);
        // The block-ending BatchNorm (residual, ReLU) and the others (ReLU only).
        let mut times = [[0.0; 2]; 2];
        for (variant, residual_in) in [None, Some(&r[..])].into_iter().enumerate() {
            times[variant][0] = time(5, || {
                std::hint::black_box(batch_norm::forward(
                    s,
                    &x,
                    &gamma,
                    &beta,
                    residual_in,
                    true,
                    1e-5,
                ));
            });
            let (y, stats) = batch_norm::forward(s, &x, &gamma, &beta, residual_in, true, 1e-5);
            let (scale, shift) = batch_norm::affine(&gamma, &beta, &stats, 1e-5);
            let gate = match residual_in {
                Some(_) => ReluGate::Output(&y),
                None => ReluGate::Affine {
                    scale: &scale,
                    shift: &shift,
                },
            };
            times[variant][1] = time(5, || {
                std::hint::black_box(batch_norm::backward(
                    s,
                    &x,
                    &r,
                    gate,
                    &gamma,
                    &stats,
                    residual_in.is_some(),
                    1e-5,
                ));
            });
        }
        let plain = (count - residual) as f64;
        let fwd = (plain * times[0][0] + residual as f64 * times[1][0]) / count as f64;
        let bwd = (plain * times[0][1] + residual as f64 * times[1][1]) / count as f64;
        println!(
            "bn {channels:>2}ch {side:>2}px x{count} ({residual} +res)   {:>7.2}  {:>7.2}",
            fwd * 1e3,
            bwd * 1e3
        );
        totals[2] += fwd * count as f64;
        totals[3] += bwd * count as f64;
    }
    println!(
        "ResNet-20 totals (ms): conv fwd {:.1}, conv bwd {:.1}, bn fwd {:.1}, bn bwd {:.1}; sum {:.1}",
        totals[0] * 1e3,
        totals[1] * 1e3,
        totals[2] * 1e3,
        totals[3] * 1e3,
        totals.iter().sum::<f64>() * 1e3
    );
}
