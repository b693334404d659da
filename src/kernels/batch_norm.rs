//! Training-mode BatchNorm on NCHW `f32` slices, fused with what follows it in a ResNet: an
//! optional residual addition and an optional ReLU. Forward is two passes over the input
//! (statistics per image and channel, merged in image order — gathered by the convolution before
//! the normalization as it writes each image, when the two run as one op — then the affine map
//! per image); backward is two passes (two sums per
//! channel, which also write out the residual's gradient; then the input gradient per image,
//! which an [`InputGradient`] makes on demand, e.g. inside the backward sweep of the convolution
//! before the normalization). burn's generic formulation instead transposes the
//! input to reduce it and runs about a dozen element-wise tensor ops, each with its own buffer.
//!
//! Each pass works one run (one image's plane of one channel) at a time, in a leaf function
//! compiled for AVX2 where the CPU has it ([`avx2_or_baseline!`]; the same bits either way).

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::REDUCTION_CHUNK;
use super::buffer::filled;
use super::vectorize::{Lanes8, avx2_or_baseline};

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

    /// Per-channel `(Σ a, Σ b)` where `run(n, c, out)` gives the two sums over image `n`, channel
    /// `c` (and writes that run of `store`, when given, as `out`). Chunks of whole images are
    /// summed in parallel (streaming through memory) and added in a fixed order.
    fn channel_sums(
        &self,
        store: Option<&mut [MaybeUninit<f32>]>,
        run: impl Fn(usize, usize, Option<&mut [MaybeUninit<f32>]>) -> (f64, f64) + Sync,
    ) -> Vec<(f64, f64)> {
        let per = REDUCTION_CHUNK;
        let tasks = self.batch.div_ceil(per);
        let stores: Vec<Option<&mut [MaybeUninit<f32>]>> = match store {
            Some(out) => out.chunks_mut(per * self.image()).map(Some).collect(),
            None => (0..tasks).map(|_| None).collect(),
        };
        let partials: Vec<Vec<(f64, f64)>> = stores
            .into_par_iter()
            .enumerate()
            .map(|(task, mut store)| {
                let mut sums = vec![(0.0, 0.0); self.channels];
                for n in task * per..((task + 1) * per).min(self.batch) {
                    for (c, sum) in sums.iter_mut().enumerate() {
                        let out = store.as_deref_mut().map(|out| {
                            &mut out[((n - task * per) * self.channels + c) * self.plane..]
                                [..self.plane]
                        });
                        let (a, b) = run(n, c, out);
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
#[derive(Debug, Clone)]
pub struct Stats {
    pub mean: Vec<f32>,
    pub variance: Vec<f32>,
}

/// SIMD width the reductions are written for: eight independent partial sums per quantity, so
/// the compiler can vectorize them (a single running float sum cannot be reordered).
const LANES: usize = 8;

/// `(Σ f(xᵢ, dᵢ, yᵢ).0, Σ f(xᵢ, dᵢ, yᵢ).1)` over `i` (equal lengths; pass any of them again for
/// an input `f` ignores): `LANES` partial sums, element `i` in lane `i mod LANES` (the tail past
/// the last full group in lane 0), added in f64 at the end.
///
/// # Safety
/// The CPU has `V`'s instruction set (see [`Lanes8::splat`]).
#[inline(always)]
unsafe fn lane_sums<V: Lanes8>(
    [x, d, y]: [&[f32]; 3],
    f: impl Fn(V, V, V) -> (V, V),
) -> (f64, f64) {
    let len = x.len();
    assert!(d.len() == len && y.len() == len, "lane sums: input lengths");
    fn groups<V: Lanes8>(v: &[f32]) -> impl Iterator<Item = V> + '_ {
        // SAFETY: `lane_sums`'s caller promised `V`'s instruction set.
        v.as_chunks::<LANES>()
            .0
            .iter()
            .map(|v| unsafe { V::load(v) })
    }
    // SAFETY (both `splat` calls): the caller promised `V`'s instruction set.
    let (mut a, mut b) = unsafe { (V::splat(0.0), V::splat(0.0)) };
    for ((xv, dv), yv) in groups(x).zip(groups(d)).zip(groups(y)) {
        let (fa, fb) = f(xv, dv, yv);
        a = a.add(fa);
        b = b.add(fb);
    }
    let (mut a, mut b) = (a.to_array(), b.to_array());
    for i in len / LANES * LANES..len {
        // The tail, element by element in lane 0 of all-equal lanes.
        // SAFETY: as above.
        let (fa, fb) = unsafe { f(V::splat(x[i]), V::splat(d[i]), V::splat(y[i])) };
        a[0] += fa.to_array()[0];
        b[0] += fb.to_array()[0];
    }
    let total = |v: [f32; LANES]| v.iter().map(|&x| x as f64).sum::<f64>();
    (total(a), total(b))
}

avx2_or_baseline! {
    /// `(Σ (v − shift), Σ (v − shift)²)` over one run.
    fn shifted_sums(run: &[f32], shift: f32) -> (f64, f64) {
        // SAFETY: `V` is this copy's lane type, whose instruction set the copy runs with.
        unsafe {
            let shift = V::splat(shift);
            lane_sums([run, run, run], |v: V, _, _| {
                let d = v.sub(shift);
                (d, d.mul(d))
            })
        }
    }
}

/// Batch statistics of `x`, its images' moments gathered in parallel.
fn statistics(s: NormShape, x: &[f32]) -> Stats {
    let moments = ImageMoments::new(s);
    x.par_chunks(s.image())
        .enumerate()
        .for_each(|(n, image)| moments.record(n, image));
    moments.statistics()
}

/// One channel's moments over one image: the mean and the sum of squared deviations from it.
#[derive(Debug, Clone, Copy)]
struct Moments {
    mean: f64,
    m2: f64,
}

/// The moments of a batch's images, recorded image by image in any order and from any thread
/// (e.g. by the convolution that produces the batch, while each image is in cache), merged in
/// image order into the batch statistics: the same bits however they were gathered.
pub struct ImageMoments {
    shape: NormShape,
    images: Vec<OnceLock<Vec<Moments>>>,
}

impl ImageMoments {
    pub fn new(s: NormShape) -> Self {
        assert!(
            s.channels > 0 && s.plane > 0,
            "batch norm statistics: empty images {s:?}"
        );
        ImageMoments {
            shape: s,
            images: (0..s.batch).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Records image `n` (`[channels, plane]`): one pass per channel, sums shifted by the
    /// image's first value in that channel (which keeps E[x²] − E[x]² accurate; a NaN in the
    /// run makes its `m2` 0 here, but its mean NaN, which the merge carries into both
    /// statistics).
    pub fn record(&self, n: usize, image: &[f32]) {
        let s = self.shape;
        assert!(
            n < s.batch && image.len() == s.image(),
            "batch norm statistics: image {n} of {}, {} values",
            s.batch,
            image.len()
        );
        let plane = s.plane as f64;
        let moments = image
            .chunks(s.plane)
            .map(|run| {
                let shift = run.first().copied().unwrap_or(0.0);
                let (sum, sum_sq) = shifted_sums(run, shift);
                Moments {
                    mean: shift as f64 + sum / plane,
                    m2: (sum_sq - sum * sum / plane).max(0.0),
                }
            })
            .collect();
        let first_time = self.images[n].set(moments).is_ok();
        assert!(
            first_time,
            "batch norm statistics: image {n} recorded twice"
        );
    }

    /// Per-channel mean and biased variance, the images' moments merged in image order (Chan,
    /// Golub and LeVeque's pairwise update, in f64).
    pub fn statistics(self) -> Stats {
        let s = self.shape;
        let mut total = vec![(0.0f64, 0.0f64); s.channels];
        for (n, image) in self.images.into_iter().enumerate() {
            let image = image
                .into_inner()
                .unwrap_or_else(|| panic!("batch norm statistics: image {n} never recorded"));
            let (before, plane) = ((n * s.plane) as f64, s.plane as f64);
            for ((mean, m2), m) in total.iter_mut().zip(image) {
                let delta = m.mean - *mean;
                let count = before + plane;
                *mean += delta * plane / count;
                *m2 += m.m2 + delta * delta * before * plane / count;
            }
        }
        let (mean, variance) = total
            .into_iter()
            .map(|(mean, m2)| (mean as f32, (m2 / s.count()) as f32))
            .unzip();
        Stats { mean, variance }
    }
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

impl<'a> ReluGate<'a> {
    /// The gate of run `(n, c)`.
    fn run(&self, s: NormShape, n: usize, c: usize) -> RunGate<'a> {
        match *self {
            ReluGate::Open => RunGate::Open,
            ReluGate::Output(y) => RunGate::Output(s.run(y, n, c)),
            ReluGate::Affine { scale, shift } => RunGate::Affine(scale[c], shift[c]),
        }
    }
}

/// [`ReluGate`] on one run (one image's plane of one channel).
#[derive(Debug, Clone, Copy)]
enum RunGate<'a> {
    Open,
    /// The run's forward outputs.
    Output(&'a [f32]),
    /// The channel's `(scale, shift)`.
    Affine(f32, f32),
}

/// `d` where `open`, else 0: the output gradient through the ReLU, element by element (the
/// reductions use [`Lanes8::where_positive`]). A bit mask rather than `if`, so that LLVM has no
/// branch to keep per element (which mispredicts on real activations).
#[inline(always)]
fn pass(open: bool, d: f32) -> f32 {
    f32::from_bits(d.to_bits() & u32::from(open).wrapping_neg())
}

avx2_or_baseline! {
    /// `(Σ g, Σ g·(x − mean))` over one run, `g` the gated output gradient; with `store`, `g`
    /// is also written there (the gradient reaching a residual), then summed from it.
    fn gated_sums(
        x: &[f32],
        dy: &[f32],
        gate: RunGate<'_>,
        mean: f32,
        store: Option<&mut [MaybeUninit<f32>]>,
    ) -> (f64, f64) {
        let gated: &[f32];
        let (dy, gate) = match store {
            Some(out) => {
                gated = gate_run(out, x, dy, gate);
                (gated, RunGate::Open)
            }
            None => (dy, gate),
        };
        // One loop per gate, so that no loop tests the gate's kind per element.
        // SAFETY: `V` is this copy's lane type, whose instruction set the copy runs with.
        unsafe {
            let mean = V::splat(mean);
            match gate {
                RunGate::Open => lane_sums([x, dy, dy], |x: V, d, _| (d, d.mul(x.sub(mean)))),
                RunGate::Output(y) => lane_sums([x, dy, y], |x: V, d, y| {
                    let g = d.where_positive(y);
                    (g, g.mul(x.sub(mean)))
                }),
                RunGate::Affine(a, b) => {
                    let (a, b) = (V::splat(a), V::splat(b));
                    lane_sums([x, dy, dy], |x: V, d, _| {
                        let g = d.where_positive(x.mul(a).add(b));
                        (g, g.mul(x.sub(mean)))
                    })
                }
            }
        }
    }
}

/// `out = g`, the run's output gradient `dy` through `gate` (bit for bit what the reductions'
/// [`Lanes8::where_positive`] passes); returns `out`, initialized.
#[inline(always)]
fn gate_run<'o>(
    out: &'o mut [MaybeUninit<f32>],
    x: &[f32],
    dy: &[f32],
    gate: RunGate<'_>,
) -> &'o [f32] {
    assert!(
        out.len() == dy.len() && x.len() == dy.len(),
        "batch norm: gate lengths"
    );
    match gate {
        RunGate::Open => {
            for (o, &d) in out.iter_mut().zip(dy) {
                o.write(d);
            }
        }
        RunGate::Output(y) => {
            assert_eq!(y.len(), dy.len(), "batch norm: gate lengths");
            for ((o, &d), &y) in out.iter_mut().zip(dy).zip(y) {
                o.write(pass(y > 0.0, d));
            }
        }
        RunGate::Affine(a, b) => {
            for ((o, &d), &x) in out.iter_mut().zip(dy).zip(x) {
                o.write(pass(x * a + b > 0.0, d));
            }
        }
    }
    // SAFETY: every element was just written.
    unsafe { std::slice::from_raw_parts(out.as_ptr().cast(), out.len()) }
}

avx2_or_baseline! {
    /// One run of the affine map and epilogue: `y = max(x·a + b (+ r), floor)`.
    fn affine_run(
        y: &mut [MaybeUninit<f32>],
        x: &[f32],
        residual: Option<&[f32]>,
        affine: (f32, f32),
        floor: f32,
    ) {
        let (a, b) = affine;
        match residual {
            Some(r) => {
                for ((y, &x), &r) in y.iter_mut().zip(x).zip(r) {
                    y.write((x * a + b + r).max(floor));
                }
            }
            None => {
                for (y, &x) in y.iter_mut().zip(x) {
                    y.write((x * a + b).max(floor));
                }
            }
        }
    }
}

/// The per-channel coefficients of the input gradient: `dx = k_g·g + k_x·(x − mean) + k_0`.
#[derive(Debug, Clone, Copy)]
struct DxCoefficients {
    k_g: f32,
    k_x: f32,
    k_0: f32,
    mean: f32,
}

avx2_or_baseline! {
    /// One run of the input gradient, `dx = k_g·g + k_x·(x − mean) + k_0` with `g = gate(dy)`.
    fn input_gradient_run(
        dx: &mut [MaybeUninit<f32>],
        x_dy: (&[f32], &[f32]),
        gate: RunGate<'_>,
        k: DxCoefficients,
    ) {
        let (x, dy) = x_dy;
        // One loop per gate (see `gated_sums`); `dy` stands in for the outputs the gate ignores.
        match gate {
            RunGate::Open => dx_loop(dx, [x, dy, dy], k, |_, d, _| d),
            RunGate::Output(y) => dx_loop(dx, [x, dy, y], k, |_, d, y| pass(y > 0.0, d)),
            RunGate::Affine(a, b) => {
                dx_loop(dx, [x, dy, dy], k, |x, d, _| pass(x * a + b > 0.0, d))
            }
        }
    }
}

/// The loop of [`input_gradient_run`] for one gate, `g = gate(x, d, y)` from the inputs
/// `[x, dy, y]`.
#[inline(always)]
fn dx_loop(
    dx: &mut [MaybeUninit<f32>],
    [x, dy, y]: [&[f32]; 3],
    k: DxCoefficients,
    gate: impl Fn(f32, f32, f32) -> f32,
) {
    assert!(
        x.len() == dx.len() && dy.len() == dx.len() && y.len() == dx.len(),
        "batch norm backward: run lengths"
    );
    for (((dx, &x), &d), &y) in dx.iter_mut().zip(x).zip(dy).zip(y) {
        dx.write(k.k_g * gate(x, d, y) + k.k_x * (x - k.mean) + k.k_0);
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
    let y = normalize(s, x, gamma, beta, residual, relu, &stats, epsilon);
    (y, stats)
}

/// [`forward`] with the batch statistics already known (e.g. [`ImageMoments`] gathered by the
/// convolution that produced `x`): the affine map and its epilogue.
///
/// # Shapes
/// - as [`forward`]
#[allow(clippy::too_many_arguments)]
pub fn normalize(
    s: NormShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    residual: Option<&[f32]>,
    relu: bool,
    stats: &Stats,
    epsilon: f64,
) -> Vec<f32> {
    assert_eq!(x.len(), s.len(), "batch norm: input length");
    assert!(
        residual.is_none_or(|r| r.len() == s.len()),
        "batch norm: residual length"
    );
    assert!(
        gamma.len() == s.channels
            && beta.len() == s.channels
            && stats.mean.len() == s.channels
            && stats.variance.len() == s.channels,
        "batch norm: {} channels, parameters or statistics of another length",
        s.channels
    );
    let (scale, shift) = affine(gamma, beta, stats, epsilon);

    let image = s.image();
    let floor = if relu { 0.0 } else { f32::NEG_INFINITY };
    let fill = |y: &mut [MaybeUninit<f32>]| {
        y.par_chunks_mut(image).enumerate().for_each(|(n, yn)| {
            let xn = &x[n * image..][..image];
            let rn = residual.map(|r| &r[n * image..][..image]);
            for c in 0..s.channels {
                let range = c * s.plane..(c + 1) * s.plane;
                let (yc, xc) = (&mut yn[range.clone()], &xn[range.clone()]);
                let rc = rn.map(|r| &r[range]);
                affine_run(yc, xc, rc, (scale[c], shift[c]), floor);
            }
        })
    };
    // SAFETY: every image `n` and channel `c` writes its whole `plane`-long range: all of `y`.
    unsafe { filled(s.len(), fill) }
}

/// What [`backward`] returns.
pub struct Gradients {
    pub dx: Vec<f32>,
    /// The gradient reaching the residual input (present when the epilogue adds one).
    pub d_residual: Option<Vec<f32>>,
    pub dgamma: Vec<f32>,
    pub dbeta: Vec<f32>,
}

/// The backward pass's first half ([`backward_sums`]): everything but the input gradient, and
/// what the input gradient needs ([`InputGradient`]).
pub struct Sums {
    coefficients: Vec<DxCoefficients>,
    pub dgamma: Vec<f32>,
    pub dbeta: Vec<f32>,
    /// The gated output gradient, which is the residual's gradient (present when the epilogue
    /// adds one).
    pub d_residual: Option<Vec<f32>>,
}

/// The first pass of [`backward`]: two sums per channel over the gated output gradient `g`
/// (and `g` itself, written out when `residual`: the residual's gradient).
///
/// # Shapes
/// - `x`, `dy`, returned `d_residual`: `[batch, channels, plane]`
/// - `gamma`, `stats`, returned `dgamma`, `dbeta`: `[channels]`
#[allow(clippy::too_many_arguments)]
pub fn backward_sums(
    s: NormShape,
    x: &[f32],
    dy: &[f32],
    gate: ReluGate<'_>,
    gamma: &[f32],
    stats: &Stats,
    residual: bool,
    epsilon: f64,
) -> Sums {
    assert!(
        x.len() == s.len() && dy.len() == s.len(),
        "batch norm backward: lengths"
    );
    // g = the gated dy: the gradient at the affine map's output (and at the residual).
    // Σ g and Σ g·(x − mean) per channel.
    let sums_of = |store: Option<&mut [MaybeUninit<f32>]>| {
        s.channel_sums(store, |n, c, out| {
            let (xr, dyr) = (s.run(x, n, c), s.run(dy, n, c));
            gated_sums(xr, dyr, gate.run(s, n, c), stats.mean[c], out)
        })
    };
    let (sums, d_residual) = if residual {
        let mut sums = Vec::new();
        // SAFETY: every image and channel writes its whole run of `g`.
        let g = unsafe { filled(s.len(), |g| sums = sums_of(Some(g))) };
        (sums, Some(g))
    } else {
        (sums_of(None), None)
    };
    let (dbeta, dgamma_raw): (Vec<f32>, Vec<f32>) =
        sums.into_iter().map(|(a, b)| (a as f32, b as f32)).unzip();

    // dx = γ·σ⁻¹·(g − Σg/M − x̂·Σ(g·x̂)/M), with x̂ = (x − mean)·σ⁻¹, written as k_g·g + k_x·(x − mean) + k_0.
    let m = s.count() as f32;
    let mut dgamma = vec![0.0; s.channels];
    let mut coefficients = Vec::with_capacity(s.channels);
    for c in 0..s.channels {
        let inv = inv_std(stats.variance[c], epsilon);
        dgamma[c] = dgamma_raw[c] * inv;
        let k_g = gamma[c] * inv;
        coefficients.push(DxCoefficients {
            k_g,
            k_x: -k_g * inv * dgamma[c] / m,
            k_0: -k_g * dbeta[c] / m,
            mean: stats.mean[c],
        });
    }
    Sums {
        coefficients,
        dgamma,
        dbeta,
        d_residual,
    }
}

/// BatchNorm's input gradient, the backward pass's second half, computed image by image on
/// demand: inside the backward sweep of the convolution whose output the normalization read,
/// it is made one image at a time in cache and never goes through memory whole.
#[derive(Clone, Copy)]
pub struct InputGradient<'a> {
    shape: NormShape,
    x: &'a [f32],
    /// The output gradient, or the gated one (`g`) when it was written out.
    d: &'a [f32],
    gate: ReluGate<'a>,
    coefficients: &'a [DxCoefficients],
}

impl<'a> InputGradient<'a> {
    /// The input gradient of [`backward_sums`]'s pass, with its arguments `s`, `x`, `dy` and
    /// `gate`. When the sums wrote the gated gradient out (`residual`), it reads that instead,
    /// and `dy` and `gate` may be left out (`None`, [`ReluGate::Open`]).
    pub fn new(
        s: NormShape,
        x: &'a [f32],
        dy: Option<&'a [f32]>,
        gate: ReluGate<'a>,
        sums: &'a Sums,
    ) -> Self {
        // With `g` written out, read it (already gated) instead of `dy` and the gate's input.
        let (d, gate) = match (&sums.d_residual, dy) {
            (Some(g), _) => (&g[..], ReluGate::Open),
            (None, Some(dy)) => (dy, gate),
            (None, None) => panic!("batch norm input gradient: no output gradient"),
        };
        assert!(
            x.len() == s.len() && d.len() == s.len() && sums.coefficients.len() == s.channels,
            "batch norm input gradient: lengths"
        );
        InputGradient {
            shape: s,
            x,
            d,
            gate,
            coefficients: &sums.coefficients,
        }
    }

    pub fn batch(&self) -> usize {
        self.shape.batch
    }

    /// Floats per image, `channels · plane`.
    pub fn image_len(&self) -> usize {
        self.shape.image()
    }

    /// Image `n` of the input gradient into `dx` (all `image_len` elements written).
    pub fn image(&self, n: usize, dx: &mut [MaybeUninit<f32>]) {
        let s = self.shape;
        assert!(
            n < s.batch && dx.len() == s.image(),
            "batch norm input gradient: image {n} of {} into {} floats",
            s.batch,
            dx.len()
        );
        for (c, &k) in self.coefficients.iter().enumerate() {
            input_gradient_run(
                &mut dx[c * s.plane..][..s.plane],
                (s.run(self.x, n, c), s.run(self.d, n, c)),
                self.gate.run(s, n, c),
                k,
            );
        }
    }

    /// The whole input gradient, `[batch, channels, plane]`, images in parallel.
    pub fn whole(&self) -> Vec<f32> {
        let fill = |dx: &mut [MaybeUninit<f32>]| {
            dx.par_chunks_mut(self.image_len())
                .enumerate()
                .for_each(|(n, dxn)| self.image(n, dxn));
        };
        // SAFETY: `image` writes each image whole.
        unsafe { filled(self.shape.len(), fill) }
    }
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
    let sums = backward_sums(s, x, dy, gate, gamma, stats, residual, epsilon);
    let dx = InputGradient::new(s, x, Some(dy), gate, &sums).whole();
    Gradients {
        dx,
        d_residual: sums.d_residual,
        dgamma: sums.dgamma,
        dbeta: sums.dbeta,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::values;

    fn init(slots: &[MaybeUninit<f32>]) -> Vec<f32> {
        // SAFETY: the leaves write every slot they are given.
        slots.iter().map(|v| unsafe { v.assume_init() }).collect()
    }

    /// The statistics merged from the images' moments: the same bits whatever order the images
    /// are recorded in, and close to the f64 definition even far from zero (where E[x²] − E[x]²
    /// without shifts would lose every digit of the variance).
    #[test]
    fn image_moments_give_accurate_statistics_in_any_recording_order() {
        let s = NormShape {
            batch: 5,
            channels: 3,
            plane: 37,
        };
        let x: Vec<f32> = values(s.len(), 7)
            .iter()
            .enumerate()
            .map(|(i, v)| 1000.0 * (1 + (i / s.plane) % s.channels) as f32 + v)
            .collect();
        let gather = |order: &mut dyn Iterator<Item = usize>| {
            let moments = ImageMoments::new(s);
            for n in order {
                moments.record(n, &x[n * s.image()..][..s.image()]);
            }
            moments.statistics()
        };
        let (forward, backward) = (gather(&mut (0..s.batch)), gather(&mut (0..s.batch).rev()));
        assert_eq!(
            (&forward.mean, &forward.variance),
            (&backward.mean, &backward.variance)
        );
        for c in 0..s.channels {
            let run: Vec<f64> = (0..s.batch)
                .flat_map(|n| s.run(&x, n, c).iter().map(|&v| v as f64))
                .collect();
            let mean = run.iter().sum::<f64>() / run.len() as f64;
            let variance = run.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / run.len() as f64;
            assert!(
                (forward.mean[c] as f64 - mean).abs() < 1e-4 * mean.abs(),
                "mean {c}"
            );
            assert!(
                (forward.variance[c] as f64 - variance).abs() < 1e-5 * variance,
                "variance {c}: {} against {variance}",
                forward.variance[c]
            );
        }
        // Every image must be recorded.
        let missing = ImageMoments::new(s);
        missing.record(0, &x[..s.image()]);
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| missing.statistics()));
        assert!(result.is_err(), "statistics with images missing");
    }

    /// Each pass's AVX2 copy gives the bits of its baseline copy (which `portable` runs), on
    /// runs with and without a tail past the last group of lanes, for every gate and epilogue.
    /// On a CPU without AVX2 + FMA the AVX2 copies must never be chosen.
    #[test]
    fn avx2_passes_give_the_baseline_bits() {
        let features = super::super::cpu::cpu().features;
        if !super::super::cpu::KernelPath::Avx2.supported(features) {
            assert!(!super::super::cpu::avx2_passes());
            return;
        }
        for len in [0, 1, 7, 8, 9, 23, 64, 70] {
            let (x, dy, y, r) = (
                values(len, 1),
                values(len, 2),
                values(len, 3),
                values(len, 4),
            );
            // SAFETY (every `avx2` call): the CPU has AVX2 and FMA (checked above).
            assert_eq!(shifted_sums::baseline(&x, 0.3), unsafe {
                shifted_sums::avx2(&x, 0.3)
            });
            for gate in [
                RunGate::Open,
                RunGate::Output(&y),
                RunGate::Affine(0.7, -0.2),
            ] {
                for store in [false, true] {
                    let run = |avx2: bool| {
                        let mut g = vec![MaybeUninit::uninit(); len];
                        let out = store.then_some(&mut g[..]);
                        let sums = if avx2 {
                            unsafe { gated_sums::avx2(&x, &dy, gate, 0.1, out) }
                        } else {
                            gated_sums::baseline(&x, &dy, gate, 0.1, out)
                        };
                        (sums, store.then(|| init(&g)))
                    };
                    let (sums, g) = run(false);
                    assert_eq!((sums, g.clone()), run(true), "sums, {gate:?}, {store}");
                    // Written out, `g` is the gated `dy` and the sums are those of the gate
                    // applied on the fly.
                    if let Some(g) = g {
                        let on_the_fly = gated_sums::baseline(&x, &dy, gate, 0.1, None);
                        assert_eq!(sums, on_the_fly, "sums with g stored, {gate:?}");
                        let open = gated_sums::baseline(&x, &g, RunGate::Open, 0.1, None);
                        assert_eq!(open, on_the_fly, "sums of the stored g, {gate:?}");
                    }
                }
                let k = DxCoefficients {
                    k_g: 1.3,
                    k_x: -0.4,
                    k_0: 0.05,
                    mean: 0.2,
                };
                let run = |avx2: bool| {
                    let mut dx = vec![MaybeUninit::uninit(); len];
                    if avx2 {
                        unsafe { input_gradient_run::avx2(&mut dx, (&x, &dy), gate, k) }
                    } else {
                        input_gradient_run::baseline(&mut dx, (&x, &dy), gate, k)
                    }
                    init(&dx)
                };
                assert_eq!(run(false), run(true), "dx, {gate:?}");
            }
            for (residual, floor) in [(None, 0.0), (Some(&r[..]), f32::NEG_INFINITY)] {
                let run = |avx2: bool| {
                    let mut out = vec![MaybeUninit::uninit(); len];
                    if avx2 {
                        unsafe { affine_run::avx2(&mut out, &x, residual, (1.1, -0.3), floor) }
                    } else {
                        affine_run::baseline(&mut out, &x, residual, (1.1, -0.3), floor)
                    }
                    init(&out)
                };
                assert_eq!(
                    run(false),
                    run(true),
                    "affine, residual {}",
                    residual.is_some()
                );
            }
        }
    }
}
