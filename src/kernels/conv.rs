//! 2-D convolution on NCHW `f32` slices: forward, input gradient and weight gradient, and the
//! dispatch between the two ways to compute them.
//!
//! - Stride-1 "same" convolutions and ResNet's stride-2 ones (3×3, padding 1, even sides) go to
//!   the direct kernel ([`super::direct`]) on CPUs with AVX2 or AVX-512: the forward pass, the
//!   input gradient (at stride 1 the forward pass of the adjoint, computed in one sweep with
//!   the weight gradient) and the weight gradient (at stride 2 on output planes at least 16
//!   wide).
//! - Everything else (other geometries, stride-2 weight gradients of narrower outputs, and every
//!   convolution on the portable path) is lowered here to a patch matrix (im2col, `[in·k·k, out_h·out_w]`)
//!   and multiplied with the weights as one GEMM per image; the weight gradient is the direct
//!   product `dW = dY · colᵀ`.
//!
//! Forward and input gradient split the batch into tasks of at most four images (so a thread the
//! machine delays holds back little), with scratch buffers per rayon job; the weight gradient
//! sums fixed chunks of images
//! (`REDUCTION_CHUNK`) so its result does not depend on the thread count. burn-flex instead
//! converts every input to NHWC, flattens the weights on one thread, and computes the weight
//! gradient as a convolution with the output gradient as its kernel (a 9× larger im2col and a
//! skinny GEMM).

use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::buffer::{add_in_place, add_onto, filled, zeroed};
use super::direct;
use super::gemm::{MatRef, matmul, matmul_uninit};
use super::output_gradient::OutputGradient;
use super::{REDUCTION_CHUNK, sum_in_order};

// The geometry lives in its own leaf module (shared with `direct`); re-exported here so
// `kernels::conv::ConvGeometry` keeps working.
pub use super::geometry::ConvGeometry;

// The im2col layout of a geometry: this module's own (the shape helpers are in `geometry`).
impl ConvGeometry {
    /// Distance between rows of an im2col patch matrix: the plane plus one cache line. A plane
    /// of 32×32 floats is 4 KiB, so unpadded rows would all map to the same cache sets, and the
    /// GEMM, which walks down the rows, would keep evicting its own operand (a stage-1
    /// convolution of ResNet-20, batch 128: forward 5.7 → 4.5 ms, `examples/kernel_times`).
    fn col_stride(&self) -> usize {
        self.out_plane() + 16
    }

    /// The patch matrix of an im2col scratch buffer (see [`ConvGeometry::col_stride`]).
    fn col_matrix<'a>(&self, col: &'a [f32]) -> MatRef<'a> {
        MatRef {
            data: col,
            rows: self.patch_len(),
            cols: self.out_plane(),
            row_stride: self.col_stride(),
            col_stride: 1,
        }
    }

    /// An im2col scratch buffer.
    fn col_buffer(&self) -> Vec<f32> {
        vec![0.0; self.patch_len() * self.col_stride()]
    }

    /// Output columns `[lo, hi)` whose input column `ow·stride + kj − padding` lies inside the image.
    fn valid_columns(&self, kj: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        let lo = if kj >= p { 0 } else { (p - kj).div_ceil(s) };
        let hi = if self.width + p > kj {
            ((self.width + p - kj - 1) / s + 1).min(self.out_width())
        } else {
            0
        };
        (lo, hi.max(lo))
    }

    /// Calls `f(patch_row, channel, in_row, out_row, lo, hi)` for every stretch of output columns
    /// `[lo, hi)` of one output row that reads real (not padding) input; the input column of
    /// output column `ow` is `ow·stride + kj − padding`, with `kj = patch_row % kernel`.
    fn for_each_stretch(&self, mut f: impl FnMut(usize, usize, usize, usize, usize, usize)) {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        for c in 0..self.in_channels {
            for ki in 0..k {
                for kj in 0..k {
                    let row = (c * k + ki) * k + kj;
                    let (lo, hi) = self.valid_columns(kj);
                    for oh in 0..self.out_height() {
                        let ih = oh * s + ki;
                        if ih >= p && ih - p < self.height && lo < hi {
                            f(row, c, ih - p, oh, lo, hi);
                        }
                    }
                }
            }
        }
    }
}

/// One patch-matrix row of an *aligned* convolution: an `h × w` source plane read shifted by
/// `(dy, dx)`, zero where the shifted position leaves the plane. In the flattened plane that is
/// one contiguous copy at `offset = dy·w + dx`, after which the `|dx|` columns that wrapped
/// around a row edge are zeroed.
struct Shift {
    offset: isize,
    /// Flattened destination positions `[lo, hi)` copied from the source.
    lo: usize,
    hi: usize,
    /// Columns of every destination row that wrapped around (relative to the row's start).
    wrapped: std::ops::Range<usize>,
    w: usize,
}

impl Shift {
    fn new(h: usize, w: usize, dy: isize, dx: isize) -> Self {
        let (hi_, wi) = (h as isize, w as isize);
        let offset = dy * wi + dx;
        let rows = ((-dy).max(0) * wi)..((hi_ - dy).min(hi_) * wi);
        // Keep the source index inside the plane (the first/last element may wrap past it).
        let lo = rows.start.max(-offset).clamp(0, hi_ * wi) as usize;
        let hi = rows.end.min(hi_ * wi - offset).max(lo as isize) as usize;
        let dxu = dx.unsigned_abs().min(w);
        let wrapped = if dx < 0 { 0..dxu } else { w - dxu..w };
        Self {
            offset,
            lo,
            hi,
            wrapped,
            w,
        }
    }

    /// Zeroes the wrapped columns of the rows holding `[lo, hi)`.
    fn clear_wrapped(&self, row: &mut [f32]) {
        if self.lo >= self.hi || self.wrapped.is_empty() {
            return;
        }
        for start in (self.lo / self.w * self.w..self.hi).step_by(self.w) {
            row[start + self.wrapped.start..start + self.wrapped.end].fill(0.0);
        }
    }

    /// `row[i] = src[i + offset]` inside the plane, 0 elsewhere.
    fn copy(&self, src: &[f32], row: &mut [f32]) {
        let (lo, hi) = (self.lo, self.hi);
        row[..lo].fill(0.0);
        row[hi..].fill(0.0);
        if lo < hi {
            let from = (lo as isize + self.offset) as usize;
            row[lo..hi].copy_from_slice(&src[from..from + hi - lo]);
            self.clear_wrapped(row);
        }
    }

    /// The adjoint of [`Shift::copy`]: `dst[i + offset] += row[i]` inside the plane. Clobbers
    /// `row`'s wrapped columns.
    fn add(&self, row: &mut [f32], dst: &mut [f32]) {
        self.clear_wrapped(row);
        let (lo, hi) = (self.lo, self.hi);
        if lo >= hi {
            return;
        }
        let to = (lo as isize + self.offset) as usize;
        for (d, v) in dst[to..to + hi - lo].iter_mut().zip(&row[lo..hi]) {
            *d += v;
        }
    }
}

impl ConvGeometry {
    /// Output plane = input plane / stride exactly (`2·padding = kernel − 1` at stride 1; the
    /// 3×3, padding-1, stride-2 convolutions of a ResNet on even sides). Every patch-matrix row
    /// is then a [`Shift`] of one *phase plane* of a channel — the pixels `(s·i + qh, s·j + qw)`
    /// for a phase `(qh, qw)` — which at stride 1 is the channel itself.
    fn is_aligned(&self) -> bool {
        let s = self.stride;
        self.height.is_multiple_of(s)
            && self.width.is_multiple_of(s)
            && self.out_height() == self.height / s
            && self.out_width() == self.width / s
    }

    /// Phase and shift within the phase plane of patch-matrix row `(ki, kj)`.
    fn phase_shift(&self, ki: usize, kj: usize) -> ((usize, usize), Shift) {
        let (s, p) = (self.stride as isize, self.padding as isize);
        let (y, x) = (ki as isize - p, kj as isize - p);
        let phase = (y.rem_euclid(s) as usize, x.rem_euclid(s) as usize);
        let shift = Shift::new(
            self.out_height(),
            self.out_width(),
            y.div_euclid(s),
            x.div_euclid(s),
        );
        (phase, shift)
    }

    /// Copies each channel of `x` (`[in, h, w]`) into its `stride²` phase planes,
    /// `[in, stride, stride, out_h, out_w]`.
    fn split_phases(&self, x: &[f32], phases: &mut [f32]) {
        let (s, oh, ow) = (self.stride, self.out_height(), self.out_width());
        for (xc, pc) in x
            .chunks_exact(self.height * self.width)
            .zip(phases.chunks_exact_mut(s * s * oh * ow))
        {
            for (q, plane) in pc.chunks_exact_mut(oh * ow).enumerate() {
                let (qh, qw) = (q / s, q % s);
                for (i, out_row) in plane.chunks_exact_mut(ow).enumerate() {
                    let in_row = &xc[(i * s + qh) * self.width..][..self.width];
                    for (j, v) in out_row.iter_mut().enumerate() {
                        *v = in_row[j * s + qw];
                    }
                }
            }
        }
    }

    /// The adjoint of [`ConvGeometry::split_phases`]: adds the phase planes back onto `dx`.
    fn merge_phases(&self, phases: &[f32], dx: &mut [f32]) {
        let (s, oh, ow) = (self.stride, self.out_height(), self.out_width());
        for (dc, pc) in dx
            .chunks_exact_mut(self.height * self.width)
            .zip(phases.chunks_exact(s * s * oh * ow))
        {
            for (q, plane) in pc.chunks_exact(oh * ow).enumerate() {
                let (qh, qw) = (q / s, q % s);
                for (i, in_row) in plane.chunks_exact(ow).enumerate() {
                    let out_row = &mut dc[(i * s + qh) * self.width..][..self.width];
                    for (j, v) in in_row.iter().enumerate() {
                        out_row[j * s + qw] += v;
                    }
                }
            }
        }
    }
}

/// [`im2col`] for [`ConvGeometry::is_aligned`] convolutions; `phases` holds one image (written
/// whole when the stride is above 1, unused otherwise).
fn im2col_aligned(g: &ConvGeometry, x: &[f32], col: &mut [f32], phases: &mut [f32]) {
    let (k, s, plane, ld) = (g.kernel, g.stride, g.out_plane(), g.col_stride());
    let phases: &[f32] = if s == 1 {
        x
    } else {
        let phases = &mut phases[..x.len()];
        g.split_phases(x, phases);
        phases
    };
    for (c, pc) in phases.chunks_exact(s * s * plane).enumerate() {
        for ki in 0..k {
            for kj in 0..k {
                let ((qh, qw), shift) = g.phase_shift(ki, kj);
                let src = &pc[(qh * s + qw) * plane..][..plane];
                shift.copy(src, &mut col[((c * k + ki) * k + kj) * ld..][..plane]);
            }
        }
    }
}

/// [`col2im`] for [`ConvGeometry::is_aligned`] convolutions; clobbers `col`.
fn col2im_aligned(g: &ConvGeometry, col: &mut [f32], dx: &mut [f32]) {
    let (k, s, plane) = (g.kernel, g.stride, g.out_plane());
    let mut phases = vec![0.0; if s == 1 { 0 } else { dx.len() }];
    let target: &mut [f32] = if s == 1 { dx } else { &mut phases };
    for (c, pc) in target.chunks_exact_mut(s * s * plane).enumerate() {
        for ki in 0..k {
            for kj in 0..k {
                let ((qh, qw), shift) = g.phase_shift(ki, kj);
                let row = &mut col[((c * k + ki) * k + kj) * plane..][..plane];
                shift.add(row, &mut pc[(qh * s + qw) * plane..][..plane]);
            }
        }
    }
    if s > 1 {
        g.merge_phases(&phases, dx);
    }
}

/// Writes the patch matrix of one image: `col[(c·k + ki)·k + kj, oh·out_w + ow] =
/// x[c, oh·s + ki − p, ow·s + kj − p]`, zero where that falls in the padding. Rows are
/// [`ConvGeometry::col_stride`] apart.
///
/// `phases` is scratch for one image (see [`Patches`]).
///
/// # Shapes
/// - `x`: `[in, h, w]`
/// - `col`: `[in·k·k, out_h·out_w]` (row stride `col_stride`)
fn im2col(g: &ConvGeometry, x: &[f32], col: &mut [f32], phases: &mut [f32]) {
    if g.is_aligned() {
        return im2col_aligned(g, x, col, phases);
    }
    let (ld, ow, s, p, w) = (g.col_stride(), g.out_width(), g.stride, g.padding, g.width);
    col.fill(0.0);
    g.for_each_stretch(|row, c, ih, oh, lo, hi| {
        let kj = row % g.kernel;
        let src = &x[(c * g.height + ih) * w..][..w];
        let dst = &mut col[row * ld + oh * ow..][..ow];
        if s == 1 {
            dst[lo..hi].copy_from_slice(&src[lo + kj - p..hi + kj - p]);
        } else {
            for (o, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                *d = src[o * s + kj - p];
            }
        }
    });
}

/// Buffers for the patch matrices of a run of images, one image at a time: the matrix and, for
/// aligned strided convolutions, the image split into phase planes. Allocated once per rayon
/// job, not once per image.
struct Patches {
    col: Vec<f32>,
    phases: Vec<f32>,
}

impl Patches {
    fn new(g: &ConvGeometry) -> Self {
        Self {
            col: g.col_buffer(),
            phases: vec![
                0.0;
                if g.stride > 1 && g.is_aligned() {
                    g.in_len()
                } else {
                    0
                }
            ],
        }
    }

    /// The patch matrix of image `x` ([`im2col`]).
    ///
    /// # Shapes
    /// - `x`: `[in, h, w]`
    /// - returns `[in·k·k, out_h·out_w]`
    fn fill(&mut self, g: &ConvGeometry, x: &[f32]) -> MatRef<'_> {
        im2col(g, x, &mut self.col, &mut self.phases);
        g.col_matrix(&self.col)
    }
}

/// Adds each patch-matrix entry back onto the input pixel it was read from (the adjoint of
/// [`im2col`]).
///
/// # Shapes
/// - `col`: `[in·k·k, out_h·out_w]`
/// - `dx`: `[in, h, w]`, accumulated into
fn col2im(g: &ConvGeometry, col: &mut [f32], dx: &mut [f32]) {
    if g.is_aligned() {
        return col2im_aligned(g, col, dx);
    }
    let (plane, ow, s, p, w) = (g.out_plane(), g.out_width(), g.stride, g.padding, g.width);
    g.for_each_stretch(|row, c, ih, oh, lo, hi| {
        let kj = row % g.kernel;
        let dst = &mut dx[(c * g.height + ih) * w..][..w];
        let src = &col[row * plane + oh * ow..][..ow];
        if s == 1 {
            for (d, v) in dst[lo + kj - p..hi + kj - p].iter_mut().zip(&src[lo..hi]) {
                *d += v;
            }
        } else {
            for (o, v) in src.iter().enumerate().take(hi).skip(lo) {
                dst[o * s + kj - p] += v;
            }
        }
    });
}

/// Images per parallel task of the convolutions, at most.
const TASK_IMAGES: usize = 4;

/// Images per parallel task: at most [`TASK_IMAGES`], so that a thread the machine
/// delays holds back only a few images (the others take over its remaining tasks), and at most
/// one contiguous run per thread on small batches.
fn images_per_task(batch: usize) -> usize {
    batch
        .div_ceil(rayon::current_num_threads().max(1))
        .clamp(1, TASK_IMAGES)
}

/// Forward convolution: direct where [`direct::fits`] and the CPU has a direct kernel, else
/// im2col + GEMM.
///
/// # Shapes
/// - `x`: `[batch, in, h, w]`
/// - `weight`: `[out, in, k, k]`
/// - returns `[batch, out, out_h, out_w]`
pub fn forward(g: &ConvGeometry, x: &[f32], weight: &[f32]) -> Vec<f32> {
    forward_plus(g, x, weight, None, None)
}

/// Something shown each output image of a forward pass (its index and values) right after the
/// image is written, while it is in cache.
pub type Observer<'a> = Option<&'a (dyn Fn(usize, &[f32]) + Sync)>;

/// [`forward`], showing each output image to `observe` as soon as it is written (images in any
/// order, each once).
///
/// # Shapes
/// - as [`forward`]; `observe` is shown `[out, out_h, out_w]` images
pub fn forward_observed(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    observe: &(dyn Fn(usize, &[f32]) + Sync),
) -> Vec<f32> {
    forward_plus(g, x, weight, None, Some(observe))
}

/// [`forward`], then `plus` (when given) added to the output image by image, while each image is
/// in cache: `y = conv(x) + plus`, each element rounded as the separate addition would be; then
/// each image shown to `observe`.
///
/// # Shapes
/// - as [`forward`]; `plus`: the output's
fn forward_plus(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    plus: Option<&[f32]>,
    observe: Observer<'_>,
) -> Vec<f32> {
    assert_eq!(x.len(), g.batch * g.in_len(), "conv2d: input length");
    assert_eq!(
        weight.len(),
        g.out_channels * g.patch_len(),
        "conv2d: weight length"
    );
    assert!(
        plus.is_none_or(|p| p.len() == g.batch * g.out_len()),
        "conv2d: length of the term added to the output"
    );
    match direct::Isa::chosen() {
        Some(isa) if direct::fits(g) => forward_direct(isa, g, x, weight, plus, observe),
        _ => forward_im2col(g, x, weight, plus, observe),
    }
}

/// Image `i`'s run of `len` floats in `plus`, if given.
fn image_of(plus: Option<&[f32]>, i: usize, len: usize) -> Option<&[f32]> {
    plus.map(|p| &p[i * len..][..len])
}

/// The end of a forward pass on output image `i`, `yi`: `plus`'s image added, then the image
/// shown to `observe`.
///
/// # Safety
/// All of `yi` has been written.
unsafe fn finish_image(
    yi: &mut [MaybeUninit<f32>],
    i: usize,
    plus: Option<&[f32]>,
    observe: Observer<'_>,
) {
    if let Some(p) = image_of(plus, i, yi.len()) {
        // SAFETY: by the caller's contract.
        unsafe { add_onto(yi, p) };
    }
    if let Some(observe) = observe {
        // SAFETY: by the caller's contract.
        observe(i, unsafe {
            std::slice::from_raw_parts(yi.as_ptr().cast(), yi.len())
        });
    }
}

/// [`forward`] by [`direct`] convolution on instruction set `isa`, image by image.
fn forward_direct(
    isa: direct::Isa,
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    plus: Option<&[f32]>,
    observe: Observer<'_>,
) -> Vec<f32> {
    let packed = direct::PackedWeights::new(g, weight);
    let per = images_per_task(g.batch);
    let fill = |y: &mut [MaybeUninit<f32>]| {
        y.par_chunks_mut(per * g.out_len())
            .zip(x.par_chunks(per * g.in_len()))
            .enumerate()
            // One scratch per rayon job, shared by the tasks it runs (not one per task).
            .for_each_init(
                || direct::Scratch::new(isa, g),
                |scratch, (task, (ys, xs))| {
                    for (i, (yi, xi)) in ys
                        .chunks_mut(g.out_len())
                        .zip(xs.chunks(g.in_len()))
                        .enumerate()
                    {
                        direct::forward_image(isa, g, xi, &packed, scratch, yi);
                        // SAFETY: `forward_image` wrote all of `yi`.
                        unsafe { finish_image(yi, task * per + i, plus, observe) };
                    }
                },
            )
    };
    // SAFETY: `forward_image` writes each image's `out_len` outputs whole.
    unsafe { filled(g.batch * g.out_len(), fill) }
}

/// [`forward`] as im2col + one GEMM per image.
fn forward_im2col(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    plus: Option<&[f32]>,
    observe: Observer<'_>,
) -> Vec<f32> {
    let (plane, patch) = (g.out_plane(), g.patch_len());
    let w = MatRef::row_major(weight, g.out_channels, patch);
    let per = images_per_task(g.batch);
    // With few output channels the GEMM runs ~1.7× faster producing the transposed image
    // ([plane, out]), even with the transpose back (measured on Zen 4: 16 channels, 32×32).
    let transposed = g.out_channels < 32;
    let fill = |y: &mut [MaybeUninit<f32>]| {
        y.par_chunks_mut(per * g.out_len())
            .zip(x.par_chunks(per * g.in_len()))
            .enumerate()
            // Buffers per rayon job, shared by the tasks it runs (not allocated per task).
            .for_each_init(
                || {
                    let yt = vec![
                        0.0;
                        if transposed {
                            plane * g.out_channels
                        } else {
                            0
                        }
                    ];
                    (Patches::new(g), yt)
                },
                |(patches, yt), (task, (ys, xs))| {
                    for (i, (yi, xi)) in ys
                        .chunks_mut(g.out_len())
                        .zip(xs.chunks(g.in_len()))
                        .enumerate()
                    {
                        let col = patches.fill(g, xi);
                        if transposed {
                            // [plane, patch] · [patch, out] → [plane, out], then → [out, plane]
                            matmul(yt, col.t(), w.t(), false);
                            transpose(yt, plane, g.out_channels, yi);
                        } else {
                            // [out, patch] · [patch, plane] → [out, plane]
                            matmul_uninit(yi, w, col);
                        }
                        // SAFETY: the GEMM or the transpose wrote all of `yi`.
                        unsafe { finish_image(yi, task * per + i, plus, observe) };
                    }
                },
            )
    };
    // SAFETY: each image's `out_len` outputs are written whole, by the GEMM or the transpose.
    unsafe { filled(g.batch * g.out_len(), fill) }
}

/// `dst[j, i] = src[i, j]` for a row-major `rows × cols` `src` (writing every element of
/// `dst`), sixteen source rows at a time so each destination row gets a whole cache line.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [MaybeUninit<f32>]) {
    const B: usize = 16;
    assert!(
        src.len() >= rows * cols && dst.len() >= rows * cols,
        "transpose: lengths"
    );
    let full = rows / B * B;
    for i0 in (0..full).step_by(B) {
        let block = &src[i0 * cols..(i0 + B) * cols];
        for j in 0..cols {
            let run: &mut [MaybeUninit<f32>; B] = (&mut dst[j * rows + i0..j * rows + i0 + B])
                .try_into()
                .expect("a run of B elements");
            for (k, d) in run.iter_mut().enumerate() {
                d.write(block[k * cols + j]);
            }
        }
    }
    for i in full..rows {
        for j in 0..cols {
            dst[j * rows + i].write(src[i * cols + j]);
        }
    }
}

/// What [`backward`] computes of the input gradient.
#[derive(Debug, Clone, Copy)]
pub enum InputGradient<'a> {
    /// None (the input is not tracked).
    Skip,
    /// `dx`.
    Plain,
    /// `dx + other`: `other`, the input's gradient from another consumer (see `kernels::Fork`),
    /// added image by image while `dx` is in cache.
    Plus(&'a [f32]),
}

/// Gradients of [`forward`] with respect to its input (as `input` says) and its weight (when
/// `want_weight`), given the output gradient `dy`. A `dy` made on demand
/// ([`OutputGradient::Normalized`]) is made image by image inside the one-sweep backward, else
/// whole first; the gradients have the same bits either way.
///
/// # Shapes
/// - `x`: `[batch, in, h, w]`; `weight`: `[out, in, k, k]`; `dy`: `[batch, out, out_h, out_w]`
/// - `InputGradient::Plus`'s term: `[batch, in, h, w]`
/// - returns `(dx: [batch, in, h, w], dw: [out, in, k, k])`
pub fn backward(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    dy: OutputGradient<'_>,
    input: InputGradient<'_>,
    want_weight: bool,
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    assert_eq!(
        x.len(),
        g.batch * g.in_len(),
        "conv2d backward: input length"
    );
    assert_eq!(
        dy.len(),
        g.batch * g.out_len(),
        "conv2d backward: gradient length"
    );
    if matches!(input, InputGradient::Skip) && !want_weight {
        return (None, None);
    }
    let plus = match input {
        InputGradient::Plus(other) => {
            assert_eq!(
                other.len(),
                g.batch * g.in_len(),
                "conv2d backward: length of the other input gradient"
            );
            Some(other)
        }
        _ => None,
    };
    if let Some(isa) = direct::Isa::chosen()
        && want_weight
        && !matches!(input, InputGradient::Skip)
        && direct::handles_backward(g)
        && g.batch.div_ceil(REDUCTION_CHUNK) >= rayon::current_num_threads()
    {
        // Both gradients in one sweep, the output gradient copied once. The sweep runs in
        // chunks of `REDUCTION_CHUNK` images, so with fewer chunks than threads the gradients
        // are computed apart instead (the input gradient in tasks of a few images); the bits are
        // the same either way.
        let (dx, dw) = direct::backward(isa, g, x, weight, &dy, plus, REDUCTION_CHUNK);
        return (Some(dx), Some(dw));
    }
    if matches!(input, InputGradient::Skip) {
        // The weight gradient alone: a gradient made on demand may stay image by image.
        return (None, Some(weight_gradient(g, x, &dy)));
    }
    let dy = dy.whole();
    let dy = &dy[..];
    let dx = input_gradient(g, weight, dy, plus);
    let dw = want_weight.then(|| weight_gradient(g, x, &OutputGradient::Given(dy)));
    (Some(dx), dw)
}

/// `dW = Σₙ dYₙ · colₙᵀ`.
///
/// # Shapes
/// - `x`: `[batch, in, h, w]`; `dy`: `[batch, out, out_h, out_w]`
/// - returns `[out, in, k, k]`
fn weight_gradient(g: &ConvGeometry, x: &[f32], dy: &OutputGradient<'_>) -> Vec<f32> {
    match direct::Isa::chosen() {
        Some(isa) if direct::handles_weight_gradient(g) => {
            direct::weight_gradient(isa, g, x, dy, REDUCTION_CHUNK)
        }
        _ => weight_gradient_im2col(g, x, &dy.whole()),
    }
}

/// [`weight_gradient`] as im2col + one GEMM per image, summed over fixed chunks of images.
fn weight_gradient_im2col(g: &ConvGeometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (plane, patch, out) = (g.out_plane(), g.patch_len(), g.out_channels);
    let per = REDUCTION_CHUNK;
    let partial_dwt: Vec<Vec<f32>> = x
        .par_chunks(per * g.in_len())
        .zip(dy.par_chunks(per * g.out_len()))
        .map_init(
            || Patches::new(g),
            |patches, (xs, dys)| {
                // The weight gradient transposed, [patch, out]: as a GEMM destination this shape runs
                // 1.0–2.7× faster than [out, patch] (measured on Zen 4).
                let mut dwt = vec![0.0; patch * out];
                for (xi, dyi) in xs.chunks(g.in_len()).zip(dys.chunks(g.out_len())) {
                    let col = patches.fill(g, xi);
                    let dyi = MatRef::row_major(dyi, out, plane);
                    // [patch, plane] · [plane, out] → [patch, out], summed over the chunk
                    matmul(&mut dwt, col, dyi.t(), true);
                }
                dwt
            },
        )
        .collect();
    let total = sum_in_order(&partial_dwt, patch * out);
    // SAFETY: the transpose writes all `out · patch` elements.
    unsafe { filled(out * patch, |dw| transpose(&total, patch, out, dw)) }
}

/// `dX`, the adjoint of the convolution applied to `dy`.
///
/// A stride-1 "same" convolution's adjoint is itself such a convolution, of `dy` with the
/// weights flipped in space and with in/out swapped; that reuses [`forward`] (the direct kernel,
/// or a shifted-copy im2col and one GEMM per image) instead of scattering a `[in·k·k, plane]`
/// matrix back onto the image. Other geometries multiply `Wᵀ · dYₙ` and scatter it with [`col2im`].
///
/// # Shapes
/// - `weight`: `[out, in, k, k]`; `dy`: `[batch, out, out_h, out_w]`
/// - returns `[batch, in, h, w]`
fn input_gradient(g: &ConvGeometry, weight: &[f32], dy: &[f32], plus: Option<&[f32]>) -> Vec<f32> {
    let (plane, patch, out, k) = (g.out_plane(), g.patch_len(), g.out_channels, g.kernel);
    if g.stride == 1 && g.is_aligned() {
        let mut flipped = vec![0.0; weight.len()]; // [in, out, k, k]
        for o in 0..out {
            for c in 0..g.in_channels {
                for t in 0..k * k {
                    flipped[(c * out + o) * k * k + t] =
                        weight[(o * g.in_channels + c) * k * k + k * k - 1 - t];
                }
            }
        }
        let adjoint = ConvGeometry {
            in_channels: out,
            out_channels: g.in_channels,
            ..*g
        };
        return forward_plus(&adjoint, dy, &flipped, plus, None);
    }
    if let Some(isa) = direct::Isa::chosen()
        && direct::handles_phase_input_gradient(g)
    {
        return input_gradient_phases(isa, g, weight, dy, plus);
    }
    let w = MatRef::row_major(weight, out, patch);
    let per = images_per_task(g.batch);
    let fill = |dx: &mut [MaybeUninit<f32>]| {
        dx.par_chunks_mut(per * g.in_len())
            .zip(dy.par_chunks(per * g.out_len()))
            .enumerate()
            // One patch-matrix buffer per rayon job, shared by the tasks it runs.
            .for_each_init(
                || vec![0.0; patch * plane],
                |dcol, (task, (dxs, dys))| {
                    // Zeroed here, in parallel: col2im accumulates.
                    let dxs = zeroed(dxs);
                    for (i, (dxi, dyi)) in dxs
                        .chunks_mut(g.in_len())
                        .zip(dys.chunks(g.out_len()))
                        .enumerate()
                    {
                        // [patch, out] · [out, plane] → [patch, plane]
                        matmul(dcol, w.t(), MatRef::row_major(dyi, out, plane), false);
                        col2im(g, dcol, dxi);
                        if let Some(p) = image_of(plus, task * per + i, g.in_len()) {
                            add_in_place(dxi, p);
                        }
                    }
                },
            )
    };
    // SAFETY: every task zeroes its whole run of images (`zeroed`).
    unsafe { filled(g.batch * g.in_len(), fill) }
}

/// [`input_gradient`] of a stride-2 convolution by [`direct`] convolution of `dy` onto the
/// input's phase planes, image by image.
fn input_gradient_phases(
    isa: direct::Isa,
    g: &ConvGeometry,
    weight: &[f32],
    dy: &[f32],
    plus: Option<&[f32]>,
) -> Vec<f32> {
    let weights = direct::PhaseWeights::new(g, weight);
    let per = images_per_task(g.batch);
    let fill = |dx: &mut [MaybeUninit<f32>]| {
        dx.par_chunks_mut(per * g.in_len())
            .zip(dy.par_chunks(per * g.out_len()))
            .enumerate()
            // One scratch per rayon job, shared by the tasks it runs.
            .for_each_init(
                || direct::PhaseScratch::new(g),
                |scratch, (task, (dxs, dys))| {
                    for (i, (dxi, dyi)) in dxs
                        .chunks_mut(g.in_len())
                        .zip(dys.chunks(g.out_len()))
                        .enumerate()
                    {
                        let p = image_of(plus, task * per + i, g.in_len());
                        direct::input_gradient_image(isa, g, dyi, &weights, scratch, p, dxi);
                    }
                },
            )
    };
    // SAFETY: `input_gradient_image` writes each image's `in_len` elements whole.
    unsafe { filled(g.batch * g.in_len(), fill) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::values;

    /// Convolution straight from its definition.
    fn naive_forward(g: &ConvGeometry, x: &[f32], w: &[f32]) -> Vec<f32> {
        let (oh, ow, k) = (g.out_height(), g.out_width(), g.kernel);
        let mut y = vec![0.0; g.batch * g.out_len()];
        for n in 0..g.batch {
            for o in 0..g.out_channels {
                for r in 0..oh {
                    for col in 0..ow {
                        let mut acc = 0.0;
                        for c in 0..g.in_channels {
                            for ki in 0..k {
                                for kj in 0..k {
                                    let ih = (r * g.stride + ki) as isize - g.padding as isize;
                                    let iw = (col * g.stride + kj) as isize - g.padding as isize;
                                    if ih < 0
                                        || iw < 0
                                        || ih >= g.height as isize
                                        || iw >= g.width as isize
                                    {
                                        continue;
                                    }
                                    let xi = ((n * g.in_channels + c) * g.height + ih as usize)
                                        * g.width
                                        + iw as usize;
                                    acc += x[xi] * w[((o * g.in_channels + c) * k + ki) * k + kj];
                                }
                            }
                        }
                        y[((n * g.out_channels + o) * oh + r) * ow + col] = acc;
                    }
                }
            }
        }
        y
    }

    fn geometries() -> Vec<ConvGeometry> {
        let g = |batch, in_channels, out_channels, side, kernel, stride, padding| ConvGeometry {
            batch,
            in_channels,
            out_channels,
            height: side,
            width: side,
            kernel,
            stride,
            padding,
        };
        vec![
            g(3, 2, 4, 6, 3, 1, 1),
            g(5, 3, 2, 7, 3, 2, 1), // odd side, stride 2
            g(2, 2, 3, 5, 1, 1, 0),
            g(1, 1, 2, 4, 3, 2, 0),
            g(4, 2, 2, 5, 3, 1, 2),   // padding wider than the kernel's reach
            g(3, 3, 33, 6, 3, 2, 1),  // many output channels: the untransposed GEMM
            g(2, 2, 3, 6, 5, 1, 2),   // 5×5 'same'
            g(2, 3, 40, 7, 3, 1, 1),  // 3×3 'same', untransposed GEMM
            g(3, 2, 4, 8, 3, 2, 1),   // stride 2 on an even side: phase planes
            g(2, 3, 33, 6, 3, 2, 1),  // the same, untransposed GEMM
            g(2, 2, 3, 9, 3, 3, 0),   // stride 3, aligned, no padding
            g(2, 2, 3, 2, 5, 1, 2),   // kernel wider than the image
            g(3, 3, 5, 16, 3, 1, 1),  // direct weight gradient, odd output channels
            g(17, 8, 3, 32, 3, 1, 1), // direct: batch past a reduction chunk
            g(2, 3, 5, 32, 3, 2, 1),  // stride 2, direct on phase planes: 16-wide output rows
            g(2, 3, 5, 8, 3, 1, 1),   // AVX-512: pairs of 8-wide rows
        ]
    }

    /// A convolution kernel on whole batches: `(geometry, x, weights or dy) → output`.
    type Kernel = Box<dyn Fn(&ConvGeometry, &[f32], &[f32]) -> Vec<f32>>;

    /// Each way [`forward`] can run: im2col + GEMM and, where `g` allows it, direct on every
    /// instruction set this CPU has.
    fn forward_paths(g: &ConvGeometry) -> Vec<(String, Kernel)> {
        let mut paths: Vec<(String, Kernel)> = vec![(
            "im2col".into(),
            Box::new(|g, x, w| forward_im2col(g, x, w, None, None)),
        )];
        if direct::handles(g) {
            for isa in direct::Isa::available() {
                paths.push((
                    format!("direct {isa:?}"),
                    Box::new(move |g, x, w| forward_direct(isa, g, x, w, None, None)),
                ));
            }
        }
        paths
    }

    /// As [`forward_paths`], for the weight gradient.
    fn weight_gradient_paths(g: &ConvGeometry) -> Vec<(String, Kernel)> {
        let mut paths: Vec<(String, Kernel)> =
            vec![("im2col".into(), Box::new(weight_gradient_im2col))];
        if direct::handles_weight_gradient(g) {
            for isa in direct::Isa::available() {
                paths.push((
                    format!("direct {isa:?}"),
                    Box::new(move |g, x, dy| {
                        let dy = OutputGradient::Given(dy);
                        direct::weight_gradient(isa, g, x, &dy, REDUCTION_CHUNK)
                    }),
                ));
            }
        }
        paths
    }

    /// A non-square image (the geometries above are square).
    fn wide() -> ConvGeometry {
        ConvGeometry {
            batch: 2,
            in_channels: 2,
            out_channels: 9,
            height: 5,
            width: 19,
            kernel: 3,
            stride: 1,
            padding: 1,
        }
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: length");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    #[test]
    fn forward_matches_the_definition() {
        for g in geometries().into_iter().chain([wide()]) {
            let x = values(g.batch * g.in_len(), 1);
            let w = values(g.out_channels * g.patch_len(), 2);
            let want = naive_forward(&g, &x, &w);
            assert_close(&forward(&g, &x, &w), &want, &format!("{g:?}"));
            for (name, path) in forward_paths(&g) {
                assert_close(&path(&g, &x, &w), &want, &format!("{name} {g:?}"));
            }
        }
    }

    /// The weight gradient straight from its definition.
    fn naive_weight_gradient(g: &ConvGeometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let (k, s, p) = (g.kernel, g.stride as isize, g.padding as isize);
        let mut dw = vec![0.0f64; g.out_channels * g.patch_len()];
        for n in 0..g.batch {
            for o in 0..g.out_channels {
                for c in 0..g.in_channels {
                    for t in 0..k * k {
                        let mut sum = 0.0;
                        for oh in 0..g.out_height() {
                            for ow in 0..g.out_width() {
                                let ih = oh as isize * s + (t / k) as isize - p;
                                let iw = ow as isize * s + (t % k) as isize - p;
                                if (0..g.height as isize).contains(&ih)
                                    && (0..g.width as isize).contains(&iw)
                                {
                                    let xv = x[((n * g.in_channels + c) * g.height + ih as usize)
                                        * g.width
                                        + iw as usize];
                                    let d = dy[((n * g.out_channels + o) * g.out_height() + oh)
                                        * g.out_width()
                                        + ow];
                                    sum += xv as f64 * d as f64;
                                }
                            }
                        }
                        dw[(o * g.in_channels + c) * k * k + t] += sum;
                    }
                }
            }
        }
        dw.into_iter().map(|v| v as f32).collect()
    }

    /// The im2col weight gradient on the shapes it takes in a ResNet (8×8 planes at stride 1,
    /// 32×32 at stride 2) and on an unaligned one (7×7 at stride 2), past a reduction chunk.
    #[test]
    fn im2col_weight_gradient_matches_the_definition() {
        let g = |batch, in_channels, out_channels, side, stride| ConvGeometry {
            batch,
            in_channels,
            out_channels,
            height: side,
            width: side,
            kernel: 3,
            stride,
            padding: 1,
        };
        for g in [g(21, 3, 4, 8, 1), g(6, 2, 3, 32, 2), g(19, 2, 3, 7, 2)] {
            let x = values(g.batch * g.in_len(), 10);
            let dy = values(g.batch * g.out_len(), 11);
            let want = naive_weight_gradient(&g, &x, &dy);
            assert_close(
                &weight_gradient_im2col(&g, &x, &dy),
                &want,
                &format!("{g:?}"),
            );
        }
    }

    /// Every weight-gradient implementation agrees with the definition summed in `f64` (and,
    /// through `gradients_are_the_adjoints_of_the_forward_map`, with the forward map).
    #[test]
    fn weight_gradient_paths_match_the_definition() {
        for g in geometries().into_iter().chain([wide()]) {
            let x = values(g.batch * g.in_len(), 8);
            let dy = values(g.batch * g.out_len(), 9);
            let want = naive_weight_gradient(&g, &x, &dy);
            for (name, path) in &weight_gradient_paths(&g) {
                assert_close(&path(&g, &x, &dy), &want, &format!("{name} {g:?}"));
            }
        }
    }

    /// The dispatch follows the kernel path (`cpu::kernel_path`): on the AVX-512 and AVX2 paths
    /// (unless `SPLITAUX_KERNEL_PATH=portable`) the direct kernels take ResNet's stride-1
    /// convolutions and its stride-2 ones (at stride 2 weight gradients where the output is at
    /// least 16 wide), so the comparisons above exercise them; the others stay on im2col +
    /// GEMM. The chosen instruction set is always one the CPU has.
    #[test]
    fn direct_kernels_cover_resnet_convolutions_where_the_cpu_allows() {
        let g = ConvGeometry {
            batch: 2,
            in_channels: 16,
            out_channels: 16,
            height: 16,
            width: 16,
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        use super::super::cpu::{KernelPath, kernel_path};
        let chosen = direct::Isa::chosen();
        assert_eq!(chosen.is_some(), kernel_path() != KernelPath::Portable);
        // The path never outruns the CPU (the direct kernels' `unsafe` relies on it).
        assert!(chosen.is_none_or(|isa| direct::Isa::available().contains(&isa)));
        assert_eq!(direct::handles(&g), chosen.is_some());
        assert_eq!(direct::handles_weight_gradient(&g), chosen.is_some());
        // 8×8 at stride 1 too: the chains need no grid.
        assert_eq!(
            direct::handles_weight_gradient(&ConvGeometry {
                width: 8,
                height: 8,
                ..g
            }),
            chosen.is_some()
        );
        // Downsampling convolutions: direct (phase planes) on even sides; the weight gradient
        // where the output is at least 16 wide.
        let strided = ConvGeometry { stride: 2, ..g };
        assert_eq!(direct::handles(&strided), chosen.is_some());
        assert_eq!(
            direct::handles_phase_input_gradient(&strided),
            chosen.is_some()
        );
        // An 8-wide output is too narrow for the lane sums' grid.
        assert!(!direct::handles_weight_gradient(&strided));
        let wide = ConvGeometry {
            height: 32,
            width: 32,
            ..strided
        };
        assert_eq!(direct::handles_weight_gradient(&wide), chosen.is_some());
        assert!(!direct::handles(&ConvGeometry {
            height: 15,
            ..strided
        }));
        assert!(!direct::handles(&ConvGeometry {
            padding: 0,
            ..strided
        }));
    }

    /// A small batch (fewer chunks than threads) computes the two gradients apart, a large one
    /// in one sweep: the same bits.
    #[test]
    fn backward_in_one_sweep_or_apart_gives_the_same_bits() {
        let Some(isa) = direct::Isa::chosen() else {
            eprintln!("no direct kernel on this path: nothing to compare");
            return;
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let g = ConvGeometry {
            batch: 3,
            in_channels: 4,
            out_channels: 5,
            height: 16,
            width: 16,
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        let x = values(g.batch * g.in_len(), 1);
        let w = values(g.out_channels * g.patch_len(), 2);
        let dy = values(g.batch * g.out_len(), 3);
        let other = values(g.batch * g.in_len(), 4);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("a pool of two threads");
        let (dx, dw) = pool.install(|| {
            // One chunk for two threads: the gradients apart.
            assert!(g.batch.div_ceil(REDUCTION_CHUNK) < rayon::current_num_threads());
            let dy = OutputGradient::Given(&dy);
            backward(&g, &x, &w, dy, InputGradient::Plus(&other), true)
        });
        let dy = OutputGradient::Given(&dy);
        let (swept_dx, swept_dw) =
            direct::backward(isa, &g, &x, &w, &dy, Some(&other), REDUCTION_CHUNK);
        assert_eq!(bits(&dx.expect("dx")), bits(&swept_dx));
        assert_eq!(bits(&dw.expect("dw")), bits(&swept_dw));
    }

    /// The gradients are the adjoints of the forward map: for a linear map y = A(x, w),
    /// ⟨dy, A(δx, w)⟩ = ⟨dx, δx⟩ and ⟨dy, A(x, δw)⟩ = ⟨dw, δw⟩ for any directions δ.
    #[test]
    fn gradients_are_the_adjoints_of_the_forward_map() {
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum::<f64>();
        for g in geometries().into_iter().chain([wide()]) {
            let x = values(g.batch * g.in_len(), 3);
            let w = values(g.out_channels * g.patch_len(), 4);
            let dy = values(g.batch * g.out_len(), 5);
            let (dx, dw) = backward(
                &g,
                &x,
                &w,
                OutputGradient::Given(&dy),
                InputGradient::Plain,
                true,
            );
            let (dx, dw) = (dx.unwrap(), dw.unwrap());
            let (delta_x, delta_w) = (values(x.len(), 6), values(w.len(), 7));
            let along_x = dot(&dy, &naive_forward(&g, &delta_x, &w));
            let along_w = dot(&dy, &naive_forward(&g, &x, &delta_w));
            let tol = |v: f64| 1e-4 * (1.0 + v.abs());
            assert!(
                (along_x - dot(&dx, &delta_x)).abs() < tol(along_x),
                "dx {g:?}"
            );
            assert!(
                (along_w - dot(&dw, &delta_w)).abs() < tol(along_w),
                "dw {g:?}"
            );

            let (only_dx, none) = backward(
                &g,
                &x,
                &w,
                OutputGradient::Given(&dy),
                InputGradient::Plain,
                false,
            );
            assert_eq!(only_dx.unwrap(), dx);
            assert!(none.is_none());

            // Another consumer's gradient, added: the same bits as adding it afterwards.
            let other = values(dx.len(), 8);
            let (plus, _) = backward(
                &g,
                &x,
                &w,
                OutputGradient::Given(&dy),
                InputGradient::Plus(&other),
                false,
            );
            let want: Vec<f32> = dx.iter().zip(&other).map(|(d, o)| d + o).collect();
            assert_eq!(plus.unwrap(), want, "dx + other {g:?}");
        }
    }
}
