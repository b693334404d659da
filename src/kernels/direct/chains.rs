//! The weight gradient of stride-1 3×3 convolutions as one fused multiply-add chain per weight,
//! vectors over output channels: `dW[o, c, t] = Σ_p dY[o, p] · X′[c, p + t]`, the output
//! gradient transposed to `[positions, out]` so that one vector holds 16 (AVX-512) or 8 (AVX2)
//! output channels at one position, multiplied by one input pixel broadcast. Like a GEMM
//! microkernel, a tile holds 27 (AVX-512: one vector of output channels × 3 input channels ×
//! 9 taps) or 9 (AVX2) accumulators and, per position, loads one output-gradient vector and
//! broadcasts the tile's input pixels from the padded planes — no load straddles a cache line,
//! and only the image's real positions are visited (no dropped grid columns).
//!
//! Sum order, the same on every instruction set and thread count: per image and *band* of
//! [`band_rows`] rows (about 128 positions), each weight is one chain from zero over the band's
//! positions in row-major order; the bands' chains are added to their chunk's sum in order
//! (images in order, chunks of `REDUCTION_CHUNK` images, from zero), and the chunks' sums
//! added in order. Short chains keep the rounding of a long reduction small: one chain per
//! image (1024 positions) was 2.5·10⁻⁴ off the exact sum on a test where im2col + GEMM was
//! 4·10⁻⁵ off.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::super::buffer::{LineAligned, add_onto};
use super::super::output_gradient::OutputGradient;
use super::{ConvGeometry, Isa, Kind, Layout, PackedWeights, Plane, Source, convolve, fits};
#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};

/// Output channels per vector of the output gradient's transposed rows: AVX-512's width (AVX2
/// takes each row as two vectors of 8). Rows are padded to it, so every row starts a cache line.
pub(super) const OUT_VECTOR: usize = 16;

/// Positions per chain, about: a band is this many positions' worth of whole rows.
const BAND_POSITIONS: usize = 128;

/// Rows per band of an image `width` wide (at least one).
pub(super) fn band_rows(width: usize) -> usize {
    (BAND_POSITIONS / width.max(1)).max(1)
}

/// Whether [`weight_gradient`] handles `g`: 3×3, stride 1, padding 1.
pub fn handles(g: &ConvGeometry) -> bool {
    fits(g) && g.stride == 1 && g.kernel == 3 && g.out_channels > 0
}

/// Sizes of the buffers of one image.
struct Sizes {
    /// Output channels rounded up to [`OUT_VECTOR`]: floats per transposed row.
    out_padded: usize,
    /// Floats of the transposed output gradient, `h·w` rows.
    transposed: usize,
    /// Floats of the chain sums, `[in, 9, out_padded]`.
    sums: usize,
}

impl Sizes {
    fn new(g: &ConvGeometry) -> Self {
        let out_padded = g.out_channels.next_multiple_of(OUT_VECTOR);
        Self {
            out_padded,
            transposed: g.height * g.width * out_padded,
            sums: g.in_channels * 9 * out_padded,
        }
    }
}

/// What a chain tile reads and adds to: one image's padded input planes and transposed output
/// gradient, and the chunk's chain sums.
pub(super) struct Chains<'a> {
    /// Padded input planes ([`Layout::new`]), `plane` floats apart, rows `row` floats long.
    pub(super) padded: &'a [f32],
    pub(super) plane: usize,
    pub(super) row: usize,
    /// The output gradient, `[h·w, out_padded]`.
    pub(super) transposed: &'a [f32],
    pub(super) out_padded: usize,
    pub(super) height: usize,
    pub(super) width: usize,
    /// Rows per chain ([`band_rows`]).
    pub(super) band_rows: usize,
    /// Chain sums `[in, 9, out_padded]`: weight `(o, c, t)` at `(c·9 + t)·out_padded + o`.
    pub(super) sums: &'a mut [f32],
    pub(super) in_channels: usize,
}

/// Adds one image's terms to the chain sums, on the tiles of `isa`.
fn add_image(isa: Isa, chains: &mut Chains) {
    assert!(
        chains.height >= 1
            && chains.width >= 1
            && chains.band_rows >= 1
            && chains.row >= chains.width + 2
            && chains.padded.len()
                >= (chains.in_channels - 1) * chains.plane
                    + (chains.height + 1) * chains.row
                    + chains.width
                    + 2
            && chains.transposed.len() >= chains.height * chains.width * chains.out_padded
            && chains.out_padded.is_multiple_of(OUT_VECTOR)
            && chains.sums.len() >= chains.in_channels * 9 * chains.out_padded,
        "chain weight gradient: buffer lengths"
    );
    // SAFETY: the CPU has `isa` (an `Isa` exists only then); the tiles read the padded planes
    // up to the last channel's pixel `(height + 1, width + 1)` and the transposed rows within
    // `height·width·out_padded`, and add to sums within `in·9·out_padded` (asserted above).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match isa.0 {
            Kind::Avx512 => avx512::chain_tiles(chains),
            Kind::Avx2 => avx2::chain_tiles(chains),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, chains);
        unreachable!("an Isa exists only on x86-64");
    }
}

/// `dst[p, o] = src[o, p]` for an output gradient `[out, positions]` (rows `out_padded` long;
/// the padding lanes are left as they are, zero): 16 × 16 blocks in registers on AVX-512 where
/// both counts are multiples of 16, else element by element.
fn transpose(isa: Isa, src: &[f32], out: usize, out_padded: usize, dst: &mut [f32]) {
    let positions = src.len() / out;
    const BLOCK: usize = 16;
    assert!(
        src.len() == out * positions && dst.len() >= positions * out_padded && out <= out_padded,
        "transpose: lengths"
    );
    #[cfg(target_arch = "x86_64")]
    if isa.0 == Kind::Avx512 && out.is_multiple_of(BLOCK) && positions.is_multiple_of(BLOCK) {
        for o in (0..out).step_by(BLOCK) {
            for p in (0..positions).step_by(BLOCK) {
                // SAFETY: the CPU has AVX-512; the block's rows lie inside both buffers
                // (lengths asserted above).
                unsafe {
                    avx512::transpose_16x16(
                        src.as_ptr().add(o * positions + p),
                        positions,
                        dst.as_mut_ptr().add(p * out_padded + o),
                        out_padded,
                    )
                };
            }
        }
        return;
    }
    let _ = isa;
    for p0 in (0..positions).step_by(BLOCK) {
        let p1 = (p0 + BLOCK).min(positions);
        for o in 0..out {
            let column = &src[o * positions..][p0..p1];
            for (k, &v) in column.iter().enumerate() {
                dst[(p0 + k) * out_padded + o] = v;
            }
        }
    }
}

/// `dW` (`[out, in, 3, 3]`) of a stride-1 3×3 convolution in the module's sum order, and with
/// `input` the input gradient, computed image by image while the image's output gradient is in
/// cache (see [`InputSide`]).
///
/// # Shapes
/// - `x`: `[batch, in, h, w]`; `dy`: `[batch, out, h, w]`
/// - returns `[out, in, 3, 3]`
pub(super) fn sweep(
    isa: Isa,
    g: &ConvGeometry,
    x: &[f32],
    dy: &OutputGradient<'_>,
    chunk: usize,
    input: Option<InputSide>,
) -> Vec<f32> {
    assert!(
        handles(g),
        "chain weight gradient: unsupported geometry {g:?}"
    );
    assert!(
        x.len() == g.batch * g.in_len() && dy.len() == g.batch * g.out_len() && chunk >= 1,
        "chain weight gradient: input lengths"
    );
    let l = Layout::new(g);
    let sizes = Sizes::new(g);
    let (out, cin) = (g.out_channels, g.in_channels);
    let chunks = g.batch.div_ceil(chunk);
    // The input-gradient side: the adjoint's layout (the forward tiles' own for `isa`), and
    // each chunk's run of the input gradient.
    let adjoint = ConvGeometry {
        in_channels: out,
        out_channels: cin,
        ..*g
    };
    let dl = Layout::forward(isa, &adjoint);
    let taps = dl.taps(&adjoint);
    let (weights, plus, dx_chunks) = match input {
        Some(InputSide { weights, plus, dx }) => {
            assert_eq!(dx.len(), g.batch * g.in_len(), "direct backward: dx length");
            let runs: Vec<_> = dx.chunks_mut(chunk * g.in_len()).map(Some).collect();
            (Some(weights), plus, runs)
        }
        None => (None, None, (0..chunks).map(|_| None).collect()),
    };
    let partials: Vec<Vec<f32>> = x
        .par_chunks(chunk * g.in_len())
        .zip(dx_chunks)
        .enumerate()
        .map_init(
            // Zeroed once: padding is never written (nor the transposed rows' padding lanes).
            || {
                (
                    vec![0.0; l.padded_len(g)],
                    LineAligned::zeroed(sizes.transposed),
                    LineAligned::zeroed(sizes.sums),
                    vec![
                        0.0;
                        if weights.is_some() {
                            dl.padded_len(&adjoint)
                        } else {
                            0
                        }
                    ],
                    Vec::new(),
                    dy.scratch(g.out_len()),
                )
            },
            |(padded, transposed, sums, padded_dy, out_grid, dy_scratch), (k, (xs, mut dxs))| {
                sums.fill(0.0);
                for (n, xi) in xs.chunks(g.in_len()).enumerate() {
                    let dyi = dy.image(k * chunk + n, g.out_len(), dy_scratch);
                    l.pad(isa, g, xi, padded);
                    transpose(isa, dyi, out, sizes.out_padded, transposed);
                    add_image(
                        isa,
                        &mut Chains {
                            padded,
                            plane: l.plane,
                            row: l.row,
                            transposed,
                            out_padded: sizes.out_padded,
                            height: g.height,
                            width: g.width,
                            band_rows: band_rows(g.width),
                            sums,
                            in_channels: cin,
                        },
                    );
                    if let (Some(weights), Some(dxs)) = (weights, dxs.as_deref_mut()) {
                        dl.pad(isa, &adjoint, dyi, padded_dy);
                        let source = Source {
                            input: padded_dy,
                            plane: dl.plane,
                            channels: out,
                            taps: &taps,
                            square_3x3: true,
                            weights,
                            row: dl.row,
                            grid: dl.grid,
                            paired: dl.paired,
                        };
                        let dxi = &mut dxs[n * g.in_len()..][..g.in_len()];
                        let shape = Plane {
                            channels: cin,
                            height: g.height,
                            width: g.width,
                        };
                        convolve(isa, &source, shape, out_grid, dxi);
                        if let Some(p) = plus {
                            let image = k * chunk + n;
                            // SAFETY: `convolve` wrote all of `dxi`.
                            unsafe { add_onto(dxi, &p[image * g.in_len()..][..g.in_len()]) };
                        }
                    }
                }
                // dW[o, c, t] = sums[(c·9 + t)·out_padded + o]
                let mut dw = vec![0.0; out * cin * 9];
                for o in 0..out {
                    for ct in 0..cin * 9 {
                        dw[o * cin * 9 + ct] = sums[ct * sizes.out_padded + o];
                    }
                }
                dw
            },
        )
        .collect();
    super::super::sum_in_order(&partials, out * cin * 9)
}

/// The input-gradient side of a [`sweep`]: the adjoint's packed weights (flipped, in and out
/// swapped), the other consumer's gradient to add, and where the input gradient goes
/// (`[batch, in, h, w]`, all written).
pub(super) struct InputSide<'a> {
    pub(super) weights: &'a PackedWeights,
    pub(super) plus: Option<&'a [f32]>,
    pub(super) dx: &'a mut [MaybeUninit<f32>],
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::values;

    #[test]
    fn transposes_on_every_instruction_set() {
        for (out, positions) in [(16, 64), (32, 1024), (5, 7), (16, 9), (64, 64)] {
            let src = values(out * positions, 1);
            let out_padded = out.next_multiple_of(OUT_VECTOR);
            let mut want = vec![0.0; positions * out_padded];
            for o in 0..out {
                for p in 0..positions {
                    want[p * out_padded + o] = src[o * positions + p];
                }
            }
            for isa in Isa::available() {
                let mut got = vec![0.0; positions * out_padded];
                transpose(isa, &src, out, out_padded, &mut got);
                assert_eq!(got, want, "{isa:?}, {out} × {positions}");
            }
        }
    }
}
