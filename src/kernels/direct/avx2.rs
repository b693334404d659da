//! The direct kernel's AVX2 tiles (AVX2 + FMA; 8 lanes, 16 registers).
//! - A forward tile holds 6 or 5 output channels (4 or 2 at the end, see [`tile_channels`]) × 2
//!   vectors of 8 output positions: 12 accumulators, 2 input vectors and the broadcast weight.
//!   The vectors lie in output rows when the width is a multiple of 8 (ResNet's 32, 16, 8),
//!   else on the grid ([`super::Positions`]).
//!   The FMA latency (4 cycles × 2 units on Zen 3) needs at least 8 chains in flight; 4 channels
//!   × 3 vectors needed 17 registers, and LLVM spilled.
//! - A stride-1 weight-gradient tile ([`chain_tile`]) holds 8 output channels × 1 input
//!   channel × 9 taps: 9 chains, one output-gradient vector and one broadcast input pixel per
//!   position (10 loads per 9 FMAs, none straddling cache lines).
//! - A stride-2 weight-gradient tile takes one kernel row and one half of the 16 lane sums at a time:
//!   4 output channels × 3 taps (12 accumulators, [`gradient_tile_pair`]), the kernel row's 3
//!   input vectors held while 4 output-gradient vectors stream past: 7 loads per 12 FMAs, in
//!   exactly 16 registers. Loads, not FMAs, bound this kernel on Zen 3 (two 256-bit loads per
//!   cycle, and the taps' loads straddle cache lines); 2 channels × 3 taps × both halves
//!   ([`gradient_tile`], kept for the last two channels when the pairs of channels are odd in
//!   number) needs 10 loads per 12 FMAs.
//!
//! The sum order is the one [`super`] defines, so these tiles give the AVX-512 tiles' bits.

use std::arch::x86_64::*;

use super::chains::Chains;
use super::{AVX2_WIDTH, GradientGroup, LANES, Layout, Positions, TILE_SUMS, Tile};

/// Floats per vector.
const WIDTH: usize = AVX2_WIDTH;
/// Vectors of output positions per forward tile.
const VECTORS: usize = 2;
/// The forward tile, as `bench --cpu` names it.
pub(super) const FORWARD_TILE: &str = "6 or 5 channels (4 or 2 at the end) × 2 vectors of 8 \
     positions (in output rows when the width is a multiple of 8, else on the grid)";

/// `dst[..src.len()] = src` with vector moves (and scalar ones for the tail), four, two, then
/// one vector at a time in straight-line code: written as a loop of vector moves, LLVM turned
/// it into a `memcpy` call, which costs more than these rows of 8–32 floats.
///
/// # Safety
/// AVX2; `dst` valid for `src.len()` writes.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn copy_row(src: &[f32], dst: *mut f32) {
    let mut i = 0;
    while i + 4 * WIDTH <= src.len() {
        // SAFETY: `i + 32 ≤ src.len()`, inside both buffers.
        unsafe { copy_vectors::<4>(src.as_ptr().add(i), dst.add(i)) };
        i += 4 * WIDTH;
    }
    if i + 2 * WIDTH <= src.len() {
        // SAFETY: as above, 16 floats.
        unsafe { copy_vectors::<2>(src.as_ptr().add(i), dst.add(i)) };
        i += 2 * WIDTH;
    }
    if i + WIDTH <= src.len() {
        // SAFETY: as above, 8 floats.
        unsafe { copy_vectors::<1>(src.as_ptr().add(i), dst.add(i)) };
        i += WIDTH;
    }
    for (k, v) in src.iter().enumerate().skip(i) {
        // SAFETY: `k < src.len()`.
        unsafe { dst.add(k).write(*v) };
    }
}

/// `N` vectors from `src` to `dst`: all loaded, then all stored.
///
/// # Safety
/// AVX2; both pointers valid for `8·N` floats.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn copy_vectors<const N: usize>(src: *const f32, dst: *mut f32) {
    let v: [__m256; N] = std::array::from_fn(|k| unsafe { _mm256_loadu_ps(src.add(k * WIDTH)) });
    for (k, v) in v.iter().enumerate() {
        unsafe { _mm256_storeu_ps(dst.add(k * WIDTH), *v) };
    }
}

/// Output channels of the next forward tile when `left` remain: tiles of 6 and 5 (12 and 10
/// accumulators) wherever they cover the rest exactly (16 = 6 + 5 + 5, 32 = 6 + 6 + 5·4,
/// 64 = 6·9 + 5·2), else 4, else the even count covering what is left. Fewer than 8
/// accumulators cannot hide the FMA latency (4 cycles × 2 units). The tile reaches at most one
/// channel past the real ones (when `left` is odd and below 4), inside the packed weights' zero
/// padding: `out_padded` is a multiple of 8.
fn tile_channels(left: usize) -> usize {
    // Whether `n` is a sum of 5s and 6s (or zero): n = 5a + 6b with b = n mod 5.
    let exact = |n: usize| n % 5 * 6 <= n;
    if left >= 6 && exact(left - 6) {
        6
    } else if left >= 5 && exact(left - 5) {
        5
    } else if left >= 4 {
        4
    } else {
        left.next_multiple_of(2)
    }
}

/// All register tiles of one image: for each pair of vectors of output positions
/// ([`Tile::vector`]; an odd last one is paired with itself, its stores written twice), every
/// tile of output channels ([`tile_channels`]); the input strip stays in L1 across them.
///
/// # Safety
/// AVX2 and FMA; `tile`'s buffers as [`super::forward_image`] asserts them.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn run_tiles(tile: &Tile) {
    let vectors = tile.vectors(WIDTH);
    assert!(
        tile.positions != Positions::Pairs,
        "direct convolution: pairs of rows are AVX-512's"
    );
    assert!(
        tile.positions == Positions::Rows || vectors.is_multiple_of(VECTORS),
        "direct convolution: the grid is a multiple of 16 (pairs of vectors)"
    );
    for k in (0..vectors).step_by(VECTORS) {
        let pair = [
            tile.vector(k, WIDTH),
            tile.vector((k + 1).min(vectors - 1), WIDTH),
        ];
        let (inputs, outputs) = (pair.map(|p| p.0), pair.map(|p| p.1));
        let mut o = 0;
        while o < tile.out_channels {
            let channels = tile_channels(tile.out_channels - o);
            // SAFETY: `o + channels ≤ out_padded` (see `tile_channels`); the vectors lie in the
            // image (`Tile::vector`).
            unsafe {
                match channels {
                    6 => forward_tile::<6>(tile, inputs, outputs, o),
                    5 => forward_tile::<5>(tile, inputs, outputs, o),
                    4 => forward_tile::<4>(tile, inputs, outputs, o),
                    _ => forward_tile::<2>(tile, inputs, outputs, o),
                }
            }
            o += channels;
        }
    }
}

/// Output channels `o + j`, `j < CH` (those below `out_channels`), at the 8 positions of each of
/// two vectors, vector `v` starting at `inputs[v]` in the padded input planes and at
/// `outputs[v]` in the output channels: `Σ_{c, t} w[c, t, o + j] · input[c, inputs[v] +
/// taps[t] ..]`, one FMA per term in `(c, t)` order.
///
/// # Safety
/// As [`run_tiles`].
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_tile<const CH: usize>(
    tile: &Tile,
    inputs: [usize; VECTORS],
    outputs: [usize; VECTORS],
    o: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); VECTORS]; CH];
    // One tap: `src[v]` its inputs for vector `v`, `wt` its weights for channels `o..`.
    let mut tap = |src: [*const f32; VECTORS], wt: *const f32| {
        // SAFETY (both pointers): within the buffers, per the contract.
        let xs: [__m256; VECTORS] = src.map(|p| unsafe { _mm256_loadu_ps(p) });
        for (j, row) in acc.iter_mut().enumerate() {
            let b = unsafe { _mm256_broadcast_ss(&*wt.add(j)) };
            for (a, xv) in row.iter_mut().zip(&xs) {
                *a = _mm256_fmadd_ps(*xv, b, *a);
            }
        }
    };
    let (taps, out_padded) = (tile.taps.len(), tile.out_padded);
    // 3×3 on one padded plane (ResNet's stride 1): the nine taps' addresses from the row
    // length, unrolled (no offset table read per tap): 32→32 channels at 16×16, 1 thread,
    // 2.13 → 1.98 ms per 32 images (`examples/kernel_times 32 1`, fastest of six runs, Zen 3).
    let three = tile.square_3x3;
    for c in 0..tile.channels {
        // SAFETY (all pointer arithmetic below): within the buffers, per the contract.
        let base = inputs.map(|i| unsafe { tile.input.add(c * tile.plane + i) });
        let wc = unsafe { tile.weights.add(c * taps * out_padded + o) };
        if three {
            for ki in 0..3 {
                let row = base.map(|b| unsafe { b.add(ki * tile.row) });
                for kj in 0..3 {
                    unsafe { tap(row.map(|r| r.add(kj)), wc.add((ki * 3 + kj) * out_padded)) };
                }
            }
        } else {
            for (t, &offset) in tile.taps.iter().enumerate() {
                unsafe { tap(base.map(|b| b.add(offset)), wc.add(t * out_padded)) };
            }
        }
    }
    let stored = CH.min(tile.out_channels - o);
    for (j, row) in acc.iter().enumerate().take(stored) {
        for (a, &out) in row.iter().zip(&outputs) {
            // SAFETY: channel `o + j < out_channels` and the vector's 8 positions lie inside
            // the output (`Tile::vector`).
            unsafe { _mm256_storeu_ps(tile.output.add((o + j) * tile.out_stride + out), *a) };
        }
    }
}

/// Adds one group's terms to the lane sums of tile `(o/2, c)`, in the order the AVX-512 tiles use: for
/// `j < 2`, `t < 9`, lane `l` of `lanes[(j·9 + t)·16 ..]` gains `dY[o + j, g] · X′[c, g + taps[t]]`
/// for every image and grid position `g ≡ l (mod 16)`, in image-then-position order. The
/// sixteen lanes are two vectors (`l < 8`, `l ≥ 8`), and the kernel's three rows are three
/// sweeps over the group.
///
/// # Safety
/// AVX2 and FMA; the reads stay inside the buffers (see [`GradientGroup::accumulate`]).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn gradient_tile(
    group: &GradientGroup,
    c: usize,
    o: usize,
    l: &Layout,
    taps: &[usize; 9],
    lanes: &mut [f32; TILE_SUMS],
) {
    for ki in 0..3 {
        // Accumulator `(j·3 + tt)·2 + h`: output channel `o + j`, tap `3·ki + tt`, half `h`.
        let slot = |k: usize| {
            let (j, tt, h) = (k / 6, k / 2 % 3, k % 2);
            (j * 9 + ki * 3 + tt) * LANES + h * WIDTH
        };
        // One flat array indexed by constants once the loops are unrolled (kept in registers).
        let mut acc: [__m256; 12] =
            std::array::from_fn(|k| unsafe { _mm256_loadu_ps(lanes.as_ptr().add(slot(k))) });
        let row_taps = [taps[ki * 3], taps[ki * 3 + 1], taps[ki * 3 + 2]];
        for i in 0..group.images {
            // SAFETY (all pointer arithmetic below): within the buffers, per the contract.
            let xc = unsafe { group.padded.as_ptr().add(i * group.x_len + c * l.plane) };
            let dyo = unsafe {
                group
                    .gridded
                    .as_ptr()
                    .add(i * group.dy_len + o * group.dy_plane)
            };
            for v in (0..l.grid).step_by(LANES) {
                let d: [__m256; 4] = std::array::from_fn(|k| unsafe {
                    _mm256_loadu_ps(dyo.add((k / 2) * group.dy_plane + v + (k % 2) * WIDTH))
                });
                for (tt, &tap) in row_taps.iter().enumerate() {
                    for h in 0..2 {
                        let xv = unsafe { _mm256_loadu_ps(xc.add(tap + v + h * WIDTH)) };
                        for j in 0..2 {
                            let k = (j * 3 + tt) * 2 + h;
                            acc[k] = _mm256_fmadd_ps(d[j * 2 + h], xv, acc[k]);
                        }
                    }
                }
            }
        }
        for (k, a) in acc.iter().enumerate() {
            // SAFETY: `slot(k) + 8 ≤ TILE_SUMS`.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr().add(slot(k)), *a) };
        }
    }
}

/// [`gradient_tile`] for two tiles at once, `(o/2, c)` into `lanes[0]` and `(o/2 + 1, c)` into
/// `lanes[1]` (output channels `o .. o + 4`), one half of the sixteen lanes at a time: per 8
/// grid positions, 3 input vectors (one per tap of the kernel row) stay in registers while the
/// 4 output-gradient vectors stream past them, 12 fused multiply-adds for 7 loads (the
/// two-channel tile loads 10 for its 12), in exactly 16 registers. Each lane still takes its
/// positions in image-then-position order, so the sums are [`gradient_tile`]'s.
///
/// # Safety
/// As [`gradient_tile`], with output channels `o .. o + 4` inside the gridded gradients.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn gradient_tile_pair(
    group: &GradientGroup,
    c: usize,
    o: usize,
    l: &Layout,
    taps: &[usize; 9],
    lanes: [&mut [f32; TILE_SUMS]; 2],
) {
    for ki in 0..3 {
        for h in 0..2 {
            // Accumulator `j·3 + tt`: output channel `o + j`, tap `3·ki + tt`, half `h`, in
            // tile `j / 2` at slot `slot(j, tt)`.
            let slot = |j: usize, tt: usize| ((j % 2) * 9 + ki * 3 + tt) * LANES + h * WIDTH;
            let mut acc: [__m256; 12] = std::array::from_fn(|k| {
                let (j, tt) = (k / 3, k % 3);
                unsafe { _mm256_loadu_ps(lanes[j / 2].as_ptr().add(slot(j, tt))) }
            });
            let row_taps = [taps[ki * 3], taps[ki * 3 + 1], taps[ki * 3 + 2]];
            for i in 0..group.images {
                // SAFETY (all pointer arithmetic below): within the buffers, per the contract.
                let xc = unsafe { group.padded.as_ptr().add(i * group.x_len + c * l.plane) };
                let dyo = unsafe {
                    group
                        .gridded
                        .as_ptr()
                        .add(i * group.dy_len + o * group.dy_plane)
                };
                for v in (h * WIDTH..l.grid).step_by(LANES) {
                    let xs: [__m256; 3] = std::array::from_fn(|tt| unsafe {
                        _mm256_loadu_ps(xc.add(row_taps[tt] + v))
                    });
                    for j in 0..4 {
                        let d = unsafe { _mm256_loadu_ps(dyo.add(j * group.dy_plane + v)) };
                        for (tt, xv) in xs.iter().enumerate() {
                            acc[j * 3 + tt] = _mm256_fmadd_ps(d, *xv, acc[j * 3 + tt]);
                        }
                    }
                }
            }
            for (k, a) in acc.iter().enumerate() {
                let (j, tt) = (k / 3, k % 3);
                // SAFETY: `slot(j, tt) + 8 ≤ TILE_SUMS`.
                unsafe { _mm256_storeu_ps(lanes[j / 2].as_mut_ptr().add(slot(j, tt)), *a) };
            }
        }
    }
}

/// The stride-1 weight-gradient tile, as `bench --cpu` names it.
pub(super) const CHAIN_TILE: &str = "8 output channels × 1 input channel × 9 taps";

/// All chain tiles of one image ([`super::chains`]): for each vector of 8 output channels,
/// each input channel: one tile of 9 chains (9 accumulators, as many as the FMA latency needs)
/// swept over every position.
///
/// # Safety
/// AVX2 and FMA; `chains`' buffers as [`super::chains`] asserts them.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn chain_tiles(chains: &mut Chains) {
    for o in (0..chains.out_padded).step_by(WIDTH) {
        for c in 0..chains.in_channels {
            // SAFETY: channel `c < in`, outputs `o .. o + 8 ≤ out_padded`.
            unsafe { chain_tile(chains, o, c) };
        }
    }
}

/// The chains of output channels `o .. o + 8` × input channel `c` × the nine taps over one
/// image, in the order of the AVX-512 tile (one chain per band of rows, each from zero, one
/// fused multiply-add per term, positions in row-major order; then added to the sums).
///
/// # Safety
/// As [`chain_tiles`]; `c < in`, `o + 8 ≤ out_padded`.
#[target_feature(enable = "avx2,fma")]
unsafe fn chain_tile(chains: &mut Chains, o: usize, c: usize) {
    let (plane, row, width, ld) = (chains.plane, chains.row, chains.width, chains.out_padded);
    // SAFETY (all pointer arithmetic below): within the buffers, per the contract.
    let sums = unsafe { chains.sums.as_mut_ptr().add(c * 9 * ld + o) };
    for band in (0..chains.height).step_by(chains.band_rows) {
        let mut acc = [_mm256_setzero_ps(); 9];
        for r in band..(band + chains.band_rows).min(chains.height) {
            let x0 = unsafe { chains.padded.as_ptr().add(c * plane + r * row) };
            let d0 = unsafe { chains.transposed.as_ptr().add(r * width * ld + o) };
            for col in 0..width {
                let d = unsafe { _mm256_loadu_ps(d0.add(col * ld)) };
                let xc = unsafe { x0.add(col) };
                for ki in 0..3 {
                    let xr = unsafe { xc.add(ki * row) };
                    for kj in 0..3 {
                        let b = unsafe { _mm256_broadcast_ss(&*xr.add(kj)) };
                        acc[ki * 3 + kj] = _mm256_fmadd_ps(d, b, acc[ki * 3 + kj]);
                    }
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            let at = unsafe { sums.add(t * ld) };
            unsafe { _mm256_storeu_ps(at, _mm256_add_ps(_mm256_loadu_ps(at), *a)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tile_channels;

    /// The tile sizes [`tile_channels`] walks `out` channels with.
    fn tiles(out: usize) -> Vec<usize> {
        let (mut o, mut sizes) = (0, vec![]);
        while o < out {
            sizes.push(tile_channels(out - o));
            o += sizes[sizes.len() - 1];
        }
        sizes
    }

    #[test]
    fn tiles_cover_the_channels_with_at_most_one_padded() {
        for out in 1..=130 {
            let sizes = tiles(out);
            let o: usize = sizes.iter().sum();
            let padded = out.div_ceil(super::super::OUT_BLOCK) * super::super::OUT_BLOCK;
            assert!(o <= out + 1 && o <= padded, "{out}: {sizes:?}");
            assert!(o == out || out % 2 == 1, "{out}: {sizes:?}");
        }
        assert_eq!(tiles(16), [6, 5, 5]);
        assert_eq!(tiles(32), [6, 6, 5, 5, 5, 5]);
        assert!(tiles(64).iter().all(|&c| c >= 5));
    }
}
