//! Training-mode BatchNorm on NCHW `f32` slices, fused with what follows it in a ResNet: an
//! optional residual addition and an optional ReLU. Forward is two passes over the input
//! (statistics per channel, then the affine map per image); backward is two passes (two sums per
//! channel, then the input gradient per image). burn's generic formulation instead transposes the
//! input to reduce it and runs about a dozen element-wise tensor ops, each with its own buffer.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::REDUCTION_CHUNK;
use super::buffer::{filled, filled_pair};

/// Layout of a BatchNorm input `[batch, channels, plane]` (plane = h·w).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormShape {
    pub batch: usize,
    pub channels: usize,
    pub plane: usize,
}

impl NormShape {
    fn len(&self) -> usize {
        self.batch * self.channels * self.plane
    }

    /// Values each channel is normalized over, `batch · plane`.
    fn count(&self) -> f64 {
        (self.batch * self.plane) as f64
    }

    fn image(&self) -> usize {
        self.channels * self.plane
    }

    /// Per-channel `(Σ a, Σ b)` where `run(n, c, scratch)` gives the two sums over image `n`,
    /// channel `c` (with a `plane`-long scratch buffer of its task). Chunks of whole images are
    /// summed in parallel (streaming through memory) and added in a fixed order.
    fn channel_sums(
        &self,
        run: impl Fn(usize, usize, &mut Vec<f32>) -> (f64, f64) + Sync,
    ) -> Vec<(f64, f64)> {
        let per = REDUCTION_CHUNK;
        let partials: Vec<Vec<(f64, f64)>> = (0..self.batch.div_ceil(per))
            .into_par_iter()
            .map(|task| {
                let mut sums = vec![(0.0, 0.0); self.channels];
                let mut scratch = Vec::with_capacity(self.plane);
                for n in task * per..((task + 1) * per).min(self.batch) {
                    for (c, sum) in sums.iter_mut().enumerate() {
                        let (a, b) = run(n, c, &mut scratch);
                        sum.0 += a;
                        sum.1 += b;
                    }
                }
                sums
            })
            .collect();
        let mut total = vec![(0.0, 0.0); self.channels];
        for part in partials {
            for (t, p) in total.iter_mut().zip(part) {
                t.0 += p.0;
                t.1 += p.1;
            }
        }
        total
    }

    /// Image `n`, channel `c` of `data`: `plane` values.
    fn run<'a>(&self, data: &'a [f32], n: usize, c: usize) -> &'a [f32] {
        &data[(n * self.channels + c) * self.plane..][..self.plane]
    }
}

/// Batch statistics: per-channel mean and biased variance (what BatchNorm normalizes with and
/// what its running statistics are fed).
pub struct Stats {
    pub mean: Vec<f32>,
    pub variance: Vec<f32>,
}

/// SIMD width the reductions are written for: eight independent partial sums per quantity, so
/// the compiler can vectorize them (a single running float sum cannot be reordered).
const LANES: usize = 8;

/// `(Σ fa(i), Σ fb(i))` over `i in 0..len`, in `LANES` partial sums, accumulated in f64 at the end.
#[inline(always)]
fn sum2(len: usize, f: impl Fn(usize) -> (f32, f32)) -> (f64, f64) {
    let (mut a, mut b) = ([0.0f32; LANES], [0.0f32; LANES]);
    let body = len / LANES * LANES;
    for i in (0..body).step_by(LANES) {
        for l in 0..LANES {
            let (fa, fb) = f(i + l);
            a[l] += fa;
            b[l] += fb;
        }
    }
    for i in body..len {
        let (fa, fb) = f(i);
        a[0] += fa;
        b[0] += fb;
    }
    let total = |v: [f32; LANES]| v.iter().map(|&x| x as f64).sum::<f64>();
    (total(a), total(b))
}

fn statistics(s: NormShape, x: &[f32]) -> Stats {
    // Shifted sums (by the channel's first value) keep E[x²] − E[x]² accurate.
    let shift: Vec<f32> = (0..s.channels).map(|c| x[c * s.plane]).collect();
    let sums = s.channel_sums(|n, c, _| {
        let run = s.run(x, n, c);
        sum2(run.len(), |i| {
            let d = run[i] - shift[c];
            (d, d * d)
        })
    });
    let (mean, variance) = sums
        .iter()
        .zip(&shift)
        .map(|(&(sum, sum_sq), &shift)| {
            let mean = sum / s.count();
            let variance = (sum_sq / s.count() - mean * mean).max(0.0);
            ((mean + shift as f64) as f32, variance as f32)
        })
        .unzip();
    Stats { mean, variance }
}

fn inv_std(variance: f32, epsilon: f64) -> f32 {
    (1.0 / (variance as f64 + epsilon).sqrt()) as f32
}

/// Per-channel `(scale, shift)` of the normalization's affine map, `y = x·scale + shift`.
pub fn affine(gamma: &[f32], beta: &[f32], stats: &Stats, epsilon: f64) -> (Vec<f32>, Vec<f32>) {
    (0..gamma.len())
        .map(|c| {
            let scale = gamma[c] * inv_std(stats.variance[c], epsilon);
            (scale, beta[c] - stats.mean[c] * scale)
        })
        .unzip()
}

/// Where the backward pass learns which outputs the ReLU let through.
#[derive(Debug, Clone, Copy)]
pub enum ReluGate<'a> {
    /// No ReLU: every gradient passes.
    Open,
    /// Where the forward output `y` is positive (needed when a residual was added before the
    /// ReLU).
    Output(&'a [f32]),
    /// Where the affine map `x·scale + shift` (from [`affine`], bit-identical to the forward's)
    /// is positive: no residual, so the input decides, and `y` need not be read.
    Affine { scale: &'a [f32], shift: &'a [f32] },
}

impl ReluGate<'_> {
    /// Run `(n, c)` of `dy` with the ReLU applied: `dy` where the gate is open, 0 elsewhere.
    /// Borrowed as is without a ReLU; written into `scratch` otherwise.
    #[inline]
    fn apply<'b>(
        &self,
        s: NormShape,
        x: &[f32],
        dy: &'b [f32],
        (n, c): (usize, usize),
        scratch: &'b mut Vec<f32>,
    ) -> &'b [f32] {
        let g = s.run(dy, n, c);
        scratch.resize(g.len(), 0.0);
        let out = &mut scratch[..g.len()];
        match *self {
            ReluGate::Open => return g,
            ReluGate::Output(y) => {
                for ((o, &g), &y) in out.iter_mut().zip(g).zip(s.run(y, n, c)) {
                    *o = if y > 0.0 { g } else { 0.0 };
                }
            }
            ReluGate::Affine { scale, shift } => {
                let (a, b) = (scale[c], shift[c]);
                for ((o, &g), &x) in out.iter_mut().zip(g).zip(s.run(x, n, c)) {
                    *o = if x * a + b > 0.0 { g } else { 0.0 };
                }
            }
        }
        out
    }
}

/// `y = epilogue(γ·(x − mean)/√(var + ε) + β)` with the batch's own statistics.
///
/// # Shapes
/// - `x`, `residual`, returned `y`: `[batch, channels, plane]`
/// - `gamma`, `beta`, returned statistics: `[channels]`
pub fn forward(
    s: NormShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    residual: Option<&[f32]>,
    relu: bool,
    epsilon: f64,
) -> (Vec<f32>, Stats) {
    assert_eq!(x.len(), s.len(), "batch norm: input length");
    assert!(
        residual.is_none_or(|r| r.len() == s.len()),
        "batch norm: residual length"
    );
    let stats = statistics(s, x);
    let (scale, shift) = affine(gamma, beta, &stats, epsilon);

    let image = s.image();
    let floor = if relu { 0.0 } else { f32::NEG_INFINITY };
    let fill = |y: &mut [MaybeUninit<f32>]| {
        y.par_chunks_mut(image).enumerate().for_each(|(n, yn)| {
            let xn = &x[n * image..][..image];
            let rn = residual.map(|r| &r[n * image..][..image]);
            for c in 0..s.channels {
                let range = c * s.plane..(c + 1) * s.plane;
                let (yc, xc) = (&mut yn[range.clone()], &xn[range.clone()]);
                let (a, b) = (scale[c], shift[c]);
                match rn {
                    Some(r) => {
                        for ((y, &x), &r) in yc.iter_mut().zip(xc).zip(&r[range]) {
                            y.write((x * a + b + r).max(floor));
                        }
                    }
                    None => {
                        for (y, &x) in yc.iter_mut().zip(xc) {
                            y.write((x * a + b).max(floor));
                        }
                    }
                }
            }
        })
    };
    // SAFETY: every image `n` and channel `c` writes its whole `plane`-long range: all of `y`.
    let y = unsafe { filled(s.len(), fill) };
    (y, stats)
}

/// What [`backward`] returns.
pub struct Gradients {
    pub dx: Vec<f32>,
    /// The gradient reaching the residual input (present when the epilogue adds one).
    pub d_residual: Option<Vec<f32>>,
    pub dgamma: Vec<f32>,
    pub dbeta: Vec<f32>,
}

/// Gradients of [`forward`] given the output gradient `dy`; `gate` says where the ReLU (if
/// any) passed the gradient.
///
/// # Shapes
/// - `x`, `dy`, returned `dx` and `d_residual`: `[batch, channels, plane]`
/// - `gamma`, `stats`, returned `dgamma`, `dbeta`: `[channels]`
#[allow(clippy::too_many_arguments)]
pub fn backward(
    s: NormShape,
    x: &[f32],
    dy: &[f32],
    gate: ReluGate<'_>,
    gamma: &[f32],
    stats: &Stats,
    residual: bool,
    epsilon: f64,
) -> Gradients {
    assert!(
        x.len() == s.len() && dy.len() == s.len(),
        "batch norm backward: lengths"
    );
    // g = the gated dy: the gradient at the affine map's output (and at the residual).
    // Σ g and Σ g·(x − mean) per channel.
    let (dbeta, dgamma_raw): (Vec<f32>, Vec<f32>) = s
        .channel_sums(|n, c, scratch| {
            let (xr, gr) = (s.run(x, n, c), gate.apply(s, x, dy, (n, c), scratch));
            let mean = stats.mean[c];
            sum2(xr.len(), |i| (gr[i], gr[i] * (xr[i] - mean)))
        })
        .into_iter()
        .map(|(a, b)| (a as f32, b as f32))
        .unzip();

    // dx = γ·σ⁻¹·(g − Σg/M − x̂·Σ(g·x̂)/M), with x̂ = (x − mean)·σ⁻¹, written as k_g·g + k_x·(x − mean) + k_0.
    let m = s.count() as f32;
    let mut dgamma = vec![0.0; s.channels];
    let mut coefficients = Vec::with_capacity(s.channels);
    for c in 0..s.channels {
        let inv = inv_std(stats.variance[c], epsilon);
        dgamma[c] = dgamma_raw[c] * inv;
        let k_g = gamma[c] * inv;
        coefficients.push((
            k_g,
            -k_g * inv * dgamma[c] / m,
            -k_g * dbeta[c] / m,
            stats.mean[c],
        ));
    }

    let image = s.image();
    let fill = |dx: &mut [MaybeUninit<f32>], d_residual: Option<&mut [MaybeUninit<f32>]>| {
        let d_residual_runs: Vec<Option<&mut [MaybeUninit<f32>]>> = match d_residual {
            Some(d) => d.chunks_mut(image).map(Some).collect(),
            None => (0..s.batch).map(|_| None).collect(),
        };
        dx.par_chunks_mut(image)
            .zip(d_residual_runs)
            .enumerate()
            .for_each(|(n, (dxn, mut drn))| {
                let mut scratch = Vec::with_capacity(s.plane);
                for (c, &(k_g, k_x, k_0, mean)) in coefficients.iter().enumerate() {
                    let range = c * s.plane..(c + 1) * s.plane;
                    let g = gate.apply(s, x, dy, (n, c), &mut scratch);
                    let rows = dxn[range.clone()].iter_mut().zip(s.run(x, n, c)).zip(g);
                    match drn.as_deref_mut() {
                        Some(dr) => {
                            for (((dx, &x), &g), dr) in rows.zip(&mut dr[range]) {
                                dr.write(g);
                                dx.write(k_g * g + k_x * (x - mean) + k_0);
                            }
                        }
                        None => {
                            for ((dx, &x), &g) in rows {
                                dx.write(k_g * g + k_x * (x - mean) + k_0);
                            }
                        }
                    }
                }
            });
    };
    // SAFETY: every image and channel writes its whole range of `dx` (and of `d_residual`).
    let (dx, d_residual) = unsafe {
        if residual {
            let (dx, d_residual) = filled_pair(s.len(), |dx, dr| fill(dx, Some(dr)));
            (dx, Some(d_residual))
        } else {
            (filled(s.len(), |dx| fill(dx, None)), None)
        }
    };
    Gradients {
        dx,
        d_residual,
        dgamma,
        dbeta,
    }
}
