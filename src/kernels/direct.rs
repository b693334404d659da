//! Direct convolution with AVX-512 for stride-1 "same" convolutions (odd kernel `k`, padding
//! `(k − 1)/2`): the forward pass of ResNet's 3×3 convolutions, through the flipped-weight
//! adjoint in [`super::conv`] their input gradient, and (3×3, planes ≥ 16 wide) their weight
//! gradient. No patch matrix is built. CPUs without AVX-512 (and runs forcing another path with
//! `SPLITAUX_KERNEL_PATH`, see [`super::cpu`]) use im2col + GEMM instead.
//!
//! Each image is copied once into zero-padded planes, `(h + k − 1) × (w + k − 1)` per channel.
//! The output is computed on the *padded-width grid*: position `g = oh·w′ + ow` with
//! `w′ = w + k − 1`, so that for every tap `(ki, kj)` the inputs of sixteen consecutive grid
//! positions are sixteen consecutive floats of the padded plane, at `g + ki·w′ + kj`. The
//! `k − 1` grid columns past `w` in each row are computed and dropped. A register tile holds
//! [`OUT_BLOCK`] output channels × `NV` vectors of sixteen positions; its inner step is one load
//! per vector and one broadcast weight per channel, feeding `OUT_BLOCK · NV` FMAs.
//!
//! im2col + GEMM (the fallback in [`super::conv`]) writes and re-reads a `k²`-times-larger patch
//! matrix per image; here the input is read from L1/L2 in place.

use std::mem::MaybeUninit;

use super::cpu::{self, KernelPath};
use super::geometry::ConvGeometry;

/// Output channels per register tile (weights are padded to a multiple of it).
const OUT_BLOCK: usize = 8;
/// Sixteen-float vectors per register tile (with [`OUT_BLOCK`]: 24 accumulators of 32).
const MAX_VECTORS: usize = 3;
const LANES: usize = 16;

/// Whether this process runs the direct kernel, and `g` is a geometry it handles. The kernel
/// runs on the [`KernelPath::Avx512`] path only, which [`cpu::kernel_path`] returns only when
/// the CPU has AVX-512 F and VL (VL as well as F: without it LLVM keeps loop-carried
/// accumulators in zmm0–15 only and spills the rest, since the 128-bit zeroing idiom it uses
/// needs VL to reach zmm16–31). `SPLITAUX_KERNEL_PATH=avx2|portable` turns it off.
pub fn handles(g: &ConvGeometry) -> bool {
    g.stride == 1
        && g.kernel % 2 == 1
        && 2 * g.padding == g.kernel - 1
        && g.in_channels > 0
        && cpu::kernel_path() == KernelPath::Avx512
}

/// The weights of a convolution reordered for the kernel: `[in, k·k, out′]`, `out′` the output
/// channels rounded up to [`OUT_BLOCK`] (the extra ones zero), so a tile's weights for one input
/// channel and tap are [`OUT_BLOCK`] consecutive floats.
pub struct PackedWeights {
    data: Vec<f32>,
    out_padded: usize,
}

impl PackedWeights {
    /// # Shapes
    /// - `weight`: `[out, in, k, k]`
    pub fn new(g: &ConvGeometry, weight: &[f32]) -> Self {
        let (out, cin, taps) = (g.out_channels, g.in_channels, g.kernel * g.kernel);
        let out_padded = out.div_ceil(OUT_BLOCK) * OUT_BLOCK;
        let mut data = vec![0.0; cin * taps * out_padded];
        for o in 0..out {
            for c in 0..cin {
                for t in 0..taps {
                    data[(c * taps + t) * out_padded + o] = weight[(o * cin + c) * taps + t];
                }
            }
        }
        Self { data, out_padded }
    }
}

/// `dst.copy_from_slice(src)` for one image row, inline with (masked) vector moves: rows are
/// 8–32 floats, where a `memcpy` call costs more than the copy (3 % of a training step).
fn copy_row(src: &[f32], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "copy_row: lengths");
    // SAFETY: `handles` checked AVX-512F and VL before any direct kernel runs.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        copy_row_avx512(src, dst)
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
fn copy_row_avx512(src: &[f32], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    for (s, d) in src.chunks(LANES).zip(dst.chunks_mut(LANES)) {
        let mask = ((1u32 << s.len()) - 1) as __mmask16;
        // SAFETY: the masked lanes cover `s.len() = d.len()` floats of each chunk.
        unsafe {
            let v = _mm512_maskz_loadu_ps(mask, s.as_ptr());
            _mm512_mask_storeu_ps(d.as_mut_ptr(), mask, v);
        }
    }
}

/// Per-thread buffer of the direct kernel: one padded input image.
pub struct Scratch {
    padded: Vec<f32>,
}

/// Sizes of the padded-width layout of one geometry.
struct Layout {
    /// Padded width `w′`.
    row: usize,
    /// Padded plane, `h′ · w′`.
    plane: usize,
    /// Grid positions computed, `h · w′` rounded up to a whole vector.
    grid: usize,
}

impl Layout {
    fn new(g: &ConvGeometry) -> Self {
        let row = g.width + 2 * g.padding;
        Self {
            row,
            plane: (g.height + 2 * g.padding) * row,
            grid: (g.height * row).div_ceil(LANES) * LANES,
        }
    }

    /// Floats of one image's padded planes, with the slack the last channel's last vector reads
    /// past its plane (`farthest_tap + grid` floats from the plane's start).
    fn padded_len(&self, g: &ConvGeometry) -> usize {
        let farthest_tap = (g.kernel - 1) * (self.row + 1);
        (g.in_channels - 1) * self.plane + farthest_tap + self.grid
    }

    /// Copies an image `[in, h, w]` into the interiors of its padded planes in `dst` (whose
    /// borders and slack are zero and stay so).
    fn pad(&self, g: &ConvGeometry, x: &[f32], dst: &mut [f32]) {
        let (w, p) = (g.width, g.padding);
        for (src, plane) in x.chunks_exact(g.height * w).zip(dst.chunks_mut(self.plane)) {
            for (r, src_row) in src.chunks_exact(w).enumerate() {
                copy_row(src_row, &mut plane[(r + p) * self.row + p..][..w]);
            }
        }
    }

    /// Writes an output gradient `[out, h, w]` onto the grid rows in `dst` (whose dropped
    /// columns and tail are zero and stay so).
    fn lay_on_grid(&self, g: &ConvGeometry, dy: &[f32], dst: &mut [f32]) {
        let w = g.width;
        for (src, grid) in dy.chunks_exact(g.height * w).zip(dst.chunks_mut(self.grid)) {
            for (r, src_row) in src.chunks_exact(w).enumerate() {
                copy_row(src_row, &mut grid[r * self.row..][..w]);
            }
        }
    }

    /// Offset of tap `(ki, kj)` from a grid position, in the padded plane.
    fn taps(&self, g: &ConvGeometry) -> Vec<usize> {
        (0..g.kernel * g.kernel)
            .map(|t| (t / g.kernel) * self.row + t % g.kernel)
            .collect()
    }
}

impl Scratch {
    pub fn new(g: &ConvGeometry) -> Self {
        Self {
            // Zeroed once: only the interiors are ever written.
            padded: vec![0.0; Layout::new(g).padded_len(g)],
        }
    }
}

/// Convolves one image.
///
/// # Shapes
/// - `x`: `[in, h, w]`
/// - `y`: `[out, h, w]`, written in full
pub fn forward_image(
    g: &ConvGeometry,
    x: &[f32],
    weights: &PackedWeights,
    scratch: &mut Scratch,
    y: &mut [MaybeUninit<f32>],
) {
    assert!(
        handles(g),
        "direct convolution: unsupported geometry or CPU"
    );
    let l = Layout::new(g);
    assert_eq!(x.len(), g.in_len(), "direct convolution: input length");
    assert_eq!(y.len(), g.out_len(), "direct convolution: output length");
    assert_eq!(
        weights.data.len(),
        g.in_channels * g.kernel * g.kernel * weights.out_padded,
        "direct convolution: packed weight length"
    );
    l.pad(g, x, &mut scratch.padded);
    // SAFETY: AVX-512F and VL are present (`handles`); `run_tiles` reads `padded` at most
    // `(in − 1)·plane + farthest_tap + grid` floats in (the buffer's length, see
    // `Layout::padded_len`), the packed weights within their asserted length, and writes each
    // of `y`'s `out · h · w` elements once (asserted length).
    unsafe { run_tiles(g, &l, weights, &scratch.padded, y.as_mut_ptr().cast()) };
}

/// All register tiles of one image: for each run of up to [`MAX_VECTORS`] vectors of grid
/// positions, every block of [`OUT_BLOCK`] output channels (the input strip stays in L1 across
/// the blocks). Results go straight to the image's output `[out, h, w]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn run_tiles(
    g: &ConvGeometry,
    l: &Layout,
    weights: &PackedWeights,
    padded: &[f32],
    output: *mut f32,
) {
    let taps = l.taps(g);
    assert!(
        padded.len() >= (g.in_channels - 1) * l.plane + taps[taps.len() - 1] + l.grid,
        "direct convolution: padded buffer"
    );
    let tile = Tile {
        input: padded.as_ptr(),
        plane: l.plane,
        channels: g.in_channels,
        taps: &taps,
        out_padded: weights.out_padded,
        output,
        out_channels: g.out_channels,
        height: g.height,
        width: g.width,
        row: l.row,
    };
    let vectors = l.grid / LANES;
    let mut v = 0;
    while v < vectors {
        let nv = (vectors - v).min(MAX_VECTORS);
        for o in (0..weights.out_padded).step_by(OUT_BLOCK) {
            let (x, wt) = (v * LANES, weights.data.as_ptr());
            // SAFETY: see `forward_image`; `o + OUT_BLOCK ≤ out_padded`, `x + nv·16 ≤ grid`.
            unsafe {
                match nv {
                    3 => tile.run::<3>(x, o, wt),
                    2 => tile.run::<2>(x, o, wt),
                    _ => tile.run::<1>(x, o, wt),
                }
            }
        }
        v += nv;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn run_tiles(_: &ConvGeometry, _: &Layout, _: &PackedWeights, _: &[f32], _: *mut f32) {
    unreachable!("direct convolution needs x86-64 AVX-512 (checked by `handles`)")
}

/// What every register tile of one image shares.
struct Tile<'a> {
    /// Padded input planes, `plane` floats apart.
    input: *const f32,
    plane: usize,
    channels: usize,
    /// Offsets of the taps in a padded plane.
    taps: &'a [usize],
    out_padded: usize,
    /// The image's output, `[out_channels, height, width]`.
    output: *mut f32,
    out_channels: usize,
    height: usize,
    width: usize,
    /// Grid positions per output row (the padded width).
    row: usize,
}

#[cfg(target_arch = "x86_64")]
impl Tile<'_> {
    /// Grid positions `x .. x + 16·NV` of output channels `o + j`, `j < OUT_BLOCK`:
    /// `Σ_{c, t} w[c, t, o + j] · input[c, x + taps[t] ..]`.
    ///
    /// # Safety
    /// AVX-512F and VL; the reads and writes described in [`run_tiles`] stay inside their
    /// buffers.
    #[target_feature(enable = "avx512f,avx512vl")]
    unsafe fn run<const NV: usize>(&self, x: usize, o: usize, weights: *const f32) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); NV]; OUT_BLOCK];
        for c in 0..self.channels {
            // SAFETY (all pointer arithmetic below): within the buffers, per the contract.
            let base = unsafe { self.input.add(c * self.plane + x) };
            let wc = unsafe { weights.add(c * self.taps.len() * self.out_padded + o) };
            for (t, &offset) in self.taps.iter().enumerate() {
                let src = unsafe { base.add(offset) };
                let xs: [__m512; NV] =
                    std::array::from_fn(|v| unsafe { _mm512_loadu_ps(src.add(v * LANES)) });
                let wt = unsafe { wc.add(t * self.out_padded) };
                for (j, row) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(unsafe { *wt.add(j) });
                    for (a, xv) in row.iter_mut().zip(&xs) {
                        *a = _mm512_fmadd_ps(*xv, b, *a);
                    }
                }
            }
        }
        for (j, row) in acc
            .iter()
            .enumerate()
            .take(self.out_channels.saturating_sub(o))
        {
            let plane = self.height * self.width;
            // SAFETY: channel `o + j < out_channels` of the output.
            let channel = unsafe { self.output.add((o + j) * plane) };
            for (v, a) in row.iter().enumerate() {
                unsafe { self.store(channel, x + v * LANES, *a) };
            }
        }
    }

    /// Writes the grid positions `start .. start + 16` held in `v` to their output pixels:
    /// position `r·row + col` is pixel `(r, col)` if `col < width` and `r < height` (else it
    /// is dropped), at `r·width + col = position − r·(row − width)`. One masked store per output
    /// row the vector touches.
    ///
    /// # Safety
    /// AVX-512F; `channel` points to one output plane of `height × width` floats.
    #[target_feature(enable = "avx512f,avx512vl")]
    unsafe fn store(&self, channel: *mut f32, start: usize, v: std::arch::x86_64::__m512) {
        use std::arch::x86_64::*;
        let dropped = self.row - self.width;
        let last = ((start + LANES - 1) / self.row).min(self.height.saturating_sub(1));
        for r in start / self.row..=last {
            let first_lane = (r * self.row).saturating_sub(start);
            let end_lane = (r * self.row + self.width).saturating_sub(start).min(LANES);
            if first_lane >= end_lane {
                continue;
            }
            let mask = ((1u32 << end_lane) - (1u32 << first_lane)) as __mmask16;
            // Lane `i` goes to `start + i − r·dropped`; the unmasked lanes lie inside the
            // plane, the masked ones are not touched (the base may point before the plane,
            // hence the wrapping arithmetic).
            let base = channel.wrapping_add(start).wrapping_sub(r * dropped);
            unsafe { _mm512_mask_storeu_ps(base, mask, v) };
        }
    }
}

/// Whether [`weight_gradient`] handles `g`: a [`handles`] geometry with a 3×3 kernel on planes
/// at least 16 wide. On narrower planes the dropped grid columns are too large a share (a
/// quarter at 8×8), and im2col + GEMM is faster (measured on Zen 4 with `examples/kernel_times`:
/// 64 channels at 8×8, backward 8.0 ms direct vs 7.6 ms; at 32×32 and 16×16 the direct
/// kernel is 5–13 % faster).
pub fn handles_weight_gradient(g: &ConvGeometry) -> bool {
    handles(g) && g.kernel == 3 && g.width >= 16
}

/// Bytes of padded inputs and gridded output gradients a weight-gradient group may hold: the
/// group's images are swept once per tile, so they should stay in L2.
const GROUP_BYTES: usize = 512 * 1024;

/// `dW = Σₙ Σ_g dYₙ[o, g] · X′ₙ[c, g + tap]`, the correlation of the output gradient laid on the
/// padded-width grid (zero on the dropped columns) with the padded input. A tile keeps two
/// output channels × one input channel × nine taps in 18 vector accumulators across a group of
/// images, then sums their lanes. Images are summed in fixed chunks of `chunk` (and groups within
/// them), so the result does not depend on the thread count. The dropped columns multiply
/// zeros with input pixels the true sum does not read: an infinite input pixel (a diverged
/// step) can turn a finite weight-gradient entry into NaN where im2col would not.
///
/// # Shapes
/// - `x`: `[batch, in, h, w]`; `dy`: `[batch, out, h, w]`
/// - returns `[out, in, 3, 3]`
pub fn weight_gradient(g: &ConvGeometry, x: &[f32], dy: &[f32], chunk: usize) -> Vec<f32> {
    use rayon::prelude::*;
    assert!(
        handles_weight_gradient(g),
        "direct weight gradient: unsupported geometry or CPU"
    );
    let l = Layout::new(g);
    // Output channels rounded up to the tile's two (the extra row of the grid stays zero).
    let (x_len, dy_len) = (l.padded_len(g), g.out_channels.next_multiple_of(2) * l.grid);
    let group = (GROUP_BYTES / (4 * (x_len + dy_len))).clamp(1, chunk);
    let size = g.out_channels * g.in_channels * 9;
    let partials: Vec<Vec<f32>> = x
        .par_chunks(chunk * g.in_len())
        .zip(dy.par_chunks(chunk * g.out_len()))
        .map_init(
            // Zeroed once: padding, dropped grid columns and slack are never written.
            || (vec![0.0; group * x_len], vec![0.0; group * dy_len]),
            |(padded, gridded), (xs, dys)| {
                let mut dw = vec![0.0; size];
                for (xg, dyg) in xs
                    .chunks(group * g.in_len())
                    .zip(dys.chunks(group * g.out_len()))
                {
                    let images = xg.len() / g.in_len();
                    for (i, (xi, dyi)) in xg
                        .chunks(g.in_len())
                        .zip(dyg.chunks(g.out_len()))
                        .enumerate()
                    {
                        l.pad(g, xi, &mut padded[i * x_len..][..x_len]);
                        l.lay_on_grid(g, dyi, &mut gridded[i * dy_len..][..dy_len]);
                    }
                    let group = GradientGroup {
                        padded: &padded[..images * x_len],
                        gridded: &gridded[..images * dy_len],
                        images,
                        x_len,
                        dy_len,
                    };
                    // SAFETY: AVX-512F and VL are present (`handles`).
                    unsafe { group.accumulate(g, &l, &mut dw) };
                }
                dw
            },
        )
        .collect();
    super::sum_in_order(&partials, size)
}

/// A group of images prepared for the weight gradient: padded inputs `x_len` floats apart and
/// gridded output gradients `dy_len` floats apart.
struct GradientGroup<'a> {
    padded: &'a [f32],
    gridded: &'a [f32],
    images: usize,
    x_len: usize,
    dy_len: usize,
}

impl GradientGroup<'_> {
    /// Adds this group's `dW` to `dw` (`[out, in, 3, 3]`).
    ///
    /// # Safety
    /// AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl")]
    unsafe fn accumulate(&self, g: &ConvGeometry, l: &Layout, dw: &mut [f32]) {
        let taps: [usize; 9] = l.taps(g).try_into().expect("a 3×3 kernel has nine taps");
        let (out, cin) = (g.out_channels, g.in_channels);
        assert!(
            self.images > 0
                && self.padded.len() >= (self.images - 1) * self.x_len + l.padded_len(g)
                && self.gridded.len() >= self.images * self.dy_len
                && self.dy_len >= out.next_multiple_of(2) * l.grid
                && dw.len() >= out * cin * 9,
            "direct weight gradient: buffer lengths"
        );
        for c in 0..cin {
            for o in (0..out).step_by(2) {
                // SAFETY: every read is inside the asserted buffers: channel `c`'s plane plus
                // the farthest tap plus the grid stays inside `padded_len`, output channels
                // `o..o + 2` inside the gridded gradients (rounded up to even).
                let sums = unsafe { self.tile(c, o, l, &taps) };
                for (j, row) in sums.chunks_exact(9).enumerate().take(out - o) {
                    let dst = &mut dw[((o + j) * cin + c) * 9..][..9];
                    dst.iter_mut().zip(row).for_each(|(d, s)| *d += s);
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn accumulate(&self, _: &ConvGeometry, _: &Layout, _: &mut [f32]) {
        unreachable!("direct convolution needs x86-64 AVX-512 (checked by `handles`)")
    }

    /// `Σ_images Σ_g dY[o + j, g] · X′[c, g + taps[t]]` for `j < 2`, `t < 9`, as `[j·9 + t]`.
    ///
    /// # Safety
    /// AVX-512F; the reads stay inside the buffers (see [`GradientGroup::accumulate`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl")]
    unsafe fn tile(&self, c: usize, o: usize, l: &Layout, taps: &[usize; 9]) -> [f32; 18] {
        use std::arch::x86_64::*;
        // One flat array indexed by constants once the tap loop is unrolled: LLVM keeps it in
        // 18 registers (a nested `[[_; 9]; 2]` was spilled to the stack).
        let mut acc = [_mm512_setzero_ps(); 18];
        for i in 0..self.images {
            // SAFETY (all pointer arithmetic below): within the buffers, per the contract.
            let xc = unsafe { self.padded.as_ptr().add(i * self.x_len + c * l.plane) };
            let dyo = unsafe { self.gridded.as_ptr().add(i * self.dy_len + o * l.grid) };
            for v in (0..l.grid).step_by(LANES) {
                let d0 = unsafe { _mm512_loadu_ps(dyo.add(v)) };
                let d1 = unsafe { _mm512_loadu_ps(dyo.add(l.grid + v)) };
                for t in 0..9 {
                    let xv = unsafe { _mm512_loadu_ps(xc.add(taps[t] + v)) };
                    acc[t] = _mm512_fmadd_ps(d0, xv, acc[t]);
                    acc[9 + t] = _mm512_fmadd_ps(d1, xv, acc[9 + t]);
                }
            }
        }
        let mut sums = [0.0; 18];
        for (s, a) in sums.iter_mut().zip(&acc) {
            *s = _mm512_reduce_add_ps(*a);
        }
        sums
    }
}
